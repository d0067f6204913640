// FlashAttention-2 on the CPU.
//
// Every matrix product is one register-blocked micro-kernel (6 rows x 16 columns of C in
// twelve 8-lane accumulators) that broadcasts elements of A and streams rows of B. A may
// be read with any row and column stride, so transposed operands (P^T, dS^T) are a
// stride swap instead of a copy. The scores are kept key-major (S^T = K Q^T, the query
// tile transposed once), which makes the softmax's per-query max and sum plain lane-wise
// vector operations over 8 queries at a time.
//
// Scores are in base 2: log2(e) is folded into the scale of Q, so each probability is a
// single exp2. A row that has seen nothing visible keeps m = -inf; exponents then use 0
// in place of m so no inf - inf (NaN) appears.
#include "flash_attn_cpu.h"

#include "simd.h"

#include <ggml-fa/error.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace gfa::cpu {

using namespace attn;
using simd::vf8;

namespace {

constexpr int64_t kTileQ = 96;  // query rows per tile; a multiple of 16 (the width of S^T)
constexpr int64_t kTileKV = 36; // keys per tile; a multiple of the micro-kernel's 6 rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) {
    return (x + m - 1) / m * m;
}

// ---- GEMM micro-kernel ------------------------------------------------------------------

// C[MR x 8*NV] (+)= A[MR x K] B[K x 8*NV], A(m, k) = A[m*a_rs + k*a_cs], B and C row-major.
template <int MR, int NV>
void micro_kernel(int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t ldb,
                  float* C, int64_t ldc, bool accumulate) {
    vf8 c[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? simd::load(C + r * ldc + 8 * v) : simd::zero();
    for (int64_t k = 0; k < K; ++k) {
        vf8 b[NV];
        for (int v = 0; v < NV; ++v) b[v] = simd::load(B + k * ldb + 8 * v);
        for (int r = 0; r < MR; ++r) {
            const vf8 a = simd::splat(A[r * a_rs + k * a_cs]);
            for (int v = 0; v < NV; ++v) c[r][v] = simd::fma(a, b[v], c[r][v]);
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) simd::store(C + r * ldc + 8 * v, c[r][v]);
}

using MicroKernel = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                             bool);
constexpr int kMR = 6;
constexpr MicroKernel kKernels[kMR][2] = {
    {micro_kernel<1, 1>, micro_kernel<1, 2>}, {micro_kernel<2, 1>, micro_kernel<2, 2>},
    {micro_kernel<3, 1>, micro_kernel<3, 2>}, {micro_kernel<4, 1>, micro_kernel<4, 2>},
    {micro_kernel<5, 1>, micro_kernel<5, 2>}, {micro_kernel<6, 1>, micro_kernel<6, 2>},
};

// C[M x N] (+)= A[M x K] B[K x N]; N a multiple of 8 (our buffers are padded to it).
// Column panels outside, row blocks inside: a K x 16 panel of B stays in L1 while A streams.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
        const int nv = N - n0 >= 16 ? 2 : 1;
        for (int64_t m0 = 0; m0 < M; m0 += kMR) {
            const int mr = int(std::min<int64_t>(kMR, M - m0));
            kKernels[mr - 1][nv - 1](K, A + m0 * a_rs, a_rs, a_cs, B + n0, ldb, C + m0 * ldc + n0, ldc,
                                     accumulate);
        }
    }
}

// ---- row conversions ----------------------------------------------------------------------

