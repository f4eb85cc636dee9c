#!/usr/bin/env bash
# Build a real node's programs from the Go module proxy (`localkube real-node`, docs/node-agent.md):
#   - the kubelet and kube-proxy: k8s.io/kubernetes/cmd/{kubelet,kube-proxy} at the control plane's
#     version, through the same wrapper module (hack/lib/k8s-module.sh);
#   - containerd, its runc shim (containerd-shim-runc-v2) and ctr: github.com/containerd/containerd/v2;
#   - CoreDNS: github.com/coredns/coredns (its default plugin set).
# runc and the CNI plugins (bridge, host-local, loopback) are Debian's packages `runc` and
# `containernetworking-plugins`, installed with apt-get when missing.
#
# Binaries are cached by version under $CACHE_DIR/node/ and rebuilt only when a pin changes. The
# builds run with `nice -n 19` and `go build -p <CPUs>` (NODE_BUILD_JOBS changes -p; 1 keeps a
# shared machine's second core free, at about twice the wall time).
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.1.4}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.14.7}"
JOBS="${NODE_BUILD_JOBS:-$(nproc)}"
CACHE_DIR="${RO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/research-operator}"
OUT="$CACHE_DIR/node/k8s-$K8S_VERSION-containerd-$CONTAINERD_VERSION-coredns-$COREDNS_VERSION"
BINARIES=(kubelet kube-proxy containerd containerd-shim-runc-v2 ctr coredns)
GO=(nice -n 19 go)

log() { echo "[build-node] $*" >&2; }

missing=()
command -v runc >/dev/null || missing+=(runc)
[[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
if (( ${#missing[@]} )); then
  command -v apt-get >/dev/null || { log "${missing[*]} required (Debian packages of those names)"; exit 1; }
  log "installing ${missing[*]} from Debian (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; }
fi

# shellcheck source=hack/lib/k8s-module.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/k8s-module.sh"
exit_if_cached build-node "$OUT/bin" "${BINARIES[@]}"

command -v go >/dev/null || { log "go is required (Go >= 1.26)"; exit 1; }
mkdir -p "$OUT/bin" "$OUT/src/k8s" "$OUT/src/containerd" "$OUT/src/coredns"
# One build at a time per cache: a second caller waits for the first and then finds the binaries.
exec 9>"$OUT/.build.lock"
if ! flock -n 9; then
  log "another build of $OUT is running; waiting for it"
  flock 9
fi
start=$(date +%s)

build() {  # build DIR OUTNAME PACKAGE [go build flags...]
  local dir="$1" name="$2" pkg="$3"; shift 3
  [[ -x "$OUT/bin/$name" ]] && return 0
  local t0; t0=$(date +%s)
  log "building $name ($pkg)"
  (cd "$dir" && "${GO[@]}" build -p "$JOBS" -trimpath "$@" -o "$OUT/bin/$name.tmp" "$pkg")
  mv "$OUT/bin/$name.tmp" "$OUT/bin/$name"
  log "built $name in $(( $(date +%s) - t0 ))s"
}

# --- kubelet, kube-proxy -------------------------------------------------------------------------
if [[ ! -x "$OUT/bin/kubelet" || ! -x "$OUT/bin/kube-proxy" ]]; then
  GOFLAGS="${GOFLAGS:-} -p=$JOBS" k8s_wrapper_module "$OUT/src/k8s" "$K8S_VERSION" kubelet kube-proxy
  ld="$(k8s_ldflags "$K8S_VERSION")"
  build "$OUT/src/k8s" kubelet k8s.io/kubernetes/cmd/kubelet -ldflags "$ld"
  build "$OUT/src/k8s" kube-proxy k8s.io/kubernetes/cmd/kube-proxy -ldflags "$ld"
fi

# --- containerd, containerd-shim-runc-v2, ctr -------------------------------------------------
wrapper() {  # wrapper DIR MODULE@VERSION PACKAGE...: a module that requires MODULE and imports PACKAGE...
  local dir="$1" mod="$2"; shift 2
  (
    cd "$dir"
    [[ -f go.sum && -f .module && "$(cat .module)" == "$mod $*" ]] && exit 0
    rm -f go.mod go.sum .module
    go mod init "local/${mod%%@*}-build" >/dev/null 2>&1
    {
      printf '//go:build tools\n\npackage tools\n\nimport (\n'
      for p in "$@"; do printf '\t_ "%s"\n' "$p"; done
      printf ')\n'
    } > tools.go
    "${GO[@]}" get "$mod" >/dev/null
    "${GO[@]}" mod tidy >/dev/null 2>&1 || "${GO[@]}" mod tidy
    echo "$mod $*" > .module
  )
}
cd_mod=github.com/containerd/containerd/v2
if [[ ! -x "$OUT/bin/containerd" || ! -x "$OUT/bin/containerd-shim-runc-v2" || ! -x "$OUT/bin/ctr" ]]; then
  wrapper "$OUT/src/containerd" "$cd_mod@$CONTAINERD_VERSION" "$cd_mod/cmd/containerd" \
    "$cd_mod/cmd/containerd-shim-runc-v2" "$cd_mod/cmd/ctr"
  ld="-s -w -X $cd_mod/version.Version=$CONTAINERD_VERSION -X $cd_mod/version.Revision=module-proxy"
  build "$OUT/src/containerd" containerd "$cd_mod/cmd/containerd" -ldflags "$ld"
  # The shim is built static, as containerd's own Makefile does (SHIM_CGO_ENABLED=0).
  CGO_ENABLED=0 build "$OUT/src/containerd" containerd-shim-runc-v2 "$cd_mod/cmd/containerd-shim-runc-v2" -ldflags "$ld"
  build "$OUT/src/containerd" ctr "$cd_mod/cmd/ctr" -ldflags "$ld"
fi

# --- CoreDNS ---------------------------------------------------------------------------------------
if [[ ! -x "$OUT/bin/coredns" ]]; then
  wrapper "$OUT/src/coredns" "github.com/coredns/coredns@$COREDNS_VERSION" github.com/coredns/coredns
  build "$OUT/src/coredns" coredns github.com/coredns/coredns \
    -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=module-proxy-$COREDNS_VERSION"
fi

log "built in $(( $(date +%s) - start ))s: $OUT/bin"
echo "$OUT/bin"
