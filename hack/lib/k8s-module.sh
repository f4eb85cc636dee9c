# Sourced by hack/build-control-plane.sh and hack/build-node.sh: the wrapper module through which
# commands of k8s.io/kubernetes are built from the Go module proxy, and the check both make first.
#
# k8s.io/kubernetes requires its staging modules (k8s.io/api, k8s.io/client-go, ...) at v0.0.0 and
# replaces them with ./staging/src/... paths that do not exist outside its own repository. The
# wrapper module replaces each staging module with its published v0.X.Y release.

# k8s_wrapper_module DIR VERSION CMD...: (re)write DIR/go.mod, go.sum and tools.go so that
# `go build k8s.io/kubernetes/cmd/CMD` works in DIR for each CMD.
k8s_wrapper_module() {
  local dir="$1" version="$2"; shift 2
  local minor="${version#v1.}"; minor="${minor%%.*}"
  local staging_version="v0.$minor.${version##*.}"
  (
    cd "$dir"
    rm -f go.mod go.sum
    go mod init local/k8s-build >/dev/null 2>&1
    local kmod
    kmod=$(go mod download -json "k8s.io/kubernetes@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    # Every "k8s.io/X => ./staging/src/k8s.io/X" replace of kubernetes' go.mod becomes X@v0.MINOR.PATCH.
    local staging
    mapfile -t staging < <(sed -nE 's#^[[:space:]]*(k8s\.io/[a-z0-9-]+) => \./staging/src/.*#\1#p' "$kmod")
    [[ ${#staging[@]} -gt 10 ]] || { echo "could not read staging modules from $kmod" >&2; exit 1; }
    local args=() m
    for m in "${staging[@]}"; do args+=("-replace=$m=$m@$staging_version"); done
    go mod edit "${args[@]}"
    go mod edit -require="k8s.io/kubernetes@$version"
    {
      printf '//go:build tools\n\npackage tools\n\nimport (\n'
      for m in "$@"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$m"; done
      printf ')\n'
    } > tools.go
    go mod tidy >/dev/null 2>&1 || go mod tidy
  )
}

# k8s_ldflags VERSION: the -ldflags that make the binaries report VERSION (as a release build does).
k8s_ldflags() {
  local version="$1" minor="${1#v1.}"; minor="${minor%%.*}"
  local now ld="-s -w" p
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$version -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$now -X $p.gitCommit=module-proxy-$version"
  done
  echo "$ld"
}

# exit_if_cached TAG DIR BINARY...: when every BINARY is an executable in DIR, say so and print DIR
# on stdout (what the build scripts print), then exit the calling script.
exit_if_cached() {
  local tag="$1" dir="$2" b; shift 2
  for b in "$@"; do [[ -x "$dir/$b" ]] || return 0; done
  echo "[$tag] cached: $dir" >&2
  echo "$dir"
  exit 0
}
