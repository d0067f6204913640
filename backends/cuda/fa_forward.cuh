// FlashAttention-2 forward on tensor cores (mma.sync m16n8k16), and its split-KV
// ("flash-decoding") variant for few query rows.
//
// Grid: (row tiles, KV heads, batch x splits). Rows are "packed": row p of a KV head is
// query position i = p / G of query head hk*G + p % G, so the G query heads that share a
// KV head sit in one block and K/V are read once for all of them (GQA packing; with G = 1
// this is the usual one-head-per-block layout). A block owns BM rows; each warp owns MI
// groups of 16 whole rows, so row max and row sum need only shuffles inside a quad.
// The block walks its K/V tiles from the last to the first, so the boundary tiles that
// need the visibility mask come first and the rest run without mask code.
#pragma once

#include "fa_args.h"
#include "fa_common.cuh"
#include "fa_tile_load.cuh"

namespace gfa::cuda::fa {

// Tile shape of one forward kernel: head-dimension tile D (the real head dims are <= D and
// zero-padded), compute type T, warps NW, 16-row groups per warp MI, key tile BN.
// SKIP_RESCALE: skip the O rescale of a tile when no row maximum of the warp changed (a
// win where the O accumulator is largest relative to the tile, D = 128; measured slower at
// D = 64 and 256, where the branch splits the softmax from the P V products).
// EXP_IN_PV: make P 16 keys at a time inside the P V loop, so that one step's exponentials
// (special-function units) issue while the step before's products (tensor cores) are in
// flight; else all of P first. Faster where the exponentials are many per product, D = 256
// with its 64-key tile (2-4%, H200); 3-4% slower at D = 128, no faster at D = 64.
template <int D_, class T_, int NW_, int MI_, int BN_, bool SKIP_RESCALE = false, bool EXP_IN_PV = false>
struct FwdTraits {
    static constexpr int D = D_, NW = NW_, MI = MI_, BN = BN_;
    static constexpr bool kSkipRescale = SKIP_RESCALE, kExpInPV = EXP_IN_PV;
    static constexpr int BM = 16 * MI * NW;
    static constexpr int kThreads = 32 * NW;
    using T = T_;
    using TileQ = SmemTile<BM, D>;
    using TileKV = SmemTile<BN, D>;
    static constexpr int kSmemBytes = TileQ::kBytes + 2 * TileKV::kBytes;
};

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float fast_tanh(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float alibi_slope(const Shape& s, int h) {
    if (s.alibi_n_head_log2 == 0) return 1.0f;
    return h < s.alibi_n_head_log2 ? powf(s.alibi_m0, float(h + 1))
                                   : powf(s.alibi_m1, float(2 * (h - s.alibi_n_head_log2) + 1));
}

// Additive mask value at (row pointer, key j) as f32 or f16.
__device__ __forceinline__ float mask_value(const char* row, int j, int code) {
    return code == kF32 ? reinterpret_cast<const float*>(row)[j]
                        : __half2float(reinterpret_cast<const __half*>(row)[j]);
}

// The end of packed query row p in a forward kernel: with key splits its partial O / l and its
// base-2 LSE for the combine kernel, else O / l (sinks join the denominator) in the output and
// LSE = (m + log2 l) ln 2. l is the row sum (reduced over the quad), m the base-2 row maximum,
// o(dt, c) this thread's accumulator of column 8 dt + 2 t4 + c. (fwd_kernel below keeps its
// own copy of these lines: calling this changed the scheduling of its main loop at D = 64 and
// 128, which has not been measured.)
template <int NTILE_D, class O>
__device__ __forceinline__ void write_output_row(const FwdArgs& a, int p, int hk, int b, int split, int t4,
                                                 float l, float m, O o) {
    const Shape& s = a.s;
    const int rows_total = s.Sq * s.G;
    const int i = p / s.G, h = hk * s.G + p % s.G;
    if (a.n_split > 1) {
        const int64_t prow = (int64_t(split * s.B + b) * s.Hkv + hk) * rows_total + p;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        float* dst = a.part_o + prow * s.Dv;
#pragma unroll
        for (int dt = 0; dt < NTILE_D; ++dt) {
            const int c = dt * 8 + 2 * t4;
            if (c < s.Dv) *reinterpret_cast<float2*>(dst + c) = make_float2(o(dt, 0) * inv, o(dt, 1) * inv);
        }
        if (t4 == 0) a.part_lse[prow] = l > 0.0f ? m + __log2f(l) : -INFINITY;
        return;
    }
    float o_scale = 1.0f;
    if (a.sinks) {
        const float sink = a.sinks[h] * kLog2e;
        const float m_new = fmaxf(m, sink);
        o_scale = fast_exp2(m - m_new);
        l = l * o_scale + fast_exp2(sink - m_new);
        m = m_new;
    }
    const float inv = l > 0.0f ? o_scale / l : 0.0f;
    char* dst = a.o + b * a.o_nb3 + int64_t(i) * a.o_nb2 + int64_t(h) * a.o_nb1;
#pragma unroll
    for (int dt = 0; dt < NTILE_D; ++dt) {
        const int c = dt * 8 + 2 * t4;
        if (c < s.Dv) store_pair(dst, c, o(dt, 0) * inv, o(dt, 1) * inv, a.o_code);
    }
    if (a.lse && t4 == 0)
        a.lse[b * a.lse_nb2 + h * a.lse_nb1 + i] = l > 0.0f ? (m + __log2f(l)) * kLn2 : -INFINITY;
}

// MASK_TILES: the instantiation for an explicit mask with classified tiles (a.mask_tiles); the
// other one has no code for them, as the lookups changed the register allocation of the
// unmasked kernels (2% slower at D = 64, H200).
template <class Tr, bool MASK_TILES>
__global__ void __launch_bounds__(Tr::kThreads) fwd_kernel(const FwdArgs a) {
    using T = typename Tr::T;
    constexpr int D = Tr::D, BM = Tr::BM, BN = Tr::BN, MI = Tr::MI, NT = Tr::kThreads;
    constexpr int NTILE_N = BN / 8, NTILE_D = D / 8;
    extern __shared__ __align__(128) uint4 smem[];
    const typename Tr::TileQ sQ{smem_addr(smem)};
    const typename Tr::TileKV sK{sQ.base + Tr::TileQ::kBytes};
    const typename Tr::TileKV sV{sK.base + Tr::TileKV::kBytes};

    const Shape& s = a.s;
    const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int rows_total = s.Sq * s.G;
    // Flat grid (GridPos). Under a causal mask the last rows see the most keys: tile 0 is the
    // last row tile.
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
    int tile_first = kv_lo / BN;
    int tile_last = kv_hi > kv_lo ? (kv_hi - 1) / BN : tile_first - 1;

    // ---- an explicit mask's classes: the tiles it hides at either end are not visited ----
    if constexpr (MASK_TILES) {
        const int* span = a.mask_tiles.span + 2 * (a.mask_tiles.slice(a.mask, b) * n_row_tiles + p0 / BM);
        tile_first = max(tile_first, a.mask_tiles.n_key_tiles - 1 - span[0]);
        tile_last = min(tile_last, span[1]);
    }

    // Packed row of (16-row group mi, half r) of this thread, clamped to the last real row;
    // its query position is p / G and its query head hk * G + p % G. Recomputed where needed
    // rather than held in registers.
    auto thread_row = [&](int mi, int r) {
        return min(p0 + warp * 16 * MI + mi * 16 + r * 8 + g, rows_total - 1);
    };

    // ---- load Q (once), then the first K tile ----
    const char* q_base = a.q.data + b * a.q.nb3;
    auto q_row = [&](int r) {
        const int p = p0 + r;
        return q_base + int64_t(hk * s.G + p % s.G) * a.q.nb2 + int64_t(p / s.G) * a.q.nb1;
    };
    const int q_rows = min(BM, rows_total - p0);
    load_any_tile<T, NT>(sQ, q_row, q_rows, s.Dk, a.q.code, a.q.data);
    cp_async_commit();

    const char* k_base = a.k.data + b * a.k.nb3 + hk * a.k.nb2;
    const char* v_base = a.v.data + b * a.v.nb3 + hk * a.v.nb2;
    auto load_k = [&](int tile) {
        const int n0 = tile * BN;
        const char* rows = k_base + int64_t(n0) * a.k.nb1;
        load_strided_tile<T, NT>(sK, rows, a.k.nb1, min(BN, s.Skv - n0), s.Dk, a.k.code);
        cp_async_commit();
    };
    auto load_v = [&](int tile) {
        const int n0 = tile * BN;
        const char* rows = v_base + int64_t(n0) * a.v.nb1;
        load_strided_tile<T, NT>(sV, rows, a.v.nb1, min(BN, s.Skv - n0), s.Dv, a.v.code);
        cp_async_commit();
    };
    if (tile_last >= tile_first) load_k(tile_last);

    float o_acc[MI][NTILE_D][4];
    float row_max[MI][2], row_sum[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int dt = 0; dt < NTILE_D; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o_acc[mi][dt][e] = 0.0f;
        row_max[mi][0] = row_max[mi][1] = -INFINITY;
        row_sum[mi][0] = row_sum[mi][1] = 0.0f;
    }
    const float scale_log2 = s.scale * kLog2e;
    // Plain scores (no softcap, no mask, positive scale) stay raw in the S accumulators: the
    // row max of raw scores times scale_log2 is the max of the base-2 scores, and the scale
    // joins the exponent as one FFMA, exp2(raw * scale_log2 - m), instead of a separate pass.
    const bool plain_scores = s.softcap <= 0.0f && a.mask.data == nullptr && s.scale > 0.0f;
    const float score_mul = plain_scores ? scale_log2 : 1.0f;
    const int warp_row0 = warp * 16 * MI;

    for (int tile = tile_last; tile >= tile_first; --tile) {
        const int n0 = tile * BN;
        // a classified tile of zeros: no mask values to read
        bool zero_tile = false;
        if constexpr (MASK_TILES)
            zero_tile = a.mask_tiles.cls[a.mask_tiles.at(a.mask, b, p0 / BM, tile)] == kTileZero;
        cp_async_wait<0>(); // K_tile (and Q) landed; all warps are done with the previous V
        __syncthreads();
        load_v(tile);

        // ---- S = Q K^T ----
        float sc[MI][NTILE_N][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int nt = 0; nt < NTILE_N; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) sc[mi][nt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t qa[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) load_a(qa[mi], sQ, warp_row0 + mi * 16, kk * 16);
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t kb[4];
                load_b_nk(kb, sK, np * 16, kk * 16);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    mma_16816<T>(sc[mi][2 * np], qa[mi], kb[0], kb[1]);
                    mma_16816<T>(sc[mi][2 * np + 1], qa[mi], kb[2], kb[3]);
                }
            }
        }

        // ---- scores in base 2: scale, softcap, additive mask (ALiBi), visibility ----
        const bool boundary = n0 + BN > s.Skv || (s.has_hi && n0 + BN - 1 > s.diag(i_min) + s.hi_off) ||
                              (s.has_lo && n0 < s.diag(i_max) + s.lo_off);
        if (!plain_scores) {
            const float cap_log2 = s.softcap * kLog2e,
                        scale_over_cap = s.softcap > 0.0f ? s.scale / s.softcap : 0.0f;
            const char* mask_head = a.mask.data + b * a.mask.nb3;
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int p = thread_row(mi, r), h = hk * s.G + p % s.G;
                    const char* mrow = a.mask.data && !zero_tile
                                           ? mask_head + h * a.mask.nb2 + int64_t(p / s.G) * a.mask.nb1
                                           : nullptr;
                    const float slope = a.mask.data ? alibi_slope(s, h) * kLog2e : 0.0f;
#pragma unroll
                    for (int nt = 0; nt < NTILE_N; ++nt)
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            float& x = sc[mi][nt][2 * r + c];
                            x = s.softcap > 0.0f ? cap_log2 * fast_tanh(x * scale_over_cap) : x * scale_log2;
                            const int j = n0 + nt * 8 + 2 * t4 + c;
                            if (mrow && j < s.Skv) x += slope * mask_value(mrow, j, a.mask.code);
                        }
                }
        }
        if (boundary) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    // the row's visible keys relative to this lane's first column of the tile
                    const Shape::KeyRange keys = s.visible_keys(thread_row(mi, r) / s.G);
                    const int lo = keys.lo - (n0 + 2 * t4), hi = keys.hi - (n0 + 2 * t4);
