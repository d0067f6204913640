// FlashAttention-2 backward, dK/dV kernel with the FlashAttention-2 block shape: 8 warps
// share one K/V tile of BN keys and walk the query tiles (BM rows) of the key tile's query
// heads. Compared with the 4-warp kernel in fa_backward.cuh (each warp 16 keys against the
// whole query tile), the warps split BOTH the keys and the queries (S^T, dP^T) or the head
// dim (dK, dV), so every shared-memory fragment feeds at least 32 rows of tensor-core work,
// and the Q/dO tiles of a step are loaded once (double-buffered cp.async) for 8 warps.
//
// Per query tile:
//   load tile      Q, dO, lse2, delta of step it+1 start while step it computes (at the
//                  step's start or after S^T: kNextTilesAfterScores)
//   S^T = K Q^T    warp (wk, wn): keys [wk*KW, +KW) x queries [wn*QW, +QW), in registers
//   P^T            exp2(score - lse2), masked; stored 16-bit to shared memory (keys x queries,
//                  stmatrix),
//                  column tiles made between dP^T's k-steps
//   dP^T = V dO^T  same warp tile as S^T
//   dS^T           P^T * (dP^T - delta), stored 16-bit to shared memory
//   dV += P^T dO   warp (wk, wn): keys [wk*KW, +KW) x head-dim columns [wn*DW, +DW), fp32
//   dK += dS^T Q   same warp tile as dV
//   dQ += dS K     warp: queries [32 wq, +32) x columns; dS read transposed from shared
//                  memory, added into the fp32 dQ accumulator with 16-byte atomics (dq_accum_col)
// Deterministic mode skips the last step (the dQ kernel of fa_backward.cuh computes dQ).
// Softcap is left to the 4-warp kernel.
#pragma once

#include "fa_backward.cuh"

