// Matrix products on the CPU.
//
// Both ops compute C[m, n] = sum_k A(k, m) B(k, n) per batch matrix, where A and B are
// read through byte strides (mul_mat: A = a with k along dim 0, B = b likewise; out_prod:
// A = a and B = b with k along dim 1), so one driver serves both and transposed views of
// f32 operands cost nothing.
//
// Two paths:
//  * GEMM (N >= kGemvMaxN): the operands are packed into panels (A: MR consecutive m per k,
//    converted to f32 while packing, so every weight type with to_float works; B: NR
//    consecutive n per k) and a register-blocked micro-kernel keeps an MR x NR tile of C in
//    registers: per k it loads MR/W vectors of A, broadcasts NR values of B and does
//    NR * MR/W FMAs. Blocking: KC values of k per pass (A block MC x KC lives in L2, one B
//    micro-panel KC x NR in L1). Threads share one packed B block and split the C tiles.
//  * GEMV (mul_mat with N < kGemvMaxN, the decode case): no packing. Each output is a dot
//    product of a weight row with a column of b, and the weights are read exactly once from
//    memory, so the kernel is bound by memory bandwidth once the arithmetic per weight is
//    small enough. f32/f16/bf16 rows are converted in registers and FMAed with b. For q8_0
//    and q4_0 the column of b is quantized to 8-bit blocks once per call and each weight
//    block meets it in integer multiply-adds (see quantize_column). Dequantizing the blocks
//    to f32 in registers instead was measured here at about 1.3x (q8_0) and 1.6x (q4_0) more
//    CPU time per weight, which on AVX2 keeps q4_0 below memory bandwidth; the price is
//    rounding b to 8 bits (about 0.5% relative error in these products, the same trade as
//    ggml's), while the GEMM path for larger N stays exact in f32.
#include "cpu_kernels.h"
#include "op_def.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gfa::cpu {

namespace {

// ---- SIMD vocabulary for the micro-kernel ------------------------------------------------

#if defined(__AVX512F__)
struct Vec {
    __m512 v;
    static constexpr int W = 16;
    static Vec zero() { return {_mm512_setzero_ps()}; }
    static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
    static Vec broadcast(const float* p) { return {_mm512_set1_ps(*p)}; }
    void store(float* p) const { _mm512_storeu_ps(p, v); }
    friend Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
    friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
};
constexpr int kNR = 12; // 24 accumulators + 2 A vectors + 1 broadcast of 32 registers
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
    __m256 v;
    static constexpr int W = 8;
    static Vec zero() { return {_mm256_setzero_ps()}; }
    static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
    static Vec broadcast(const float* p) { return {_mm256_broadcast_ss(p)}; }
    void store(float* p) const { _mm256_storeu_ps(p, v); }
    friend Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
    friend Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
};
constexpr int kNR = 6; // 12 accumulators + 2 A vectors + 1 broadcast of 16 registers
#else
// Portable: four floats the compiler may vectorize as it can.
struct Vec {
    float v[4];
    static constexpr int W = 4;
    static Vec zero() { return {{0, 0, 0, 0}}; }
    static Vec load(const float* p) { return {{p[0], p[1], p[2], p[3]}}; }
    static Vec broadcast(const float* p) { return {{*p, *p, *p, *p}}; }
    void store(float* p) const { std::memcpy(p, v, sizeof v); }
    friend Vec fma(Vec a, Vec b, Vec c) {
        for (int i = 0; i < 4; ++i) c.v[i] += a.v[i] * b.v[i];
        return c;
    }
    friend Vec operator+(Vec a, Vec b) {
        for (int i = 0; i < 4; ++i) a.v[i] += b.v[i];
        return a;
    }
};
constexpr int kNR = 4;
#endif

constexpr int kMR = 2 * Vec::W;   // rows of C (along m) per micro-tile
constexpr int64_t kKC = 256;      // k per packed block: a multiple of every block size (32, 256)
constexpr int64_t kMC = 8 * kMR;  // m per A block (MC x KC floats stay in L2)
constexpr int64_t kNT = 16 * kNR; // n per thread tile
constexpr int64_t kNC = 64 * kNT; // n per shared B block
constexpr int64_t kGemvMaxN = 4;  // mul_mat with fewer columns of b runs as dot products

