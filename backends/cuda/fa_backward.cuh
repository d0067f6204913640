// FlashAttention-2 backward on tensor cores.
//
// The dK/dV kernel used by default is the 8-warp one in fa_backward_wide.cuh (1.2-2x faster
// than the kernel below on an H100); the 4-warp dK/dV kernel here serves softcap, and the dQ
// kernel here is the deterministic dQ pass for both.
//
// dK/dV kernel: one block per (key tile, KV head, batch). Each warp owns 16 keys and keeps
// their dK and dV rows in fp32 registers while the block walks the query tiles of every
// query head of its group (GQA: the group's sum accumulates in registers, in a fixed
// order). Working with transposed scores, S^T = K Q^T, puts the keys in the M dimension,
// so P^T and dS^T come out of the accumulators already in the A-operand layout of
// dV += P^T dO and dK += dS^T Q. dQ += dS K needs dS with the queries as rows: dS^T goes
// through shared memory once and ldmatrix.trans reads it back transposed; the partial dQ
// is added into an fp32 accumulator with atomics. In deterministic mode that last step is
// skipped and the dQ kernel computes dQ per query tile, looping over the key tiles.
//
// Head dim 256 splits the dK/dV/dQ columns over DSPLIT blocks (S and dP are recomputed by
// each), which keeps the fp32 accumulators within the register file.
#pragma once

#include "fa_args.h"
#include "fa_common.cuh"
#include "fa_forward.cuh"
#include "fa_tile_load.cuh"

