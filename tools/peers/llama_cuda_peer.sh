#!/usr/bin/env bash
# GPU peer for the model benchmark: builds llama.cpp's `llama-bench` with its CUDA backend for
# one architecture (sm_90a, Hopper) from the llama.cpp copy bundled in the llama-cpp-python
# source distribution, as one static executable that needs only the CUDA runtime and cuBLAS
# of the machine it runs on (no NCCL, generic AVX2 host code). It builds without a GPU, so it
# can be made on a development machine (about 22 minutes on 2 cores) and copied, compressed,
# to a GPU machine, where `tools/bench_model.py --llama-bench PATH` times it on the same GGUF
# files as ggml-fa (every layer on the GPU, flash attention on). Everything lands in
# $WORK_DIR (default build/llama-cuda-peer); nothing is added to the source tree, and this
# script is not part of the normal build or the tests.
#
# usage: tools/peers/llama_cuda_peer.sh        prints the path of llama-bench
# env:   WORK_DIR, LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default 1),
#        CUDA_ARCH (default 90a-real)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
work=${WORK_DIR:-$repo_root/build/llama-cuda-peer}
jobs=${JOBS:-1}
arch=${CUDA_ARCH:-90a-real}
mkdir -p "$work"
work=$(cd "$work" && pwd)

. "$repo_root/tools/peers/llama_cpp_source.sh"
fetch_llama_cpp_source "$work" "$version"
src=$llama_cpp_src

bench="$work/llama-build/bin/llama-bench"
if [ ! -x "$bench" ]; then
    cmake -S "$src" -B "$work/llama-build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX2=ON \
        -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DCMAKE_CUDA_ARCHITECTURES="$arch" \
        -DGGML_VULKAN=OFF -DGGML_METAL=OFF >"$work/llama-configure.log" 2>&1 ||
        {
            tail -30 "$work/llama-configure.log" >&2
            exit 1
        }
    cmake --build "$work/llama-build" --target llama-bench -j"$jobs" >"$work/llama-build.log" 2>&1 ||
        {
            tail -30 "$work/llama-build.log" >&2
            exit 1
        }
fi
echo "$bench"
