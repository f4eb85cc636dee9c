#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager and kube-scheduler from the Go module proxy.
#
# Kubernetes' commands are built through a wrapper module (hack/lib/k8s-module.sh), since
# k8s.io/kubernetes cannot be built from the module proxy by itself.
# Binaries are cached by version under $CACHE_DIR and rebuilt only when a pin changes.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
CACHE_DIR="${RO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/research-operator}"
OUT="$CACHE_DIR/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler)

log() { echo "[build-control-plane] $*" >&2; }

# shellcheck source=hack/lib/k8s-module.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/k8s-module.sh"
exit_if_cached build-control-plane "$OUT/bin" "${BINARIES[@]}"

command -v go >/dev/null || { log "go is required (Go >= 1.26)"; exit 1; }
mkdir -p "$OUT/bin" "$OUT/src/k8s" "$OUT/src/etcd"
# One build at a time per cache: a second caller (another checkout, a parallel test run) waits for
# the first and then finds the binaries built.
exec 9>"$OUT/.build.lock"
if ! flock -n 9; then
  log "another build of $OUT is running; waiting for it"
  flock 9
fi
start=$(date +%s)

# --- etcd ------------------------------------------------------------------------------------
if [[ ! -x "$OUT/bin/etcd" ]]; then
  log "building etcd $ETCD_VERSION"
  (
    cd "$OUT/src/etcd"
    rm -f go.mod go.sum
    go mod init local/etcd-build >/dev/null 2>&1
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null
    go build -trimpath -ldflags "-s -w" -o "$OUT/bin/etcd.tmp" go.etcd.io/etcd/server/v3
    mv "$OUT/bin/etcd.tmp" "$OUT/bin/etcd"
  )
fi

# --- kubernetes ------------------------------------------------------------------------------
k8s_wrapper_module "$OUT/src/k8s" "$K8S_VERSION" kube-apiserver kube-controller-manager kube-scheduler
ld="$(k8s_ldflags "$K8S_VERSION")"
for b in kube-apiserver kube-controller-manager kube-scheduler; do
  if [[ ! -x "$OUT/bin/$b" ]]; then
    log "building $b $K8S_VERSION"
    (cd "$OUT/src/k8s" && go build -trimpath -ldflags "$ld" -o "$OUT/bin/$b.tmp" "k8s.io/kubernetes/cmd/$b")
    mv "$OUT/bin/$b.tmp" "$OUT/bin/$b"
  fi
done
log "built in $(( $(date +%s) - start ))s: $OUT/bin"
echo "$OUT/bin"
