// FlashAttention-2 on the CPU.
//
// Every matrix product is one register-blocked micro-kernel (6 rows x 16 columns of C in
// twelve 8-lane accumulators) that broadcasts elements of A and streams rows of B. A may
// be read with any row and column stride, so transposed operands (P^T, dS^T) are a
// stride swap instead of a copy. The scores are kept key-major (S^T = K Q^T, the query
// tile transposed once), which makes the softmax's per-query max and sum plain lane-wise
// vector operations over 8 queries at a time.
//
// Decoding (at most 8 query rows per kv head) has its own path: the rows of a GQA group
// share a tile, so each kv head's K and V are streamed once; scores are dot products read
// straight from K's storage (F16C conversion, q8_0/q4_0 blocks dequantized in the loop),
// with the query rows in row-major order, and the keys are split across threads when the
// kv heads alone do not keep them evenly busy.
//
// With precision BF16 (and a build for AVX512-BF16) the two products of a tile take pairs of
// bf16 values instead (bf16_pairs.h): S^T = K Q^T over pairs of head dims (Q packed once per
// tile), and O^T = V^T P^T over pairs of keys, the output kept transposed (query-major lanes)
// so the online softmax's rescale is one multiply per lane inside the product. The softmax in
// between is the f32 one.
//
// Scores are in base 2: log2(e) is folded into the scale of Q, so each probability is a
// single exp2. A row that has seen nothing visible keeps m = -inf; exponents then use 0
// in place of m so no inf - inf (NaN) appears.
#include "flash_attn_cpu.h"

#include "bf16_pairs.h"
#include "simd.h"

#include <ggml-fa/error.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <new>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