// C tile (MR x NR, column n at c + n * ldc) = or += packed A panel x packed B panel.
void micro_kernel(int64_t kc, const float* pa, const float* pb, float* c, int64_t ldc, bool accumulate) {
    Vec acc[kNR][2];
#pragma GCC unroll 16
    for (int j = 0; j < kNR; ++j) acc[j][0] = acc[j][1] = Vec::zero();
    for (int64_t k = 0; k < kc; ++k) {
        const Vec a0 = Vec::load(pa), a1 = Vec::load(pa + Vec::W);
#pragma GCC unroll 16
        for (int j = 0; j < kNR; ++j) {
            const Vec bj = Vec::broadcast(pb + j);
            acc[j][0] = fma(a0, bj, acc[j][0]);
            acc[j][1] = fma(a1, bj, acc[j][1]);
        }
        pa += kMR;
        pb += kNR;
    }
#pragma GCC unroll 16
    for (int j = 0; j < kNR; ++j) {
        float* cj = c + j * ldc;
        if (accumulate) {
            acc[j][0] = acc[j][0] + Vec::load(cj);
            acc[j][1] = acc[j][1] + Vec::load(cj + Vec::W);
        }
        acc[j][0].store(cj);
        acc[j][1].store(cj + Vec::W);
    }
}

// A partial tile at the matrix edge: compute the full tile into a scratch tile (the packed
// panels are zero-padded) and copy the valid part.
void edge_kernel(int64_t kc, const float* pa, const float* pb, float* c, int64_t ldc, bool accumulate,
                 int64_t mr, int64_t nr) {
    alignas(64) float tile[kNR * kMR];
    micro_kernel(kc, pa, pb, tile, kMR, false);
    for (int64_t j = 0; j < nr; ++j)
        for (int64_t i = 0; i < mr; ++i)
            c[j * ldc + i] = (accumulate ? c[j * ldc + i] : 0.0f) + tile[j * kMR + i];
}

// ---- operands ---------------------------------------------------------------------------

// One GEMM operand: element (k, x) of batch matrix (i2, i3) lives at
// base + k * sk + x * sx + (i2 / r2) * s2 + (i3 / r3) * s3.
struct Operand {
    const char* base;
    Type type;
    size_t sk, sx, s2, s3;
    int64_t r2, r3;
    const char* matrix(int64_t i2, int64_t i3) const {
        return base + size_t(i2 / r2) * s2 + size_t(i3 / r3) * s3;
    }
};

struct Problem {
    Operand a, b;
    int64_t M, N, K, B2, B3;
    float* c; // dst, contiguous: C(m, n) of batch (i2, i3) at c[((i3 * B2 + i2) * N + n) * M + m]
};

// Packs `width` consecutive x (from x0, nx valid, the rest zero) for k in [k0, k0 + kc) of
// one matrix: out[k * width + i] = op(k0 + k, x0 + i), converted to f32.
void pack_panel(const Operand& op, const char* mat, int64_t x0, int64_t nx, int64_t k0, int64_t kc, int width,
                float* out, std::vector<float>& row) {
    const TypeTraits& tt = type_traits(op.type);
    if (nx < width) std::fill(out, out + kc * width, 0.0f);
    if (op.type == Type::F32 && op.sx == sizeof(float)) {
        // x is the contiguous direction (out_prod, transposed views): copy runs of x.
        for (int64_t k = 0; k < kc; ++k)
            std::memcpy(out + k * width, mat + size_t(k0 + k) * op.sk + size_t(x0) * op.sx,
                        size_t(nx) * sizeof(float));
        return;
    }
    if (op.sk == tt.type_size) {
        // k is the contiguous direction (mul_mat rows): convert a run of each row, then
        // interleave it into the panel. Quantized rows start at a block boundary (k0 % KC == 0).
        row.resize(size_t(kc));
        for (int64_t i = 0; i < nx; ++i) {
            const char* src = mat + size_t(x0 + i) * op.sx + size_t(k0 / tt.block_size) * tt.type_size;
            const float* v = reinterpret_cast<const float*>(src);
            if (op.type != Type::F32) {
                tt.to_float(src, row.data(), kc);
                v = row.data();
            }
            for (int64_t k = 0; k < kc; ++k) out[k * width + i] = v[k];
        }
        return;
    }
    // Any other layout of a plain type: element by element.
    for (int64_t k = 0; k < kc; ++k)
        for (int64_t i = 0; i < nx; ++i)
            tt.to_float(mat + size_t(k0 + k) * op.sk + size_t(x0 + i) * op.sx, out + k * width + i, 1);
}

