#!/usr/bin/env bash
# Run the tests N times in a row and say how each run ended and how long it took, to find tests
# that pass on one run and fail on the next. Used by `make test-repeat`.
#
#   N=5 hack/test-repeat.sh                 # the cluster tiers (marker cluster) in this checkout
#   N=5 FRESH=1 hack/test-repeat.sh         # `make test` (the CI command) in a fresh clone each time
#                                           # of one commit: COMMIT (default: HEAD when it starts)
#   N=1 FRESH=1 COLD=1 hack/test-repeat.sh  # the same on empty caches, as on a fresh machine: every
#                                           # build, Go module and pip download anew (XDG_CACHE_HOME,
#                                           # GOPATH and PIP_CACHE_DIR on empty dirs under $OUT)
#   N=3 PYTEST_ARGS="tests/test_wakeups_cluster.py" hack/test-repeat.sh
#
# Each run's output goes to $OUT/run-<i>.log (default: a new dir under /tmp); a summary line per
# run to $OUT/summary.tsv: run, exit code, seconds, pytest's last line. Exits non-zero if any run failed.
# A fresh clone's cluster has a state dir of its own ($OUT/state-<i>), so that nothing else on the
# machine (another checkout's cluster, a stray earlier run) shares it. Stop a run by its process
# group: kill -- -<pid of this script>.
set -uo pipefail
cd "$(dirname "$0")/.."
N="${N:-5}"
OUT="${OUT:-$(mktemp -d /tmp/test-repeat.XXXXXX)}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
COMMIT="$(git rev-parse "${COMMIT:-HEAD}")"
failed=0
printf 'run\texit\tseconds\tresult\n' >"$OUT/summary.tsv"
[ -z "${FRESH:-}" ] || echo "commit: $COMMIT" | tee "$OUT/commit"
for i in $(seq 1 "$N"); do
  start=$(date +%s)
  if [ -n "${FRESH:-}" ]; then
    dir="$OUT/clone-$i"
    git clone -q . "$dir" && git -C "$dir" checkout -q --detach "$COMMIT" && ln -sfn "$(cd .. && pwd)/shared" "$OUT/shared" 2>/dev/null
    cold=()
    if [ -n "${COLD:-}" ]; then
      c="$OUT/cold-$i"
      mkdir -p "$c/cache" "$c/gopath"
      cold=(XDG_CACHE_HOME="$c/cache" GOPATH="$c/gopath" PIP_CACHE_DIR="$c/cache/pip")
    fi
    (cd "$dir" && env "${cold[@]}" CI=true LOCALKUBE_STATE_DIR="$OUT/state-$i" \
      make test PYTEST_ARGS="${PYTEST_ARGS:-}" </dev/null) >"$OUT/run-$i.log" 2>&1
    code=$?
    rm -rf "$dir"
    # The Go module cache is read-only by design.
    [ -z "${COLD:-}" ] || { chmod -R u+w "$OUT/cold-$i" && rm -rf "$OUT/cold-$i"; }
  else
    # shellcheck disable=SC2086 # PYTEST_ARGS is a list of words
    "$PY" -m pytest -m "${MARKERS:-cluster}" -p no:cacheprovider ${PYTEST_ARGS:-} </dev/null >"$OUT/run-$i.log" 2>&1
    code=$?
  fi
  secs=$(($(date +%s) - start))
  result=$(grep -E '^(=+ )?[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)' "$OUT/run-$i.log" | tail -1 | tr -d '=' | sed 's/^ *//')
  printf '%s\t%s\t%s\t%s\n' "$i" "$code" "$secs" "$result" | tee -a "$OUT/summary.tsv"
  [ "$code" -eq 0 ] || failed=1
done
echo "logs and summary: $OUT"
exit "$failed"
