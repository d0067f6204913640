// Internal: the tile shapes per head-dim tile and the launch glue that each fa_tile_dXX.cu
// instantiates for its own head-dim tile.
#pragma once

#include "fa_backward.cuh"
#include "fa_backward_wide.cuh"
#include "fa_forward.cuh"
#include "fa_launch.h"

#include <ggml-fa/error.h>

#include <string>

namespace gfa::cuda::fa {

// Forward tiles (FlashAttention-2 shapes for the mma.sync generation), measured on an H100:
// D = 64: 4 warps x 32 rows, 128-key tiles (6% faster than 64-key tiles: half the
// per-tile barriers and softmax bookkeeping); D = 128: 4 warps x 32 rows, 64-key tiles (the
// O and S accumulators fill the register file; 32-key tiles were 3% slower; skipping the
// rescale of unchanged rows gained 8%); D = 256:
// 8 warps x 16 rows (BM = 128, so each K/V tile feeds twice the rows of a 4-warp block; 4%
// faster), the O accumulator of 16 rows x 256 fitting in registers, P made 16 keys at a time
// inside the P V loop (EXP_IN_PV; 1-3% faster, H200). Decode (few packed rows, split KV): 4
// warps of 16 rows, so a block has 128 threads to stream K/V while the tensor cores idle on padded rows
// (memory-bound anyway). Backward: 4 warps, 64 keys x 64 queries, Q/dO double-buffered up to D = 128; D = 256
// splits the gradient columns over 2 blocks. Wide backward (FlashAttention-2 shapes), 8 warps: D = 64 128
// keys x 128 queries; D = 128 128 x 64; D = 256 64 x 64 (2 warps along the keys, 4 along the queries/columns,
// so the dK/dV accumulators fit in registers without a split). Its dQ atomics go out after a
// warp's whole dQ block at D = 64/128, per 16-column group at D = 256 (2-4% faster there, 0-2%
// slower at 64/128, H200).
template <int D> struct TileConfig;
template <> struct TileConfig<64> {
    template <class T> using Fwd = FwdTraits<64, T, 4, 2, 128>;
    template <class T> using Decode = FwdTraits<64, T, 4, 1, 64>;
    template <class T> using Bwd = BwdTraits<64, 1, T, 4, 64, 2>;
    template <class T> using BwdWide = BwdWideTraits<64, T, 128, 128, 4>;
};
template <> struct TileConfig<128> {
    template <class T> using Fwd = FwdTraits<128, T, 4, 2, 64, true>;
    template <class T> using Decode = FwdTraits<128, T, 4, 1, 64>;
    template <class T> using Bwd = BwdTraits<128, 1, T, 4, 64, 2>;
    template <class T> using BwdWide = BwdWideTraits<128, T, 128, 64, 4>;
};
template <> struct TileConfig<256> {
    template <class T> using Fwd = FwdTraits<256, T, 8, 1, 64, false, true>;
    template <class T> using Decode = FwdTraits<256, T, 4, 1, 64>;
    template <class T> using Bwd = BwdTraits<256, 2, T, 4, 64, 1>;
    template <class T> using BwdWide = BwdWideTraits<256, T, 64, 64, 2, 1>;
};

inline void check_launch(const char* what) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        gfa::fail(std::string("flash_attn_ext (CUDA): launching ") + what +
                  " failed: " + cudaGetErrorString(err));
}

inline void set_smem(const void* kernel, int bytes, const char* what) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess)
        gfa::fail(std::string("flash_attn_ext (CUDA): ") + what + " needs " + std::to_string(bytes) +
                  " bytes of shared memory, more than the device allows");
}

template <class Tr> KernelInfo fwd_info_of() {
    KernelInfo info{Tr::BM, Tr::BN, Tr::kThreads, Tr::kSmemBytes, 0};
    set_smem(reinterpret_cast<const void*>(fwd_kernel<Tr, false>), Tr::kSmemBytes, "the forward kernel");
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.blocks_per_sm, fwd_kernel<Tr, false>, Tr::kThreads,
                                                  Tr::kSmemBytes);
    return info;
}

