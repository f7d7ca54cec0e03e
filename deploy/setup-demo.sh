#!/usr/bin/env bash
# Set-up for the demo (deploy/demo.sh runs it): the build toolchain and exactly the programs
# meshlane-demo runs, nothing for the tests or the benchmarks. Debian bookworm, as root;
# idempotent, about a second when everything is present.
#
#   build: see deploy/setup/lib.sh (C toolchain, LLVM 22, bpf-linker 0.13, nightly + rust-src)
#   iproute2   the lab (`ip netns`, veth, bridge, `ss`) and the pods' default route
#   sockperf   ping-pong latency, pod ↔ pod and through the sidecars
#   iperf3     pod ↔ pod and same-pod loopback throughput
#   haproxy    the sidecars (our stand-in for Envoy, forwarding to SO_ORIGINAL_DST)
#   iptables   the baselines: Istio's REDIRECT rules, 5,000 kube-proxy-style DNAT services
#   containernetworking-plugins, cnitool v1.3.1 (Go module proxy): the lab's pods are made by a
#                real CNI chain (bridge + host-local + portmap + meshlane)
#   bpffs at /sys/fs/bpf
# The rest the demo starts is ours (meshlane-agent, ml-svc).
set -euo pipefail
SETUP_NAME=setup-demo
# shellcheck source=deploy/setup/lib.sh
. "$(dirname "$0")/setup/lib.sh"
need_root
apt_install "${BUILD_PKGS[@]}" sockperf iperf3 haproxy iptables containernetworking-plugins
# The lab makes its pods with a real CNI runtime (cnitool, on libcni) and Debian's plugins.
go_install_cached cnitool github.com/containernetworking/cni/cnitool@v1.3.1
ensure_build_toolchain
ensure_bpffs
setup_done