// n elements of type t to float; dst[n, n_padded) is zeroed.
void load_row(Type t, const void* src, float* dst, int64_t n, int64_t n_padded) {
    int64_t i = 0;
    switch (t) {
    case Type::F32:
        std::memcpy(dst, src, size_t(n) * 4);
        i = n;
        break;
#if GFA_SIMD_AVX2
    case Type::F16: {
        const uint16_t* s = static_cast<const uint16_t*>(src);
        for (; i + 8 <= n; i += 8) simd::store(dst + i, simd::load_f16(s + i));
        for (; i < n; ++i) dst[i] = fp16_to_fp32(s[i]);
        break;
    }
    case Type::BF16: {
        const uint16_t* s = static_cast<const uint16_t*>(src);
        for (; i + 8 <= n; i += 8) simd::store(dst + i, simd::load_bf16(s + i));
        for (; i < n; ++i) dst[i] = bf16_to_fp32(s[i]);
        break;
    }
    case Type::Q8_0: {
        const block_q8_0* blk = static_cast<const block_q8_0*>(src);
        for (; i < n; i += QK8_0, ++blk) {
            const vf8 d = simd::splat(fp16_to_fp32(blk->d));
            for (int k = 0; k < QK8_0; k += 8) simd::store(dst + i + k, d * simd::load_i8(blk->qs + k));
        }
        break;
    }
#endif
    default:
        type_traits(t).to_float(src, dst, n);
        i = n;
        break;
    }
    for (int64_t k = n; k < n_padded; ++k) dst[k] = 0.0f;
}

void store_row(Type t, const float* src, void* dst, int64_t n) {
    switch (t) {
    case Type::F32:
        std::memcpy(dst, src, size_t(n) * 4);
        return;
#if GFA_SIMD_AVX2
    case Type::F16: {
        uint16_t* d = static_cast<uint16_t*>(dst);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) simd::store_f16(d + i, simd::load(src + i));
        for (; i < n; ++i) d[i] = fp32_to_fp16(src[i]);
        return;
    }
#endif
    default:
        type_traits(t).from_float(src, dst, n);
    }
}

float mask_value(Type t, const char* row, int64_t j) {
    if (t == Type::F16) return fp16_to_fp32(reinterpret_cast<const uint16_t*>(row)[j]);
    return reinterpret_cast<const float*>(row)[j];
}

// Keys [lo, hi] that query i may see under causal/window (empty when lo > hi); the same
// rule as attn::visible(), solved for j.
struct KeyRange {
    int64_t lo, hi;
};
KeyRange visible_keys(const Params& pr, int64_t i, int64_t Sq, int64_t Skv) {
    const int64_t diag = i + Skv - Sq;
    int64_t lo = 0, hi = Skv - 1;
    if (pr.causal) hi = std::min(hi, diag);
    if (pr.window_right >= 0) hi = std::min(hi, diag + pr.window_right);
    if (pr.window_left >= 0) lo = std::max(lo, diag - pr.window_left);
    return {lo, hi};
}

// The scale applied to q.k before the softmax, in base 2. With a softcap, Q is scaled by
// scale / cap and the score becomes (cap * log2 e) * tanh(q.k scale / cap).
float q_prescale(const Params& pr) {
    return pr.logit_softcap > 0.0f ? pr.scale / pr.logit_softcap : pr.scale * kLog2e;
}

// Per-query-row facts a tile needs: which head/position, its visible keys, ALiBi slope
// (base 2) and mask row.
struct RowInfo {
    int64_t h = 0, i = 0;
    KeyRange keys{0, -1};
    float slope2 = 0.0f;
    const char* mask = nullptr;
};

// Adds slope * mask (base 2) and sets invisible pairs to -inf on a key-major score tile
// st[j][r] for keys [j0, j0 + nk). `partial` says some pair in the tile is invisible.
void apply_mask(const Problem& p, const RowInfo* rows, int64_t n_rows, int64_t j0, int64_t nk, float* st,
                int64_t ld, bool partial) {
    if (p.mask.present())
        for (int64_t r = 0; r < n_rows; ++r) {
            const RowInfo& ri = rows[r];
            for (int64_t j = 0; j < nk; ++j)
                st[j * ld + r] += ri.slope2 * mask_value(p.mask.type, ri.mask, j0 + j);
        }
    if (partial)
        for (int64_t r = 0; r < n_rows; ++r)
            for (int64_t j = 0; j < nk; ++j)
                if (j0 + j < rows[r].keys.lo || j0 + j > rows[r].keys.hi) st[j * ld + r] = kNegInf;
}