// Per-thread scratch, kept between calls (the pool's threads live as long as the backend).
struct Scratch {
    std::vector<float> packed_a, row;
};
Scratch& thread_scratch() {
    thread_local Scratch s;
    return s;
}

// ---- GEMM driver ------------------------------------------------------------------------

// Multiplies the k block [k0, k0 + kc) of A with the packed B block (n in [n0, n0 + nc)) into
// C for this worker's share of (m block, n tile) pairs.
void gemm_block(const Problem& p, int64_t i2, int64_t i3, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                const float* packed_b, int ith, int nth) {
    const int64_t m_blocks = (p.M + kMC - 1) / kMC, n_tiles = (nc + kNT - 1) / kNT;
    const auto [t_begin, t_end] = split_range(m_blocks * n_tiles, ith, nth);
    Scratch& s = thread_scratch();
    s.packed_a.resize(size_t(kMC * kKC));
    const char* a_mat = p.a.matrix(i2, i3);
    float* c_mat = p.c + size_t((i3 * p.B2 + i2) * p.N) * size_t(p.M);
    const bool accumulate = k0 > 0;
    int64_t packed_block = -1;
    for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t mb = t / n_tiles, nt = t % n_tiles;
        const int64_t m0 = mb * kMC, mc = std::min(kMC, p.M - m0);
        // Tiles are ordered m block first, so a worker packs each A block once.
        if (mb != packed_block) {
            for (int64_t ir = 0; ir < mc; ir += kMR)
                pack_panel(p.a, a_mat, m0 + ir, std::min<int64_t>(kMR, mc - ir), k0, kc, kMR,
                           s.packed_a.data() + ir * kc, s.row);
            packed_block = mb;
        }
        const int64_t t0 = nt * kNT, tn = std::min(kNT, nc - t0);
        for (int64_t jr = 0; jr < tn; jr += kNR) {
            const float* pb = packed_b + (t0 + jr) * kc;
            const int64_t nr = std::min<int64_t>(kNR, tn - jr);
            float* c_col = c_mat + size_t(n0 + t0 + jr) * size_t(p.M);
            for (int64_t ir = 0; ir < mc; ir += kMR) {
                const float* pa = s.packed_a.data() + ir * kc;
                const int64_t mr = std::min<int64_t>(kMR, mc - ir);
                if (mr == kMR && nr == kNR)
                    micro_kernel(kc, pa, pb, c_col + m0 + ir, p.M, accumulate);
                else
                    edge_kernel(kc, pa, pb, c_col + m0 + ir, p.M, accumulate, mr, nr);
            }
        }
    }
}

// One matrix of the batch. With a pool, the B block is packed by all workers and the C
// tiles are shared out; without one, the calling thread does everything.
void gemm_matrix(const Problem& p, int64_t i2, int64_t i3, ThreadPool* pool, std::vector<float>& packed_b) {
    const char* b_mat = p.b.matrix(i2, i3);
    for (int64_t n0 = 0; n0 < p.N; n0 += kNC) {
        const int64_t nc = std::min(kNC, p.N - n0);
        const int64_t panels = (nc + kNR - 1) / kNR;
        for (int64_t k0 = 0; k0 < p.K; k0 += kKC) {
            const int64_t kc = std::min(kKC, p.K - k0);
            packed_b.resize(size_t(panels * kNR * kc));
            auto pack_b = [&](int ith, int nth) {
                const auto [begin, end] = split_range(panels, ith, nth);
                for (int64_t j = begin; j < end; ++j)
                    pack_panel(p.b, b_mat, n0 + j * kNR, std::min<int64_t>(kNR, nc - j * kNR), k0, kc, kNR,
                               packed_b.data() + j * kNR * kc, thread_scratch().row);
            };
            auto multiply = [&](int ith, int nth) {
                gemm_block(p, i2, i3, n0, nc, k0, kc, packed_b.data(), ith, nth);
            };
            if (pool) {
                pool->run(pack_b);
                pool->run(multiply);
            } else {
                pack_b(0, 1);
                multiply(0, 1);
            }
        }
    }
}