namespace gfa::cpu {

using namespace attn;
using simd::vf8;

namespace {

constexpr int64_t kTileQ = 96;        // query rows per tile; a multiple of 16 (the width of S^T)
constexpr int64_t kTileQPairs = 192;  // the same for the bf16 products: packing K/V pays for more rows
constexpr int64_t kTileKV = 36;       // keys per tile; a multiple of the micro-kernel's 6 rows
constexpr int64_t kTileKVPairs = 128; // keys per tile of the bf16 products: 64 pairs, 16 row blocks
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

constexpr int64_t round_up(int64_t x, int64_t m) {
    return (x + m - 1) / m * m;
}

// A leading dimension (in floats, >= n) that is an odd number of 64-byte lines. The GEMMs
// walk a 16-column panel of B down its rows; with an even line count per row (96 floats
// = 6 lines, 4096 floats = 64 lines) those rows fall into half, or just one, of the L1's
// 64 sets and evict each other. An odd count spreads them over every set.
constexpr int64_t conflict_free_ld(int64_t n) {
    const int64_t ld = round_up(n, 16);
    return (ld / 16) % 2 == 1 ? ld : ld + 16;
}

// Float buffers on 64-byte boundaries, so 8-lane rows never straddle two cache lines.
template <class T> struct LineAligned {
    using value_type = T;
    LineAligned() = default;
    template <class U> LineAligned(const LineAligned<U>&) {}
    T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    template <class U> bool operator==(const LineAligned<U>&) const { return true; }
};
using FloatBuffer = std::vector<float, LineAligned<float>>;

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

// Adds slope * mask (base 2) and sets invisible pairs to -inf on a score tile for keys
// [j0, j0 + nk), score (r, j) at s[r * row_stride + j * key_stride]. `partial` says some
// pair in the tile is invisible.
void apply_mask(const Problem& p, const RowInfo* rows, int64_t n_rows, int64_t j0, int64_t nk, float* s,
                int64_t row_stride, int64_t key_stride, bool partial) {
    if (p.mask.present())
        for (int64_t r = 0; r < n_rows; ++r) {
            const RowInfo& ri = rows[r];
            for (int64_t j = 0; j < nk; ++j)
                s[r * row_stride + j * key_stride] += ri.slope2 * mask_value(p.mask.type, ri.mask, j0 + j);
        }
    if (partial)
        for (int64_t r = 0; r < n_rows; ++r)
            for (int64_t j = 0; j < nk; ++j)
                if (j0 + j < rows[r].keys.lo || j0 + j > rows[r].keys.hi)
                    s[r * row_stride + j * key_stride] = kNegInf;
}

// True when some (row, key) pair of the tile is outside the visible band.
bool tile_is_partial(const RowInfo* rows, int64_t n_rows, int64_t j0, int64_t nk) {
    for (int64_t r = 0; r < n_rows; ++r)
        if (rows[r].keys.lo > j0 || rows[r].keys.hi < j0 + nk - 1) return true;
    return false;
}

// The columns of the transposed tiles (query rows) that see any key of [j0, j0 + nk), as a
// range of whole 16-column groups [c0, c1) (empty: {0, 0}). Under a causal mask the rows
// above the diagonal of a tile see none of its keys: they keep their state (probabilities 0,
// rescale 1), so the tile's products and softmax leave their columns out.
std::pair<int64_t, int64_t> seeing_columns(const RowInfo* rows, int64_t n_rows, int64_t j0, int64_t nk) {
    int64_t first = n_rows, last = -1;
    for (int64_t r = 0; r < n_rows; ++r) {
        const KeyRange& k = rows[r].keys;
        if (std::max(k.lo, j0) <= std::min(k.hi, j0 + nk - 1)) {
            first = std::min(first, r);
            last = r;
        }
    }
    if (last < 0) return {0, 0};
    return {first / 16 * 16, round_up(last + 1, 16)};
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
    bool decode = false;     // tiles run through decode_tile
    bool pairs = false;      // tiles run through forward_tile_pairs (bf16 products)
    int64_t tile_q = kTileQ; // query rows per tile
};

// The bf16 products: asked for, built for, and head dims in whole 16-lane rows.
bool use_pair_products(const Problem& p) {
#if GFA_BF16_PAIRS
    return p.params.precision == attn::Precision::BF16 && p.Dk % 16 == 0 && p.Dv % 16 == 0;
#else
    (void)p;
    return false;
#endif
}

// Decoding (a few query rows per kv head): the rows of a whole GQA group form one tile,
// so K and V are streamed once per kv head, and the scores are dot products computed
// straight from K's storage type (no converted copy, no transposed Q).
constexpr int64_t kDecodeMaxRows = 8;  // Sq * (Hq / Hkv) at most this
constexpr int64_t kDecodeTileKV = 32;  // keys per tile: K and V tiles of a head stay in L1
constexpr int64_t kDecodeRowBlock = 4; // query rows per register block

bool decode_kv_type(Type t) {
    return t == Type::F32 || t == Type::F16 || t == Type::BF16 || t == Type::Q8_0 || t == Type::Q4_0;
}

bool use_decode_path(const Problem& p) {
#if GFA_SIMD_AVX2
    return p.Sq * (p.Hq / p.Hkv) <= kDecodeMaxRows && p.Dk % 8 == 0 && p.Dv % 8 == 0 &&
           decode_kv_type(p.k.type) && decode_kv_type(p.v.type);
#else
    (void)p;
    return false;
#endif
}

ForwardPlan plan_forward(const Problem& p, int n_threads) {
    ForwardPlan plan;
    plan.Dv8 = round_up(p.Dv, 8);
    const int64_t group = p.Hq / p.Hkv;
    if (use_decode_path(p)) {
        plan.decode = true;
        for (int64_t b = 0; b < p.B; ++b)
            for (int64_t g = 0; g < p.Hkv; ++g) plan.tiles.push_back({b, g, g * group, group, 0, p.Sq});
        // Split the keys when the kv heads do not divide evenly over the threads: aim at
        // about four items per thread, each split keeping at least four key tiles.
        const int64_t n_tiles = int64_t(plan.tiles.size());
        if (n_tiles % n_threads != 0) {
            const int64_t kv_tiles = (p.Skv + kDecodeTileKV - 1) / kDecodeTileKV;
            plan.splits = std::clamp<int64_t>((4 * n_threads + n_tiles - 1) / n_tiles, 1,
                                              std::max<int64_t>(1, kv_tiles / 4));
        }
        return plan;
    }
    plan.pairs = use_pair_products(p);
    plan.tile_q = plan.pairs ? kTileQPairs : kTileQ;
    const int64_t ni = std::min(p.Sq, plan.tile_q);
    const int64_t heads_per_tile = std::clamp<int64_t>(plan.tile_q / ni, 1, group);
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

// Per-thread buffers of the forward, for tiles of ldq query rows (the plan's tile_q). With
// bf16 products (pairs) the K/V buffers hold pairs (32-bit words: kbuf's first half as bf16
// rows, vbuf as key pairs) and the score tile has kTileKVPairs rows.
struct ForwardWorkspace {
    int64_t ldq;      // query rows per tile: the leading dimension of the query-wise buffers
    FloatBuffer qt;   // [Dk][ldq]         Q tile, transposed and pre-scaled
    FloatBuffer kbuf; // [key rows][Dk]    converted K tile (f32 K is read in place)
    FloatBuffer vbuf; // [key rows][Dv8]   converted V tile; pairs: [keys / 2][Dv] key pairs
    FloatBuffer st;   // [key rows][ldq]   scores S^T, then probabilities P^T
    FloatBuffer oacc; // [ldq][Dv8]        unnormalized output
    FloatBuffer row;  // [2][max(Dk, Dv8)] converted rows
    FloatBuffer qp;   // pairs: [Dk / 2][ldq] Q's dims in pairs
    FloatBuffer pp;   // pairs: [kTileKVPairs / 2][ldq] P^T's keys in pairs
    FloatBuffer ot;   // pairs: [Dv][ldq] unnormalized output, transposed
    std::vector<RowInfo> rows;
    float m[kTileQPairs], l[kTileQPairs], alpha[kTileQPairs];

    static int64_t key_rows(bool pairs) { return pairs ? kTileKVPairs : kTileKV; }
    static size_t floats(const Problem& p, const ForwardPlan& plan) {
        const int64_t kr = key_rows(plan.pairs), q = plan.tile_q, Dv8 = plan.Dv8;
        const size_t pair_floats = plan.pairs ? size_t(p.Dk / 2 * q + kr / 2 * q + Dv8 * q) : 0;
        return size_t(p.Dk * q + kr * p.Dk + kr * Dv8 + kr * q + q * Dv8 + 2 * std::max(p.Dk, Dv8)) +
               pair_floats;
    }
    ForwardWorkspace(const Problem& p, const ForwardPlan& plan)
        : ldq(plan.tile_q), qt(size_t(p.Dk * ldq)), kbuf(size_t(key_rows(plan.pairs) * p.Dk)),
          vbuf(size_t(key_rows(plan.pairs) * plan.Dv8)), st(size_t(key_rows(plan.pairs) * ldq)),
          oacc(size_t(ldq * plan.Dv8)), row(size_t(2 * std::max(p.Dk, plan.Dv8))),
          qp(plan.pairs ? size_t(p.Dk / 2 * ldq) : 0), pp(plan.pairs ? size_t(kTileKVPairs / 2 * ldq) : 0),
          ot(plan.pairs ? size_t(plan.Dv8 * ldq) : 0), rows(size_t(ldq)) {}
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

// The key tiles (of tile_kv keys) any of the rows can see (causal/window skip the rest),
// then split `split`'s share of them: [first, last).
std::pair<int64_t, int64_t> split_key_tiles(const Problem& p, const RowInfo* rows, int64_t n, int64_t tile_kv,
                                            int64_t split, int64_t splits) {
    int64_t jmin = p.Skv, jmax = -1;
    for (int64_t r = 0; r < n; ++r)
        if (rows[r].keys.lo <= rows[r].keys.hi) {
            jmin = std::min(jmin, rows[r].keys.lo);
            jmax = std::max(jmax, rows[r].keys.hi);
        }
    if (jmax < jmin) return {0, 0};
    const int64_t t0 = jmin / tile_kv, t1 = jmax / tile_kv + 1;
    return {t0 + (t1 - t0) * split / splits, t0 + (t1 - t0) * (split + 1) / splits};
}

// Epilogue of a tile: normalize and write, or hand the split's partial to the combine step.
void finish_tile(const Problem& p, const QTile& tile, int64_t Dv8, ForwardWorkspace& ws,
                 const Partial* partial) {
    const int64_t n = tile.rows();
    if (partial) {
        std::copy(ws.m, ws.m + n, partial->m);
        std::copy(ws.l, ws.l + n, partial->l);
        std::copy(ws.oacc.begin(), ws.oacc.begin() + n * Dv8, partial->o);
        return;
    }
    for (int64_t r = 0; r < n; ++r)
        write_row_output(p, tile.b, ws.rows[size_t(r)], ws.m[r], ws.l[r], ws.oacc.data() + r * Dv8,
                         ws.row.data());
}

// Online softmax of a score tile S^T (nk keys x `width` queries, a multiple of 8), 8 query
// rows per vector: the new running max, the rescale factor alpha of each row, P = exp2(S - m)
// in place, and the running sums.
void online_softmax(ForwardWorkspace& ws, float* st, int64_t nk, int64_t width, int64_t first = 0) {
    for (int64_t r = first; r < width; r += 8) {
        vf8 mx = simd::load(ws.m + r);
        for (int64_t j = 0; j < nk; ++j) mx = simd::max(mx, simd::load(st + j * ws.ldq + r));
        float m_new[8], m_use[8];
        simd::store(m_new, mx);
        for (int k = 0; k < 8; ++k) m_use[k] = m_new[k] == kNegInf ? 0.0f : m_new[k];
        const vf8 mu = simd::load(m_use);
        const vf8 alpha = simd::exp2(simd::load(ws.m + r) - mu);
        vf8 sum = simd::zero();
        for (int64_t j = 0; j < nk; ++j) {
            const vf8 pj = simd::exp2(simd::load(st + j * ws.ldq + r) - mu);
            simd::store(st + j * ws.ldq + r, pj);
            sum = sum + pj;
        }
        simd::store(ws.l + r, simd::fma(simd::load(ws.l + r), alpha, sum));
        simd::store(ws.alpha + r, alpha);
        simd::store(ws.m + r, mx);
    }
}

// Loads the tile's Q rows transposed (qt[d][r]) and scaled; columns [n, ldq) are zero.
// Resets the running max and sum.
void load_q_tile(const Problem& p, const QTile& tile, const RowInfo* rows, ForwardWorkspace& ws) {
    const float qscale = q_prescale(p.params);
    std::fill(ws.qt.begin(), ws.qt.end(), 0.0f);
    for (int64_t r = 0; r < tile.rows(); ++r) {
        load_row(p.q.type, row_at(p.q, rows[r].i, rows[r].h, tile.b), ws.row.data(), p.Dk, p.Dk);
        for (int64_t d = 0; d < p.Dk; ++d) ws.qt[size_t(d * ws.ldq + r)] = ws.row[size_t(d)] * qscale;
    }
    for (int64_t r = 0; r < ws.ldq; ++r) ws.m[r] = kNegInf, ws.l[r] = 0.0f;
}

// One query tile against the key tiles of split `split`: load Q tile; per key tile:
// load K/V, S = QK^T, mask, online softmax, O += PV; epilogue.
void forward_tile(const Problem& p, const ForwardPlan& plan, const QTile& tile, int64_t split,
                  ForwardWorkspace& ws, const Partial* partial) {
    const int64_t n = tile.rows(), n8 = round_up(n, 8), Dk = p.Dk, Dv8 = plan.Dv8;
    RowInfo* rows = ws.rows.data();
    describe_rows(p, tile.b, tile.h0, tile.nh, tile.i0, tile.ni, rows);

    load_q_tile(p, tile, rows, ws);
    std::fill(ws.oacc.begin(), ws.oacc.end(), 0.0f);

    const auto [t_begin, t_end] = split_key_tiles(p, rows, n, kTileKV, split, plan.splits);

    const bool k_in_place = p.k.type == Type::F32;
    const bool v_in_place = p.v.type == Type::F32 && p.Dv % 8 == 0;
    float* st = ws.st.data();
    for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t j0 = t * kTileKV, nk = std::min(kTileKV, p.Skv - j0);
        // The rows that see the tile (the others keep their state, see seeing_columns).
        auto [c0, c1] = seeing_columns(rows, n, j0, nk);
        if (c1 == 0) continue; // no row sees it (split_key_tiles keeps to the seen range)
        c1 = std::min(c1, n8);
        const int64_t seeing_rows = std::min(n, c1) - c0;

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
        gemm(nk, c1 - c0, Dk, kt, k_ld, 1, ws.qt.data() + c0, ws.ldq, st + c0, ws.ldq, false);
        if (p.params.logit_softcap > 0.0f)
            apply_softcap(p.params.logit_softcap, st + c0, nk, c1 - c0, ws.ldq);

        // Mask: ALiBi-scaled mask, causal/window band.
        apply_mask(p, rows + c0, seeing_rows, j0, nk, st + c0, 1, ws.ldq,
                   tile_is_partial(rows + c0, seeing_rows, j0, nk));

        online_softmax(ws, st, nk, c1, c0);
        for (int64_t r = c0; r < c0 + seeing_rows; ++r) {
            if (ws.alpha[r] == 1.0f) continue;
            const vf8 a = simd::splat(ws.alpha[r]);
            float* o = ws.oacc.data() + r * Dv8;
            for (int64_t d = 0; d < Dv8; d += 8) simd::store(o + d, a * simd::load(o + d));
        }

        // O += P V (P read transposed out of st).
        gemm(seeing_rows, Dv8, nk, st + c0, 1, ws.ldq, vt, v_ld, ws.oacc.data() + c0 * Dv8, Dv8, true);
    }

    finish_tile(p, tile, Dv8, ws, partial);
}

#if GFA_BF16_PAIRS
// forward_tile with the two products on bf16 pairs (see the file comment): Q's dims packed
// in pairs once; per key tile K's rows rounded to bf16 (bf16 rows are read in place), S^T =
// K Q^T, the f32 mask and softmax, P^T's and V's keys packed in pairs, O^T = O^T alpha +
// V^T P^T; O^T transposed into the rows at the end.
void forward_tile_pairs(const Problem& p, const ForwardPlan& plan, const QTile& tile, int64_t split,
                        ForwardWorkspace& ws, const Partial* partial) {
    const int64_t n = tile.rows(), n16 = round_up(n, 16), Dk = p.Dk, Dv = p.Dv;
    RowInfo* rows = ws.rows.data();
    describe_rows(p, tile.b, tile.h0, tile.nh, tile.i0, tile.ni, rows);
    load_q_tile(p, tile, rows, ws);
    auto* qp = reinterpret_cast<uint32_t*>(ws.qp.data());
    for (int64_t d = 0; d < Dk; d += 2)
        bf16::pack_pairs(ws.qt.data() + d * ws.ldq, ws.qt.data() + (d + 1) * ws.ldq, qp + d / 2 * ws.ldq,
                         n16);
    std::fill(ws.ot.begin(), ws.ot.end(), 0.0f);

    const auto [t_begin, t_end] = split_key_tiles(p, rows, n, kTileKVPairs, split, plan.splits);
    const bool k_in_place =
        p.k.type == Type::BF16 && p.k.nb[1] % 4 == 0 && reinterpret_cast<uintptr_t>(p.k.data) % 4 == 0;
    auto* kb = reinterpret_cast<uint16_t*>(ws.kbuf.data());
    auto* vp = reinterpret_cast<uint32_t*>(ws.vbuf.data());
    auto* pp = reinterpret_cast<uint32_t*>(ws.pp.data());
    float* st = ws.st.data();
    float* even = ws.row.data();
    float* odd = even + std::max(Dk, plan.Dv8);
    for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t j0 = t * kTileKVPairs, nk = std::min(kTileKVPairs, p.Skv - j0), n_pairs = (nk + 1) / 2;
        // The rows that see the tile (the others keep their state, see seeing_columns).
        const auto [c0, c1] = seeing_columns(rows, n, j0, nk);
        if (c1 == 0) continue; // no row sees it (split_key_tiles keeps to the seen range)

        // K's rows as bf16 pairs of dims.
        const uint32_t* kw = reinterpret_cast<const uint32_t*>(kb);
        int64_t k_words = Dk / 2;
        if (k_in_place) {
            kw = reinterpret_cast<const uint32_t*>(row_at(p.k, j0, tile.g, tile.b));
            k_words = p.k.nb[1] / 4;
        } else {
            for (int64_t j = 0; j < nk; ++j) {
                load_row(p.k.type, row_at(p.k, j0 + j, tile.g, tile.b), even, Dk, Dk);
                bf16::to_bf16(even, kb + j * Dk, Dk);
            }
        }

        // S^T = K Q^T over the seeing rows' columns, then the mask and the online softmax as in
        // the f32 path.
        const int64_t width = c1 - c0;
        bf16::gemm(nk, width, Dk / 2, kw, k_words, 1, qp + c0, ws.ldq, st + c0, ws.ldq, nullptr, false);
        if (p.params.logit_softcap > 0.0f) apply_softcap(p.params.logit_softcap, st + c0, nk, width, ws.ldq);
        const int64_t mask_rows = std::min(n, c1) - c0;
        apply_mask(p, rows + c0, mask_rows, j0, nk, st + c0, 1, ws.ldq,
                   tile_is_partial(rows + c0, mask_rows, j0, nk));
        online_softmax(ws, st, nk, c1, c0);

        // P^T and V with their keys in pairs (a missing odd key is zero).
        for (int64_t jp = 0; jp < n_pairs; ++jp) {
            const int64_t j = 2 * jp;
            bf16::pack_pairs(st + j * ws.ldq + c0, j + 1 < nk ? st + (j + 1) * ws.ldq + c0 : nullptr,
                             pp + jp * ws.ldq + c0, width);
            load_row(p.v.type, row_at(p.v, j0 + j, tile.g, tile.b), even, Dv, Dv);
            if (j + 1 < nk) load_row(p.v.type, row_at(p.v, j0 + j + 1, tile.g, tile.b), odd, Dv, Dv);
            bf16::pack_pairs(even, j + 1 < nk ? odd : nullptr, vp + jp * Dv, Dv);
        }

        // O^T = O^T alpha + V^T P^T: row c of O^T takes column c of V's key pairs.
        bf16::gemm(Dv, width, n_pairs, vp, 1, Dv, pp + c0, ws.ldq, ws.ot.data() + c0, ws.ldq, ws.alpha + c0,
                   true);
    }

    for (int64_t r = 0; r < n; ++r)
        for (int64_t d = 0; d < Dv; ++d) ws.oacc[size_t(r * plan.Dv8 + d)] = ws.ot[size_t(d * ws.ldq + r)];
    finish_tile(p, tile, plan.Dv8, ws, partial);
}
#else
void forward_tile_pairs(const Problem&, const ForwardPlan&, const QTile&, int64_t, ForwardWorkspace&,
                        const Partial*) {
    fail("flash_attn_ext (CPU): bf16 pair products are not in this build");
}
#endif

// ============================== decode =======================================================
#if GFA_SIMD_AVX2

template <Type T> constexpr bool is_float_type = T == Type::F32 || T == Type::F16 || T == Type::BF16;

// Elements [32c, 32c + 32) of a K or V row stored as T, as four float vectors. Quantized
// blocks are dequantized here, inside the consumer's loop, instead of into a copy.
template <Type T> inline void load_chunk32(const char* row, int64_t c, vf8 out[4]) {
    if constexpr (T == Type::F32) {
        const float* x = reinterpret_cast<const float*>(row) + 32 * c;
        for (int i = 0; i < 4; ++i) out[i] = simd::load(x + 8 * i);
    } else if constexpr (T == Type::F16) {
        const uint16_t* x = reinterpret_cast<const uint16_t*>(row) + 32 * c;
        for (int i = 0; i < 4; ++i) out[i] = simd::load_f16(x + 8 * i);
    } else if constexpr (T == Type::BF16) {
        const uint16_t* x = reinterpret_cast<const uint16_t*>(row) + 32 * c;
        for (int i = 0; i < 4; ++i) out[i] = simd::load_bf16(x + 8 * i);
    } else if constexpr (T == Type::Q8_0) {
        const block_q8_0& blk = reinterpret_cast<const block_q8_0*>(row)[c];
        simd::load_i8x32_scaled(blk.qs, simd::f16_to_f32(blk.d), out);
    } else {
        static_assert(T == Type::Q4_0);
        const block_q4_0& blk = reinterpret_cast<const block_q4_0*>(row)[c];
        simd::load_u4x32_centered(blk.qs, simd::f16_to_f32(blk.d), out);
    }
}

// Elements [8u, 8u + 8) of a row of a float storage type (row tails past the last 32).
template <Type T> inline vf8 load_chunk8(const char* row, int64_t u) {
    if constexpr (T == Type::F32)
        return simd::load(reinterpret_cast<const float*>(row) + 8 * u);
    else if constexpr (T == Type::F16)
        return simd::load_f16(reinterpret_cast<const uint16_t*>(row) + 8 * u);
    else
        return simd::load_bf16(reinterpret_cast<const uint16_t*>(row) + 8 * u);
}

// Decoding reads the K and V rows of the cache once per step, in order, from memory: like the
// weight rows of the decoding products (request_weights_ahead in kernels_matmul.cpp), each
// key's row is asked for kRowsAhead keys before it is read (rows past the tile are the next
// tile's, or past the cache, where a request is dropped).
constexpr int64_t kRowsAhead = 16;
inline void request_row(const char* row, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(row + o, 0, 3);
}

// S = Q K^T for MR query rows (q: row-major, stride Dk, pre-scaled) against keys [0, nk)
// at k_rows + j * k_stride, into s[r * lds + j]. KB keys at a time: MR * KB <= 8 dot
// products accumulate lane-wise over Dk and are summed horizontally together at the end.
// Each chunk of K is converted once and used by all MR rows, so a whole GQA group of 8
// rows (MR = 8, KB = 1) pays for one conversion of K.
template <Type KT, int MR, int KB>
void decode_scores(int64_t Dk, const float* q, const char* k_rows, int64_t k_stride, int64_t nk, float* s,
                   int64_t lds) {
    static_assert(MR * KB <= 8);
    const int64_t n32 = Dk / 32;
    const int64_t row_bytes = int64_t(row_size(KT, Dk));
    for (int64_t j = 0; j < nk; j += KB) {
        for (int b = 0; b < KB; ++b) request_row(k_rows + (j + b + kRowsAhead) * k_stride, row_bytes);
        const char* key[KB];
        for (int b = 0; b < KB; ++b) // keys past the end repeat the last one (computed, not stored)
            key[b] = k_rows + std::min<int64_t>(j + b, nk - 1) * k_stride;
        vf8 acc[8];
        for (vf8& a : acc) a = simd::zero();
        for (int64_t c = 0; c < n32; ++c)
            for (int b = 0; b < KB; ++b) {
                vf8 kv[4];
                load_chunk32<KT>(key[b], c, kv);
                for (int r = 0; r < MR; ++r)
                    for (int i = 0; i < 4; ++i)
                        acc[r * KB + b] =
                            simd::fma(simd::load(q + r * Dk + 32 * c + 8 * i), kv[i], acc[r * KB + b]);
            }
        if constexpr (is_float_type<KT>)
            for (int64_t u = 4 * n32; u < Dk / 8; ++u)
                for (int b = 0; b < KB; ++b) {
                    const vf8 kv = load_chunk8<KT>(key[b], u);
                    for (int r = 0; r < MR; ++r)
                        acc[r * KB + b] = simd::fma(simd::load(q + r * Dk + 8 * u), kv, acc[r * KB + b]);
                }
        float sums[8];
        simd::store(sums, simd::reduce_add8(acc));
        for (int r = 0; r < MR; ++r)
            for (int b = 0; b < KB && j + b < nk; ++b) s[r * lds + j + b] = sums[r * KB + b];
    }
}

// O[r] += sum_j P[r][j] V_j for MR rows (p[r * lds + j], o[r * ldo + d]); V rows of a float
// storage type at v_rows + j * v_stride. 16 output columns at a time stay in registers
// while the keys stream past.
template <Type VT, int MR>
void decode_accumulate(int64_t Dv, const float* p, int64_t lds, const char* v_rows, int64_t v_stride,
                       int64_t nk, float* o, int64_t ldo) {
    for (int64_t n0 = 0; n0 < Dv; n0 += 16) {
        const bool two = n0 + 16 <= Dv;
        vf8 acc[MR][2];
        for (int r = 0; r < MR; ++r) {
            acc[r][0] = simd::load(o + r * ldo + n0);
            acc[r][1] = two ? simd::load(o + r * ldo + n0 + 8) : simd::zero();
        }
        for (int64_t j = 0; j < nk; ++j) {
            const char* vr = v_rows + j * v_stride;
            if (n0 == 0) request_row(vr + kRowsAhead * v_stride, int64_t(row_size(VT, Dv)));
            const vf8 va = load_chunk8<VT>(vr, n0 / 8);
            const vf8 vb = two ? load_chunk8<VT>(vr, n0 / 8 + 1) : simd::zero();
            for (int r = 0; r < MR; ++r) {
                const vf8 pr = simd::splat(p[r * lds + j]);
                acc[r][0] = simd::fma(pr, va, acc[r][0]);
                acc[r][1] = simd::fma(pr, vb, acc[r][1]);
            }
        }
        for (int r = 0; r < MR; ++r) {
            simd::store(o + r * ldo + n0, acc[r][0]);
            if (two) simd::store(o + r * ldo + n0 + 8, acc[r][1]);
        }
    }
}

// Calls f with T as a compile-time constant.
template <class F> void with_kv_type(Type t, F&& f) {
    switch (t) {
    case Type::F32:
        return f(std::integral_constant<Type, Type::F32>{});
    case Type::F16:
        return f(std::integral_constant<Type, Type::F16>{});
    case Type::BF16:
        return f(std::integral_constant<Type, Type::BF16>{});
    case Type::Q8_0:
        return f(std::integral_constant<Type, Type::Q8_0>{});
    case Type::Q4_0:
        return f(std::integral_constant<Type, Type::Q4_0>{});
    default:
        fail("flash_attn_ext (CPU decode): unsupported K/V type");
    }
}
// Calls f with the row count (1..kDecodeRowBlock) as a compile-time constant.
template <class F> void with_rows(int64_t mr, F&& f) {
    switch (mr) {
    case 1:
        return f(std::integral_constant<int, 1>{});
    case 2:
        return f(std::integral_constant<int, 2>{});
    case 3:
        return f(std::integral_constant<int, 3>{});
    default:
        return f(std::integral_constant<int, 4>{});
    }
}

// The rows of one GQA group (all Sq positions) against split `split`'s key tiles:
// load Q rows; per key tile: S = QK^T from K's storage, softcap, mask, online softmax,
// O += PV (quantized V is dequantized once per tile into L1); epilogue.
void decode_tile(const Problem& p, const ForwardPlan& plan, const QTile& tile, int64_t split,
                 ForwardWorkspace& ws, const Partial* partial) {
    const int64_t n = tile.rows(), Dk = p.Dk, Dv = p.Dv, lds = kDecodeTileKV;
    RowInfo* rows = ws.rows.data();
    describe_rows(p, tile.b, tile.h0, tile.nh, tile.i0, tile.ni, rows);

    // Load Q rows, row-major and pre-scaled.
    const float qscale = q_prescale(p.params);
    float* q = ws.qt.data();
    for (int64_t r = 0; r < n; ++r) {
        load_row(p.q.type, row_at(p.q, rows[r].i, rows[r].h, tile.b), q + r * Dk, Dk, Dk);
        for (int64_t d = 0; d < Dk; ++d) q[r * Dk + d] *= qscale;
    }
    for (int64_t r = 0; r < n; ++r) ws.m[r] = kNegInf, ws.l[r] = 0.0f;
    std::fill(ws.oacc.begin(), ws.oacc.begin() + n * Dv, 0.0f);

    const auto [t_begin, t_end] = split_key_tiles(p, rows, n, kDecodeTileKV, split, plan.splits);
    const bool v_quantized = p.v.type == Type::Q8_0 || p.v.type == Type::Q4_0;
    float* s = ws.st.data();
    for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t j0 = t * kDecodeTileKV, nk = std::min(kDecodeTileKV, p.Skv - j0), nk8 = round_up(nk, 8);
        const char* k_rows = row_at(p.k, j0, tile.g, tile.b);
        const char* v_rows = row_at(p.v, j0, tile.g, tile.b);

        // S = Q K^T, a register block of rows at a time.
        with_kv_type(p.k.type, [&](auto kt) {
            constexpr Type KT = decltype(kt)::value;
            if (n == 8) return decode_scores<KT, 8, 1>(Dk, q, k_rows, p.k.nb[1], nk, s, lds);
            for (int64_t r0 = 0; r0 < n; r0 += kDecodeRowBlock)
                with_rows(std::min(kDecodeRowBlock, n - r0), [&](auto mr) {
                    decode_scores<KT, decltype(mr)::value, 2>(Dk, q + r0 * Dk, k_rows, p.k.nb[1], nk,
                                                              s + r0 * lds, lds);
                });
        });
        for (int64_t r = 0; r < n; ++r)
            for (int64_t j = nk; j < nk8; ++j) s[r * lds + j] = 0.0f;
        if (p.params.logit_softcap > 0.0f) apply_softcap(p.params.logit_softcap, s, n, nk8, lds);

        // Mask; the padding keys [nk, nk8) are invisible.
        apply_mask(p, rows, n, j0, nk, s, lds, 1, tile_is_partial(rows, n, j0, nk));
        for (int64_t r = 0; r < n; ++r)
            for (int64_t j = nk; j < nk8; ++j) s[r * lds + j] = kNegInf;

        // Online softmax along each row: new max, rescale factor, P = exp2(S - m).
        for (int64_t r = 0; r < n; ++r) {
            float* sr = s + r * lds;
            vf8 mx = simd::splat(ws.m[r]);
            for (int64_t j = 0; j < nk8; j += 8) mx = simd::max(mx, simd::load(sr + j));
            const float m_new = simd::reduce_max(mx);
            const float m_use = m_new == kNegInf ? 0.0f : m_new;
            const float alpha = std::exp2(ws.m[r] - m_use);
            vf8 sum = simd::zero();
            for (int64_t j = 0; j < nk8; j += 8) {
                const vf8 pj = simd::exp2(simd::load(sr + j) - simd::splat(m_use));
                simd::store(sr + j, pj);
                sum = sum + pj;
            }
            float lanes[8];
            simd::store(lanes, sum);
            float total = 0.0f;
            for (float x : lanes) total += x;
            ws.l[r] = ws.l[r] * alpha + total;
            ws.m[r] = m_new;
            if (alpha != 1.0f) {
                float* o = ws.oacc.data() + r * Dv;
                for (int64_t d = 0; d < Dv; d += 8)
                    simd::store(o + d, simd::splat(alpha) * simd::load(o + d));
            }
        }

        // O += P V. Quantized V is dequantized once into f32 rows, then read from L1 by
        // every row block.
        const char* v_src = v_rows;
        int64_t v_stride = p.v.nb[1];
        Type v_read = p.v.type;
        if (v_quantized) {
            with_kv_type(p.v.type, [&](auto vt) {
                const int64_t row_bytes = int64_t(row_size(p.v.type, Dv));
                for (int64_t j = 0; j < nk; ++j) {
                    request_row(v_rows + (j + kRowsAhead) * p.v.nb[1], row_bytes);
                    float* dst = ws.vbuf.data() + j * Dv;
                    for (int64_t c = 0; c < Dv / 32; ++c) {
                        vf8 x[4];
                        load_chunk32<decltype(vt)::value>(v_rows + j * p.v.nb[1], c, x);
                        for (int i = 0; i < 4; ++i) simd::store(dst + 32 * c + 8 * i, x[i]);
                    }
                }
            });
            v_src = reinterpret_cast<const char*>(ws.vbuf.data());
            v_stride = Dv * 4;
            v_read = Type::F32;
        }
        with_kv_type(v_read, [&](auto vt) {
            if constexpr (is_float_type<decltype(vt)::value>)
                for (int64_t r0 = 0; r0 < n; r0 += kDecodeRowBlock)
                    with_rows(std::min(kDecodeRowBlock, n - r0), [&](auto mr) {
                        decode_accumulate<decltype(vt)::value, decltype(mr)::value>(
                            Dv, s + r0 * lds, lds, v_src, v_stride, nk, ws.oacc.data() + r0 * Dv, Dv);
                    });
        });
    }
    finish_tile(p, tile, plan.Dv8, ws, partial);
}

#else

void decode_tile(const Problem&, const ForwardPlan&, const QTile&, int64_t, ForwardWorkspace&,
                 const Partial*) {
    fail("flash_attn_ext (CPU decode): needs AVX2");
}

#endif

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
    return size_t(plan.tiles.size()) * size_t(plan.splits) * size_t(plan.tile_q * (plan.Dv8 + 2));
}