// True when some (row, key) pair of the tile is outside the visible band.
bool tile_is_partial(const RowInfo* rows, int64_t n_rows, int64_t j0, int64_t nk) {
    for (int64_t r = 0; r < n_rows; ++r)
        if (rows[r].keys.lo > j0 || rows[r].keys.hi < j0 + nk - 1) return true;
    return false;
}

void apply_softcap(float cap, float* st, int64_t nk, int64_t width, int64_t ld) {
    const vf8 cap2 = simd::splat(cap * kLog2e);
    for (int64_t j = 0; j < nk; ++j)
        for (int64_t r = 0; r < width; r += 8)
            simd::store(st + j * ld + r, cap2 * simd::tanh(simd::load(st + j * ld + r)));
}

// Fills RowInfo for rows (h0 + a, i0 + c), r = a * ni + c.
void describe_rows(const Problem& p, int64_t b, int64_t h0, int64_t nh, int64_t i0, int64_t ni,
                   RowInfo* rows) {
    for (int64_t a = 0; a < nh; ++a)
        for (int64_t c = 0; c < ni; ++c) {
            RowInfo& ri = rows[a * ni + c];
            ri.h = h0 + a;
            ri.i = i0 + c;
            ri.keys = visible_keys(p.params, ri.i, p.Sq, p.Skv);
            ri.slope2 = alibi_slope(p.params.max_bias, ri.h, p.Hq) * kLog2e;
            ri.mask = mask_row(p.mask, ri.i, ri.h, b);
        }
}

// ============================== forward ======================================================

// A query tile: heads [h0, h0 + nh) x positions [i0, i0 + ni) of batch b, all reading kv
// head g. Several heads share a tile when Sq is short (decoding packs the GQA group).
struct QTile {
    int64_t b, g, h0, nh, i0, ni;
    int64_t rows() const { return nh * ni; }
};

struct ForwardPlan {
    std::vector<QTile> tiles;
    int64_t splits = 1; // split-KV factor per tile
    int64_t Dv8 = 0;
};

ForwardPlan plan_forward(const Problem& p, int n_threads) {
    ForwardPlan plan;
    plan.Dv8 = round_up(p.Dv, 8);
    const int64_t group = p.Hq / p.Hkv;
    const int64_t ni = std::min(p.Sq, kTileQ);
    const int64_t heads_per_tile = std::clamp<int64_t>(kTileQ / ni, 1, group);
    for (int64_t b = 0; b < p.B; ++b)
        for (int64_t g = 0; g < p.Hkv; ++g)
            for (int64_t h0 = g * group; h0 < (g + 1) * group; h0 += heads_per_tile)
                for (int64_t i0 = 0; i0 < p.Sq; i0 += ni)
                    plan.tiles.push_back({b, g, h0, std::min(heads_per_tile, (g + 1) * group - h0), i0,
                                          std::min(ni, p.Sq - i0)});
    // Too few query tiles to feed the threads (decoding): split the keys too.
    const int64_t n_tiles = int64_t(plan.tiles.size());
    if (n_tiles < n_threads) {
        const int64_t kv_tiles = (p.Skv + kTileKV - 1) / kTileKV;
        plan.splits = std::clamp<int64_t>((n_threads + n_tiles - 1) / n_tiles, 1, kv_tiles);
    }
    return plan;
}

// Per-thread buffers of the forward.
struct ForwardWorkspace {
    std::vector<float> qt;   // [Dk][kTileQ]   Q tile, transposed and pre-scaled
    std::vector<float> kbuf; // [kTileKV][Dk]  converted K tile (f32 K is read in place)
    std::vector<float> vbuf; // [kTileKV][Dv8] converted V tile
    std::vector<float> st;   // [kTileKV][kTileQ] scores S^T, then probabilities P^T
    std::vector<float> oacc; // [kTileQ][Dv8]  unnormalized output
    std::vector<float> row;  // [max(Dk, Dv8)] one converted row
    std::vector<RowInfo> rows;
    float m[kTileQ], l[kTileQ], alpha[kTileQ];

