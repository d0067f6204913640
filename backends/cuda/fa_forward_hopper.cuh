// FlashAttention forward on Hopper's warpgroup tensor cores (wgmma, sm_90a), for the plain
// problems of prefill: no explicit mask, no softcap; causal and window limits, GQA packing,
// sinks, LSE and split-KV partials as in fa_forward.cuh, whose grid, row packing and key-tile
// order this kernel shares.
//
// Each warpgroup owns 64 packed query rows; the block's NWG warpgroups share the K/V tiles,
// which every thread helps copy (cp.async, two stages) into 128-byte-swizzled shared memory
// that wgmma reads directly: Q and K as K-major operands, V as an MN-major one, so no
// fragment is loaded by the warps themselves (the mma.sync kernel spends its issue slots on
// ldmatrix). Per key tile:
//   S = Q K^T        wgmma from shared memory, fp32 accumulators in registers
//   softmax          base 2, online: row max and sum across the quad, P = exp2(S - m)
//   O = O c + P V    P from the S accumulators as the register A operand
// With OVERLAP (the schedule of FlashAttention-3's intra-warpgroup pipelining) the products
// of tile j + 1's S and of tile j's P V are issued together, and tile j + 1's softmax runs
// while P V is still in the tensor cores; V then lags K by one tile in the copies.
#pragma once

#include "fa_args.h"
#include "fa_common.cuh"
#include "fa_forward.cuh"
#include "fa_tile_load.cuh"
#include "wgmma.cuh"