// ============================== backward =====================================================
//
// Per batch and kv head: dK/dV accumulate in f32 buffers for the whole head ([Skv][D]).
// For each query head of the group: a pre-pass converts Q and dO once (row-major and
// transposed), computes D_i = rowsum(dO_i * O_i) and the base-2 LSE; the main pass runs
// over key tiles (FA2's outer loop), each owning its rows of dK/dV, and loops over the
// query tiles that can see it: recompute S and P = exp2(S - LSE), dV += P^T dO,
// dP = dO V^T, dS = P (dP - D), dK += dS^T Q, dQ += dS K.
//
// Determinism: dQ gets contributions from every key tile. Key tile t always runs on
// thread t % n_threads and adds into that thread's own dQ partial; the partials are then
// summed in thread order. The order of every floating-point sum is thus fixed by the
// problem and the thread count, never by scheduling, so repeated runs are bit-identical.

constexpr int64_t kBwdTileQ = 64;  // query rows per tile (a multiple of 16)
constexpr int64_t kBwdTileKV = 48; // keys per tile

struct BackwardSizes {
    int64_t Dk8, Dv8, Sq16;
    int64_t ldq; // leading dimension of the transposed Q and dO (>= Sq16)
    explicit BackwardSizes(const Problem& p)
        : Dk8(round_up(p.Dk, 8)), Dv8(round_up(p.Dv, 8)), Sq16(round_up(p.Sq, 16)),
          ldq(conflict_free_ld(p.Sq)) {}
    // Shared across threads: dK/dV accumulators, one query head's converted Q/dO, D and
    // LSE, and one dQ partial per thread.
    size_t shared_floats(const Problem& p, int n_threads) const {
        return size_t(p.Skv * (Dk8 + Dv8) + p.Dk * ldq + p.Sq * Dk8 + p.Dv * ldq + p.Sq * Dv8 + 2 * Sq16 +
                      int64_t(n_threads) * p.Sq * Dk8);
    }
    size_t thread_floats(const Problem& p) const {
        return size_t(kBwdTileKV * (Dk8 + Dv8) + 3 * kBwdTileKV * kBwdTileQ + std::max(Dk8, Dv8));
    }
};