    static size_t floats(const Problem& p, int64_t Dv8) {
        return size_t(p.Dk * kTileQ + kTileKV * p.Dk + kTileKV * Dv8 + kTileKV * kTileQ + kTileQ * Dv8 +
                      std::max(p.Dk, Dv8));
    }
    ForwardWorkspace(const Problem& p, int64_t Dv8)
        : qt(size_t(p.Dk * kTileQ)), kbuf(size_t(kTileKV * p.Dk)), vbuf(size_t(kTileKV * Dv8)),
          st(size_t(kTileKV * kTileQ)), oacc(size_t(kTileQ * Dv8)), row(size_t(std::max(p.Dk, Dv8))),
          rows(size_t(kTileQ)) {}
};

// Partial results of one split: running max m and sum l (base 2) and the unnormalized O.
struct Partial {
    float* m;
    float* l;
    float* o; // [rows][Dv8]
};

// Normalizes one row and writes O and LSE; folds in the sink as a logit with value 0.
void write_row_output(const Problem& p, int64_t b, const RowInfo& ri, float m, float l, float* o,
                      float* tmp) {
    if (p.sinks.present()) {
        const float s2 = sink_logit(p.sinks, ri.h) * kLog2e;
        const float m_new = std::max(m, s2);
        const float alpha = m == kNegInf ? 0.0f : std::exp2(m - m_new);
        l = l * alpha + std::exp2(s2 - m_new);
        for (int64_t d = 0; d < p.Dv; ++d) o[d] *= alpha;
        m = m_new;
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f; // nothing visible: O = 0
    for (int64_t d = 0; d < p.Dv; ++d) tmp[d] = o[d] * inv;
    store_row(p.o.type, tmp, o_row(p.o, ri.i, ri.h, b), p.Dv);
    if (p.lse.present()) *lse_at(p.lse, ri.i, ri.h, b) = l > 0.0f ? (m + std::log2(l)) / kLog2e : kNegInf;
}

// One query tile against the key tiles of split `split`: load Q tile; per key tile:
// load K/V, S = QK^T, mask, online softmax, O += PV; epilogue.
void forward_tile(const Problem& p, const ForwardPlan& plan, const QTile& tile, int64_t split,
                  ForwardWorkspace& ws, const Partial* partial) {
    const int64_t n = tile.rows(), n8 = round_up(n, 8), Dk = p.Dk, Dv8 = plan.Dv8;
    RowInfo* rows = ws.rows.data();
    describe_rows(p, tile.b, tile.h0, tile.nh, tile.i0, tile.ni, rows);

    // Load Q tile, transposed (qt[d][r]) and scaled; columns [n, n8) are zero.
    const float qscale = q_prescale(p.params);
    std::fill(ws.qt.begin(), ws.qt.end(), 0.0f);
    for (int64_t r = 0; r < n; ++r) {
        load_row(p.q.type, row_at(p.q, rows[r].i, rows[r].h, tile.b), ws.row.data(), Dk, Dk);
        for (int64_t d = 0; d < Dk; ++d) ws.qt[size_t(d * kTileQ + r)] = ws.row[size_t(d)] * qscale;
    }
    for (int64_t r = 0; r < kTileQ; ++r) ws.m[r] = kNegInf, ws.l[r] = 0.0f;
    std::fill(ws.oacc.begin(), ws.oacc.end(), 0.0f);

    // The key tiles any row of this tile can see (causal/window skip the rest), then
    // this split's share of them.
    int64_t jmin = p.Skv, jmax = -1;
    for (int64_t r = 0; r < n; ++r)
        if (rows[r].keys.lo <= rows[r].keys.hi) {
            jmin = std::min(jmin, rows[r].keys.lo);
            jmax = std::max(jmax, rows[r].keys.hi);
        }
    int64_t t_begin = 0, t_end = 0;
    if (jmax >= jmin) {
        const int64_t t0 = jmin / kTileKV, t1 = jmax / kTileKV + 1;
        t_begin = t0 + (t1 - t0) * split / plan.splits;
        t_end = t0 + (t1 - t0) * (split + 1) / plan.splits;
    }

    const bool k_in_place = p.k.type == Type::F32;
    const bool v_in_place = p.v.type == Type::F32 && p.Dv % 8 == 0;
    float* st = ws.st.data();
    for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t j0 = t * kTileKV, nk = std::min(kTileKV, p.Skv - j0);

        // Load K/V tile (converted to f32 unless already f32).
        const float* kt = ws.kbuf.data();
        int64_t k_ld = Dk;
        if (k_in_place) {
            kt = reinterpret_cast<const float*>(row_at(p.k, j0, tile.g, tile.b));
            k_ld = p.k.nb[1] / 4;
        } else {
            for (int64_t j = 0; j < nk; ++j)
                load_row(p.k.type, row_at(p.k, j0 + j, tile.g, tile.b), ws.kbuf.data() + j * Dk, Dk, Dk);
        }
        const float* vt = ws.vbuf.data();
        int64_t v_ld = Dv8;
        if (v_in_place) {
            vt = reinterpret_cast<const float*>(row_at(p.v, j0, tile.g, tile.b));
            v_ld = p.v.nb[1] / 4;
        } else {
            for (int64_t j = 0; j < nk; ++j)
                load_row(p.v.type, row_at(p.v, j0 + j, tile.g, tile.b), ws.vbuf.data() + j * Dv8, p.Dv, Dv8);
        }

        // S^T = K Q^T (key-major, base-2 units unless softcapped).
        gemm(nk, n8, Dk, kt, k_ld, 1, ws.qt.data(), kTileQ, st, kTileQ, false);
        if (p.params.logit_softcap > 0.0f) apply_softcap(p.params.logit_softcap, st, nk, n8, kTileQ);

        // Mask: ALiBi-scaled mask, causal/window band.
        apply_mask(p, rows, n, j0, nk, st, kTileQ, tile_is_partial(rows, n, j0, nk));

        // Online softmax, 8 query rows per vector: new max, rescale factor, P = exp2(S - m).
        for (int64_t r = 0; r < n8; r += 8) {
            vf8 mx = simd::load(ws.m + r);
            for (int64_t j = 0; j < nk; ++j) mx = simd::max(mx, simd::load(st + j * kTileQ + r));
            float m_new[8], m_use[8];
            simd::store(m_new, mx);
            for (int k = 0; k < 8; ++k) m_use[k] = m_new[k] == kNegInf ? 0.0f : m_new[k];
            const vf8 mu = simd::load(m_use);
            const vf8 alpha = simd::exp2(simd::load(ws.m + r) - mu);
            vf8 sum = simd::zero();
            for (int64_t j = 0; j < nk; ++j) {
                const vf8 pj = simd::exp2(simd::load(st + j * kTileQ + r) - mu);
                simd::store(st + j * kTileQ + r, pj);
                sum = sum + pj;
            }
            simd::store(ws.l + r, simd::fma(simd::load(ws.l + r), alpha, sum));
            simd::store(ws.alpha + r, alpha);
            simd::store(ws.m + r, mx);
        }
        for (int64_t r = 0; r < n; ++r) {
            if (ws.alpha[r] == 1.0f) continue;
            const vf8 a = simd::splat(ws.alpha[r]);
            float* o = ws.oacc.data() + r * Dv8;
            for (int64_t d = 0; d < Dv8; d += 8) simd::store(o + d, a * simd::load(o + d));
        }

        // O += P V (P read transposed out of st).
        gemm(n, Dv8, nk, st, 1, kTileQ, vt, v_ld, ws.oacc.data(), Dv8, true);
    }

    // Epilogue: normalize and write, or hand the split's partial to the combine step.
    if (partial) {
        std::copy(ws.m, ws.m + n, partial->m);
        std::copy(ws.l, ws.l + n, partial->l);
        std::copy(ws.oacc.begin(), ws.oacc.begin() + n * Dv8, partial->o);
        return;
    }
    for (int64_t r = 0; r < n; ++r)
        write_row_output(p, tile.b, rows[r], ws.m[r], ws.l[r], ws.oacc.data() + r * Dv8, ws.row.data());
}

