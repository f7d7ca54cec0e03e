#!/usr/bin/env bash
# Set-up for the benchmark suite (perf/run.sh runs it): the build toolchain, the workloads and the
# load generators. Debian bookworm, as root; idempotent, about a second when everything is
# present (the first run builds oha: a few minutes).
#
#   build: see deploy/setup/lib.sh (C toolchain, LLVM 22, bpf-linker 0.13, nightly + rust-src)
#   iproute2     the lab (`ip netns`, veth, bridge, `ss`)
#   sockperf     ping-pong latency and throughput
#   iperf3       single-stream throughput
#   nginx-light  the HTTP server behind the mesh
#   haproxy      the sidecars
#   iptables     the baselines: Istio's REDIRECT rules, kube-proxy-style DNAT
#   wrk          HTTP at saturation
#   util-linux   taskset (pins the placements' processes to CPUs)
#   oha 1.x      HTTP at fixed rates with latency correction (crates.io)
#   containernetworking-plugins, cnitool v1.3.1 (Go module proxy): the lab's pods are made by a
#                real CNI chain (bridge + host-local + portmap + meshlane)
#   bpffs at /sys/fs/bpf
set -euo pipefail
SETUP_NAME=perf-setup
# shellcheck source=deploy/setup/lib.sh
. "$(dirname "$0")/../deploy/setup/lib.sh"
need_root
apt_install "${BUILD_PKGS[@]}" sockperf iperf3 nginx-light haproxy iptables wrk util-linux containernetworking-plugins
# The lab makes its pods with a real CNI runtime (cnitool, on libcni) and Debian's plugins.
go_install_cached cnitool github.com/containernetworking/cni/cnitool@v1.3.1
ensure_build_toolchain
ensure_cargo_tool oha '^oha 1\.' --version '^1.16'
ensure_bpffs
setup_done