struct BackwardWorkspace {
    FloatBuffer kbuf; // [kBwdTileKV][Dk8]
    FloatBuffer vbuf; // [kBwdTileKV][Dv8]
    FloatBuffer pt;   // [kBwdTileKV][kBwdTileQ] S^T, then P^T
    FloatBuffer dst;  // [kBwdTileKV][kBwdTileQ] dP^T, then dS^T
    FloatBuffer tt;   // [kBwdTileKV][kBwdTileQ] tanh of the softcapped scores
    FloatBuffer row;
    std::vector<RowInfo> rows;
    BackwardWorkspace(const BackwardSizes& z)
        : kbuf(size_t(kBwdTileKV * z.Dk8)), vbuf(size_t(kBwdTileKV * z.Dv8)),
          pt(size_t(kBwdTileKV * kBwdTileQ)), dst(size_t(kBwdTileKV * kBwdTileQ)),
          tt(size_t(kBwdTileKV * kBwdTileQ)), row(size_t(std::max(z.Dk8, z.Dv8))), rows(size_t(kBwdTileQ)) {}
};

struct HeadBuffers {
    FloatBuffer dk, dv;      // [Skv][Dk8], [Skv][Dv8] accumulators of the kv head
    FloatBuffer qt, q;       // [Dk][ldq] scaled for S;  [Sq][Dk8] unscaled
    FloatBuffer dot, dO;     // [Dv][ldq];  [Sq][Dv8]
    FloatBuffer lse2, D;     // [Sq16]
    FloatBuffer dq_partials; // [n_threads][Sq][Dk8]
};

