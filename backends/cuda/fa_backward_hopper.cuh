// FlashAttention-2 backward, dK/dV kernel (dQ through atomics) on Hopper's warpgroup tensor
// cores (wgmma, sm_90a), for the plain problems of training: no explicit mask (so no ALiBi)
// and no softcap; causal and window limits, GQA, partial tiles, sinks' rows and the
// deterministic mode as in the 8-warp kernel (fa_backward_wide.cuh), whose grid order and
// step walk this kernel shares.
//
// A block owns BN = 128 keys of one KV head; warpgroup w owns keys [64 w, +64) and both walk
// the query tiles (BM rows: 128 at D = 64, 64 at D = 128, where the dK/dV accumulators take
// twice the registers) of the key tile's query heads. Every operand the tensor
// cores read sits in 128-byte-swizzled shared memory, read through descriptors: where the
// 8-warp mma.sync kernel spends about one shared-memory instruction per two products on
// ldmatrix and its stores, this one issues none for K, V, Q or dO. Per query tile:
//   load tile      Q, dO, lse2, delta of step it+1 (cp.async) while step it computes
//   S^T = K Q^T    wgmma, K (K-major, the warpgroup's 64 rows) by Q (K-major)
//   dP^T = V dO^T  the same with V and dO, a second group behind S^T
//   P^T            exp2(score - lse2) while dP^T is in the tensor cores; -inf where the
//                  causal or window limit hides a key
//   dS^T           P^T (dP^T - delta); stored 16-bit (stmatrix) for dQ
//   dV += P^T dO   P^T as the register A operand (the accumulator layout is the A layout),
//                  dO MN-major
//   dK += dS^T Q   the same with dS^T and Q
//   dQ += dS K     after a barrier: dS (dS^T MN-major) by K (MN-major); warpgroup w takes
//                  queries [64 w, +64) (D = 64) or columns [64 w, +64) (D = 128) of the
//                  BM x D block; 16-byte atomics into the fp32 accumulator
// Deterministic mode skips the last step (the dQ kernel of fa_backward.cuh computes dQ).
#pragma once

#include "fa_args.h"
#include "fa_backward.cuh"
#include "fa_common.cuh"
#include "fa_tile_load.cuh"
#include "wgmma.cuh"

namespace gfa::cuda::fa {

template <int D_, class T_> struct HopperBwdTraits {
    static constexpr int D = D_, BN = 128, BM = D_ == 64 ? 128 : 64, NWG = 2, kThreads = 128 * NWG;
    static_assert(D == 64 || D == 128, "the dK/dV accumulators (D / 2 registers each) fit beside S^T, dP^T");
    // Each warpgroup's dQ block is 64 x 64: queries [64 w, +64) when BM = 128, else columns.
    static constexpr bool kDqSplitsQueries = BM == 128;
    using T = T_;
    using TileK = SwizzledTile128<BN, D>;    // K and V (key rows)
    using TileQ = SwizzledTile128<BM, D>;    // Q and dO (query rows), two buffers
    using TileS = SwizzledTile128<BN, BM>;   // dS^T (keys x queries)
    static constexpr int kRowBytes = BM * 4; // lse2 or delta of a step
    static constexpr int kSmem = 2 * TileK::kBytes + 4 * TileQ::kBytes + TileS::kBytes + 4 * kRowBytes + 1024;
};

__device__ __forceinline__ float2 ld_shared_f32x2(uint32_t addr) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
    return v;
}

