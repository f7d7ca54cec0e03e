#!/usr/bin/env bash
# meshlane's benchmark suite, in the lab (root; everything it creates is removed at the end).
#   perf/run.sh            full run (about 40 minutes): results into perf/results/
#   perf/run.sh --quick    the regression gates only (under 3 minutes): results into ./target/perf-quick/
#                          (in the checkout, whatever CARGO_TARGET_DIR says)
# Any other meshlane-bench option may follow (see `meshlane-bench --help`). Exit status 3: a
# regression gate was missed.
set -euo pipefail
cd "$(dirname "$0")/.."
perf/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --locked --release --bins
exec "${CARGO_TARGET_DIR:-target}/release/meshlane-bench" "$@"
