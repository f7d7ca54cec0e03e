# shellcheck shell=bash
# Shared by meshlane's set-up scripts (deploy/setup-demo.sh, deploy/setup-tests.sh, perf/setup.sh):
# sourced, never run. Every function checks before it acts, so a set-up that finds everything in
# place takes about a second and says so. Debian bookworm, as root.
#
# Caches live where the machine keeps them, outside any clone: cargo-installed tools in
# ~/.cargo/bin, everything else the set-up builds under $MESHLANE_CACHE. Go-built test tools
# (cnitool v1.3.1, the reference CNI plugins v1.10.0; recipes in the design notes' "Facts
# verified") come from go_install_cached / go_install_cni_plugins below, one call per tool in
# deploy/setup-tests.sh.

MESHLANE_CACHE=${MESHLANE_CACHE:-/var/cache/meshlane}
export DEBIAN_FRONTEND=noninteractive
export PATH="$HOME/.cargo/bin:$PATH"

# What every build needs: a C toolchain for build scripts and linking, LLVM 22 to build
# bpf-linker (which links the eBPF crate and loads libLLVM at run time), and iproute2, which the
# lab itself runs (`ip netns`, veths, bridge, `ss`).
# shellcheck disable=SC2034 # used by the scripts that source this file
BUILD_PKGS=(gcc libc6-dev llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev iproute2)

SETUP_NAME=${SETUP_NAME:-setup}
INSTALLED=()

log() { printf '[%s] %s\n' "$SETUP_NAME" "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs packages and mounts bpffs)"
    exit 1
  fi
}

# apt_install PKG...: installs the packages that are not installed yet. `apt-get update` runs only
# then, and at most once an hour across set-ups (a stamp under $MESHLANE_CACHE), so `deploy/setup.sh`
# updates once for its three parts. nginx and haproxy are started by their packages' scripts; the
# lab runs its own instances, so they are stopped and disabled right after they are installed.
apt_install() {
  local have missing=() p svc
  # dpkg-query fails when it knows none of a name's versions; the names it lists are enough.
  have=" $({ dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "$@" 2>/dev/null || true; } |
    awk '$1 == "ii" { printf "%s ", $2 }')"
  for p in "$@"; do
    [[ "$have" == *" $p "* ]] || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "present: Debian packages $*"
    return
  fi
  log "installing Debian packages: ${missing[*]}"
  mkdir -p "$MESHLANE_CACHE"
  if [ -z "$(find "$MESHLANE_CACHE/apt-updated" -mmin -60 2>/dev/null)" ]; then
    apt-get update -qq
    touch "$MESHLANE_CACHE/apt-updated"
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  for svc in nginx haproxy; do
    [[ " ${missing[*]}" == *" $svc"* ]] || continue
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
    service "$svc" stop >/dev/null 2>&1 || true
  done
  INSTALLED+=("${missing[@]}")
}

# ensure_cargo_tool NAME PATTERN [ARGS...]: `cargo install --locked NAME ARGS...` unless
# `NAME --version` already matches the extended regular expression PATTERN. Installs into
# ~/.cargo/bin, so it is built once per machine.
ensure_cargo_tool() {
  local name=$1 want=$2 version
  shift 2
  version=$("$name" --version 2>/dev/null | head -n 1) || true
  if [[ "$version" =~ $want ]]; then
    log "present: $version"
    return
  fi
  log "building $name from crates.io ($*)"
  cargo install --locked "$name" "$@"
  INSTALLED+=("$name")
}

