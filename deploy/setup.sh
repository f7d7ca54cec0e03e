#!/usr/bin/env bash
# Everything: the set-ups of the demo, the tests and the benchmarks in turn (each idempotent,
# about a second when all is present). The commands that need a set-up run their own part:
# deploy/demo.sh → deploy/setup-demo.sh, deploy/test.sh → deploy/setup-tests.sh,
# perf/run.sh → perf/setup.sh. Debian bookworm, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-demo.sh
deploy/setup-tests.sh
perf/setup.sh
