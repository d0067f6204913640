// CPU kernels (internal): each op family registers its kernels in a table indexed by Op.
// A kernel gets the node to compute and the thread pool, and splits the work itself.
#pragma once

#include <ggml-fa/tensor.h>

#include "thread_pool.h"

#include <algorithm>
#include <array>
#include <cstdint>

namespace gfa::cpu {

struct ComputeCtx {
    ThreadPool& pool;
};

using Kernel = void (*)(const ComputeCtx& ctx, Tensor* dst);
// Exact check that the kernel handles this node (types, layouts); nullptr means "always".
using Supports = bool (*)(const Tensor* dst);

struct KernelEntry {
    Kernel run = nullptr;
    Supports supports = nullptr;
};
using KernelTable = std::array<KernelEntry, size_t(Op::Count)>;

const KernelTable& kernels();

void register_movement_kernels(KernelTable& t);
void register_elementwise_kernels(KernelTable& t);
void register_reduce_kernels(KernelTable& t);
void register_matmul_kernels(KernelTable& t);
// Whether mul_mat multiplies quantized weights by many columns in integers (builds for AVX-512
// with VNNI): b's columns are then rounded to 16 bits per 32 values (per 256 for q2_K and
// q3_K; 14 bits per 64 for q6_K).
bool integer_quantized_prompts();
// Whether that integer GEMM runs its products on AMX tiles (builds for AMX-INT8, on a CPU and
// kernel that grant the tiles; GFA_CPU_AMX=0 turns it off): the same results, bit for bit.
bool amx_quantized_prompts();
// True when the CPU kernels multiply bf16 pairs (AVX512-BF16 builds): mul_mat with
// MatMulPrecision::BF16 and f32/f16/bf16 weights then rounds both operands to bf16 in prompts.
bool bf16_pair_products();
void register_norm_kernels(KernelTable& t);
void register_activation_kernels(KernelTable& t);
void register_training_kernels(KernelTable& t);
void register_attention_kernels(KernelTable& t);

// ---- helpers shared by kernels ----------------------------------------------------------

// Address of element (i0, i1, i2, i3) of t.
inline char* element_ptr(const Tensor* t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    return static_cast<char*>(t->data) + i0 * t->nb[0] + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3];
}
inline float* f32_row(const Tensor* t, int64_t i1, int64_t i2, int64_t i3) {
    return reinterpret_cast<float*>(element_ptr(t, 0, i1, i2, i3));
}
// Calls fn(i1, i2, i3) for this worker's share of t's rows.
// How many workers a job over t's rows can use: one row is never split, so a worker more
// would only be woken to find nothing to do (for a decoded token's single rows, waking the
// whole pool cost more than the work).
inline int rows_of(const Tensor* t) {
    return int(std::min<int64_t>(t->nrows(), INT32_MAX));
}

template <class Fn> void for_each_row(const Tensor* t, int ith, int nth, Fn&& fn) {
    const int64_t n = t->nrows();
    const auto [begin, end] = split_range(n, ith, nth);
    for (int64_t r = begin; r < end; ++r) {
        const int64_t i1 = r % t->ne[1];
        const int64_t i2 = (r / t->ne[1]) % t->ne[2];
        const int64_t i3 = r / (t->ne[1] * t->ne[2]);
        fn(i1, i2, i3);
    }
}

} // namespace gfa::cpu