void gemm(const ComputeCtx& ctx, const Problem& p) {
    const int64_t batches = p.B2 * p.B3;
    if (p.K == 0) {
        std::fill(p.c, p.c + batches * p.M * p.N, 0.0f);
        return;
    }
    const int nth = ctx.pool.size();
    // Many matrices: give each worker whole matrices (no synchronisation inside one); few
    // large ones: all workers on each matrix.
    if (batches >= 4 * int64_t(nth) || (batches >= nth && batches % nth == 0)) {
        ctx.pool.run([&](int ith, int n) {
            std::vector<float> packed_b;
            const auto [begin, end] = split_range(batches, ith, n);
            for (int64_t bi = begin; bi < end; ++bi) gemm_matrix(p, bi % p.B2, bi / p.B2, nullptr, packed_b);
        });
        return;
    }
    std::vector<float> packed_b;
    for (int64_t bi = 0; bi < batches; ++bi) gemm_matrix(p, bi % p.B2, bi / p.B2, &ctx.pool, packed_b);
}

// ---- GEMV: dot products of weight rows with f32 columns ---------------------------------

#if defined(__AVX2__) && defined(__FMA__)
float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
// Block scales: one conversion per 32 weights, so it must not be a function call.
inline float scale_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return fp16_to_fp32(h);
#endif
}
// Eight signed bytes -> eight floats.
inline __m256 i8x8_to_f32(__m128i bytes) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}
#endif

float dot_f32(const void* row, const float* x, int64_t K) {
    const float* w = static_cast<const float*>(row);
    int64_t k = 0;
    float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; k + 32 <= K; k += 32)
        for (int u = 0; u < 4; ++u)
            acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8 * u), _mm256_loadu_ps(x + k + 8 * u), acc[u]);
    sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
    for (; k < K; ++k) sum += w[k] * x[k];
    return sum;
}

float dot_f16(const void* row, const float* x, int64_t K) {
    const uint16_t* w = static_cast<const uint16_t*>(row);
    int64_t k = 0;
    float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; k + 32 <= K; k += 32)
        for (int u = 0; u < 4; ++u) {
            const __m256 wv =
                _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 8 * u)));
            acc[u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + k + 8 * u), acc[u]);
        }
    sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
    for (; k < K; ++k) sum += fp16_to_fp32(w[k]) * x[k];
    return sum;
}

float dot_bf16(const void* row, const float* x, int64_t K) {
    const uint16_t* w = static_cast<const uint16_t*>(row);
    int64_t k = 0;
    float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; k + 32 <= K; k += 32)
        for (int u = 0; u < 4; ++u) {
            // bf16 is the top half of an f32: widen to 32 bits and shift into place.
            const __m256i bits =
                _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 8 * u)));
            const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
            acc[u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + k + 8 * u), acc[u]);
        }
    sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
    for (; k < K; ++k) sum += bf16_to_fp32(w[k]) * x[k];
    return sum;
}