// Converts one query head's Q and dO, and computes D and the base-2 LSE, rows [r0, r1).
void backward_prepass(const BackwardProblem& bp, const BackwardSizes& z, int64_t b, int64_t h, int64_t r0,
                      int64_t r1, HeadBuffers& hb, float* tmp) {
    const Problem& p = bp.fwd;
    const float qscale = q_prescale(p.params);
    for (int64_t i = r0; i < r1; ++i) {
        float* q = hb.q.data() + i * z.Dk8;
        load_row(p.q.type, row_at(p.q, i, h, b), q, p.Dk, z.Dk8);
        for (int64_t d = 0; d < p.Dk; ++d) hb.qt[size_t(d * z.ldq + i)] = q[d] * qscale;
        float* dO = hb.dO.data() + i * z.Dv8;
        load_row(bp.dO.type, o_row(bp.dO, i, h, b), dO, p.Dv, z.Dv8);
        for (int64_t d = 0; d < p.Dv; ++d) hb.dot[size_t(d * z.ldq + i)] = dO[d];
        load_row(p.o.type, o_row(p.o, i, h, b), tmp, p.Dv, p.Dv);
        double Di = 0.0;
        for (int64_t d = 0; d < p.Dv; ++d) Di += double(dO[d]) * double(tmp[d]);
        hb.D[size_t(i)] = float(Di);
        // A fully masked row has LSE = -inf; +inf here makes every P of that row 0.
        const float lse = *lse_at(p.lse, i, h, b);
        hb.lse2[size_t(i)] = lse == kNegInf ? std::numeric_limits<float>::infinity() : lse * kLog2e;
    }
}

