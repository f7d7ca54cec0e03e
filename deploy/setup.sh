#!/usr/bin/env bash
# meshlane set-up: installs everything the build, the demo and the tests need on a fresh Debian
# bookworm machine, as root. Idempotent: every step checks before it acts, so a second run is quick.
#
# What it installs and why:
#   - Debian: llvm-22-dev (bpf-linker links the eBPF crate with it), iproute2 + iptables (the lab and
#     the iptables baseline), iperf3/sockperf/wrk (workloads), nginx/haproxy (real servers, real
#     sidecar), bpftool (independent evidence of what is attached), containernetworking-plugins.
#   - rust-src for the nightly toolchain (aya-build builds the eBPF crate with -Z build-std=core).
#   - bpf-linker 0.13 with its llvm-22 feature.
#   - oha 1.x from crates.io: the fixed-rate HTTP load generator of the benchmark suite.
#   - bpffs at /sys/fs/bpf if nothing is mounted there.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "[setup] must run as root (it installs packages and mounts bpffs)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
PKGS=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev iproute2 iptables iperf3 sockperf wrk nginx-light haproxy bpftool
      containernetworking-plugins procps psmisc curl)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # nginx and haproxy are started by their packages' scripts; the lab runs its own instances.
  for svc in nginx haproxy; do
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
    service "$svc" stop >/dev/null 2>&1 || true
  done
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
  echo "[setup] cargo not found: this project needs a rustup toolchain (stable + nightly)" >&2
  exit 1
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

if ! bpf-linker --version 2>/dev/null | grep -q '0\.13'; then
  log "building bpf-linker 0.13 against llvm-22 (about a minute)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version '^0.13' \
    --no-default-features --features llvm-22
fi

if ! oha --version 2>/dev/null | grep -q '^oha 1\.'; then
  log "building oha 1.x, the benchmarks' fixed-rate HTTP load generator (a few minutes)"
  cargo install --locked oha --version '^1.16'
fi

# bpffs: the agent mounts its own if needed, but bpftool and humans expect /sys/fs/bpf.
if ! awk '$9=="bpf"{f=1} END{exit !f}' /proc/self/mountinfo; then
  log "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

log "ready"