template <class Tr> __global__ void __launch_bounds__(Tr::kThreads, 1) bwd_hopper_kernel(const BwdArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using T = typename Tr::T;
    using TileQ = typename Tr::TileQ;
    constexpr int D = Tr::D, BM = Tr::BM, BN = Tr::BN, NT = Tr::kThreads;
    constexpr int NQ = BM / 8, ND = D / 8; // 8-column accumulator tiles of S^T (queries), of dK/dV/dQ
    extern __shared__ uint4 smem[];
    const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u;
    const typename Tr::TileK sK{base}, sV{base + Tr::TileK::kBytes};
    const uint32_t q_region = base + 2 * Tr::TileK::kBytes;
    auto sQ = [&](int buf) { return TileQ{q_region + uint32_t(2 * buf * TileQ::kBytes)}; };
    auto sdO = [&](int buf) { return TileQ{q_region + uint32_t((2 * buf + 1) * TileQ::kBytes)}; };
    const typename Tr::TileS sdS{q_region + 4 * TileQ::kBytes};
    const uint32_t rows_region = sdS.base + Tr::TileS::kBytes;
    auto sLse = [&](int buf) { return rows_region + uint32_t(2 * buf * Tr::kRowBytes); };
    auto sDelta = [&](int buf) { return sLse(buf) + uint32_t(Tr::kRowBytes); };

    const Shape& s = a.s;
    const int wg = int(threadIdx.x) >> 7, warp = (int(threadIdx.x) >> 5) & 3, lane = int(threadIdx.x) & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int key0 = wg * 64 + warp * 16; // this warp's accumulator rows: keys key0 + g, + 8
    const GridPos pos = grid_pos(blockIdx.x, s.Hkv, s.B, (s.Skv + BN - 1) / BN, a.tile_group);
    const int n0 = pos.tile * BN;
    const int hk = pos.head, b = pos.outer;

    // ---- the query tiles that see any key of this tile ----
    const QueryRange seen = queries_seeing(s, n0, BN);
    const int i_hi = seen.hi;
    const int m_first = seen.first_tile(BM), n_mtiles = seen.n_tiles(BM);
    const int n_iters = n_mtiles * s.G;

    // ---- K and V, once ----
    const char* k_rows = a.k.data + b * a.k.nb3 + hk * a.k.nb2 + int64_t(n0) * a.k.nb1;
    const char* v_rows = a.v.data + b * a.v.nb3 + hk * a.v.nb2 + int64_t(n0) * a.v.nb1;
    const int kv_rows = min(BN, s.Skv - n0);
    load_strided_tile<T, NT, GeneralPath::OutOfLine>(sK, k_rows, a.k.nb1, kv_rows, s.Dk, a.k.code);
    load_strided_tile<T, NT, GeneralPath::OutOfLine>(sV, v_rows, a.v.nb1, kv_rows, s.Dv, a.v.code);

    // ---- the rows of one step (query head h, tile at row m0) ----
    using Rows = StepRows<BM>;
    const int m_start = m_first * BM;
    Rows cur = Rows::first(a, b, hk * s.G, m_start);
    const int64_t rewind = int64_t(n_mtiles - 1) * BM;
    auto load_q_tile = [&](const Rows& r, int m0, int buf) {
        load_step_tiles<T, NT>(a, r, m0, sQ(buf), sdO(buf), sLse(buf));
    };
    if (n_iters > 0)
        load_q_tile(cur, m_start, 0);
    else
        cp_async_commit();

    // ---- descriptors ----
    // K-major (S^T's operands): k-step kk is 32 bytes into the 128-byte rows of column block
    // kk / 4; `row0` the first row.
    auto kmajor = [](auto tile, int row0, int kk) {
        return wgmma_desc(
            tile.base + uint32_t((kk >> 2) * decltype(tile)::kBlockBytes + row0 * 128 + (kk & 3) * 32), 0);
    };
    // MN-major (rows along k): k-step kk is rows 16 kk.. (2048 bytes); 64-column blocks
    // `block_bytes` apart.
    auto mnmajor = [](uint32_t tile_base, int kk, int block_bytes) {
        return wgmma_desc(tile_base + uint32_t(kk * 2048), uint32_t(block_bytes));
    };

    float dk_acc[D / 2], dv_acc[D / 2];
#pragma unroll
    for (int e = 0; e < D / 2; ++e) dk_acc[e] = dv_acc[e] = 0.0f;
    const float scale_log2 = s.scale * kLog2e;

    int m0 = m_start;
    for (int it = 0; it < n_iters; ++it) {
        const int buf = it & 1;
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads(); // step it's tiles landed and are visible to the tensor cores; step it-1 is done
        const bool last_of_head = m0 + BM > i_hi;
        const int m0_next = last_of_head ? m_start : m0 + BM;
        const Rows next = cur.next(a, rewind, last_of_head);
        if (it + 1 < n_iters)
            load_q_tile(next, m0_next, buf ^ 1);
        else
            cp_async_commit();
        const TileQ q_t = sQ(buf), do_t = sdO(buf);

        // ---- S^T = K Q^T, dP^T = V dO^T: two groups ----
        float st[BM / 2], dpt[BM / 2];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            wgmma_ss<T, BM>(st, kmajor(sK, wg * 64, kk), kmajor(q_t, 0, kk), kk);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            wgmma_ss<T, BM>(dpt, kmajor(sV, wg * 64, kk), kmajor(do_t, 0, kk), kk);
        wgmma_commit();
        wgmma_wait<1>(); // S^T; dP^T may still run

        // ---- P^T = exp2(score - lse2), hidden keys to 0 ----
        // st[4 n + 2 r + c]: key key0 + 8 r + g, query 8 n + 2 t4 + c of the tile.
        // (the keys past Skv too: their zero rows give P = exp2(-lse2), which may overflow)
        const bool boundary = n0 + BN > s.Skv || (s.has_hi && n0 + BN - 1 > s.diag(m0) + s.hi_off) ||
                              (s.has_lo && n0 < s.diag(m0 + BM - 1) + s.lo_off);
#pragma unroll
        for (int n = 0; n < NQ; ++n) {
            const int iq = 8 * n + 2 * t4;
            const float2 lse2 = ld_shared_f32x2(sLse(buf) + uint32_t(4 * iq));
#pragma unroll
            for (int e = 0; e < 4; ++e)
                st[4 * n + e] = fmaf(st[4 * n + e], scale_log2, -((e & 1) ? lse2.y : lse2.x));
            if (boundary) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    Shape::KeyRange keys = s.visible_keys(m0 + iq + c);
                    keys.lo -= n0 + key0 + g;
                    keys.hi -= n0 + key0 + g;
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        float& x = st[4 * n + 2 * r + c];
                        x = 8 * r < keys.lo || 8 * r > keys.hi ? -INFINITY : x;
                    }
                }
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) st[4 * n + e] = fast_exp2(st[4 * n + e]);
        }
        wgmma_wait<0>(); // dP^T

        // ---- dS^T = P^T (dP^T - delta); both as A operands, dS^T also to shared memory ----
        uint32_t pa[BM / 16][4], dsa[BM / 16][4];
