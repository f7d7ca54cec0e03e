#!/usr/bin/env bash
# The meshlane demo: two pods on this node, the agent on the lab's own cgroup, sockperf and iperf3
# between the pods with the fast path off and on, and a side-by-side table. Needs root; removes
# everything it created.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --locked --release --bins
exec ./target/release/meshlane-demo
