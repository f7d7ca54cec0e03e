#!/usr/bin/env bash
# Set-up for the test suite (deploy/test.sh runs it): the build toolchain and the programs the
# tests run. Debian bookworm, as root; idempotent, about a second when everything is present.
#
#   build: see deploy/setup/lib.sh (C toolchain, LLVM 22, bpf-linker 0.13, nightly + rust-src)
#   iproute2     the lab (`ip netns`, veth, bridge, `ss` to see listeners)
#   iptables     Istio's REDIRECT rules and their counters (iptables-save -c) in the sidecar tests
#   haproxy      the sidecar (our stand-in for Envoy)
#   nginx-light  a real HTTP server; wrk loads it through the fast path
#   wrk          HTTP at saturation in the FIONREAD/epoll test
#   curl         HTTP requests through the sidecars, and the agent's /metrics
#   iputils-ping ping between the lab's pods (the CNI recipe's connectivity check)
#   bpftool      independent evidence of what is attached and what the pinned maps hold
#   util-linux   setpriv (run as the proxy uid 1337)
#   stress-ng    a CPU hog: the tests must hold on a busy machine
#   oha 1.x      an HTTP load generator with an exact count of what it got (crates.io; the first
#                run builds it, a few minutes): the HTTP telemetry tests' ground truth
#   containernetworking-plugins  Debian's CNI plugins 1.1.1 in /usr/lib/cni (spec <= 1.0.0): the
#                lab chains bridge + host-local + portmap at cniVersion 1.0.0
#   bpffs at /sys/fs/bpf
# Built with Go (/usr/local/go) from the Go module proxy, once per version, under $MESHLANE_CACHE:
#   bin/cnitool-v1.3.1 (+ symlink bin/cnitool)  the CNI runtime the lab creates pods with
#   cni/v1.10.0/{bridge,host-local,portmap,loopback}  the current reference plugins (spec 1.1.0)
# (kube-apiserver needs more than go_install_cached: its recipe builds in a throwaway module with
# replace lines, which `go install PKG@VERSION` would refuse; see the design notes.)
set -euo pipefail
SETUP_NAME=setup-tests
# shellcheck source=deploy/setup/lib.sh
. "$(dirname "$0")/setup/lib.sh"
need_root
apt_install "${BUILD_PKGS[@]}" iptables haproxy nginx-light wrk curl bpftool util-linux stress-ng \
  iputils-ping containernetworking-plugins
ensure_build_toolchain
ensure_cargo_tool oha '^oha 1\.' --version '^1.16'
go_install_cached cnitool github.com/containernetworking/cni/cnitool@v1.3.1
# A plain Go io.Copy TCP proxy (reads with splice): the splice guard's test workload.
go_build_cached goproxy "$(dirname "$0")/../tests/go/goproxy"
go_install_cni_plugins github.com/containernetworking/plugins v1.10.0 \
  plugins/main/bridge plugins/ipam/host-local plugins/meta/portmap plugins/main/loopback
ensure_bpffs
setup_done