namespace gfa::cuda::fa {

// DQC: 16-column groups of dQ per chunk whose atomics go out together (0: all of a warp's).
template <int D_, class T_, int BN_, int BM_, int WK_, int DQC_ = 0> struct BwdWideTraits {
    static constexpr int D = D_, BN = BN_, BM = BM_, NW = 8, kThreads = 32 * NW;
    static constexpr int WK = WK_, WN = NW / WK_; // warp grid: WK along keys, WN along queries/columns
    static constexpr int KW = BN / WK;            // keys per warp
    static constexpr int QW = BM / WN;            // queries per warp in S^T and dP^T
    static constexpr int DW = D / WN;             // dK/dV columns per warp
    static constexpr int WQ = BM / 32;            // dQ: warps along the queries (32 rows each)
    static constexpr int DQW = D / (NW / WQ);     // dQ columns per warp
    static constexpr int DQC = DQC_ > 0 ? DQC_ : DQW / 16;
    static_assert(KW % 16 == 0 && QW % 16 == 0 && DW % 16 == 0 && DQW % 16 == 0, "warp tiles of 16");
    static_assert(NW % WQ == 0, "dQ warp grid");
    using T = T_;
    using TileQ = SmemTile<BM, D>;  // Q and dO (query rows)
    using TileK = SmemTile<BN, D>;  // K and V (key rows)
    using TileS = SmemTile<BN, BM>; // P^T and dS^T (keys x queries)
    static constexpr int kRowBytes = BM * 4;
    static_assert(kRowBytes % 128 == 0, "tiles placed after row arrays stay 128-byte aligned (frag_addr)");
    static constexpr int kBufBytes = 2 * TileQ::kBytes + 2 * kRowBytes;
    static constexpr int kSmem = 2 * TileK::kBytes + 2 * kBufBytes + 2 * TileS::kBytes;
    // Where a step issues the copies of the next step's Q and dO: after its S^T products when
    // a tile is small (D = 64, 128: their copies, issued at the step's start, queued behind
    // the last step's dQ atomics and held up the warp's first products; 0.2-1.8% faster,
    // H200), at the start when it is large (D = 256: 32 KB each, whose latency then shows
    // under causal masks, 5% slower at 2k keys).
    static constexpr bool kNextTilesAfterScores = TileQ::kBytes <= 16384;
};

// MASK_TILES: the instantiation for an explicit mask with classified tiles (a.mask_tiles); the
// other one has no code for them, as the lookups changed the register allocation of the
// unmasked kernel (4-6% slower at D = 64, H200).
template <class Tr, bool MASK_TILES>
__global__ void __launch_bounds__(Tr::kThreads, 1) bwd_kv_wide_kernel(const BwdArgs a) {
    using T = typename Tr::T;
    constexpr int D = Tr::D, BM = Tr::BM, BN = Tr::BN, NT = Tr::kThreads;
    constexpr int MT = Tr::KW / 16; // 16-key row tiles per warp
    constexpr int NQ = Tr::QW / 8;  // 8-query column tiles per warp (S^T, dP^T)
    constexpr int ND = Tr::DW / 8;  // 8-column tiles per warp (dK, dV)
    constexpr int NDQ = Tr::DQW / 8;
    extern __shared__ __align__(128) uint4 smem[];
    const uint32_t base = smem_addr(smem);
    const typename Tr::TileK sK{base};
    const typename Tr::TileK sV{sK.base + Tr::TileK::kBytes};
    const uint32_t q_region = sV.base + Tr::TileK::kBytes;
    auto sQ = [&](int buf) { return typename Tr::TileQ{q_region + buf * Tr::kBufBytes}; };
    auto sdO = [&](int buf) {
        return typename Tr::TileQ{q_region + buf * Tr::kBufBytes + Tr::TileQ::kBytes};
    };
    auto sLse = [&](int buf) { return q_region + buf * Tr::kBufBytes + 2 * Tr::TileQ::kBytes; };
    auto sDelta = [&](int buf) { return sLse(buf) + Tr::kRowBytes; };
    const typename Tr::TileS sP{q_region + 2 * Tr::kBufBytes};
    const typename Tr::TileS sdS{sP.base + Tr::TileS::kBytes};
    const char* smem_generic = reinterpret_cast<const char*>(smem);
    auto row_pair = [&](uint32_t addr, int idx) { // two adjacent fp32 row values, idx even
        return *reinterpret_cast<const float2*>(smem_generic + (addr - base) + idx * 4);
    };

    const Shape& s = a.s;
    const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int wk = warp % Tr::WK, wn = warp / Tr::WK;
    const int key0 = wk * Tr::KW; // this warp's keys within the tile
    const int qs0 = wn * Tr::QW;  // its queries in S^T / dP^T
    const int dc0 = wn * Tr::DW;  // its dK/dV columns
    const int dq_q0 = (warp % Tr::WQ) * 32, dq_c0 = (warp / Tr::WQ) * Tr::DQW; // its dQ block
    // Column tile nt of P^T (dS^T: one tile further) goes to shared memory with stmatrix, four
    // 8x8 matrices per instruction (a quarter of the instructions of 32-bit stores; 0-4% faster
    // at D = 64, H100): lane l names row key0 + l (+ 32 per pair of 16-row tiles). NQ is a power
    // of two and qs0 a multiple of 8 NQ, so the tile's chunk qs0 / 8 + nt is (qs0 / 8) ^ nt,
    // and with the swizzle the address is this lane's for nt = 0 XOR 16 nt. Before sm_90 a
    // lane stores its pairs (row key0 + g, columns qs0 + 8 nt + 2 t4, and rows 8 apart).
    static_assert((NQ & (NQ - 1)) == 0 && NQ <= 8 && MT % 2 == 0, "stmatrix store pattern");
    constexpr int kPtRowBytes = BM * 2;
    const uint32_t pt_row_addr = sP.chunk_addr(key0 + lane, qs0 >> 3);
    auto store_tile = [&](uint32_t tile_offset, const float(&x)[MT][NQ][4], int nt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#pragma unroll
        for (int mp = 0; mp < MT / 2; ++mp)
            stmatrix_x4((pt_row_addr + tile_offset + mp * 32 * kPtRowBytes) ^ uint32_t(nt << 4),
                        Elem<T>::pack(x[2 * mp][nt][0], x[2 * mp][nt][1]),
                        Elem<T>::pack(x[2 * mp][nt][2], x[2 * mp][nt][3]),
                        Elem<T>::pack(x[2 * mp + 1][nt][0], x[2 * mp + 1][nt][1]),
                        Elem<T>::pack(x[2 * mp + 1][nt][2], x[2 * mp + 1][nt][3]));
#else // before Hopper: a lane's pairs one at a time
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r)
                st_shared_b32(sP.pair_addr(key0 + g, qs0 + nt * 8 + 2 * t4) + tile_offset +
                                  (mt * 16 + r * 8) * kPtRowBytes,
                              Elem<T>::pack(x[mt][nt][2 * r], x[mt][nt][2 * r + 1]));
#endif
    };
    // Flat grid (GridPos). Under a causal mask the first keys are seen by the most queries, so
    // key tile 0 is the longest, and the grid's groups start with it.
    const GridPos pos = grid_pos(blockIdx.x, s.Hkv, s.B, (s.Skv + BN - 1) / BN, a.tile_group);
    const int n0 = pos.tile * BN;
    const int hk = pos.head, b = pos.outer;