namespace gfa::cuda::fa {

template <int D_, int DSPLIT_, class T_, int NW_, int BM_, int QBUF_> struct BwdTraits {
    static constexpr int D = D_, DSPLIT = DSPLIT_, DH = D_ / DSPLIT_, NW = NW_, BM = BM_, QBUF = QBUF_;
    static constexpr int BN = 16 * NW; // keys per block in the dK/dV kernel
    static constexpr int kThreads = 32 * NW;
    using T = T_;
    using TileQ = SmemTile<BM, D>;           // Q and dO tiles (query rows)
    using TileK = SmemTile<BN, D>;           // K and V tiles
    using TileS = SmemTile<BN, BM>;          // dS^T (keys x queries)
    static constexpr int kRowBytes = BM * 4; // lse2 or delta of one query tile
    static_assert(kRowBytes % 128 == 0, "tiles placed after row arrays stay 128-byte aligned (frag_addr)");
    // dK/dV kernel: K, V, QBUF x (Q, dO, lse2, delta), dS^T; + softcap derivative when used.
    static constexpr int kSmemKV =
        2 * TileK::kBytes + QBUF * (2 * TileQ::kBytes + 2 * kRowBytes) + TileS::kBytes;
    static constexpr int kSoftcapBytes = kThreads * (BM / 2) * 4;
    // dQ kernel (query tile BM = 16 * NW rows, key tile BNQ): Q, dO, lse2, delta, K, V.
    static constexpr int BNQ = 64;
    using TileKQ = SmemTile<BNQ, D>;
    static constexpr int kSmemQ = 2 * TileQ::kBytes + 2 * kRowBytes + 2 * TileKQ::kBytes;
};

// The base-2 score of one (query i, key j) pair of head h from the raw dot product, and the
// derivative d(score)/d(raw * scale) that softcap introduces (1 without softcap).
struct ScoreParams {
    float scale_log2, cap_log2, scale_over_cap;
    bool softcap;
};
__device__ __forceinline__ float score_base2(float raw, const ScoreParams& sp, float& dcap) {
    if (sp.softcap) {
        const float th = fast_tanh(raw * sp.scale_over_cap);
        dcap = 1.0f - th * th;
        return sp.cap_log2 * th;
    }
    dcap = 1.0f;
    return raw * sp.scale_log2;
}

// The queries [lo, hi] that see any of the keys [n0, n0 + bn) under the causal and window
// limits (empty when lo > hi): the dK/dV kernels walk only the query tiles they touch.
struct QueryRange {
    int lo, hi;
    // the tiles of bm rows that hold them: [first_tile, first_tile + n_tiles)
    __device__ __forceinline__ int first_tile(int bm) const { return lo / bm; }
    __device__ __forceinline__ int n_tiles(int bm) const { return hi >= lo ? hi / bm - lo / bm + 1 : 0; }
};
__device__ __forceinline__ QueryRange queries_seeing(const Shape& s, int n0, int bn) {
    QueryRange r{0, s.Sq - 1};
    const int off = s.Skv - s.Sq;
    if (s.has_hi) r.lo = max(r.lo, n0 - off - s.hi_off);
    if (s.has_lo) r.hi = min(r.hi, min(n0 + bn, s.Skv) - 1 - off - s.lo_off);
    return r;
}

// The rows of one step of a dK/dV kernel's walk over (query head, query tile): the steps take
// the tiles [m_first, m_first + n_tiles) of head h_first, then those of h_first + 1, ... Each
// step's row pointers are the last step's advanced by one tile or rewound to the next head's
// first tile: a few additions instead of 64-bit products of (b, h, m0) and the strides every
// step.
template <int BM> struct StepRows {
    const char* q;  // Q row m0 of head h
    const char* dO; // dO row m0 of head h
    int64_t row;    // index of row m0 in lse2 / delta
    float* dq;      // dQ accumulator row m0

    __device__ __forceinline__ static StepRows first(const BwdArgs& a, int b, int h, int m0) {
        const Shape& s = a.s;
        return {a.q.data + b * a.q.nb3 + int64_t(h) * a.q.nb2 + int64_t(m0) * a.q.nb1,
                a.dO.data + b * a.dO.nb3 + int64_t(h) * a.dO.nb1 + int64_t(m0) * a.dO.nb2,
                (int64_t(b) * s.Hq + h) * a.Sq_pad + m0,
                a.dq_accum + ((int64_t(b) * s.Hq + h) * s.Sq + m0) * a.dq_ld};
    }
    // rewind: rows from the last tile of a head back to its first, (n_tiles - 1) * BM
    __device__ __forceinline__ StepRows next(const BwdArgs& a, int64_t rewind, bool next_head) const {
        if (next_head)
            return {q + a.q.nb2 - rewind * a.q.nb1, dO + a.dO.nb1 - rewind * a.dO.nb2,
                    row + a.Sq_pad - rewind, dq + (a.s.Sq - rewind) * a.dq_ld};
        return {q + BM * a.q.nb1, dO + BM * a.dO.nb2, row + BM, dq + BM * a.dq_ld};
    }
};

// Q, dO (BM-row tiles) and the BM values each of lse2 and delta (adjacent in shared memory at
// lse_then_delta) of one step, as one cp.async group.
template <class T, int NT, int BM, class TileQ>
__device__ __forceinline__ void load_step_tiles(const BwdArgs& a, const StepRows<BM>& r, int m0, TileQ q,
                                                TileQ dO, uint32_t lse_then_delta) {
    static_assert(BM / 2 <= NT, "one 16-byte chunk of lse2 or delta per thread");
    const Shape& s = a.s;
    const int rows = min(BM, s.Sq - m0);
    load_strided_tile<T, NT, GeneralPath::OutOfLine>(q, r.q, a.q.nb1, rows, s.Dk, a.q.code);
    load_strided_tile<T, NT, GeneralPath::OutOfLine>(dO, r.dO, a.dO.nb2, rows, s.Dv, a.dO.code);
    // BM / 4 chunks each, threads [0, BM / 2)
    const int t = int(threadIdx.x);
    if (t < BM / 2) {
        const float* src = t < BM / 4 ? a.lse2 + r.row + 4 * t : a.delta + r.row + 4 * (t - BM / 4);
        cp_async_16(lse_then_delta + 16 * t, src, true);
    }
    cp_async_commit();
}

// Two adjacent fp32 values (8-byte aligned) added at once on sm_90, else one by one.
__device__ __forceinline__ void atomic_add_pair(float* dst, float x0, float x1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x0, x1));
#else
    atomicAdd(dst, x0);
    atomicAdd(dst + 1, x1);