// q8_0: per block of 32, sum_j (d * q_j) x_j = d * sum_j q_j x_j. Two blocks per step with
// separate accumulators so the FMA latency of one block hides behind the other.
float dot_q8_0(const void* row, const float* x, int64_t K) {
    const block_q8_0* blocks = static_cast<const block_q8_0*>(row);
    const int64_t nb = K / QK8_0;
    int64_t i = 0;
    float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; i + 2 <= nb; i += 2)
        for (int u = 0; u < 2; ++u) {
            const block_q8_0& b = blocks[i + u];
            const float* xb = x + (i + u) * QK8_0;
            const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
            const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs + 16));
            __m256 s0 = _mm256_mul_ps(i8x8_to_f32(lo), _mm256_loadu_ps(xb));
            __m256 s1 = _mm256_mul_ps(i8x8_to_f32(_mm_unpackhi_epi64(lo, lo)), _mm256_loadu_ps(xb + 8));
            s0 = _mm256_fmadd_ps(i8x8_to_f32(hi), _mm256_loadu_ps(xb + 16), s0);
            s1 = _mm256_fmadd_ps(i8x8_to_f32(_mm_unpackhi_epi64(hi, hi)), _mm256_loadu_ps(xb + 24), s1);
            acc[u] = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), _mm256_set1_ps(scale_to_f32(b.d)), acc[u]);
        }
    sum = hsum(_mm256_add_ps(acc[0], acc[1]));
#endif
    for (; i < nb; ++i) {
        float s = 0.0f;
        for (int j = 0; j < QK8_0; ++j) s += float(blocks[i].qs[j]) * x[i * QK8_0 + j];
        sum += fp16_to_fp32(blocks[i].d) * s;
    }
    return sum;
}

// q4_0: element j of a block is the low nibble of byte j (j < 16) or the high nibble of
// byte j - 16, minus 8, times d.
float dot_q4_0(const void* row, const float* x, int64_t K) {
    const block_q4_0* blocks = static_cast<const block_q4_0*>(row);
    const int64_t nb = K / QK4_0;
    int64_t i = 0;
    float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    const __m128i low_mask = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; i + 2 <= nb; i += 2)
        for (int u = 0; u < 2; ++u) {
            const block_q4_0& b = blocks[i + u];
            const float* xb = x + (i + u) * QK4_0;
            const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
            const __m128i lo = _mm_sub_epi8(_mm_and_si128(packed, low_mask), eight);
            const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(packed, 4), low_mask), eight);
            __m256 s0 = _mm256_mul_ps(i8x8_to_f32(lo), _mm256_loadu_ps(xb));
            __m256 s1 = _mm256_mul_ps(i8x8_to_f32(_mm_unpackhi_epi64(lo, lo)), _mm256_loadu_ps(xb + 8));
            s0 = _mm256_fmadd_ps(i8x8_to_f32(hi), _mm256_loadu_ps(xb + 16), s0);
            s1 = _mm256_fmadd_ps(i8x8_to_f32(_mm_unpackhi_epi64(hi, hi)), _mm256_loadu_ps(xb + 24), s1);
            acc[u] = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), _mm256_set1_ps(scale_to_f32(b.d)), acc[u]);
        }
    sum = hsum(_mm256_add_ps(acc[0], acc[1]));
#endif
    for (; i < nb; ++i) {
        float s = 0.0f;
        for (int j = 0; j < QK4_0 / 2; ++j) {
            s += float(int(blocks[i].qs[j] & 0x0f) - 8) * x[i * QK4_0 + j];
            s += float(int(blocks[i].qs[j] >> 4) - 8) * x[i * QK4_0 + j + QK4_0 / 2];
        }
        sum += fp16_to_fp32(blocks[i].d) * s;
    }
    return sum;
}

#if defined(__AVX2__)
// ---- integer dot products for quantized weights (AVX2) ----------------------------------
//
// The f32 column is quantized once per call to 8-bit blocks of 32 with an f32 scale (the
// rounding error, under 0.4% of each value, is far below that of the 4- and 8-bit weights),
// and each weight block meets its column block in one 8-bit multiply-add: |w| * sign(x, w)
// pairs into 16 bits (maddubs), pairs of those into 32 bits (madd), then one f32 FMA with
// the product of the two scales. That is about 6 vector instructions per 32 weights instead
// of 16 for converting the weights to f32, which keeps a core ahead of memory bandwidth.
struct ColumnBlock {
    float d;
    float sum; // d * sum of qs: the block's share of a weight offset (q4_K's mins)
    int8_t qs[32];
};

