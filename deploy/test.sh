#!/usr/bin/env bash
# Runs the whole meshlane test suite: set-up, build, host unit tests, then the privileged lab
# tests (real kernel programs, real agent, pods as network namespaces). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-tests.sh
export PATH="$HOME/.cargo/bin:$PATH"
# The lab tests start the binaries next to the test executables (${CARGO_TARGET_DIR:-target}/debug).
cargo build --locked --bins
# The CLI (like the CNI plugin and the controller) talks to the agent through the API crate only:
# it must build without the eBPF toolchain, so nothing of aya may be in its dependency tree.
if cargo tree --locked -p meshlane-cli -e normal,build --prefix none | grep -E '^aya' >&2; then
  echo "meshlane-cli depends on aya (above): it must depend on meshlane-api only" >&2
  exit 1
fi
echo "meshlane-cli: no aya in its dependency tree"
# One test at a time: each builds its own lab, and timing checks (epoll wakeup < 100 ms, no
# request slower than 1 s) should not compete for the machine's two cores.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked -- --test-threads=1 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "meshlane: %d passed, %d failed, %d skipped\n", p, f, s }' \
  "${log}" | sed 's/;//g'
exit "$rc"