// Log-sum-exp combine of a tile's splits, in split order.
void combine_splits(const Problem& p, const ForwardPlan& plan, const QTile& tile, const Partial* parts,
                    ForwardWorkspace& ws) {
    const int64_t n = tile.rows(), Dv8 = plan.Dv8;
    describe_rows(p, tile.b, tile.h0, tile.nh, tile.i0, tile.ni, ws.rows.data());
    for (int64_t r = 0; r < n; ++r) {
        float m = kNegInf;
        for (int64_t s = 0; s < plan.splits; ++s) m = std::max(m, parts[s].m[r]);
        float l = 0.0f;
        float* o = ws.oacc.data();
        std::fill(o, o + Dv8, 0.0f);
        if (m != kNegInf)
            for (int64_t s = 0; s < plan.splits; ++s) {
                if (parts[s].m[r] == kNegInf) continue;
                const float w = std::exp2(parts[s].m[r] - m);
                l += w * parts[s].l[r];
                const float* os = parts[s].o + r * Dv8;
                for (int64_t d = 0; d < Dv8; ++d) o[d] += w * os[d];
            }
        write_row_output(p, tile.b, ws.rows[size_t(r)], m, l, o, ws.row.data());
    }
}

size_t split_partial_floats(const ForwardPlan& plan) {
    if (plan.splits == 1) return 0;
    return size_t(plan.tiles.size()) * size_t(plan.splits) * size_t(kTileQ * (plan.Dv8 + 2));
}

} // namespace