#endif
}

// Four adjacent fp32 values (16-byte aligned) added at once on sm_90, else in pairs.
__device__ __forceinline__ void atomic_add_quad(float* dst, float x0, float x1, float x2, float x3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(dst), make_float4(x0, x1, x2, x3));
#else
    atomic_add_pair(dst, x0, x1);
    atomic_add_pair(dst + 2, x2, x3);
#endif
}

template <class Tr> __global__ void __launch_bounds__(Tr::kThreads) bwd_kv_kernel(const BwdArgs a) {
    using T = typename Tr::T;
    constexpr int D = Tr::D, DH = Tr::DH, BM = Tr::BM, BN = Tr::BN, NT = Tr::kThreads, QBUF = Tr::QBUF;
    constexpr int NTQ = BM / 8; // accumulator tiles along the queries
    static_assert(BM == 16 * Tr::NW, "the dQ step gives each warp 16 query rows");
    extern __shared__ __align__(128) uint4 smem[];
    const uint32_t base = smem_addr(smem);
    const typename Tr::TileK sK{base};
    const typename Tr::TileK sV{sK.base + Tr::TileK::kBytes};
    const uint32_t q_region = sV.base + Tr::TileK::kBytes;
    constexpr int kBufBytes = 2 * Tr::TileQ::kBytes + 2 * Tr::kRowBytes;
    auto sQ = [&](int buf) { return typename Tr::TileQ{q_region + buf * kBufBytes}; };
    auto sdO = [&](int buf) { return typename Tr::TileQ{q_region + buf * kBufBytes + Tr::TileQ::kBytes}; };
    auto sLse = [&](int buf) { return q_region + buf * kBufBytes + 2 * Tr::TileQ::kBytes; };
    auto sDelta = [&](int buf) { return sLse(buf) + Tr::kRowBytes; };
    const typename Tr::TileS sdS{q_region + QBUF * kBufBytes};
    const uint32_t s_softcap = sdS.base + Tr::TileS::kBytes;
    const char* smem_generic = reinterpret_cast<const char*>(smem);
    auto row_f32 = [&](uint32_t addr, int idx) {
        return *reinterpret_cast<const float*>(smem_generic + (addr - base) + idx * 4);
    };

    const Shape& s = a.s;
    const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int n0 = int(blockIdx.x) * BN;
    const int hk = int(blockIdx.y) / Tr::DSPLIT, d0 = (int(blockIdx.y) % Tr::DSPLIT) * DH;
    const int b = int(blockIdx.z);
    const int key0 = warp * 16; // this warp's keys within the tile

    // ---- the query tiles that see any key of this tile ----
    const QueryRange seen = queries_seeing(s, n0, BN);
    const int m_first = seen.first_tile(BM), n_mtiles = seen.n_tiles(BM);
    const int n_iters = n_mtiles * s.G;

    // ---- load K and V (once) ----
    const char* k_rows = a.k.data + b * a.k.nb3 + hk * a.k.nb2 + int64_t(n0) * a.k.nb1;
    const char* v_rows = a.v.data + b * a.v.nb3 + hk * a.v.nb2 + int64_t(n0) * a.v.nb1;
    const int kv_rows = min(BN, s.Skv - n0);
    load_any_tile<T, NT>(
        sK, [&](int r) { return k_rows + r * a.k.nb1; }, kv_rows, s.Dk, a.k.code, k_rows);
    load_any_tile<T, NT>(
        sV, [&](int r) { return v_rows + r * a.v.nb1; }, kv_rows, s.Dv, a.v.code, v_rows);

    // ---- Q, dO, lse2 and delta of iteration it (query head hk*G + it / n_mtiles) ----
    auto load_q_tile = [&](int it, int buf) {
        const int h = hk * s.G + it / n_mtiles, m0 = (m_first + it % n_mtiles) * BM;
        const char* q_rows = a.q.data + b * a.q.nb3 + h * a.q.nb2 + int64_t(m0) * a.q.nb1;
        const char* do_rows = a.dO.data + b * a.dO.nb3 + h * a.dO.nb1 + int64_t(m0) * a.dO.nb2;
        const int rows = min(BM, s.Sq - m0);
        load_any_tile<T, NT>(
            sQ(buf), [&](int r) { return q_rows + r * a.q.nb1; }, rows, s.Dk, a.q.code, q_rows);
        load_any_tile<T, NT>(
            sdO(buf), [&](int r) { return do_rows + r * a.dO.nb2; }, rows, s.Dv, a.dO.code, do_rows);
        const int64_t row_base = (int64_t(b) * s.Hq + h) * a.Sq_pad + m0;
        for (int c = int(threadIdx.x); c < BM / 4; c += NT) {
            cp_async_16(sLse(buf) + c * 16, a.lse2 + row_base + c * 4, true);
            cp_async_16(sDelta(buf) + c * 16, a.delta + row_base + c * 4, true);
        }
        cp_async_commit();
    };
    if (n_iters > 0)
        load_q_tile(0, 0);
    else
        cp_async_commit();

    float dk_acc[DH / 8][4], dv_acc[DH / 8][4];
#pragma unroll
    for (int dt = 0; dt < DH / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[dt][e] = dv_acc[dt][e] = 0.0f;

    ScoreParams sp;
    sp.softcap = s.softcap > 0.0f;
    sp.scale_log2 = s.scale * kLog2e;
    sp.cap_log2 = s.softcap * kLog2e;
    sp.scale_over_cap = sp.softcap ? s.scale / s.softcap : 0.0f;

    for (int it = 0; it < n_iters; ++it) {
        const int buf = QBUF == 2 ? it & 1 : 0;
        const int h = hk * s.G + it / n_mtiles, m0 = (m_first + it % n_mtiles) * BM;
        cp_async_wait<0>();
        __syncthreads();
        if (QBUF == 2 && it + 1 < n_iters) load_q_tile(it + 1, buf ^ 1);
        const typename Tr::TileQ q_t = sQ(buf), do_t = sdO(buf);

        // ---- S^T = K Q^T (this warp's 16 keys x BM queries) ----
        float pt[NTQ][4];
#pragma unroll
        for (int nt = 0; nt < NTQ; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) pt[nt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t ka[4];
            load_a(ka, sK, key0, kk * 16);
#pragma unroll
            for (int np = 0; np < BM / 16; ++np) {
                uint32_t qb[4];
                load_b_nk(qb, q_t, np * 16, kk * 16);
                mma_16816<T>(pt[2 * np], ka, qb[0], qb[1]);
                mma_16816<T>(pt[2 * np + 1], ka, qb[2], qb[3]);
            }
        }

        // ---- P^T = exp2(score - lse2), masked where invisible ----
        const bool boundary = n0 + BN > s.Skv || (s.has_hi && n0 + BN - 1 > s.diag(m0) + s.hi_off) ||
                              (s.has_lo && n0 < s.diag(m0 + BM - 1) + s.lo_off);
        const float slope_log2 = alibi_slope(s, h) * kLog2e;
        const char* mask_base = a.mask.data ? a.mask.data + b * a.mask.nb3 + h * a.mask.nb2 : nullptr;
#pragma unroll
        for (int nt = 0; nt < NTQ; ++nt) {
            // each query's visible keys relative to this lane's first key (boundary tiles)
            Shape::KeyRange keys[2] = {};
            if (boundary)
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    keys[q] = s.visible_keys(m0 + nt * 8 + 2 * t4 + q);
                    keys[q].lo -= n0 + key0 + g;
                    keys[q].hi -= n0 + key0 + g;
                }
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int iq = nt * 8 + 2 * t4 + (e & 1); // query within the tile
                const int i = m0 + iq, j = n0 + key0 + (e >> 1) * 8 + g;
                float dcap;
                float x = score_base2(pt[nt][e], sp, dcap);
                if (sp.softcap)
                    st_shared_b32(s_softcap + ((nt * 4 + e) * NT + threadIdx.x) * 4, __float_as_uint(dcap));
                if (mask_base && i < s.Sq && j < s.Skv)
                    x += slope_log2 * mask_value(mask_base + int64_t(i) * a.mask.nb1, j, a.mask.code);
                const int row = (e >> 1) * 8;
                if (boundary && (row < keys[e & 1].lo || row > keys[e & 1].hi)) x = -INFINITY;
                pt[nt][e] = fast_exp2(x - row_f32(sLse(buf), iq));
            }
        }

        // ---- dP^T = V dO^T ----
        float dpt[NTQ][4];
#pragma unroll
        for (int nt = 0; nt < NTQ; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) dpt[nt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t va[4];
            load_a(va, sV, key0, kk * 16);
#pragma unroll
            for (int np = 0; np < BM / 16; ++np) {
                uint32_t ob[4];
                load_b_nk(ob, do_t, np * 16, kk * 16);
                mma_16816<T>(dpt[2 * np], va, ob[0], ob[1]);
                mma_16816<T>(dpt[2 * np + 1], va, ob[2], ob[3]);
            }
        }

        // ---- dV += P^T dO ----
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            uint32_t pa[4];
            acc_to_a<T>(pa, pt[2 * kk], pt[2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < DH / 16; ++dp) {
                uint32_t ob[4];
                load_b_kn(ob, do_t, kk * 16, d0 + dp * 16);
                mma_16816<T>(dv_acc[2 * dp], pa, ob[0], ob[1]);
                mma_16816<T>(dv_acc[2 * dp + 1], pa, ob[2], ob[3]);
            }
        }

        // ---- dS^T = P^T * (dP^T - delta) (* softcap derivative) ----
#pragma unroll
        for (int nt = 0; nt < NTQ; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int iq = nt * 8 + 2 * t4 + (e & 1);
                float ds = pt[nt][e] * (dpt[nt][e] - row_f32(sDelta(buf), iq));
                if (sp.softcap) ds *= row_f32(s_softcap, (nt * 4 + e) * NT + int(threadIdx.x));
                pt[nt][e] = ds;
            }

            // ---- dK += dS^T Q ----
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            uint32_t da[4];
            acc_to_a<T>(da, pt[2 * kk], pt[2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < DH / 16; ++dp) {
                uint32_t qb[4];
                load_b_kn(qb, q_t, kk * 16, d0 + dp * 16);
                mma_16816<T>(dk_acc[2 * dp], da, qb[0], qb[1]);
                mma_16816<T>(dk_acc[2 * dp + 1], da, qb[2], qb[3]);
            }
        }

        // ---- dQ += dS K: dS^T through shared memory, read back transposed ----
        if (a.accumulate_dq) {
#pragma unroll
            for (int nt = 0; nt < NTQ; ++nt)
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    st_shared_b32(sdS.pair_addr(key0 + r * 8 + g, nt * 8 + 2 * t4),
                                  Elem<T>::pack(pt[nt][2 * r], pt[nt][2 * r + 1]));
        }
        __syncthreads(); // dS^T complete; every warp is done with this Q/dO buffer
        if (QBUF == 1 && it + 1 < n_iters) load_q_tile(it + 1, 0);
        if (a.accumulate_dq) {
            const int q0 = warp * 16; // this warp's query rows within the tile
            float* dq_rows = a.dq_accum + (int64_t(b) * s.Hq + h) * int64_t(s.Sq) * a.dq_ld;
#pragma unroll
            for (int c0 = 0; c0 < DH; c0 += 64) {
                if (d0 + c0 >= s.Dk) break;
                float acc[8][4];
#pragma unroll
                for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) {
                    uint32_t da[4];
                    load_a_trans(da, sdS, kk * 16, q0);
#pragma unroll
                    for (int dp = 0; dp < 4; ++dp) {
                        uint32_t kb[4];
                        load_b_kn(kb, sK, kk * 16, d0 + c0 + dp * 16);
                        mma_16816<T>(acc[2 * dp], da, kb[0], kb[1]);
                        mma_16816<T>(acc[2 * dp + 1], da, kb[2], kb[3]);
                    }
                }
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int i = m0 + q0 + r * 8 + g;
                    if (i >= s.Sq) continue;
#pragma unroll
                    for (int nt = 0; nt < 8; ++nt) {
                        const int c = d0 + c0 + nt * 8 + 2 * t4;
                        if (c < s.Dk)
                            atomic_add_pair(dq_rows + int64_t(i) * a.dq_ld + dq_accum_col(c), acc[nt][2 * r],
                                            acc[nt][2 * r + 1]);
                    }
                }
            }
        }
    }

    cp_async_wait<0>(); // a block with no query tiles still has its K/V copies in flight

    // ---- epilogue: dK = scale * dS^T Q, dV as accumulated ----
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = n0 + key0 + r * 8 + g;
        if (j >= s.Skv) continue;
        char* dk_row = a.dk + b * a.dk_nb3 + hk * a.dk_nb2 + int64_t(j) * a.dk_nb1;
        char* dv_row = a.dv + b * a.dv_nb3 + hk * a.dv_nb2 + int64_t(j) * a.dv_nb1;
