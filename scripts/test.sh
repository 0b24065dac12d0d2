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
echo "== tests" >&2
# Node 20's test runner does not expand globs itself.
shopt -s nullglob
node --import tsx --test --test-concurrency=2 --test-timeout=900000 test/unit/*.test.ts test/guest/*.test.ts test/integration/*.test.ts
echo "suite wall time: $(( $(date +%s) - start )) s" >&2
