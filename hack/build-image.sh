#!/usr/bin/env bash
# Build the product image from the Dockerfile: with a Docker engine if one answers (the users'
# path, `docker build`), else with Debian's buildah and no daemon at all (this machine).
#
# The buildah path:
#   1. a base image assembled here from Debian (debootstrap --variant=minbase bookworm plus
#      python3.11, python3.11-venv and python3-pip; /usr/local/bin/python -> python3.11, which the
#      Dockerfile's `python` commands need), committed with `buildah from scratch` and passed as
#      --build-arg PYTHON_IMAGE. It stands in for python:3.11.7-slim-bookworm, which no registry
#      here serves. Cached by its recipe (BASE_SUITE, BASE_PACKAGES, BASE_RECIPE).
#   2. `buildah build --isolation chroot` of the Dockerfile (no runtime daemon, no user namespace),
#      storage driver overlay if this kernel mounts it, else vfs. Cached by a hash of what the
#      image is built from: Dockerfile, .dockerignore, pyproject.toml, api/ operator/ worker/
#      modelserver/ cli/ (as the .dockerignore filters them), and the base image's id.
#   3. an export for runc and later work: <out>/rootfs (the image's file system), <out>/oci (an OCI
#      image layout, tag 0.1.0), <out>/image.json (`buildah inspect` of the image: Entrypoint, Cmd,
#      Env, User, WorkingDir) and <out>/key. localkube.containers runs containers from it.
#
# Everything lives under $RO_CACHE_DIR (default ~/.cache/research-operator)/image: buildah's
# storage of its own (storage/, run/), the chosen storage driver, and the exports. Prints the
# export directory on stdout (nothing for the docker path, which exports nothing).
#
# IMAGE_BUILDER=docker|buildah forces a builder; IMAGE names the image (research-operator:0.1.0).
# `hack/build-image.sh --key` prints the product image's cache key and builds nothing (the base
# image must exist).
set -euo pipefail
KEY_ONLY=0
[[ "${1:-}" == --key ]] && KEY_ONLY=1

IMAGE="${IMAGE:-research-operator:0.1.0}"
BUILDER="${IMAGE_BUILDER:-auto}"
BASE_SUITE="${BASE_SUITE:-bookworm}"
BASE_PACKAGES="${BASE_PACKAGES:-python3.11,python3.11-venv,python3-pip,ca-certificates}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The CA bundle pip trusts during the build's RUN steps: the host's, bind-mounted read-only for the
# build only (a TLS-inspecting egress proxy's CA, say), so the image keeps Debian's own bundle.
HOST_CA_BUNDLE="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
BASE_RECIPE=1  # bump when the steps that assemble the base image change
CACHE_DIR="${RO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/research-operator}"
IMG_CACHE="$CACHE_DIR/image"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { echo "[build-image] $*" >&2; }