    // ---- the query tiles that see any key of this tile ----
    QueryRange seen = queries_seeing(s, n0, BN);
    // an explicit mask's classes: the query tiles it hides at either end are not visited
    if constexpr (MASK_TILES) {
        const int* span =
            a.mask_tiles.span + 2 * (a.mask_tiles.slice(a.mask, b) * a.mask_tiles.n_key_tiles + pos.tile);
        seen.lo = max(seen.lo, (a.mask_tiles.n_row_tiles - 1 - span[0]) * BM);
        seen.hi = min(seen.hi, span[1] * BM + BM - 1);
    }
    const int i_hi = seen.hi;
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

    // ---- the rows of one step: query head h, query tile at row m0 ----
    using Rows = StepRows<BM>;
    const int h_first = hk * s.G, m_start = m_first * BM;
    Rows cur = Rows::first(a, b, h_first, m_start);
    const int64_t rewind = int64_t(n_mtiles - 1) * BM; // rows from the last tile back to the first

    // ---- Q, dO, lse2 and delta of one step into buffer buf ----
    auto load_q_tile = [&](const Rows& r, int m0, int buf) {
        load_step_tiles<T, NT>(a, r, m0, sQ(buf), sdO(buf), sLse(buf));
    };
    if (n_iters > 0)
        load_q_tile(cur, m_start, 0);
    else
        cp_async_commit();

    float dk_acc[MT][ND][4], dv_acc[MT][ND][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < ND; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) dk_acc[mt][dt][e] = dv_acc[mt][dt][e] = 0.0f;

    const float scale_log2 = s.scale * kLog2e;

    int h = h_first, m0 = m_start; // this step's query head and tile
    for (int it = 0; it < n_iters; ++it) {
        const int buf = it & 1;
        cp_async_wait<0>();
        __syncthreads(); // step it's tiles landed; every warp is done with step it-1
        const bool last_of_head = m0 + BM > i_hi;
        const int h_next = last_of_head ? h + 1 : h, m0_next = last_of_head ? m_start : m0 + BM;
        const Rows next = cur.next(a, rewind, last_of_head);
        if (!Tr::kNextTilesAfterScores && it + 1 < n_iters) load_q_tile(next, m0_next, buf ^ 1);
        const typename Tr::TileQ q_t = sQ(buf), do_t = sdO(buf);

        // ---- S^T = K Q^T ----
        float pt[MT][NQ][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NQ; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) pt[mt][nt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t ka[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) load_a(ka[mt], sK, key0 + mt * 16, kk * 16);
#pragma unroll
            for (int np = 0; np < NQ / 2; ++np) {
                uint32_t qb[4];
                load_b_nk(qb, q_t, qs0 + np * 16, kk * 16);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(pt[mt][2 * np], ka[mt], qb[0], qb[1]);
                    mma_16816<T>(pt[mt][2 * np + 1], ka[mt], qb[2], qb[3]);
                }
            }
        }

        if (Tr::kNextTilesAfterScores && it + 1 < n_iters) load_q_tile(next, m0_next, buf ^ 1);

