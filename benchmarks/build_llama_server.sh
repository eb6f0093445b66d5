#!/usr/bin/env bash
# Build llama.cpp's own C++ server (`llama-server`) outside the repository, for the side-by-side
# benchmark (benchmarks/bench_llama_server.py). The source is the llama.cpp vendored in the
# llama-cpp-python sdist on PyPI, so it builds with the package registry as the only network access.
#
#   benchmarks/build_llama_server.sh [BUILD_DIR]     (default: ~/.cache/servekit/llama.cpp)
#
# Prints the binary's path on its last line. Vector flags follow this CPU's /proc/cpuinfo (no
# -march=native, so the binary runs on the CPU it was built on and names what it uses); AMX stays off
# (it crashed llama-server on an AMX machine).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
BUILD_DIR="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/servekit/llama.cpp}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$BUILD_DIR"
cd "$BUILD_DIR"

if [ -x "build/bin/llama-server" ]; then
  echo "already built" >&2
  echo "$BUILD_DIR/build/bin/llama-server"
  exit 0
fi

if [ ! -d "src/vendor/llama.cpp" ]; then
  "$PYTHON" -m pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d sdist >&2
  rm -rf src && mkdir src
  tar -xzf sdist/llama_cpp_python-"$VERSION".tar.gz -C src --strip-components=1
fi

flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { [[ "$flags" == *" $1 "* ]]; }
on_off() { if has "$1"; then echo ON; else echo OFF; fi; }

cmake_args=(
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
  -DGGML_AVX="$(on_off avx)" -DGGML_AVX2="$(on_off avx2)" -DGGML_FMA="$(on_off fma)"
  -DGGML_F16C="$(on_off f16c)" -DGGML_BMI2="$(on_off bmi2)" -DGGML_AVX_VNNI="$(on_off avx_vnni)"
  -DGGML_AVX512="$(on_off avx512f)" -DGGML_AVX512_VBMI="$(on_off avx512vbmi)"
  -DGGML_AVX512_VNNI="$(on_off avx512_vnni)" -DGGML_AVX512_BF16="$(on_off avx512_bf16)"
)
echo "cmake ${cmake_args[*]}" >&2
cmake -S src/vendor/llama.cpp -B build "${cmake_args[@]}" >&2
cmake --build build --target llama-server -j "$JOBS" >&2
echo "$BUILD_DIR/build/bin/llama-server"
