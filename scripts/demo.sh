#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the demo: a guest with a mixed workload live-migrated on
# loopback without pruning, with free pages pruned and with free and cache pages pruned (each migration from a
# freshly booted guest), verified on the destination, with a table of what moved. Extra arguments go to `vmprune demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The Node flags of the installed `vmprune` (its shebang; src/cli/node-runtime.ts says why).
node --initial-old-space-size=128 dist/cli/main.js demo "$@"