# ensure_build_toolchain: what building the workspace needs beyond BUILD_PKGS (install those
# first): stable Rust from rustup (checked, not installed), the nightly toolchain with rust-src (aya-build
# builds the eBPF crate with -Z build-std=core), and bpf-linker 0.13 built against LLVM 22.
ensure_build_toolchain() {
  if ! command -v cargo >/dev/null 2>&1; then
    log "cargo not found: this project needs a rustup toolchain (stable + nightly) in ~/.cargo/bin"
    exit 1
  fi
  # `nightly-<host>`, the toolchain `+nightly` names (a dated nightly alone would not do).
  if ! rustup toolchain list | grep -q '^nightly-[a-z]'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
    INSTALLED+=(nightly)
  fi
  # The eBPF crate is verified with this nightly (aya-ebpf 0.2.1, aya-build 0.2.0); another one
  # may build or may not, so say so rather than fail a machine that has only another.
  local want_nightly='1.97.0-nightly (e50aa6fba 2026-05-19)' have_nightly
  have_nightly=$(rustc +nightly --version 2>/dev/null | sed 's/^rustc //')
  if [ "$have_nightly" != "$want_nightly" ]; then
    log "warning: nightly is '$have_nightly'; the eBPF crate is verified with '$want_nightly'"
  fi
  if [ -d "$(rustc +nightly --print sysroot)/lib/rustlib/src/rust/library" ]; then
    log "present: nightly with rust-src"
  else
    log "adding rust-src to nightly"
    rustup component add rust-src --toolchain nightly
    INSTALLED+=(rust-src)
  fi
  # About a minute on two cores.
  LLVM_PREFIX=/usr/lib/llvm-22 ensure_cargo_tool bpf-linker '^bpf-linker 0\.13\.' \
    --version '^0.13' --no-default-features --features llvm-22
}

# ensure_bpffs: the agent mounts its own bpffs, but bpftool and humans expect /sys/fs/bpf.
ensure_bpffs() {
  if awk '$9 == "bpf" { f = 1 } END { exit !f }' /proc/self/mountinfo; then
    log "present: bpffs"
    return
  fi
  log "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
  INSTALLED+=(bpffs)
}

# Go from /usr/local/go (Go 1.26.8 on these machines), never a toolchain it would download.
GO=${GO:-/usr/local/go/bin/go}

_need_go() {
  if [ ! -x "$GO" ]; then
    log "Go not found at $GO: building $1 needs Go (1.26.8 is installed at /usr/local/go; or set GO=)"
    exit 1
  fi
}

# _go_install_into DIR PACKAGE@VERSION...: `go install` into DIR (GOBIN) with the caches under
# $MESHLANE_CACHE/go, -trimpath and CGO off; modules come from the Go module proxy (GOPROXY as
# configured, proxy.golang.org by default). Removes DIR and exits the set-up when it fails.
_go_install_into() {
  local dir=$1
  shift
  mkdir -p "$MESHLANE_CACHE/go/build" "$MESHLANE_CACHE/go/mod"
  if ! GOCACHE="$MESHLANE_CACHE/go/build" GOMODCACHE="$MESHLANE_CACHE/go/mod" GOBIN="$dir" \
    GOFLAGS=-trimpath CGO_ENABLED=0 GOTOOLCHAIN=local GO111MODULE=on \
    "$GO" install "$@"; then
    rm -rf "$dir"
    log "go install $* failed (is the Go module proxy reachable?)"
    exit 1
  fi
}

