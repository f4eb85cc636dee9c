#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager and kube-scheduler from the Go module proxy.
#
# k8s.io/kubernetes requires its staging modules (k8s.io/api, k8s.io/client-go, ...) at v0.0.0 and
# replaces them with ./staging/src/... paths that do not exist outside its own repository. A small
# wrapper module therefore replaces each staging module with its published v0.X.Y release.
# Binaries are cached by version under $CACHE_DIR and rebuilt only when a pin changes.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
CACHE_DIR="${RO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/research-operator}"
OUT="$CACHE_DIR/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler)

log() { echo "[build-control-plane] $*" >&2; }

complete=1
for b in "${BINARIES[@]}"; do [[ -x "$OUT/bin/$b" ]] || complete=0; done
if [[ $complete == 1 ]]; then
  log "cached: $OUT/bin"
  echo "$OUT/bin"
  exit 0
fi

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
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
patch="${K8S_VERSION##*.}"
staging_version="v0.$minor.$patch"
(
  cd "$OUT/src/k8s"
  rm -f go.mod go.sum
  go mod init local/k8s-build >/dev/null 2>&1
  kmod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  # Every "k8s.io/X => ./staging/src/k8s.io/X" replace of kubernetes' go.mod becomes X@v0.MINOR.PATCH.
  mapfile -t staging < <(sed -nE 's#^[[:space:]]*(k8s\.io/[a-z0-9-]+) => \./staging/src/.*#\1#p' "$kmod")
  [[ ${#staging[@]} -gt 10 ]] || { log "could not read staging modules from $kmod"; exit 1; }
  args=()
  for m in "${staging[@]}"; do args+=("-replace=$m=$m@$staging_version"); done
  go mod edit "${args[@]}"
  go mod edit -require="k8s.io/kubernetes@$K8S_VERSION"
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
GO
  go mod tidy >/dev/null 2>&1 || go mod tidy
  pkg=k8s.io/component-base/version
  cgo=k8s.io/client-go/pkg/version
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  ld="-s -w"
  for p in $pkg $cgo; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$now -X $p.gitCommit=module-proxy-$K8S_VERSION"
  done
  for b in kube-apiserver kube-controller-manager kube-scheduler; do
    if [[ ! -x "$OUT/bin/$b" ]]; then
      log "building $b $K8S_VERSION (staging modules at $staging_version)"
      go build -trimpath -ldflags "$ld" -o "$OUT/bin/$b.tmp" "k8s.io/kubernetes/cmd/$b"
      mv "$OUT/bin/$b.tmp" "$OUT/bin/$b"
    fi
  done
)
log "built in $(( $(date +%s) - start ))s: $OUT/bin"
echo "$OUT/bin"