size_t flash_attn_scratch_bytes(const Problem& p, int n_threads) {
    const ForwardPlan plan = plan_forward(p, n_threads);
    return 4 * (size_t(n_threads) * ForwardWorkspace::floats(p, plan.Dv8) + split_partial_floats(plan)) +
           size_t(n_threads) * kTileQ * sizeof(RowInfo);
}

void flash_attn_forward(const Problem& p, ThreadPool& pool) {
    validate(p, "flash_attn_ext (CPU forward)");
    const int nth = pool.size();
    const ForwardPlan plan = plan_forward(p, nth);
    const int64_t n_tiles = int64_t(plan.tiles.size());
    const int64_t n_items = n_tiles * plan.splits;

    std::vector<float> partial_store(split_partial_floats(plan));
    auto partial_of = [&](int64_t tile, int64_t split) {
        float* base = partial_store.data() + size_t((tile * plan.splits + split) * kTileQ * (plan.Dv8 + 2));
        return Partial{base, base + kTileQ, base + 2 * kTileQ};
    };

    // Items are claimed dynamically (causal tiles differ in cost); each item owns its
    // output rows (or its partial slot), so the result does not depend on who ran it.
    std::atomic<int64_t> next{0};
    pool.run([&](int, int) {
        ForwardWorkspace ws(p, plan.Dv8);
        for (int64_t item; (item = next.fetch_add(1)) < n_items;) {
            const int64_t tile = item / plan.splits, split = item % plan.splits;
            if (plan.splits == 1) {
                forward_tile(p, plan, plan.tiles[size_t(tile)], split, ws, nullptr);
            } else {
                const Partial part = partial_of(tile, split);
                forward_tile(p, plan, plan.tiles[size_t(tile)], split, ws, &part);
            }
        }
    });
    if (plan.splits == 1) return;

    std::atomic<int64_t> next_tile{0};
    pool.run([&](int, int) {
        ForwardWorkspace ws(p, plan.Dv8);
        std::vector<Partial> parts(size_t(plan.splits));
        for (int64_t tile; (tile = next_tile.fetch_add(1)) < n_tiles;) {
            for (int64_t s = 0; s < plan.splits; ++s) parts[size_t(s)] = partial_of(tile, s);
            combine_splits(p, plan, plan.tiles[size_t(tile)], parts.data(), ws);
        }
    });
}

} // namespace gfa::cpu