void quantize_column(const float* x, int64_t K, ColumnBlock* out) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < K / 32; ++i) {
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int u = 0; u < 4; ++u) {
            v[u] = _mm256_loadu_ps(x + i * 32 + 8 * u);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[u]));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float d = _mm_cvtss_f32(m) / 127.0f;
        const __m256 inv = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        __m256i q[4];
        for (int u = 0; u < 4; ++u) q[u] = _mm256_cvtps_epi32(_mm256_mul_ps(v[u], inv)); // nearest even
        // Narrow 32 -> 16 -> 8 bits; the packs interleave 128-bit lanes, the permute undoes it.
        const __m256i q16 = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
        const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, q16b),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        out[i].d = d;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i].qs), q8);
        const __m256i pair_sums = _mm256_maddubs_epi16(_mm256_set1_epi8(1), q8); // 16 x i16
        const __m256i sums = _mm256_madd_epi16(pair_sums, _mm256_set1_epi16(1)); // 8 x i32
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        out[i].sum = d * float(_mm_cvtsi128_si32(s4));
    }
}

// 32 signed 8-bit weights times 32 signed 8-bit column values -> 8 partial sums (i32 as f32).
inline __m256 i8_dot(__m256i w, __m256i x) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// The two accumulators are separate variables, not an array indexed by block parity: GCC
// kept such an array on the stack, and the store-to-load round trip per block, not the
// arithmetic, then set the speed.
float dot_q8_0_int(const void* row, const void* column, int64_t K) {
    const block_q8_0* w = static_cast<const block_q8_0*>(row);
    const ColumnBlock* x = static_cast<const ColumnBlock*>(column);
    auto term = [&](int64_t i, __m256 acc) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i].qs));
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i].qs));
        return _mm256_fmadd_ps(i8_dot(wv, xv), _mm256_set1_ps(scale_to_f32(w[i].d) * x[i].d), acc);
    };
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const int64_t nb = K / 32;
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
        acc0 = term(i, acc0);
        acc1 = term(i + 1, acc1);
    }
    if (i < nb) acc0 = term(i, acc0);
    return hsum(_mm256_add_ps(acc0, acc1));
}

// q4_0: x = d (q - 8) with q in 0..15. The 4-bit values go into maddubs' unsigned operand
// as they are, and the -8 comes from the column block's sum: sum (q - 8) qx = sum q qx - 8
// sum qx, which saves the subtraction and both sign operations of i8_dot per block.
float dot_q4_0_int(const void* row, const void* column, int64_t K) {
    const block_q4_0* w = static_cast<const block_q4_0*>(row);
    const ColumnBlock* x = static_cast<const ColumnBlock*>(column);
    const __m128i low_mask = _mm_set1_epi8(0x0f);
    const __m256i ones = _mm256_set1_epi16(1);
    auto term = [&](int64_t i, __m256 acc, float& offset) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[i].qs));
        // Low nibbles are elements 0..15, high nibbles 16..31.
        const __m128i lo = _mm_and_si128(packed, low_mask);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i].qs));
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set_m128i(hi, lo), xv), ones);
        const float dw = scale_to_f32(w[i].d);
        offset += dw * x[i].sum;
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * x[i].d), acc);
    };
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float offset0 = 0.0f, offset1 = 0.0f;
    const int64_t nb = K / 32;
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
        acc0 = term(i, acc0, offset0);
        acc1 = term(i + 1, acc1, offset1);
    }
    if (i < nb) acc0 = term(i, acc0, offset0);
    return hsum(_mm256_add_ps(acc0, acc1)) - 8.0f * (offset0 + offset1);
}