namespace gfa::cuda::fa {

template <int D_, class T_, int NWG_, int BN_, bool OVERLAP_> struct HopperFwdTraits {
    static constexpr int D = D_, NWG = NWG_, BN = BN_, BM = 64 * NWG_, kThreads = 128 * NWG_;
    static constexpr bool kOverlap = OVERLAP_;
    using T = T_;
    using TileQ = SwizzledTile128<BM, D>;
    using TileKV = SwizzledTile128<BN, D>;
    // Q, two stages of K and of V, and room to round the base up to 1024 bytes.
    static constexpr int kSmemBytes = TileQ::kBytes + 4 * TileKV::kBytes + 1024;
};

template <class Tr> __global__ void __launch_bounds__(Tr::kThreads, 1) fwd_hopper_kernel(const FwdArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using T = typename Tr::T;
    using TileKV = typename Tr::TileKV;
    constexpr int D = Tr::D, BM = Tr::BM, BN = Tr::BN, NT = Tr::kThreads;
    constexpr int NS = BN / 8, NO = D / 8; // 8-column accumulator tiles of S and of O
    extern __shared__ uint4 smem[];
    const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u;
    const typename Tr::TileQ sQ{base};
    const uint32_t kv_base = base + Tr::TileQ::kBytes;
    auto sK = [&](int stage) { return TileKV{kv_base + uint32_t(stage * TileKV::kBytes)}; };
    auto sV = [&](int stage) { return TileKV{kv_base + uint32_t((2 + stage) * TileKV::kBytes)}; };

    const Shape& s = a.s;
    const int wg = int(threadIdx.x) >> 7, warp = (int(threadIdx.x) >> 5) & 3, lane = int(threadIdx.x) & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int rows_total = s.Sq * s.G;
    const int n_row_tiles = (rows_total + BM - 1) / BM;
    const GridPos pos = grid_pos(blockIdx.x, s.Hkv, s.B * a.n_split, n_row_tiles, a.tile_group);
    const int p0 = (a.longest_first ? n_row_tiles - 1 - pos.tile : pos.tile) * BM;
    const int hk = pos.head;
    const int b = pos.outer / a.n_split, split = pos.outer % a.n_split;

    // ---- the keys this block can see: the union over its rows, cut to its split ----
    const int i_min = p0 / s.G, i_max = min(s.Sq - 1, (p0 + BM - 1) / s.G);
    int kv_lo = 0, kv_hi = s.Skv;
    if (s.has_hi) kv_hi = min(kv_hi, s.diag(i_max) + s.hi_off + 1);
    if (s.has_lo) kv_lo = max(kv_lo, s.diag(i_min) + s.lo_off);
    if (a.n_split > 1) {
        kv_lo = max(kv_lo, split * a.split_keys);
        kv_hi = min(kv_hi, (split + 1) * a.split_keys);
    }
    const int tile_first = kv_lo / BN;
    const int tile_last = kv_hi > kv_lo ? (kv_hi - 1) / BN : tile_first - 1;
    const int n_tiles = tile_last - tile_first + 1; // may be <= 0

    // this thread's two rows (halves r = 0, 1 of its warp's 16), clamped to the last real row
    const int row0 = wg * 64 + warp * 16;
    auto thread_row = [&](int r) { return min(p0 + row0 + r * 8 + g, rows_total - 1); };

    // ---- copies: Q once; K and V tiles by stage ----
    const char* q_base = a.q.data + b * a.q.nb3;
    auto q_row = [&](int r) {
        const int p = p0 + r;
        return q_base + int64_t(hk * s.G + p % s.G) * a.q.nb2 + int64_t(p / s.G) * a.q.nb1;
    };
    load_any_tile<T, NT>(sQ, q_row, min(BM, rows_total - p0), s.Dk, a.q.code, a.q.data);
    const char* k_base = a.k.data + b * a.k.nb3 + hk * a.k.nb2;
    const char* v_base = a.v.data + b * a.v.nb3 + hk * a.v.nb2;
    auto load_k = [&](int tile, int stage) {
        const int n0 = tile * BN;
        load_strided_tile<T, NT>(sK(stage), k_base + int64_t(n0) * a.k.nb1, a.k.nb1, min(BN, s.Skv - n0),
                                 s.Dk, a.k.code);
    };
    auto load_v = [&](int tile, int stage) {
        const int n0 = tile * BN;
        load_strided_tile<T, NT>(sV(stage), v_base + int64_t(n0) * a.v.nb1, a.v.nb1, min(BN, s.Skv - n0),
                                 s.Dv, a.v.code);
    };
    // tiles are visited from the last to the first (the boundary tiles of causal rows first)
    auto tile_of = [&](int j) { return tile_last - j; };
    if (n_tiles > 0) {
        load_k(tile_of(0), 0);
        if constexpr (!Tr::kOverlap) load_v(tile_of(0), 0);
    }
    cp_async_commit();

    // ---- descriptors: this warpgroup's 64 rows of Q; K and V of a stage ----
    // Q and K: k-step kk is 32 bytes into the 128-byte rows of column block kk / 4.
    auto q_desc = [&](int kk) {
        return wgmma_desc(
            sQ.base + uint32_t((kk >> 2) * Tr::TileQ::kBlockBytes + wg * 64 * 128 + (kk & 3) * 32), 0);
    };
    auto k_desc = [&](int stage, int kk) {
        return wgmma_desc(sK(stage).base + uint32_t((kk >> 2) * TileKV::kBlockBytes + (kk & 3) * 32), 0);
    };
    // V: k-step kk is rows 16 kk.. (2048 bytes each); its 64-column blocks kBlockBytes apart.
    auto v_desc = [&](int stage, int kk) {
        return wgmma_desc(sV(stage).base + uint32_t(kk * 2048), uint32_t(TileKV::kBlockBytes));
    };

    float o_acc[D / 2], sc[BN / 2];
#pragma unroll
    for (int e = 0; e < D / 2; ++e) o_acc[e] = 0.0f;
#pragma unroll
    for (int e = 0; e < BN / 2; ++e) sc[e] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    uint32_t pa[BN / 16][4]; // P of the tile whose P V is pending (OVERLAP)
    const float scale_log2 = s.scale * kLog2e;

    auto issue_scores = [&](int stage) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) wgmma_ss<T, BN>(sc, q_desc(kk), k_desc(stage, kk), kk);
        wgmma_commit();
    };
    auto issue_pv = [&](int stage) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs<T, D, true>(o_acc, pa[kk], v_desc(stage, kk));
        wgmma_commit();
    };
    // Visibility of the keys of tile `tile` (the tile at either end of a causal or window
    // range, or the last, partial one): hidden scores to -inf.
    auto mask_boundary = [&](int tile) {
        const int n0 = tile * BN;
        const bool boundary = n0 + BN > s.Skv || (s.has_hi && n0 + BN - 1 > s.diag(i_min) + s.hi_off) ||
                              (s.has_lo && n0 < s.diag(i_max) + s.lo_off);
        if (!boundary) return;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const Shape::KeyRange keys = s.visible_keys(thread_row(r) / s.G);
            const int lo = keys.lo - (n0 + 2 * t4), hi = keys.hi - (n0 + 2 * t4);
#pragma unroll
            for (int nt = 0; nt < NS; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int col = nt * 8 + c;
                    float& x = sc[nt * 4 + 2 * r + c];
                    x = col < lo || col > hi ? -INFINITY : x;
                }
        }
    };
    // Online softmax of the raw scores in sc (the scale joins the exponent): P in place, the
    // row sums and maxima updated; returns the factors the O rows must be multiplied by.
    auto softmax = [&](float(&corr)[2]) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < NS; ++nt) mx = fmaxf(mx, fmaxf(sc[nt * 4 + 2 * r], sc[nt * 4 + 2 * r + 1]));
            const float m_new = fmaxf(row_max[r], quad_max(mx) * scale_log2);
            const float m_use = m_new == -INFINITY ? 0.0f : m_new; // fully masked so far: no NaN
            corr[r] = fast_exp2(row_max[r] - m_use);
            row_max[r] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NS; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    float& x = sc[nt * 4 + 2 * r + c];
                    x = fast_exp2(fmaf(x, scale_log2, -m_use));
                    sum += x;
                }
            row_sum[r] = row_sum[r] * corr[r] + sum; // quad-partial; reduced in the epilogue
        }
    };
    auto rescale_o = [&](const float(&corr)[2]) {
#pragma unroll
        for (int e = 0; e < D / 2; ++e) o_acc[e] *= corr[(e >> 1) & 1];
    };
    auto p_to_a = [&] {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            pa[kk][0] = Elem<T>::pack(sc[8 * kk + 0], sc[8 * kk + 1]);
            pa[kk][1] = Elem<T>::pack(sc[8 * kk + 2], sc[8 * kk + 3]);
            pa[kk][2] = Elem<T>::pack(sc[8 * kk + 4], sc[8 * kk + 5]);
            pa[kk][3] = Elem<T>::pack(sc[8 * kk + 6], sc[8 * kk + 7]);
        }
    };
    // All copies issued so far have landed and are visible to the tensor cores; every warp is
    // done with the stage the next copies overwrite.
    auto tiles_ready = [] {
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
    };

    for (int j = 0; j < n_tiles; ++j) {
        const int tile = tile_of(j), stage = j & 1;
        tiles_ready();
        if constexpr (Tr::kOverlap) {
            // K of tile j + 1 and V of tile j (V of tile j - 1 is still to be read)
            if (j + 1 < n_tiles) load_k(tile_of(j + 1), stage ^ 1);
            load_v(tile, stage);
            cp_async_commit();
            wgmma_fence();
            issue_scores(stage);
            if (j > 0) {
                issue_pv(stage ^ 1);
                wgmma_wait<1>(); // the scores; P V of tile j - 1 may still run
            } else {
                wgmma_wait<0>();
            }
            mask_boundary(tile);
            float corr[2];
            softmax(corr);
            wgmma_wait<0>();
            rescale_o(corr);
            p_to_a();
        } else {
            if (j + 1 < n_tiles) {
                load_k(tile_of(j + 1), stage ^ 1);
                load_v(tile_of(j + 1), stage ^ 1);
            }
            cp_async_commit();
            wgmma_fence();
            issue_scores(stage);
            wgmma_wait<0>();
            mask_boundary(tile);
            float corr[2];
            softmax(corr);
            rescale_o(corr);
            p_to_a();
            wgmma_fence();
            issue_pv(stage);
            wgmma_wait<0>();
        }
    }
    if constexpr (Tr::kOverlap) {
        if (n_tiles > 0) { // the last tile's P V
            tiles_ready();
            wgmma_fence();
            issue_pv((n_tiles - 1) & 1);
            wgmma_wait<0>();
        }
    }
    cp_async_wait<0>(); // a block with no visible keys still has its Q copy in flight

    // ---- epilogue: O /= l (sinks join the denominator), LSE = m + log l ----
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int p = p0 + row0 + r * 8 + g;
        const float l = quad_sum(row_sum[r]);
        if (p >= rows_total) continue;
        write_output_row<NO>(a, p, hk, b, split, t4, l, row_max[r],
                             [&](int dt, int c) { return o_acc[dt * 4 + 2 * r + c]; });
    }
#else
    __trap(); // launched only where the sm_90a code was built (hopper_forward_available)
#endif
}

} // namespace gfa::cuda::fa