        // ---- P^T = exp2(score - lse2), masked where invisible; to shared memory ----
        // Tiles with no mask, no ALiBi and every key visible (nearly all of them) take the
        // plain path: one FFMA and one exp2 per score.
        const bool boundary = n0 + BN > s.Skv || (s.has_hi && n0 + BN - 1 > s.diag(m0) + s.hi_off) ||
                              (s.has_lo && n0 < s.diag(m0 + BM - 1) + s.lo_off);
        // a classified tile of zeros: no mask values to read (the class is found from the
        // arguments each step: a pointer held across the loop made ptxas spill at D = 128)
        bool zero_tile = false;
        if constexpr (MASK_TILES)
            zero_tile = a.mask_tiles.cls[a.mask_tiles.at(a.mask, b, m0 / BM, n0 / BN)] == kTileZero;
        const char* mask_base =
            a.mask.data && !zero_tile ? a.mask.data + b * a.mask.nb3 + h * a.mask.nb2 : nullptr;
        auto store_pt = [&](int nt) { store_tile(0, pt, nt); };
        auto plain_pt = [&](int nt) {
            const float2 lse2 = row_pair(sLse(buf), qs0 + nt * 8 + 2 * t4);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    pt[mt][nt][e] = fast_exp2(fmaf(pt[mt][nt][e], scale_log2, -((e & 1) ? lse2.y : lse2.x)));
            store_pt(nt);
        };
        const float slope_log2 = mask_base ? alibi_slope(s, h) * kLog2e : 0.0f;
        auto masked_pt = [&](int nt) {
            const int iq0 = qs0 + nt * 8 + 2 * t4; // this lane's two queries of the column tile
            const float2 lse2 = row_pair(sLse(buf), iq0);
            // each query's visible keys relative to this lane's first key of the warp's rows
            Shape::KeyRange keys[2];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                keys[q] = s.visible_keys(m0 + iq0 + q);
                keys[q].lo -= n0 + key0 + g;
                keys[q].hi -= n0 + key0 + g;
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = m0 + iq0 + (e & 1), j = n0 + key0 + mt * 16 + (e >> 1) * 8 + g;
                    // score * log2(e) - lse2 in one FFMA; lse2 = +inf (no gradient) gives P = 0
                    float x = fmaf(pt[mt][nt][e], scale_log2, -((e & 1) ? lse2.y : lse2.x));
                    if (mask_base && i < s.Sq && j < s.Skv)
                        x += slope_log2 * mask_value(mask_base + int64_t(i) * a.mask.nb1, j, a.mask.code);
                    const int row = mt * 16 + (e >> 1) * 8;
                    x = row < keys[e & 1].lo || row > keys[e & 1].hi ? -INFINITY : x;
                    pt[mt][nt][e] = fast_exp2(x);
                }
            store_pt(nt);
        };

        // ---- dP^T = V dO^T, P^T's column tiles between its k-steps ----
        // The exponentials run on the special-function units and the products on the tensor
        // cores. Every warp reaches this point at once (the barrier above), so one phase after
        // the other would leave each unit idle while the other works; interleaved, a column
        // tile's exponentials issue while the next k-step's products are in flight.
        float dpt[MT][NQ][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NQ; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) dpt[mt][nt][e] = 0.0f;
        auto dpt_with_pt = [&](auto&& pt_columns) {
            constexpr int KS = D / 16;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                uint32_t va[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) load_a(va[mt], sV, key0 + mt * 16, kk * 16);
#pragma unroll
                for (int np = 0; np < NQ / 2; ++np) {
                    uint32_t ob[4];
                    load_b_nk(ob, do_t, qs0 + np * 16, kk * 16);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_16816<T>(dpt[mt][2 * np], va[mt], ob[0], ob[1]);
                        mma_16816<T>(dpt[mt][2 * np + 1], va[mt], ob[2], ob[3]);
                    }
                }
                // column tiles [kk NQ / KS, (kk + 1) NQ / KS): every tile once over the k-steps
#pragma unroll
                for (int nt = kk * NQ / KS; nt < (kk + 1) * NQ / KS; ++nt) pt_columns(nt);
            }
        };
        if (!boundary && !mask_base) {
            dpt_with_pt(plain_pt);
        } else { // apart: interleaved, the masked path's extra registers made ptxas spill
#pragma unroll
            for (int nt = 0; nt < NQ; ++nt) masked_pt(nt);
            dpt_with_pt([](int) {});
        }

        // ---- dS^T = P^T * (dP^T - delta); to shared memory ----
