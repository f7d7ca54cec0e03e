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
#   bpftool      independent evidence of what is attached and what the pinned maps hold
#   util-linux   setpriv (run as the proxy uid 1337)
#   stress-ng    a CPU hog: the tests must hold on a busy machine
#   bpffs at /sys/fs/bpf
# Go-built tools for the coming tests (cnitool, the reference CNI plugins, kube-apiserver) get one
# `go_install_cached NAME MODULE@VERSION` call each here; see deploy/setup/lib.sh.
set -euo pipefail
SETUP_NAME=setup-tests
# shellcheck source=deploy/setup/lib.sh
. "$(dirname "$0")/setup/lib.sh"
need_root
apt_install "${BUILD_PKGS[@]}" iptables haproxy nginx-light wrk curl bpftool util-linux stress-ng
ensure_build_toolchain
ensure_bpffs
setup_done
