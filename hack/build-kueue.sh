#!/usr/bin/env bash
# Build Kueue's manager from the Go module proxy and cache it by version.
#
# sigs.k8s.io/kueue has no replace directives, so its own go.mod pins every dependency (its
# Kubernetes client libraries are one or two minors behind the local control plane, which is
# within the client/server version skew Kubernetes supports). A wrapper module requires exactly
# KUEUE_VERSION and builds cmd/kueue. The manifests come from the same module source in the Go
# module cache and are copied next to the binary, so that `localkube up --with-kueue` needs nothing
# but this directory: config/components/crd (the CRDs and their conversion-webhook patches),
# config/components/rbac (the manager's ClusterRole) and config/components/webhook (the webhook
# configurations).
#
# `go build -p <CPUs>` by default: on CI's 2 cores `-p 1` took twice the wall time. Memory: linking
# the manager peaks at about 2 GiB; KUEUE_BUILD_P=1 keeps one compile at a time, for a small
# machine that also runs a cluster.
set -euo pipefail

KUEUE_VERSION="${KUEUE_VERSION:-v0.17.0}"
CACHE_DIR="${RO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/research-operator}"
OUT="$CACHE_DIR/kueue/kueue-$KUEUE_VERSION"
BUILD_P="${KUEUE_BUILD_P:-$(nproc)}"

log() { echo "[build-kueue] $*" >&2; }

if [[ -x "$OUT/bin/kueue" && -f "$OUT/config/.complete" ]]; then
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

command -v go >/dev/null || { log "go is required (Go >= 1.25)"; exit 1; }
mkdir -p "$OUT/bin" "$OUT/src"
start=$(date +%s)
(
  cd "$OUT/src"
  rm -f go.mod go.sum
  go mod init local/kueue-build >/dev/null 2>&1
  go mod edit -require="sigs.k8s.io/kueue@$KUEUE_VERSION"
  cat > tools.go <<'GO'
//go:build tools

package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
GO
  go mod tidy >/dev/null 2>&1 || go mod tidy
  # The wrapper must resolve Kueue itself at the pinned version, not at a newer one.
  got=$(go list -m -f '{{.Version}}' sigs.k8s.io/kueue)
  [[ "$got" == "$KUEUE_VERSION" ]] || { log "resolved sigs.k8s.io/kueue $got, wanted $KUEUE_VERSION"; exit 1; }

  if [[ ! -x "$OUT/bin/kueue" ]]; then
    log "building kueue $KUEUE_VERSION (go build -p $BUILD_P)"
    ld="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
    ld+=" -X sigs.k8s.io/kueue/pkg/version.GitCommit=module-proxy-$KUEUE_VERSION"
    go build -p "$BUILD_P" -trimpath -ldflags "$ld" -o "$OUT/bin/kueue.tmp" sigs.k8s.io/kueue/cmd/kueue
    mv "$OUT/bin/kueue.tmp" "$OUT/bin/kueue"
  fi

  moddir=$(go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
  [[ -d "$moddir/config/components/crd/bases" ]] || { log "no CRDs in $moddir"; exit 1; }
  rm -rf "$OUT/config"
  mkdir -p "$OUT/config"
  cp -r "$moddir/config/components/crd" "$moddir/config/components/rbac" "$moddir/config/components/webhook" \
    "$OUT/config/"
  chmod -R u+w "$OUT/config"  # the module cache is read-only
  touch "$OUT/config/.complete"
)
log "built in $(( $(date +%s) - start ))s: $OUT"
echo "$OUT"