// q4_K: sub-block j of a 256-block is x = d sc_j q - dmin mn_j with q in 0..15, so against a
// column block (dx, qx) it adds d sc_j dx sum(q qx) - dmin mn_j dx sum(qx). The 4-bit values
// go straight into the unsigned operand of maddubs (15 * 127 * 2 fits 16 bits).
void unpack_q4_K_scales(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = uint8_t((s[j + 8] & 0x0f) | ((s[j] >> 6) << 4));
        mn[j + 4] = uint8_t((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

float dot_q4_K_int(const void* row, const void* column, int64_t K) {
    const block_q4_K* w = static_cast<const block_q4_K*>(row);
    const ColumnBlock* x = static_cast<const ColumnBlock*>(column);
    const __m256i low_mask = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    float offsets = 0.0f;
    for (int64_t ib = 0; ib < K / QK_K; ++ib) {
        const float d = scale_to_f32(w[ib].d), dmin = scale_to_f32(w[ib].dmin);
        uint8_t sc[8], mn[8];
        unpack_q4_K_scales(w[ib].scales, sc, mn);
        const ColumnBlock* xb = x + ib * (QK_K / 32);
        for (int c = 0; c < 4; ++c) {
            const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[ib].qs + 32 * c));
            const __m256i nibbles[2] = {_mm256_and_si256(q, low_mask),
                                        _mm256_and_si256(_mm256_srli_epi16(q, 4), low_mask)};
            for (int h = 0; h < 2; ++h) {
                const int j = 2 * c + h;
                const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb[j].qs));
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles[h], xv), ones);
                acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * float(sc[j]) * xb[j].d),
                                         acc[h]);
                offsets += dmin * float(mn[j]) * xb[j].sum;
            }
        }
    }
    return hsum(_mm256_add_ps(acc[0], acc[1])) - offsets;
}
#endif

using DotFn = float (*)(const void* row, const float* x, int64_t K);
DotFn dot_for(Type t) {
    switch (t) {
    case Type::F32:
        return dot_f32;
    case Type::F16:
        return dot_f16;
    case Type::BF16:
        return dot_bf16;
    case Type::Q8_0:
        return dot_q8_0;
    case Type::Q4_0:
        return dot_q4_0;
    default:
        return nullptr; // any other type: the row is converted to f32 first
    }
}

// Dot product of a quantized weight row with a column prepared by quantize_column.
using IntDotFn = float (*)(const void* row, const void* column, int64_t K);
IntDotFn int_dot_for(Type t) {
#if defined(__AVX2__)
    if (t == Type::Q8_0) return dot_q8_0_int;
    if (t == Type::Q4_0) return dot_q4_0_int;
    if (t == Type::Q4_K) return dot_q4_K_int;
#endif
    (void)t;
    return nullptr;
}

// mul_mat for a few columns of b: workers split the weight rows of each matrix.
void gemv(const ComputeCtx& ctx, const Tensor* a, const Tensor* b, Tensor* dst) {
    const int64_t K = a->ne[0], M = a->ne[1], N = b->ne[1];
    const int64_t r2 = b->ne[2] / a->ne[2], r3 = b->ne[3] / a->ne[3];
    const TypeTraits& ta = type_traits(a->type);
    const bool packed_a = a->nb[0] == ta.type_size;
    const DotFn dot = packed_a ? dot_for(a->type) : nullptr;
    const IntDotFn int_dot = packed_a ? int_dot_for(a->type) : nullptr;
    const bool packed_b = b->nb[0] == sizeof(float);
    ctx.pool.run([&](int ith, int nth) {
        std::vector<float> columns, row;
        if (!packed_b) columns.resize(size_t(N * K));
        if (!dot) row.resize(size_t(K));
#if defined(__AVX2__)
        std::vector<ColumnBlock> quantized(int_dot ? size_t(N * K / 32) : 0);
#endif
        for (int64_t i3 = 0; i3 < b->ne[3]; ++i3)
            for (int64_t i2 = 0; i2 < b->ne[2]; ++i2) {
                // The columns of b this matrix uses: contiguous f32, or quantized for int_dot.
                const float* x[kGemvMaxN];
                const void* xq[kGemvMaxN] = {};
                for (int64_t n = 0; n < N; ++n) {
                    const char* col = element_ptr(b, 0, n, i2, i3);
                    if (packed_b) {
                        x[n] = reinterpret_cast<const float*>(col);
                    } else {
                        float* dstc = columns.data() + n * K;
                        for (int64_t k = 0; k < K; ++k)
                            dstc[k] = *reinterpret_cast<const float*>(col + k * b->nb[0]);
                        x[n] = dstc;
                    }
#if defined(__AVX2__)
                    if (int_dot) {
                        quantize_column(x[n], K, quantized.data() + n * (K / 32));
                        xq[n] = quantized.data() + n * (K / 32);
                    }
#endif
                }
                const auto [m_begin, m_end] = split_range(M, ith, nth);
                for (int64_t m = m_begin; m < m_end; ++m) {
                    const char* w = element_ptr(a, 0, m, i2 / r2, i3 / r3);
                    float* out = f32_row(dst, 0, i2, i3) + m;
                    if (int_dot) {
                        for (int64_t n = 0; n < N; ++n) out[n * M] = int_dot(w, xq[n], K);
                        continue;
                    }
                    DotFn row_dot = dot;
                    if (!row_dot) { // convert the row, then an f32 dot
                        if (packed_a) {
                            ta.to_float(w, row.data(), K);
                        } else {
                            for (int64_t k = 0; k < K; ++k) ta.to_float(w + k * a->nb[0], row.data() + k, 1);
                        }
                        w = reinterpret_cast<const char*>(row.data());
                        row_dot = dot_f32;
                    }
                    for (int64_t n = 0; n < N; ++n) out[n * M] = row_dot(w, x[n], K);
                }
            }
    });
}

