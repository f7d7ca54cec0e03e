#!/usr/bin/env bash
# Runs the whole meshlane test suite: set-up, build, host unit tests, then the privileged lab
# tests (real kernel programs, real agent, pods as network namespaces). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# The lab tests start the binaries next to the test executables (target/debug).
cargo build --locked --bins
# One test at a time: each builds its own lab, and timing checks (epoll wakeup < 100 ms, no
# request slower than 1 s) should not compete for the machine's two cores.
cargo test --locked -- --test-threads=1
