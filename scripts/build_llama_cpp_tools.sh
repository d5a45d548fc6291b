#!/usr/bin/env bash
# Build llama.cpp's own llama-quantize, llama-imatrix and llama-gguf-split, once, from the source that the installed
# llama-cpp-python vendors (the llama.cpp whose libggml-base the byte-identity tests load), and
# print the folder holding them. Idempotent: a finished build is reused; concurrent runs wait.
#
#   scripts/build_llama_cpp_tools.sh            # -> ~/.cache/minicpm-convert/llama.cpp-<version>/bin
#   JOBS=4 scripts/build_llama_cpp_tools.sh     # parallel compile jobs (default 2)
#
# Portable flags (GGML_NATIVE=OFF), static, only the three tools: ~10 minutes on 2 cores.
set -euo pipefail

VERSION=${LLAMA_CPP_PYTHON_VERSION:-$(python3 -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}
CACHE=${MINICPM_CONVERT_CACHE:-$HOME/.cache/minicpm-convert}
SDIST=$CACHE/sdist
SRC=$SDIST/llama_cpp_python-$VERSION/vendor/llama.cpp
BUILD=$CACHE/llama.cpp-$VERSION
BIN=$BUILD/bin

mkdir -p "$CACHE"
exec 9>"$BUILD.lock"
flock 9  # one build at a time; a second caller finds it done

TOOLS=(llama-quantize llama-imatrix llama-gguf-split)
if [ -f "$BUILD/.complete" ] && [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-imatrix" ] \
    && [ -x "$BIN/llama-gguf-split" ]; then
    echo "$BIN"
    exit 0
fi

if [ ! -d "$SRC" ]; then
    mkdir -p "$SDIST"
    if [ ! -f "$SDIST/llama_cpp_python-$VERSION.tar.gz" ]; then
        python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$SDIST" "llama-cpp-python==$VERSION" >&2
    fi
    tar -xzf "$SDIST/llama_cpp_python-$VERSION.tar.gz" -C "$SDIST"
fi

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
cmake -S "$SRC" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF >&2
cmake --build "$BUILD" --target "${TOOLS[@]}" -j "${JOBS:-2}" >&2
touch "$BUILD/.complete"
echo "$BIN"