// One key tile against every query tile of head h that can see it.
void backward_key_tile(const BackwardProblem& bp, const BackwardSizes& z, int64_t b, int64_t g, int64_t h,
                       int64_t t, HeadBuffers& hb, float* dq_partial, BackwardWorkspace& ws) {
    const Problem& p = bp.fwd;
    const int64_t Dk8 = z.Dk8, Dv8 = z.Dv8, ld = kBwdTileQ;
    const int64_t j0 = t * kBwdTileKV, nk = std::min(kBwdTileKV, p.Skv - j0);

    // Query rows whose visible band meets [j0, j0 + nk); the band's ends never decrease
    // with i, so a row range suffices.
    int64_t i_begin = p.Sq, i_end = 0;
    for (int64_t i = 0; i < p.Sq; ++i) {
        const KeyRange kr = visible_keys(p.params, i, p.Sq, p.Skv);
        if (kr.lo <= kr.hi && kr.hi >= j0 && kr.lo < j0 + nk) {
            i_begin = std::min(i_begin, i);
            i_end = i + 1;
        }
    }
    if (i_begin >= i_end) return;

    // Load K/V tile.
    for (int64_t j = 0; j < nk; ++j) {
        load_row(p.k.type, row_at(p.k, j0 + j, g, b), ws.kbuf.data() + j * Dk8, p.Dk, Dk8);
        load_row(p.v.type, row_at(p.v, j0 + j, g, b), ws.vbuf.data() + j * Dv8, p.Dv, Dv8);
    }
    const bool softcap = p.params.logit_softcap > 0.0f;
    float* pt = ws.pt.data();
    float* dst = ws.dst.data();
    float* dk = hb.dk.data() + j0 * Dk8;
    float* dv = hb.dv.data() + j0 * Dv8;
    for (int64_t i0 = i_begin; i0 < i_end; i0 += kBwdTileQ) {
        const int64_t nq = std::min(kBwdTileQ, i_end - i0), nq8 = round_up(nq, 8);
        RowInfo* rows = ws.rows.data();
        describe_rows(p, b, h, 1, i0, nq, rows);

        // S^T = K Q^T, softcap, mask.
        gemm(nk, nq8, p.Dk, ws.kbuf.data(), Dk8, 1, hb.qt.data() + i0, z.ldq, pt, ld, false);
        if (softcap) {
            for (int64_t j = 0; j < nk; ++j)
                for (int64_t r = 0; r < nq8; r += 8)
                    simd::store(ws.tt.data() + j * ld + r, simd::tanh(simd::load(pt + j * ld + r)));
            const vf8 cap2 = simd::splat(p.params.logit_softcap * kLog2e);
            for (int64_t j = 0; j < nk; ++j)
                for (int64_t r = 0; r < nq8; r += 8)
                    simd::store(pt + j * ld + r, cap2 * simd::load(ws.tt.data() + j * ld + r));
        }
        apply_mask(p, rows, nq, j0, nk, pt, 1, ld, tile_is_partial(rows, nq, j0, nk));

        // P^T = exp2(S^T - LSE). Lanes past the last row read lse2 = +inf or zero-padded
        // columns and come out 0.
        for (int64_t r = 0; r < nq8; r += 8) {
            const vf8 lse2 = simd::load(hb.lse2.data() + i0 + r);
            for (int64_t j = 0; j < nk; ++j)
                simd::store(pt + j * ld + r, simd::exp2(simd::load(pt + j * ld + r) - lse2));
        }

        // dV += P^T dO.
        gemm(nk, Dv8, nq, pt, ld, 1, hb.dO.data() + i0 * Dv8, Dv8, dv, Dv8, true);
        // dP^T = V dO^T.
        gemm(nk, nq8, p.Dv, ws.vbuf.data(), Dv8, 1, hb.dot.data() + i0, z.ldq, dst, ld, false);
        // dS^T = P^T (dP^T - D), times (1 - tanh^2) through the softcap.
        for (int64_t r = 0; r < nq8; r += 8) {
            const vf8 D = simd::load(hb.D.data() + i0 + r);
            for (int64_t j = 0; j < nk; ++j) {
                vf8 ds = simd::load(pt + j * ld + r) * (simd::load(dst + j * ld + r) - D);
                if (softcap) {
                    const vf8 th = simd::load(ws.tt.data() + j * ld + r);
                    ds = ds * (simd::splat(1.0f) - th * th);
                }
                simd::store(dst + j * ld + r, ds);
            }
        }
        // dK += dS^T Q;  dQ += dS K (into this thread's partial).
        gemm(nk, Dk8, nq, dst, ld, 1, hb.q.data() + i0 * Dk8, Dk8, dk, Dk8, true);
        gemm(nq, Dk8, nk, dst, 1, ld, ws.kbuf.data(), Dk8, dq_partial + i0 * Dk8, Dk8, true);
    }
}

} // namespace