#pragma unroll
        for (int n = 0; n < NQ; ++n) {
            const float2 delta = ld_shared_f32x2(sDelta(buf) + uint32_t(4 * (8 * n + 2 * t4)));
#pragma unroll
            for (int e = 0; e < 4; ++e)
                dpt[4 * n + e] = st[4 * n + e] * (dpt[4 * n + e] - ((e & 1) ? delta.y : delta.x));
        }
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                pa[kk][q] = Elem<T>::pack(st[8 * kk + 2 * q], st[8 * kk + 2 * q + 1]);
                dsa[kk][q] = Elem<T>::pack(dpt[8 * kk + 2 * q], dpt[8 * kk + 2 * q + 1]);
            }
        }
        if (a.accumulate_dq) {
            // dsa[kk] holds the 8x8 matrices (rows key0.., key0 + 8..) x (query chunks 2 kk, 2 kk + 1):
            // lanes 8i.. name the rows of matrix i.
            const int row = key0 + ((lane >> 3) & 1) * 8 + (lane & 7), chunk_lo = lane >> 4;
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)
                stmatrix_x4(sdS.chunk_addr(row, 2 * kk + chunk_lo), dsa[kk][0], dsa[kk][1], dsa[kk][2],
                            dsa[kk][3]);
            fence_proxy_async();
        }

        // ---- dV += P^T dO, dK += dS^T Q ----
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
            wgmma_rs<T, D, true>(dv_acc, pa[kk], mnmajor(do_t.base, kk, TileQ::kBlockBytes));
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
            wgmma_rs<T, D, true>(dk_acc, dsa[kk], mnmajor(q_t.base, kk, TileQ::kBlockBytes));
        wgmma_commit();

        // ---- dQ += dS K: this warpgroup's 64 x 64 block of the tile, keys of both warpgroups ----
        if (a.accumulate_dq) {
            __syncthreads(); // dS^T of both warpgroups in shared memory
            constexpr bool split_q = Tr::kDqSplitsQueries;
            const int dq_q0 = split_q ? wg * 64 : 0, dq_c0 = split_q ? 0 : wg * 64;
            float dq[32];
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk)
                wgmma_ss<T, 64, true, true>(
                    dq,
                    mnmajor(sdS.base + uint32_t((dq_q0 >> 6) * Tr::TileS::kBlockBytes), kk,
                            Tr::TileS::kBlockBytes),
                    mnmajor(sK.base + uint32_t((dq_c0 >> 6) * Tr::TileK::kBlockBytes), kk,
                            Tr::TileK::kBlockBytes),
                    kk);
            wgmma_commit();
            wgmma_wait<0>();
            // dq[4 n + 2 r + c]: query dq_q0 + 16 warp + 8 r + g, column dq_c0 + 8 n + 2 t4 + c
            const int q_row = dq_q0 + warp * 16 + g;
            if (m0 + BM <= s.Sq && s.Dk == D) {
                float* dq_thread = cur.dq + q_row * D + dq_c0 + 4 * t4;
#pragma unroll
                for (int r = 0; r < 2; ++r)
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                        atomic_add_quad(dq_thread + r * 8 * D + j * 16, dq[8 * j + 2 * r],
                                        dq[8 * j + 2 * r + 1], dq[8 * j + 4 + 2 * r],
                                        dq[8 * j + 4 + 2 * r + 1]);
            } else {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int iq = q_row + 8 * r;
                    if (m0 + iq >= s.Sq) continue;
#pragma unroll
                    for (int n = 0; n < 8; ++n) {
                        const int c = dq_c0 + 8 * n + 2 * t4;
                        if (c < s.Dk)
                            atomic_add_pair(cur.dq + int64_t(iq) * a.dq_ld + dq_accum_col(c),
                                            dq[4 * n + 2 * r], dq[4 * n + 2 * r + 1]);
                    }
                }
            }
        } else {
            wgmma_wait<0>();
        }
        m0 = m0_next, cur = next;
    }
    cp_async_wait<0>(); // a block with no query tiles still has its K/V copies in flight

    // ---- epilogue: dK = scale * dS^T Q, dV as accumulated; rows key0 + g, + 8 ----
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = n0 + key0 + 8 * r + g;
        if (j >= s.Skv) continue;
        char* dk_row = a.dk + b * a.dk_nb3 + hk * a.dk_nb2 + int64_t(j) * a.dk_nb1;
        char* dv_row = a.dv + b * a.dv_nb3 + hk * a.dv_nb2 + int64_t(j) * a.dv_nb1;
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            const int c = 8 * n + 2 * t4;
            if (c < s.Dk)
                store_pair(dk_row, c, dk_acc[4 * n + 2 * r] * s.scale, dk_acc[4 * n + 2 * r + 1] * s.scale,
                           a.dk_code);
            if (c < s.Dv) store_pair(dv_row, c, dv_acc[4 * n + 2 * r], dv_acc[4 * n + 2 * r + 1], a.dv_code);
        }
    }
#else
    __trap(); // launched only where the sm_90a code was built (hopper_backward_available)
#endif
}

} // namespace gfa::cuda::fa
