// Hopper (sm_90a) warpgroup matrix products: shared-memory tiles in the layout the tensor
// cores read directly, their matrix descriptors, and wgmma.mma_async with fp32 accumulators.
//
// A warpgroup (4 consecutive warps, the first a multiple of 4) multiplies a 64-row A by an
// N-column B in k-steps of 16. Accumulator layout (per warp w of the group, lane (g, t) =
// (lane / 4, lane % 4)): d[4 n + 2 r + c] holds row 16 w + 8 r + g, column 8 n + 2 t + c, which
// is the mma.sync m16n8 layout repeated over the N / 8 column tiles; an A operand in
// registers has the mma.sync m16n8k16 A layout of the warp's 16 rows. So, as with mma.sync,
// the accumulators of S = Q K^T become the A operand of O += P V without leaving registers
// (acc_to_a in fa_common.cuh).
//
// Shared-memory operands use the 128-byte swizzle: a tile of ROWS x COLS 16-bit elements is
// COLS / 64 column blocks, each ROWS rows of 128 bytes, and 16-byte chunk c of row r sits at
// chunk c ^ (r % 8) of its row. With every block 1024-byte aligned, bits 4..6 of an address
// are XORed with bits 7..9, which is the pattern the descriptor's swizzle mode names.
#pragma once

#include "fa_common.cuh"