bool flash_attn_has_pair_products() {
#if GFA_BF16_PAIRS
    return true;
#else
    return false;
#endif
}

bool flash_attn_uses_decode_path(const Problem& p) {
    return use_decode_path(p);
}

size_t flash_attn_scratch_bytes(const Problem& p, int n_threads) {
    const ForwardPlan plan = plan_forward(p, n_threads);
    return 4 * (size_t(n_threads) * ForwardWorkspace::floats(p, plan) + split_partial_floats(plan)) +
           size_t(n_threads) * plan.tile_q * sizeof(RowInfo);
}

// The plan's tiles by decreasing work: query rows times the keys each sees (stable, so equal
// tiles keep their order).
std::vector<int64_t> tiles_longest_first(const Problem& p, const ForwardPlan& plan) {
    std::vector<int64_t> work(plan.tiles.size());
    for (size_t t = 0; t < plan.tiles.size(); ++t) {
        const QTile& tile = plan.tiles[t];
        for (int64_t i = tile.i0; i < tile.i0 + tile.ni; ++i) {
            const KeyRange k = visible_keys(p.params, i, p.Sq, p.Skv);
            work[t] += tile.nh * std::max<int64_t>(0, k.hi - k.lo + 1);
        }
    }
    std::vector<int64_t> order(plan.tiles.size());
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return work[size_t(a)] > work[size_t(b)]; });
    return order;
}