# go_install_cached NAME MODULE@VERSION: $MESHLANE_CACHE/bin/NAME-VERSION, built once per version
# (`go install MODULE@VERSION`; the package's last path element must be NAME), plus the stable
# symlink $MESHLANE_CACHE/bin/NAME -> NAME-VERSION. It is built in a temporary GOBIN beside the
# target and renamed into place, so an interrupted build never leaves a half binary.
go_install_cached() {
  local name=$1 pkg=$2 version bin tmp
  version=${pkg##*@}
  bin="$MESHLANE_CACHE/bin"
  if [ ! -x "$bin/$name-$version" ]; then
    _need_go "$name $version"
    log "building $name $version from the Go module proxy ($pkg)"
    mkdir -p "$bin"
    rm -rf "$bin/.tmp-$name-$version".*     # left by an interrupted run
    tmp=$(mktemp -d "$bin/.tmp-$name-$version.XXXXXX")
    _go_install_into "$tmp" "$pkg"
    if [ ! -x "$tmp/$name" ]; then
      log "go install $pkg made no binary named $name (it made: $(ls "$tmp"))"
      rm -rf "$tmp"
      exit 1
    fi
    mv -f "$tmp/$name" "$bin/$name-$version"
    rmdir "$tmp"
    INSTALLED+=("$name-$version")
  else
    log "present: $name $version ($bin/$name-$version)"
  fi
  if [ "$(readlink "$bin/$name" 2>/dev/null)" != "$name-$version" ]; then
    ln -sfn "$name-$version" "$bin/$name.tmp"
    mv -Tf "$bin/$name.tmp" "$bin/$name"
  fi
}

# go_install_cni_plugins MODULE VERSION PLUGIN...: a CNI bin dir $MESHLANE_CACHE/cni/VERSION/
# holding the PLUGINs (package paths inside MODULE, e.g. plugins/main/bridge), built once per
# version in one `go install`. The whole directory is built beside the target and renamed into
# place; one that lacks a requested plugin is rebuilt.
go_install_cni_plugins() {
  local module=$1 version=$2 dir tmp p missing=() pkgs=()
  shift 2
  dir="$MESHLANE_CACHE/cni/$version"
  for p in "$@"; do
    [ -x "$dir/${p##*/}" ] || missing+=("${p##*/}")
    pkgs+=("$module/$p@$version")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "present: CNI plugins $version ($dir: ${*##*/})"
    return
  fi
  _need_go "the CNI plugins $version"
  log "building CNI plugins $version from the Go module proxy (${*##*/})"
  mkdir -p "$MESHLANE_CACHE/cni"
  rm -rf "$MESHLANE_CACHE/cni/.tmp-$version".*  # left by an interrupted run
  tmp=$(mktemp -d "$MESHLANE_CACHE/cni/.tmp-$version.XXXXXX")
  chmod 755 "$tmp"
  _go_install_into "$tmp" "${pkgs[@]}"
  if [ -e "$dir" ]; then rm -rf "$dir.old" && mv "$dir" "$dir.old"; fi
  mv "$tmp" "$dir"
  rm -rf "$dir.old"
  INSTALLED+=("cni-plugins-$version")
}

# setup_done: the closing line, saying whether anything had to be done.
setup_done() {
  if [ "${#INSTALLED[@]}" -eq 0 ]; then
    log "ready: everything was already present"
  else
    log "ready: installed ${INSTALLED[*]}"
  fi
}

# go_build_cached NAME DIR: builds the Go main package in the project's DIR (no dependencies
# beyond the standard library) into $MESHLANE_CACHE/bin/NAME-<hash of DIR's files>, once per
# source version, with the stable symlink $MESHLANE_CACHE/bin/NAME.
go_build_cached() {
  local name=$1 dir=$2 hash bin out tmp
  hash=$(cat "$dir"/go.mod "$dir"/*.go | sha256sum | cut -c1-12)
  bin="$MESHLANE_CACHE/bin"
  out="$bin/$name-$hash"
  if [ ! -x "$out" ]; then
    _need_go "$name"
    log "building $name from $dir"
    mkdir -p "$bin" "$MESHLANE_CACHE/go/build"
    tmp="$out.tmp.$$"
    if ! (cd "$dir" && GOCACHE="$MESHLANE_CACHE/go/build" GOFLAGS=-trimpath CGO_ENABLED=0 \
      GOTOOLCHAIN=local "$GO" build -o "$tmp" .); then
      rm -f "$tmp"
      log "go build of $dir failed"
      exit 1
    fi
    mv -f "$tmp" "$out"
    INSTALLED+=("$name-$hash")
  else
    log "present: $name ($out)"
  fi
  ln -sfn "$name-$hash" "$bin/$name"
}