#pragma unroll
        for (int nt = 0; nt < NQ; ++nt) {
            const int iq0 = qs0 + nt * 8 + 2 * t4;
            const float2 delta = row_pair(sDelta(buf), iq0);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    dpt[mt][nt][e] = pt[mt][nt][e] * (dpt[mt][nt][e] - ((e & 1) ? delta.y : delta.x));
            store_tile(Tr::TileS::kBytes, dpt, nt);
        }
        __syncthreads(); // P^T and dS^T of the whole tile are in shared memory

        // ---- dV += P^T dO ----
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            uint32_t pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) load_a(pa[mt], sP, key0 + mt * 16, kk * 16);
#pragma unroll
            for (int dp = 0; dp < ND / 2; ++dp) {
                uint32_t ob[4];
                load_b_kn(ob, do_t, kk * 16, dc0 + dp * 16);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(dv_acc[mt][2 * dp], pa[mt], ob[0], ob[1]);
                    mma_16816<T>(dv_acc[mt][2 * dp + 1], pa[mt], ob[2], ob[3]);
                }
            }
        }

        // ---- dK += dS^T Q ----
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            uint32_t da[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) load_a(da[mt], sdS, key0 + mt * 16, kk * 16);
#pragma unroll
            for (int dp = 0; dp < ND / 2; ++dp) {
                uint32_t qb[4];
                load_b_kn(qb, q_t, kk * 16, dc0 + dp * 16);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(dk_acc[mt][2 * dp], da[mt], qb[0], qb[1]);
                    mma_16816<T>(dk_acc[mt][2 * dp + 1], da[mt], qb[2], qb[3]);
                }
            }
        }

        // ---- dQ += dS K: dS^T read transposed, fp32 atomics ----
        // In chunks of DQC 16-column groups, a chunk's atomics issued before the next chunk's
        // products so that they drain while the tensor cores work (traits: DQC).
        if (a.accumulate_dq) {
            constexpr int NG = NDQ / 2, GC = Tr::DQC; // 16-column groups; groups per chunk
            static_assert(NDQ % 2 == 0 && NG % GC == 0, "dQ chunks of whole 16-column groups");
            // Full tiles (every row real, Dk = D) add 16 bytes at a time at offsets known at
            // compile time from one per-thread pointer (dq_accum_col puts a lane's pairs of a
            // group's two 8-column tiles side by side); the last query tile and padded head
            // dims check each pair.
            const bool full = m0 + BM <= s.Sq && s.Dk == D;
            float* dq_thread = cur.dq + (dq_q0 + g) * D + dq_c0 + 4 * t4;
#pragma unroll
            for (int g0 = 0; g0 < NG; g0 += GC) {
                float acc[2][2 * GC][4];
#pragma unroll
                for (int mq = 0; mq < 2; ++mq)
#pragma unroll
                    for (int nt = 0; nt < 2 * GC; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc[mq][nt][e] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) {
                    uint32_t da[2][4];
#pragma unroll
                    for (int mq = 0; mq < 2; ++mq) load_a_trans(da[mq], sdS, kk * 16, dq_q0 + mq * 16);
#pragma unroll
                    for (int gi = 0; gi < GC; ++gi) {
                        uint32_t kb[4];
                        load_b_kn(kb, sK, kk * 16, dq_c0 + (g0 + gi) * 16);
#pragma unroll
                        for (int mq = 0; mq < 2; ++mq) {
                            mma_16816<T>(acc[mq][2 * gi], da[mq], kb[0], kb[1]);
                            mma_16816<T>(acc[mq][2 * gi + 1], da[mq], kb[2], kb[3]);
                        }
                    }
                }
                if (full) {
#pragma unroll
                    for (int mq = 0; mq < 2; ++mq)
#pragma unroll
                        for (int r = 0; r < 2; ++r)
#pragma unroll
                            for (int gi = 0; gi < GC; ++gi)
                                atomic_add_quad(dq_thread + (mq * 16 + r * 8) * D + (g0 + gi) * 16,
                                                acc[mq][2 * gi][2 * r], acc[mq][2 * gi][2 * r + 1],
                                                acc[mq][2 * gi + 1][2 * r], acc[mq][2 * gi + 1][2 * r + 1]);
                } else {
#pragma unroll
                    for (int mq = 0; mq < 2; ++mq)
#pragma unroll
                        for (int r = 0; r < 2; ++r) {
                            const int iq = dq_q0 + mq * 16 + r * 8 + g; // query row within the tile
                            if (m0 + iq >= s.Sq) continue;
#pragma unroll
                            for (int nt = 0; nt < 2 * GC; ++nt) {
                                const int c = dq_c0 + g0 * 16 + nt * 8 + 2 * t4;
                                if (c < s.Dk)
                                    atomic_add_pair(cur.dq + int64_t(iq) * a.dq_ld + dq_accum_col(c),
                                                    acc[mq][nt][2 * r], acc[mq][nt][2 * r + 1]);
                            }
                        }
                }
            }
        }
        h = h_next, m0 = m0_next, cur = next;
    }

    cp_async_wait<0>(); // a block with no query tiles still has its K/V copies in flight

    // ---- epilogue: dK = scale * dS^T Q, dV as accumulated ----
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int j = n0 + key0 + mt * 16 + r * 8 + g;
            if (j >= s.Skv) continue;
            char* dk_row = a.dk + b * a.dk_nb3 + hk * a.dk_nb2 + int64_t(j) * a.dk_nb1;
            char* dv_row = a.dv + b * a.dv_nb3 + hk * a.dv_nb2 + int64_t(j) * a.dv_nb1;
#pragma unroll
            for (int dt = 0; dt < ND; ++dt) {
                const int c = dc0 + dt * 8 + 2 * t4;
                if (c < s.Dk)
                    store_pair(dk_row, c, dk_acc[mt][dt][2 * r] * s.scale,
                               dk_acc[mt][dt][2 * r + 1] * s.scale, a.dk_code);
                if (c < s.Dv)
                    store_pair(dv_row, c, dv_acc[mt][dt][2 * r], dv_acc[mt][dt][2 * r + 1], a.dv_code);
            }
        }
}

} // namespace gfa::cuda::fa
