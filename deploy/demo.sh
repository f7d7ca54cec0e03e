#!/usr/bin/env bash
# The meshlane demo: two pods on this node, the agent on the lab's own cgroup, sockperf and iperf3
# between the pods with the fast path off and on, and a side-by-side table. Needs root; removes
# everything it created.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-demo.sh
export PATH="$HOME/.cargo/bin:$PATH"
# Only what the demo runs: the agent, the lab's helper binaries, the demo itself.
cargo build --locked --release -p meshlane-agent -p meshlane-lab -p meshlane-perf --bins
exec "${CARGO_TARGET_DIR:-target}/release/meshlane-demo"