namespace gfa::cuda::fa {

template <int ROWS, int COLS> struct SwizzledTile128 {
    static_assert(COLS % 64 == 0 && ROWS % 8 == 0, "whole 128-byte rows and 8-row swizzle atoms");
    static constexpr int kRows = ROWS, kCols = COLS;
    static constexpr int kBlockBytes = ROWS * 128; // one 64-column block
    static constexpr int kBytes = ROWS * COLS * 2;
    static constexpr int kRowPitch = 128;
    uint32_t base; // shared-space address, a multiple of 1024

    __device__ __forceinline__ uint32_t chunk_addr(int row, int chunk) const {
        return base + uint32_t((chunk >> 3) * kBlockBytes + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
    }
};

// Matrix descriptor of a 128-byte-swizzled operand starting at `addr` (bits 0-13: address / 16;
// 16-29: leading byte offset / 16; 32-45: stride byte offset / 16; 62-63: swizzle mode, 1 =
// 128 bytes). K-major operands (rows along M or N, the 16 k of a step inside one 128-byte
// row): 8-row groups 1024 bytes apart (stride); the leading offset is unused. MN-major
// operands (rows along K, e.g. V in O = P V): 8-row groups of k 1024 bytes apart (stride),
// 64-column blocks `block_bytes` apart (leading).
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t leading_bytes) {
    return uint64_t((addr & 0x3ffff) >> 4) | uint64_t(leading_bytes >> 4) << 16 | uint64_t(1024 >> 4) << 32 |
           uint64_t(1) << 62;
}

__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written by ordinary stores or cp.async, read next by the tensor cores (the
// async proxy): each writing thread fences before the barrier that publishes the tile.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- wgmma.mma_async, m64nNk16, fp32 accumulators ------------------------------------------
// The operand lists are spelled out once per N; TYPE is the PTX name of the 16-bit type.

#define GFA_WG_ACC8(i)                                                                                       \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]),              \
        "+f"(d[i + 6]), "+f"(d[i + 7])
#define GFA_WG_ACC32 GFA_WG_ACC8(0), GFA_WG_ACC8(8), GFA_WG_ACC8(16), GFA_WG_ACC8(24)
#define GFA_WG_ACC64 GFA_WG_ACC32, GFA_WG_ACC8(32), GFA_WG_ACC8(40), GFA_WG_ACC8(48), GFA_WG_ACC8(56)
#define GFA_WG_REGS32                                                                                        \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "       \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define GFA_WG_REGS64                                                                                        \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "       \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "        \
    "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "        \
    "%59, %60, %61, %62, %63}"

// d (+)= A B with A and B in shared memory, each K-major or MN-major (transposed: tnspA,
// tnspB); scale_d == 0 overwrites d.
#define GFA_WGMMA_SS(NAME, N, TYPE, REGS, ACC, A, B, S, TA, TB)                                              \
    template <bool A_MN_MAJOR, bool B_MN_MAJOR>                                                              \
    __device__ __forceinline__ void NAME(float(&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {  \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" S ", 0;\n"                                         \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " REGS ", %" A        \
                     ", %" B ", p, 1, 1, %" TA ", %" TB ";\n}\n"                                             \
                     : ACC                                                                                   \
                     : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(A_MN_MAJOR ? 1 : 0),                      \
                       "n"(B_MN_MAJOR ? 1 : 0));                                                             \
    }
// d += A B with A in registers (the mma.sync A layout) and B in shared memory, MN-major
// (transposed, tnspB = 1) or K-major.
#define GFA_WGMMA_RS(NAME, N, TYPE, REGS, ACC, A0, B, TR)                                                    \
    template <bool B_MN_MAJOR>                                                                               \
    __device__ __forceinline__ void NAME(float(&d)[N / 2], const uint32_t(&a)[4], uint64_t desc_b) {         \
        asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " REGS ", {%" A0      \
                     "}, %" B ", 1, 1, 1, %" TR ";\n"                                                        \
                     : ACC                                                                                   \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(B_MN_MAJOR ? 1 : 0));    \
    }

GFA_WGMMA_SS(wgmma_ss_f16_n64, 64, "f16", GFA_WG_REGS32, GFA_WG_ACC32, "32", "33", "34", "35", "36")
GFA_WGMMA_SS(wgmma_ss_bf16_n64, 64, "bf16", GFA_WG_REGS32, GFA_WG_ACC32, "32", "33", "34", "35", "36")
GFA_WGMMA_SS(wgmma_ss_f16_n128, 128, "f16", GFA_WG_REGS64, GFA_WG_ACC64, "64", "65", "66", "67", "68")
GFA_WGMMA_SS(wgmma_ss_bf16_n128, 128, "bf16", GFA_WG_REGS64, GFA_WG_ACC64, "64", "65", "66", "67", "68")
GFA_WGMMA_RS(wgmma_rs_f16_n64, 64, "f16", GFA_WG_REGS32, GFA_WG_ACC32, "32, %33, %34, %35", "36", "37")
GFA_WGMMA_RS(wgmma_rs_bf16_n64, 64, "bf16", GFA_WG_REGS32, GFA_WG_ACC32, "32, %33, %34, %35", "36", "37")
GFA_WGMMA_RS(wgmma_rs_f16_n128, 128, "f16", GFA_WG_REGS64, GFA_WG_ACC64, "64, %65, %66, %67", "68", "69")
GFA_WGMMA_RS(wgmma_rs_bf16_n128, 128, "bf16", GFA_WG_REGS64, GFA_WG_ACC64, "64, %65, %66, %67", "68", "69")

#undef GFA_WGMMA_RS
#undef GFA_WGMMA_SS
#undef GFA_WG_REGS64
#undef GFA_WG_REGS32
#undef GFA_WG_ACC64
#undef GFA_WG_ACC32
#undef GFA_WG_ACC8

// The products by compute type T and width N (64 or 128); A and B K-major unless named
// MN-major.
template <class T, int N, bool A_MN_MAJOR = false, bool B_MN_MAJOR = false>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    static_assert(N == 64 || N == 128, "instantiated widths");
    constexpr bool f16 = Elem<T>::code == kF16;
    constexpr bool ta = A_MN_MAJOR, tb = B_MN_MAJOR;
    if constexpr (N == 64)
        f16 ? wgmma_ss_f16_n64<ta, tb>(d, desc_a, desc_b, scale_d)
            : wgmma_ss_bf16_n64<ta, tb>(d, desc_a, desc_b, scale_d);
    else
        f16 ? wgmma_ss_f16_n128<ta, tb>(d, desc_a, desc_b, scale_d)
            : wgmma_ss_bf16_n128<ta, tb>(d, desc_a, desc_b, scale_d);
}
template <class T, int N, bool B_MN_MAJOR>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b) {
    static_assert(N == 64 || N == 128, "instantiated widths");
    constexpr bool f16 = Elem<T>::code == kF16;
    if constexpr (N == 64)
        f16 ? wgmma_rs_f16_n64<B_MN_MAJOR>(d, a, desc_b) : wgmma_rs_bf16_n64<B_MN_MAJOR>(d, a, desc_b);
    else
        f16 ? wgmma_rs_f16_n128<B_MN_MAJOR>(d, a, desc_b) : wgmma_rs_bf16_n128<B_MN_MAJOR>(d, a, desc_b);
}

} // namespace gfa::cuda::fa