[[ $KEY_ONLY == 1 ]] && BUILDER=buildah
if [[ "$BUILDER" == auto ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then BUILDER=docker; else BUILDER=buildah; fi
fi
if [[ "$BUILDER" == docker ]]; then
  log "docker build -t $IMAGE ."
  docker build -t "$IMAGE" "$REPO" >&2
  exit 0
fi
[[ "$BUILDER" == buildah ]] || { log "IMAGE_BUILDER must be docker or buildah, not $BUILDER"; exit 2; }
[[ $(id -u) == 0 ]] || { log "the buildah path runs as root (debootstrap, chroot isolation)"; exit 1; }
# A fresh machine has none of them: install Debian's packages (runc runs the image's containers).
missing=()
for tool in buildah debootstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if (( ${#missing[@]} )); then
  command -v apt-get >/dev/null || { log "${missing[*]} required (Debian packages of those names)"; exit 1; }
  log "installing ${missing[*]} from Debian (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; }
fi

mkdir -p "$IMG_CACHE"
# One build at a time per cache: a second caller waits, then finds the first one's result.
exec 9>"$IMG_CACHE/.lock"
flock 9

# --- storage driver: overlay if this kernel mounts it here, else vfs (kept once chosen) ----------
if [[ ! -s "$IMG_CACHE/storage-driver" ]]; then
  probe="$(mktemp -d "$IMG_CACHE/overlay-probe.XXXXXX")"
  mkdir -p "$probe"/{lower,upper,work,merged}
  if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
      "$probe/merged" 2>"$probe/error"; then
    umount "$probe/merged"
    echo overlay > "$IMG_CACHE/storage-driver"
  else
    log "overlay does not mount here ($(cat "$probe/error")); using vfs"
    echo vfs > "$IMG_CACHE/storage-driver"
  fi
  rm -rf "$probe"
fi
DRIVER="$(cat "$IMG_CACHE/storage-driver")"
B=(buildah --root "$IMG_CACHE/storage" --runroot "$IMG_CACHE/run" --storage-driver "$DRIVER")

# --- 1. the base image -------------------------------------------------------------------------
if [[ $KEY_ONLY == 1 ]] && ! "${B[@]}" inspect --type image "localhost/research-operator-base:$BASE_SUITE-$(
  printf '%s\n' "$BASE_SUITE" "$BASE_PACKAGES" "$BASE_RECIPE" | sha256sum | cut -c1-12)" >/dev/null 2>&1; then
  log "--key: no base image yet (run hack/build-image.sh once)"; exit 1
fi
base_key="$(printf '%s\n' "$BASE_SUITE" "$BASE_PACKAGES" "$BASE_RECIPE" | sha256sum | cut -c1-12)"
BASE_TAG="localhost/research-operator-base:$BASE_SUITE-$base_key"
if ! "${B[@]}" inspect --type image "$BASE_TAG" >/dev/null 2>&1; then
  log "assembling the base image $BASE_TAG: debootstrap --variant=minbase $BASE_SUITE + $BASE_PACKAGES"
  start=$(date +%s)
  rootfs="$IMG_CACHE/base-rootfs.tmp"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$BASE_SUITE" "$rootfs" "$DEBIAN_MIRROR" \
    >"$IMG_CACHE/debootstrap.log" 2>&1 || { tail -20 "$IMG_CACHE/debootstrap.log" >&2; exit 1; }
  ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  ctr="$("${B[@]}" from scratch)"
  mnt="$("${B[@]}" mount "$ctr")"
  tar -C "$rootfs" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
  "${B[@]}" umount "$ctr" >/dev/null
  "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 --os linux --arch "$(dpkg --print-architecture)" \
    --label "org.opencontainers.image.description=Debian $BASE_SUITE minbase + $BASE_PACKAGES (hack/build-image.sh)" \
    "$ctr"
  "${B[@]}" commit --rm --quiet "$ctr" "$BASE_TAG" >/dev/null
  rm -rf "$rootfs"
  log "base image assembled in $(( $(date +%s) - start ))s"
fi
base_id="$("${B[@]}" inspect --type image --format '{{.FromImageID}}' "$BASE_TAG")"

# --- 2. the product image, keyed by what it is built from -----------------------------------------
cd "$REPO"
key="$(
  {
    echo "image=$IMAGE base=$base_id"
    sha256sum Dockerfile .dockerignore pyproject.toml
    find api operator worker modelserver cli -type f \
      -not -path '*/__pycache__/*' -not -name '*.pyc' -not -path '*.egg-info/*' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
)"
OUT="$IMG_CACHE/research-operator-$key"
if [[ $KEY_ONLY == 1 ]]; then echo "$key"; exit 0; fi
if [[ -f "$OUT/.complete" ]] && "${B[@]}" inspect --type image "localhost/$IMAGE" >/dev/null 2>&1; then
  touch "$OUT"  # used now: the last to be evicted
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

log "building $IMAGE with buildah (--isolation chroot, storage $DRIVER) FROM $BASE_TAG"
start=$(date +%s)
ca_mount=()
[[ -f "$HOST_CA_BUNDLE" ]] && ca_mount=(--volume "$HOST_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
"${B[@]}" build --isolation chroot --pull=never --layers=false "${ca_mount[@]}" \
  --build-arg "PYTHON_IMAGE=$BASE_TAG" -t "localhost/$IMAGE" -f Dockerfile . >&2
built=$(date +%s)

# --- 3. export: OCI layout, image config, root file system -------------------------------------------
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp/rootfs"
"${B[@]}" push --quiet "localhost/$IMAGE" "oci:$OUT.tmp/oci:${IMAGE##*:}" >&2
"${B[@]}" inspect --type image "localhost/$IMAGE" > "$OUT.tmp/image.json"
ctr="$("${B[@]}" from --pull=never "localhost/$IMAGE")"
mnt="$("${B[@]}" mount "$ctr")"
tar -C "$mnt" --numeric-owner -cf - . | tar -C "$OUT.tmp/rootfs" --numeric-owner -xpf -
"${B[@]}" umount "$ctr" >/dev/null
"${B[@]}" rm "$ctr" >/dev/null
echo "$key" > "$OUT.tmp/key"
echo "$(( built - start ))" > "$OUT.tmp/build-seconds"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
touch "$OUT/.complete"
touch "$OUT"
# Keep the KEEP_EXPORTS most recently used exports (each is ~600 MB), so checkouts side by side (a
# worktree, a fresh clone of CI's) each keep theirs between `make image-build` and their tests;
# keeping only the newest made one checkout's build delete the other's export mid-run.
# buildah's storage keeps the images themselves.
# shellcheck disable=SC2012 # names are ours: research-operator-<hex key>
ls -1dt "$IMG_CACHE"/research-operator-*/ | grep -v '\.tmp/$' | tail -n +"$(( ${KEEP_EXPORTS:-3} + 1 ))" \
  | xargs -r rm -rf  # never another build's export in progress (.tmp)
"${B[@]}" rmi --prune >/dev/null 2>&1 || true
log "built in $(( built - start ))s, exported in $(( $(date +%s) - built ))s: $OUT"
echo "$OUT"