#pragma unroll
                    for (int nt = 0; nt < NTILE_N; ++nt)
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int col = nt * 8 + c;
                            float& x = sc[mi][nt][2 * r + c];
                            x = col < lo || col > hi ? -INFINITY : x;
                        }
                }
        }

        cp_async_wait<0>(); // V_tile landed; all warps are done with K_tile
        __syncthreads();
        if (tile > tile_first) load_k(tile - 1);

        // ---- online softmax (base 2): rescale O and l by exp2(m_old - m_new) ----
        // Once the running maxima settle most tiles leave them unchanged (corr = 1 exactly);
        // with kSkipRescale the O rescale is skipped when that holds for every row of the warp.
        // P = exp2(S - m) in place, a pair of a row at a time; returns the pair's sum.
        auto p_pair = [&](float* pair, float m_use) {
            pair[0] = fast_exp2(fmaf(pair[0], score_mul, -m_use));
            pair[1] = fast_exp2(fmaf(pair[1], score_mul, -m_use));
            return pair[0] + pair[1];
        };
        float corr_of[MI][2], m_use_of[MI][2];
        bool rescale = false;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < NTILE_N; ++nt)
                    mx = fmaxf(mx, fmaxf(sc[mi][nt][2 * r], sc[mi][nt][2 * r + 1]));
                const float m_new = fmaxf(row_max[mi][r], quad_max(mx) * score_mul); // base 2
                const float m_use = m_new == -INFINITY ? 0.0f : m_new; // fully masked so far: no NaN
                const float corr = fast_exp2(row_max[mi][r] - m_use);
                row_max[mi][r] = m_new;
                m_use_of[mi][r] = m_use;
                corr_of[mi][r] = corr;
                rescale |= corr != 1.0f;
                if constexpr (!Tr::kExpInPV) {
                    float sum = 0.0f;
#pragma unroll
                    for (int nt = 0; nt < NTILE_N; ++nt) sum += p_pair(&sc[mi][nt][2 * r], m_use);
                    row_sum[mi][r] = row_sum[mi][r] * corr + sum; // quad-partial; reduced in the epilogue
                }
            }
        if (!Tr::kSkipRescale || __any_sync(0xffffffffu, rescale)) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int dt = 0; dt < NTILE_D; ++dt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) o_acc[mi][dt][e] *= corr_of[mi][e >> 1];
        }

        // ---- O += P V (P straight from the S accumulators; with kExpInPV made here) ----
        float sum_of[MI][2] = {};
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t pa[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                if constexpr (Tr::kExpInPV)
#pragma unroll
                    for (int nt = 2 * kk; nt < 2 * kk + 2; ++nt)
#pragma unroll
                        for (int r = 0; r < 2; ++r)
                            sum_of[mi][r] += p_pair(&sc[mi][nt][2 * r], m_use_of[mi][r]);
                acc_to_a<T>(pa[mi], sc[mi][2 * kk], sc[mi][2 * kk + 1]);
            }
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t vb[4];
                load_b_kn(vb, sV, kk * 16, dp * 16);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    mma_16816<T>(o_acc[mi][2 * dp], pa[mi], vb[0], vb[1]);
                    mma_16816<T>(o_acc[mi][2 * dp + 1], pa[mi], vb[2], vb[3]);
                }
            }
        }
        if constexpr (Tr::kExpInPV) // the same additions in the same order as all of P first
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int r = 0; r < 2; ++r) row_sum[mi][r] = row_sum[mi][r] * corr_of[mi][r] + sum_of[mi][r];
    }

    cp_async_wait<0>(); // a block with no visible keys still has its Q copy in flight

    // ---- epilogue: O /= l (sinks join the denominator), LSE = m + log l ----
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int p = p0 + warp_row0 + mi * 16 + r * 8 + g;
            float l = quad_sum(row_sum[mi][r]);
            if (p >= rows_total) continue;
            const int i = p / s.G, h = hk * s.G + p % s.G;
            float m = row_max[mi][r];
            if (a.n_split > 1) {
                const int64_t prow = (int64_t(split * s.B + b) * s.Hkv + hk) * rows_total + p;
                const float inv = l > 0.0f ? 1.0f / l : 0.0f;
                float* dst = a.part_o + prow * s.Dv;
#pragma unroll
                for (int dt = 0; dt < NTILE_D; ++dt) {
                    const int c = dt * 8 + 2 * t4;
                    if (c < s.Dv)
                        *reinterpret_cast<float2*>(dst + c) =
                            make_float2(o_acc[mi][dt][2 * r] * inv, o_acc[mi][dt][2 * r + 1] * inv);
                }
                if (t4 == 0) a.part_lse[prow] = l > 0.0f ? m + __log2f(l) : -INFINITY;
                continue;
            }
            float o_scale = 1.0f;
            if (a.sinks) {
                const float sink = a.sinks[h] * kLog2e;
                const float m_new = fmaxf(m, sink);
                o_scale = fast_exp2(m - m_new);
                l = l * o_scale + fast_exp2(sink - m_new);
                m = m_new;
            }
            const float inv = l > 0.0f ? o_scale / l : 0.0f;
            char* dst = a.o + b * a.o_nb3 + int64_t(i) * a.o_nb2 + int64_t(h) * a.o_nb1;
#pragma unroll
            for (int dt = 0; dt < NTILE_D; ++dt) {
                const int c = dt * 8 + 2 * t4;
                if (c < s.Dv)
                    store_pair(dst, c, o_acc[mi][dt][2 * r] * inv, o_acc[mi][dt][2 * r + 1] * inv, a.o_code);
            }
            if (a.lse && t4 == 0)
                a.lse[b * a.lse_nb2 + h * a.lse_nb1 + i] = l > 0.0f ? (m + __log2f(l)) * kLn2 : -INFINITY;
        }
}

} // namespace gfa::cuda::fa