#pragma unroll
        for (int dt = 0; dt < DH / 8; ++dt) {
            const int c = d0 + dt * 8 + 2 * t4;
            if (c < s.Dk)
                store_pair(dk_row, c, dk_acc[dt][2 * r] * s.scale, dk_acc[dt][2 * r + 1] * s.scale,
                           a.dk_code);
            if (c < s.Dv) store_pair(dv_row, c, dv_acc[dt][2 * r], dv_acc[dt][2 * r + 1], a.dv_code);
        }
    }
}

// dQ per query tile (deterministic mode): S = Q K^T, P, dP = dO V^T, dS, dQ += dS K over the
// key tiles, dQ in fp32 registers, written once. Grid: (query tiles, Hq x DSPLIT, batch).
template <class Tr> __global__ void __launch_bounds__(Tr::kThreads) bwd_q_kernel(const BwdArgs a) {
    using T = typename Tr::T;
    constexpr int D = Tr::D, DH = Tr::DH, BM = Tr::BM, BN = Tr::BNQ, NT = Tr::kThreads;
    constexpr int NTK = BN / 8;
    extern __shared__ __align__(128) uint4 smem[];
    const uint32_t base = smem_addr(smem);
    const typename Tr::TileQ sQ{base}, sdO{base + Tr::TileQ::kBytes};
    const uint32_t sLse = sdO.base + Tr::TileQ::kBytes, sDelta = sLse + Tr::kRowBytes;
    const typename Tr::TileKQ sK{sDelta + Tr::kRowBytes}, sV{sDelta + Tr::kRowBytes + Tr::TileKQ::kBytes};
    const char* smem_generic = reinterpret_cast<const char*>(smem);
    auto row_f32 = [&](uint32_t addr, int idx) {
        return *reinterpret_cast<const float*>(smem_generic + (addr - base) + idx * 4);
    };

    const Shape& s = a.s;
    const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int m0 = int(blockIdx.x) * BM;
    const int h = int(blockIdx.y) / Tr::DSPLIT, d0 = (int(blockIdx.y) % Tr::DSPLIT) * DH;
    const int hk = h / s.G, b = int(blockIdx.z);
    const int q0 = warp * 16;

    const int i_max = min(s.Sq - 1, m0 + BM - 1);
    int kv_lo = 0, kv_hi = s.Skv;
    if (s.has_hi) kv_hi = min(kv_hi, s.diag(i_max) + s.hi_off + 1);
    if (s.has_lo) kv_lo = max(kv_lo, s.diag(m0) + s.lo_off);
    const int tile_first = kv_lo / BN, tile_last = kv_hi > kv_lo ? (kv_hi - 1) / BN : tile_first - 1;

    const char* q_rows = a.q.data + b * a.q.nb3 + h * a.q.nb2 + int64_t(m0) * a.q.nb1;
    const char* do_rows = a.dO.data + b * a.dO.nb3 + h * a.dO.nb1 + int64_t(m0) * a.dO.nb2;
    const int rows = min(BM, s.Sq - m0);
    load_any_tile<T, NT>(
        sQ, [&](int r) { return q_rows + r * a.q.nb1; }, rows, s.Dk, a.q.code, q_rows);
    load_any_tile<T, NT>(
        sdO, [&](int r) { return do_rows + r * a.dO.nb2; }, rows, s.Dv, a.dO.code, do_rows);
    const int64_t row_base = (int64_t(b) * s.Hq + h) * a.Sq_pad + m0;
    for (int c = int(threadIdx.x); c < BM / 4; c += NT) {
        cp_async_16(sLse + c * 16, a.lse2 + row_base + c * 4, true);
        cp_async_16(sDelta + c * 16, a.delta + row_base + c * 4, true);
    }
    const char* k_base = a.k.data + b * a.k.nb3 + hk * a.k.nb2;
    const char* v_base = a.v.data + b * a.v.nb3 + hk * a.v.nb2;
    auto load_kv = [&](typename Tr::TileKQ tile, const char* kv_base, int64_t nb1, int code, int cols,
                       int t) {
        const char* rows_p = kv_base + int64_t(t) * BN * nb1;
        load_any_tile<T, NT>(
            tile, [&](int r) { return rows_p + r * nb1; }, min(BN, s.Skv - t * BN), cols, code, rows_p);
        cp_async_commit();
    };
    if (tile_last >= tile_first)
        load_kv(sK, k_base, a.k.nb1, a.k.code, s.Dk, tile_first);
    else
        cp_async_commit();

    float dq_acc[DH / 8][4];
#pragma unroll
    for (int dt = 0; dt < DH / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq_acc[dt][e] = 0.0f;

    ScoreParams sp;
    sp.softcap = s.softcap > 0.0f;
    sp.scale_log2 = s.scale * kLog2e;
    sp.cap_log2 = s.softcap * kLog2e;
    sp.scale_over_cap = sp.softcap ? s.scale / s.softcap : 0.0f;
    const float slope_log2 = alibi_slope(s, h) * kLog2e;
    const char* mask_base = a.mask.data ? a.mask.data + b * a.mask.nb3 + h * a.mask.nb2 : nullptr;
    float lse2_r[2], delta_r[2];

    for (int tile = tile_first; tile <= tile_last; ++tile) {
        const int n0 = tile * BN;
        cp_async_wait<0>();
        __syncthreads();
        load_kv(sV, v_base, a.v.nb1, a.v.code, s.Dv, tile);
        if (tile == tile_first)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                lse2_r[r] = row_f32(sLse, q0 + r * 8 + g);
                delta_r[r] = row_f32(sDelta, q0 + r * 8 + g);
            }

        // ---- S = Q K^T, P = exp2(score - lse2) ----
        float sc[NTK][4], dcap[NTK][4];
#pragma unroll
        for (int nt = 0; nt < NTK; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[nt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t qa[4];
            load_a(qa, sQ, q0, kk * 16);
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t kb[4];
                load_b_nk(kb, sK, np * 16, kk * 16);
                mma_16816<T>(sc[2 * np], qa, kb[0], kb[1]);
                mma_16816<T>(sc[2 * np + 1], qa, kb[2], kb[3]);
            }
        }
        const bool boundary = n0 + BN > s.Skv || (s.has_hi && n0 + BN - 1 > s.diag(m0) + s.hi_off) ||
                              (s.has_lo && n0 < s.diag(i_max) + s.lo_off);
        // each of the lane's two rows' visible keys relative to its first column (boundary tiles)
        Shape::KeyRange keys[2] = {};
        if (boundary)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                keys[r] = s.visible_keys(m0 + q0 + r * 8 + g);
                keys[r].lo -= n0 + 2 * t4;
                keys[r].hi -= n0 + 2 * t4;
            }
#pragma unroll
        for (int nt = 0; nt < NTK; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = m0 + q0 + (e >> 1) * 8 + g, j = n0 + nt * 8 + 2 * t4 + (e & 1);
                float x = score_base2(sc[nt][e], sp, dcap[nt][e]);
                if (mask_base && i < s.Sq && j < s.Skv)
                    x += slope_log2 * mask_value(mask_base + int64_t(i) * a.mask.nb1, j, a.mask.code);
                const int col = nt * 8 + (e & 1);
                if (boundary && (col < keys[e >> 1].lo || col > keys[e >> 1].hi)) x = -INFINITY;
                sc[nt][e] = fast_exp2(x - lse2_r[e >> 1]);
            }

        cp_async_wait<0>(); // V landed
        __syncthreads();

        // ---- dP = dO V^T, dS = P (dP - delta) ----
        float dp_acc[NTK][4];
#pragma unroll
        for (int nt = 0; nt < NTK; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) dp_acc[nt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t oa[4];
            load_a(oa, sdO, q0, kk * 16);
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t vb[4];
                load_b_nk(vb, sV, np * 16, kk * 16);
                mma_16816<T>(dp_acc[2 * np], oa, vb[0], vb[1]);
                mma_16816<T>(dp_acc[2 * np + 1], oa, vb[2], vb[3]);
            }
        }
