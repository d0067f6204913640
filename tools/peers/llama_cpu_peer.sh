#!/usr/bin/env bash
# Same-machine peer for the CPU model benchmark: builds llama.cpp's `llama-bench` (CPU only)
# from the llama.cpp copy bundled in the llama-cpp-python source distribution and runs it on
# the GGUF files given. Also builds llama_logits_peer.c against the same libllama (llama.cpp's
# logits for a prompt of token ids, for agreement checks). Everything downloaded or built lands in $WORK_DIR (default
# build/llama-peer); nothing is added to the source tree, and this script is not part of the
# normal build or the tests.
#
# usage: tools/peers/llama_cpu_peer.sh [--build-only] [llama-bench args] [-- FILE.gguf ...]
#   With files after "--", runs `llama-bench -m FILE <args>` for each (default args:
#   -p 512 -n 128 -t 2 -r 3 -o md). With --build-only, only builds and prints the paths of
#   llama-bench and llama_logits_peer, one a line.
# env:   WORK_DIR (build folder), LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default 1),
#        LLAMA_NO_AMX=1: build for this CPU's instruction sets but without ggml's AMX kernels
#        (default folder build/llama-peer-noamx). In llama.cpp 0c1e570 they crashed (SIGSEGV in
#        ggml_backend_amx_mul_mat) on an AMX-capable Xeon, where AMX itself worked; this keeps
#        llama.cpp's other repacked layouts, which llama-bench --repack 0 would also turn off.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
no_amx=${LLAMA_NO_AMX:-0}
if [ "$no_amx" = 1 ]; then
    work=${WORK_DIR:-$repo_root/build/llama-peer-noamx}
else
    work=${WORK_DIR:-$repo_root/build/llama-peer}
fi
jobs=${JOBS:-1}
mkdir -p "$work"
work=$(cd "$work" && pwd)

build_only=0
bench_args=()
files=()
while [ $# -gt 0 ]; do
    case "$1" in
    --build-only) build_only=1 ;;
    --)
        shift
        files=("$@")
        break
        ;;
    *) bench_args+=("$1") ;;
    esac
    shift
done
if [ ${#bench_args[@]} -eq 0 ]; then bench_args=(-p 512 -n 128 -t 2 -r 3 -o md); fi
if [ $build_only -eq 0 ] && [ ${#files[@]} -eq 0 ]; then
    echo "usage: $0 [--build-only] [llama-bench args] [-- FILE.gguf ...]" >&2
    exit 2
fi

# 1. Source: the sdist carries llama.cpp (and ggml) under vendor/llama.cpp.
. "$repo_root/tools/peers/llama_cpp_source.sh"
fetch_llama_cpp_source "$work" "$version"
src=$llama_cpp_src

# 2. llama-bench only: CPU backend, Release, tuned for this machine, static, no network
#    support (no CURL/OpenSSL: nothing is downloaded at run time), no tests/examples/server.
bench="$work/llama-build/bin/llama-bench"
if [ ! -x "$bench" ]; then
    isa=(-DGGML_NATIVE=ON)
    if [ "$no_amx" = 1 ]; then
        # This CPU's extensions one by one (what -march=native would give), AMX left out.
        has() { grep -qw "$1" /proc/cpuinfo; }
        isa=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
        for pair in avx:AVX avx2:AVX2 bmi2:BMI2 fma:FMA f16c:F16C avx_vnni:AVX_VNNI avx512f:AVX512 \
            avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
            if has "${pair%%:*}"; then isa+=("-DGGML_${pair##*:}=ON"); else isa+=("-DGGML_${pair##*:}=OFF"); fi
        done
    fi
    cmake -S "$src" -B "$work/llama-build" -DCMAKE_BUILD_TYPE=Release "${isa[@]}" \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF >"$work/llama-configure.log" 2>&1 ||
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
# 3. The logits peer, linked against the static libraries (C++ runtime and OpenMP, which
#    ggml-cpu uses for its threads when the compiler has it).
logits_peer="$work/llama_logits_peer"
if [ ! -x "$logits_peer" ] || [ "$repo_root/tools/peers/llama_logits_peer.c" -nt "$logits_peer" ]; then
    libs=$(find "$work/llama-build" -name 'libllama.a' -o -name 'libggml.a' -o -name 'libggml-cpu.a' -o \
        -name 'libggml-base.a')
    # Static libraries in dependency order: llama, ggml, ggml-cpu, ggml-base.
    ordered=""
    for lib in libllama.a libggml.a libggml-cpu.a libggml-base.a; do
        ordered+=" $(echo "$libs" | grep "/$lib\$" | head -1)"
    done
    openmp=""
    if grep -q '^GGML_OPENMP:BOOL=ON' "$work/llama-build/CMakeCache.txt"; then openmp="-fopenmp"; fi
    cc -O2 -std=gnu11 -Wall -Wextra -I"$src/include" -I"$src/ggml/include" \
        "$repo_root/tools/peers/llama_logits_peer.c" $ordered $openmp -lstdc++ -lm -lpthread -o "$logits_peer"
fi
if [ $build_only -eq 1 ]; then
    echo "$bench"
    echo "$logits_peer"
    exit 0
fi

# 4. Run, with the llama.cpp revision and the machine in the header.
echo "# llama.cpp from llama-cpp-python $version ($("$bench" --version 2>&1 | head -1))"
echo "# cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
for file in "${files[@]}"; do
    "$bench" -m "$file" "${bench_args[@]}"
done