void flash_attn_forward(const Problem& p, ThreadPool& pool) {
    validate(p, "flash_attn_ext (CPU forward)");
    const int nth = pool.size();
    const ForwardPlan plan = plan_forward(p, nth);
    const int64_t n_tiles = int64_t(plan.tiles.size());
    const int64_t n_items = n_tiles * plan.splits;

    std::vector<float> partial_store(split_partial_floats(plan));
    auto partial_of = [&](int64_t tile, int64_t split) {
        float* base =
            partial_store.data() + size_t((tile * plan.splits + split) * plan.tile_q * (plan.Dv8 + 2));
        return Partial{base, base + plan.tile_q, base + 2 * plan.tile_q};
    };

    // Items are claimed dynamically, the tiles that see the most keys first (causal tiles
    // differ in cost; the short ones left for last even out the threads' ends). Each item owns
    // its output rows (or its partial slot), so the result does not depend on who ran it.
    const std::vector<int64_t> order = tiles_longest_first(p, plan);
    std::atomic<int64_t> next{0};
    pool.run([&](int, int) {
        ForwardWorkspace ws(p, plan);
        for (int64_t item; (item = next.fetch_add(1)) < n_items;) {
            const int64_t tile = order[size_t(item / plan.splits)], split = item % plan.splits;
            const Partial part = plan.splits == 1 ? Partial{} : partial_of(tile, split);
            const Partial* out = plan.splits == 1 ? nullptr : &part;
            if (plan.decode)
                decode_tile(p, plan, plan.tiles[size_t(tile)], split, ws, out);
            else if (plan.pairs)
                forward_tile_pairs(p, plan, plan.tiles[size_t(tile)], split, ws, out);
            else
                forward_tile(p, plan, plan.tiles[size_t(tile)], split, ws, out);
        }
    });
    if (plan.splits == 1) return;

    std::atomic<int64_t> next_tile{0};
    pool.run([&](int, int) {
        ForwardWorkspace ws(p, plan);
        std::vector<Partial> parts(size_t(plan.splits));
        for (int64_t tile; (tile = next_tile.fetch_add(1)) < n_tiles;) {
            for (int64_t s = 0; s < plan.splits; ++s) parts[size_t(s)] = partial_of(tile, s);
            combine_splits(p, plan, plan.tiles[size_t(tile)], parts.data(), ws);
        }
    });
}

size_t flash_attn_backward_scratch_bytes(const BackwardProblem& bp, int n_threads) {
    const BackwardSizes z(bp.fwd);
    return 4 * (z.shared_floats(bp.fwd, n_threads) + size_t(n_threads) * z.thread_floats(bp.fwd)) +
           size_t(n_threads) * kBwdTileQ * sizeof(RowInfo);
}

void flash_attn_backward(const BackwardProblem& bp, ThreadPool& pool) {
    validate(bp, "flash_attn_ext (CPU backward)");
    const Problem& p = bp.fwd;
    const int nth = pool.size();
    const BackwardSizes z(p);
    const int64_t group = p.Hq / p.Hkv;
    const int64_t n_key_tiles = (p.Skv + kBwdTileKV - 1) / kBwdTileKV;
    const float scale = p.params.scale;

    HeadBuffers hb;
    hb.dk.resize(size_t(p.Skv * z.Dk8));
    hb.dv.resize(size_t(p.Skv * z.Dv8));
    hb.qt.assign(size_t(p.Dk * z.ldq), 0.0f); // columns past Sq stay zero
    hb.q.resize(size_t(p.Sq * z.Dk8));
    hb.dot.assign(size_t(p.Dv * z.ldq), 0.0f);
    hb.dO.resize(size_t(p.Sq * z.Dv8));
    hb.lse2.assign(size_t(z.Sq16), std::numeric_limits<float>::infinity());
    hb.D.assign(size_t(z.Sq16), 0.0f);
    hb.dq_partials.resize(size_t(nth * p.Sq * z.Dk8));
    std::vector<BackwardWorkspace> workspaces;
    for (int t = 0; t < nth; ++t) workspaces.emplace_back(z);

    float* dsinks = static_cast<float*>(bp.dsinks.data);
    if (bp.dsinks.present())
        for (int64_t h = 0; h < p.Hq; ++h) dsinks[h * bp.dsinks.nb[0] / 4] = 0.0f;

    for (int64_t b = 0; b < p.B; ++b)
        for (int64_t g = 0; g < p.Hkv; ++g) {
            std::fill(hb.dk.begin(), hb.dk.end(), 0.0f);
            std::fill(hb.dv.begin(), hb.dv.end(), 0.0f);
            for (int64_t h = g * group; h < (g + 1) * group; ++h) {
                pool.run([&](int ith, int n) {
                    const auto [r0, r1] = split_range(p.Sq, ith, n);
                    backward_prepass(bp, z, b, h, r0, r1, hb, workspaces[size_t(ith)].row.data());
                });
                if (bp.dsinks.present()) {
                    // dsink_h = -sum_i P_sink(i) D_i, summed over batches in order.
                    const float s2 = sink_logit(p.sinks, h) * kLog2e;
                    double ds = 0.0;
                    for (int64_t i = 0; i < p.Sq; ++i)
                        ds -= double(std::exp2(s2 - hb.lse2[size_t(i)])) * double(hb.D[size_t(i)]);
                    dsinks[h * bp.dsinks.nb[0] / 4] += float(ds);
                }
                pool.run([&](int ith, int n) {
                    float* dq_partial = hb.dq_partials.data() + size_t(ith) * size_t(p.Sq * z.Dk8);
                    std::fill(dq_partial, dq_partial + p.Sq * z.Dk8, 0.0f);
                    for (int64_t t = ith; t < n_key_tiles; t += n)
                        backward_key_tile(bp, z, b, g, h, t, hb, dq_partial, workspaces[size_t(ith)]);
                });
                // dQ = scale * (sum of the partials in thread order).
                pool.run([&](int ith, int n) {
                    const auto [r0, r1] = split_range(p.Sq, ith, n);
                    float* acc = workspaces[size_t(ith)].row.data();
                    for (int64_t i = r0; i < r1; ++i) {
                        for (int64_t d = 0; d < p.Dk; ++d) acc[d] = 0.0f;
                        for (int t = 0; t < nth; ++t) {
                            const float* part = hb.dq_partials.data() +
                                                (size_t(t) * size_t(p.Sq) + size_t(i)) * size_t(z.Dk8);
                            for (int64_t d = 0; d < p.Dk; ++d) acc[d] += part[d];
                        }
                        for (int64_t d = 0; d < p.Dk; ++d) acc[d] *= scale;
                        store_row(bp.dq.type, acc, row_at(bp.dq, i, h, b), p.Dk);
                    }
                });
            }
            // Epilogue: dK = scale * accumulated dS^T Q, dV as accumulated.
            pool.run([&](int ith, int n) {
                const auto [j_begin, j_end] = split_range(p.Skv, ith, n);
                float* tmp = workspaces[size_t(ith)].row.data();
                for (int64_t j = j_begin; j < j_end; ++j) {
                    for (int64_t d = 0; d < p.Dk; ++d) tmp[d] = hb.dk[size_t(j * z.Dk8 + d)] * scale;
                    store_row(bp.dk.type, tmp, row_at(bp.dk, j, g, b), p.Dk);
                    store_row(bp.dv.type, hb.dv.data() + j * z.Dv8, row_at(bp.dv, j, g, b), p.Dv);
                }
            });
        }
}

} // namespace gfa::cpu