// ---- kernels ----------------------------------------------------------------------------

void run_mul_mat(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *a = dst->src[0], *b = dst->src[1];
    if (b->ne[1] < kGemvMaxN) {
        gemv(ctx, a, b, dst);
        return;
    }
    const Problem p{
        .a = {static_cast<const char*>(a->data), a->type, a->nb[0], a->nb[1], a->nb[2], a->nb[3],
              b->ne[2] / a->ne[2], b->ne[3] / a->ne[3]},
        .b = {static_cast<const char*>(b->data), b->type, b->nb[0], b->nb[1], b->nb[2], b->nb[3], 1, 1},
        .M = a->ne[1],
        .N = b->ne[1],
        .K = a->ne[0],
        .B2 = b->ne[2],
        .B3 = b->ne[3],
        .c = static_cast<float*>(dst->data),
    };
    gemm(ctx, p);
}

// out_prod(a [M, K], b [N, K]): A(k, m) = a[m, k], B(k, n) = b[n, k].
void run_out_prod(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *a = dst->src[0], *b = dst->src[1];
    const Problem p{
        .a = {static_cast<const char*>(a->data), a->type, a->nb[1], a->nb[0], a->nb[2], a->nb[3],
              b->ne[2] / a->ne[2], b->ne[3] / a->ne[3]},
        .b = {static_cast<const char*>(b->data), b->type, b->nb[1], b->nb[0], b->nb[2], b->nb[3], 1, 1},
        .M = a->ne[0],
        .N = b->ne[0],
        .K = a->ne[1],
        .B2 = b->ne[2],
        .B3 = b->ne[3],
        .c = static_cast<float*>(dst->data),
    };
    gemm(ctx, p);
}

bool writes_packed_f32(const Tensor* dst) {
    return dst->type == Type::F32 && dst->is_contiguous();
}

// Weights of any type with to_float; block-quantized rows must be stored whole. b: f32 with
// any strides.
bool supports_mul_mat(const Tensor* dst) {
    const Tensor *a = dst->src[0], *b = dst->src[1];
    const TypeTraits& ta = type_traits(a->type);
    if (!ta.to_float || b->type != Type::F32 || !writes_packed_f32(dst)) return false;
    return ta.block_size == 1 || a->nb[0] == ta.type_size;
}

bool supports_out_prod(const Tensor* dst) {
    const Tensor *a = dst->src[0], *b = dst->src[1];
    return a->type == Type::F32 && b->type == Type::F32 && writes_packed_f32(dst);
}

} // namespace

void register_matmul_kernels(KernelTable& t) {
    t[size_t(Op::MulMat)] = {run_mul_mat, supports_mul_mat};
    t[size_t(Op::OutProd)] = {run_out_prod, supports_out_prod};
}

} // namespace gfa::cpu