#pragma unroll
        for (int nt = 0; nt < NTK; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                sc[nt][e] = sc[nt][e] * (dp_acc[nt][e] - delta_r[e >> 1]) * dcap[nt][e];

                // ---- dQ += dS K ----
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t da[4];
            acc_to_a<T>(da, sc[2 * kk], sc[2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < DH / 16; ++dp) {
                uint32_t kb[4];
                load_b_kn(kb, sK, kk * 16, d0 + dp * 16);
                mma_16816<T>(dq_acc[2 * dp], da, kb[0], kb[1]);
                mma_16816<T>(dq_acc[2 * dp + 1], da, kb[2], kb[3]);
            }
        }
        __syncthreads(); // every warp is done with K and V
        if (tile < tile_last) load_kv(sK, k_base, a.k.nb1, a.k.code, s.Dk, tile + 1);
    }

    // ---- epilogue: dQ = scale * dS K ----
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = m0 + q0 + r * 8 + g;
        if (i >= s.Sq) continue;
        char* dq_row = a.dq + b * a.dq_nb3 + h * a.dq_nb2 + int64_t(i) * a.dq_nb1;
#pragma unroll
        for (int dt = 0; dt < DH / 8; ++dt) {
            const int c = d0 + dt * 8 + 2 * t4;
            if (c < s.Dk)
                store_pair(dq_row, c, dq_acc[dt][2 * r] * s.scale, dq_acc[dt][2 * r + 1] * s.scale,
                           a.dq_code);
        }
    }
}

} // namespace gfa::cuda::fa