template <class Tr> void fwd_launch_one(const FwdArgs& a, dim3 grid, cudaStream_t st) {
    static const bool ready =
        (set_smem(reinterpret_cast<const void*>(fwd_kernel<Tr, false>), Tr::kSmemBytes, "the forward kernel"),
         set_smem(reinterpret_cast<const void*>(fwd_kernel<Tr, true>), Tr::kSmemBytes, "the forward kernel"),
         true);
    (void)ready;
    if (a.mask_tiles.cls)
        fwd_kernel<Tr, true><<<grid, Tr::kThreads, Tr::kSmemBytes, st>>>(a);
    else
        fwd_kernel<Tr, false><<<grid, Tr::kThreads, Tr::kSmemBytes, st>>>(a);
    check_launch("the forward kernel");
}

template <int D> KernelInfo fwd_info_tile(bool decode) {
    using C = TileConfig<D>;
    return decode ? fwd_info_of<typename C::template Decode<__half>>()
                  : fwd_info_of<typename C::template Fwd<__half>>();
}

template <int D> void fwd_launch_tile(bool bf16, bool decode, const FwdArgs& a, dim3 grid, cudaStream_t st) {
    using C = TileConfig<D>;
    if (decode) {
        if (bf16)
            fwd_launch_one<typename C::template Decode<__nv_bfloat16>>(a, grid, st);
        else
            fwd_launch_one<typename C::template Decode<__half>>(a, grid, st);
    } else {
        if (bf16)
            fwd_launch_one<typename C::template Fwd<__nv_bfloat16>>(a, grid, st);
        else
            fwd_launch_one<typename C::template Fwd<__half>>(a, grid, st);
    }
}

template <int D> BwdInfo bwd_info_tile() {
    using Tr = typename TileConfig<D>::template Bwd<__half>;
    using Wide = typename TileConfig<D>::template BwdWide<__half>;
    BwdInfo info{Tr::BM, Tr::BN, Tr::DSPLIT, Tr::kThreads, Tr::kSmemKV, Tr::kSoftcapBytes, Tr::kSmemQ};
    info.wide_bn = Wide::BN, info.wide_bm = Wide::BM, info.wide_threads = Wide::kThreads;
    info.wide_smem = Wide::kSmem;
    return info;
}

template <class Tr, class Wide>
void bwd_launch_one(BwdKernel which, const BwdArgs& a, dim3 grid, cudaStream_t st) {
    if (which == BwdKernel::QueryTile) {
        static const bool ready =
            (set_smem(reinterpret_cast<const void*>(bwd_q_kernel<Tr>), Tr::kSmemQ, "the backward dQ kernel"),
             true);
        (void)ready;
        bwd_q_kernel<Tr><<<grid, Tr::kThreads, Tr::kSmemQ, st>>>(a);
        check_launch("the backward dQ kernel");
    } else if (which == BwdKernel::KeyTileWide) {
        static const bool ready = (set_smem(reinterpret_cast<const void*>(bwd_kv_wide_kernel<Wide, false>),
                                            Wide::kSmem, "the 8-warp backward dK/dV kernel"),
                                   set_smem(reinterpret_cast<const void*>(bwd_kv_wide_kernel<Wide, true>),
                                            Wide::kSmem, "the 8-warp backward dK/dV kernel"),
                                   true);
        (void)ready;
        if (a.mask_tiles.cls)
            bwd_kv_wide_kernel<Wide, true><<<grid, Wide::kThreads, Wide::kSmem, st>>>(a);
        else
            bwd_kv_wide_kernel<Wide, false><<<grid, Wide::kThreads, Wide::kSmem, st>>>(a);
        check_launch("the 8-warp backward dK/dV kernel");
    } else {
        static const bool ready = (set_smem(reinterpret_cast<const void*>(bwd_kv_kernel<Tr>),
                                            Tr::kSmemKV + Tr::kSoftcapBytes, "the backward dK/dV kernel"),
                                   true);
        (void)ready;
        const int smem = Tr::kSmemKV + (a.s.softcap > 0.0f ? Tr::kSoftcapBytes : 0);
        bwd_kv_kernel<Tr><<<grid, Tr::kThreads, smem, st>>>(a);
        check_launch("the backward dK/dV kernel");
    }
}

template <int D>
void bwd_launch_tile(bool bf16, BwdKernel which, const BwdArgs& a, dim3 grid, cudaStream_t st) {
    using C = TileConfig<D>;
    if (bf16)
        bwd_launch_one<typename C::template Bwd<__nv_bfloat16>, typename C::template BwdWide<__nv_bfloat16>>(
            which, a, grid, st);
    else
        bwd_launch_one<typename C::template Bwd<__half>, typename C::template BwdWide<__half>>(which, a, grid,
                                                                                               st);
}

} // namespace gfa::cuda::fa
