#!/usr/bin/env bash
# Same-machine peer for the CPU attention benchmarks: builds ggml's CPU library from the
# llama.cpp copy bundled in the llama-cpp-python source distribution, builds our
# ggml_fa_peer.c against it and runs it. Everything downloaded or built lands in
# $WORK_DIR (default build/ggml-peer); nothing is added to the source tree, and this
# script is not part of the normal build or the tests.
#
# usage: tools/peers/ggml_cpu_peer.sh [ggml_fa_peer args, e.g. --reps 7 --quick]
# env:   WORK_DIR (build folder), LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default 2)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
work=${WORK_DIR:-$repo_root/build/ggml-peer}
jobs=${JOBS:-2}
mkdir -p "$work"
work=$(cd "$work" && pwd)

# 1. Source: the sdist carries llama.cpp (and ggml) under vendor/.
. "$repo_root/tools/peers/llama_cpp_source.sh"
fetch_llama_cpp_source "$work" "$version"
ggml="$llama_cpp_src/ggml"

# 2. ggml's CPU library only: Release, tuned for this machine, static, no tests/examples.
cmake -S "$ggml" -B "$work/ggml-build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF >"$work/ggml-configure.log"
cmake --build "$work/ggml-build" --target ggml-cpu -j"$jobs" >"$work/ggml-build.log"

# 3. The peer program, linked against the static libraries (C++ runtime and OpenMP, which
#    ggml-cpu uses for its threads when the compiler has it).
libs=$(find "$work/ggml-build" -name 'libggml-cpu.a' -o -name 'libggml-base.a' | sort -r)
openmp=""
if grep -q '^GGML_OPENMP:BOOL=ON' "$work/ggml-build/CMakeCache.txt"; then openmp="-fopenmp"; fi
cc -O2 -march=native -std=gnu11 -Wall -Wextra -I"$ggml/include" "$repo_root/tools/peers/ggml_fa_peer.c" \
    $libs $openmp -lstdc++ -lm -lpthread -o "$work/ggml_fa_peer"

# 4. Run, with the ggml revision and the machine in the header.
echo "# ggml $(sed -n "s/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) *\([0-9]*\))/\2/p" "$ggml/CMakeLists.txt" | paste -sd.) from llama-cpp-python $version"
echo "# cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, openmp=$([ -n "$openmp" ] && echo on || echo off)"
"$work/ggml_fa_peer" "$@"
