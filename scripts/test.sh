#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite: lint, type check, unit tests, and the
# integration tests that boot real guests under real QEMU. Prints the suite's wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
echo "== lint and type check" >&2
npx --no-install biome check .
npx --no-install tsc -p tsconfig.json --noEmit
# What QEMU processes and guest RAM files exist besides the suite's (another VM on this host is not ours).
leftovers() {
  { ls -1 /dev/shm 2>/dev/null | grep '^vmprune-' || true; } | sed 's/^/file /'
  { pgrep -f 'mem-path=/dev/shm/vmprune-' || true; } | sed 's/^/qemu pid /'
}
before=$(leftovers | sort)
echo "== tests" >&2
# Node 20's test runner does not expand globs itself.
shopt -s nullglob
status=0
node --import tsx --test --test-concurrency=2 --test-timeout=900000 test/unit/*.test.ts test/guest/*.test.ts test/integration/*.test.ts || status=$?
echo "== leftovers: no QEMU process and no /dev/shm file may outlive the suite, passed or failed" >&2
left=$(comm -13 <(echo "$before") <(leftovers | sort))
if [[ -n "$left" ]]; then
  echo "the suite left behind:" >&2
  echo "$left" >&2
  status=1
fi
echo "suite wall time: $(( $(date +%s) - start )) s" >&2
exit "$status"
