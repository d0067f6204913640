// Matrix products on the CPU.
//
// Both ops compute C[m, n] = sum_k A(k, m) B(k, n) per batch matrix, where A and B are
// read through byte strides (mul_mat: A = a with k along dim 0, B = b likewise; out_prod:
// A = a and B = b with k along dim 1), so one driver serves both and transposed views of
// f32 operands cost nothing.
//
// Three paths:
//  * GEMM (N >= kGemvMaxN): the operands are packed into panels (A: MR consecutive m per k,
//    converted to f32 while packing, so every weight type with to_float works; B: NR
//    consecutive n per k) and a register-blocked micro-kernel keeps an MR x NR tile of C in
//    registers: per k it loads MR/W vectors of A, broadcasts NR values of B and does
//    NR * MR/W FMAs. Blocking: KC values of k per pass (A block MC x KC lives in L2, one B
//    micro-panel KC x NR in L1). Threads share one packed B block and split the C tiles.
//  * GEMV (mul_mat with N < kGemvMaxN, the decode case): no packing. Each output is a dot
//    product of a weight row with a column of b, and the weights are read exactly once from
//    memory, so the kernel is bound by memory bandwidth once the arithmetic per weight is
//    small enough. f32/f16/bf16 rows are converted in registers and FMAed with b. For the
//    GGUF block types (q8_0, q4_0, q4_1, q5_0, q5_1, q2_K .. q6_K, iq4_nl, iq4_xs) the column of b is
//    quantized to 8 bits once per call and each weight block meets it in integer
//    multiply-adds (see "integer dot products" below). Dequantizing the blocks to f32 in
//    registers instead was measured here at about 1.3x (q8_0) and 1.6x (q4_0) more CPU time
//    per weight, which on AVX2 keeps q4_0 below memory bandwidth; the price is rounding b to
//    8 bits (about 0.5% relative error in these products, the same trade as ggml's), while
//    the GEMM path for larger N stays exact in f32.
//  * Pair GEMM (N >= kGemvMaxN, f32/f16/bf16 weights, MatMulPrecision::BF16, on CPUs with
//    AVX512-BF16): both operands rounded to bf16 and multiplied in pairs along k (bf16_pairs.h),
//    twice the f32 micro-kernel's multiplies per instruction.
//  * Integer GEMM (N >= kGemvMaxN, every GGUF block type, on CPUs with AVX-512 VNNI): the
//    weights stay integers and b is rounded to 16 bits (q6_K: 14) per block of 32, which
//    doubles the multiply-adds per instruction against the f32 micro-kernel (see "quantized
//    prompts"). The rounding costs about 1e-5 of relative error in a product (q6_K: 6e-5). On
//    CPUs with AMX its multiply-adds run on the tile unit instead, with the same bits (see
//    "quantized prompts on AMX tiles").
#include "bf16_pairs.h"
#include "cpu_kernels.h"
#include "op_def.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// The integer dot products of the decoding path (GEMV section) need AVX2, FMA and F16C.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define GFA_INT_DOTS 1
#else
#define GFA_INT_DOTS 0
#endif
// The integer GEMM of quantized prompts (q4_0, q8_0) needs AVX-512 with VNNI besides.
#if GFA_INT_DOTS && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GFA_INT_GEMM 1
#else
#define GFA_INT_GEMM 0
#endif
// The integer GEMM's tile products on AMX (tile registers and int8 tile products) besides.
#if GFA_INT_GEMM && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define GFA_AMX_GEMM 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define GFA_AMX_GEMM 0
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

// ---- weight rows streamed ahead of the decoding row dots ---------------------------------
//
// A decoding product reads each weight row once, straight from memory, and the row dots below
// ask for its bytes in order. On the 2-core Xeon the hardware prefetchers left them waiting on
// memory: a 1.1B q4_K model generated at 20 tok/s, about 12 of the 21 GB/s that two cores read;
// each block asking for the lines kWeightsAhead bytes further on took it to 33 tok/s (1024
// bytes ahead: 32, 512: 29, 4096 and more: 22-24; docs/BENCHMARKS.md). Rows follow each other
// in memory, so near its end a row's requests are for the next row's first lines.
constexpr size_t kWeightsAhead = 2048;
// Asks for the cache lines of the kBytes of weights that begin kWeightsAhead bytes after `at`:
// one request per 64 bytes, so that consecutive calls over consecutive blocks (each no longer
// than kBytes) reach every line.
template <size_t kBytes> inline void request_weights_ahead(const void* at) {
    const char* p = static_cast<const char*>(at) + kWeightsAhead;
    for (size_t o = 0; o < kBytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}

// Rows of f32 weights against an f32 column (16-bit rows: dot_half_column). One row (dot_row)
// keeps two accumulators over alternating 8-value chunks, then adds the tail one value at a
// time; dot_rows takes kDotRows consecutive rows at once (each column vector loaded once for
// all of them) and adds in exactly dot_row's order, so a row's result does not depend on
// which of the two computed it (which varies with the thread count). The tails use an explicit
// fma: left to the compiler, one of them may be contracted and the other not. Eight rows where
// AVX-512 gives 32 vector registers (16 accumulators), four with AVX2's 16: on a Zen 4 core
// f16 rows (before they took the half column) read at 20-22 GB/s eight at a time against 16-18
// four at a time, f32 rows alike either way.
#if defined(__AVX512F__)
constexpr int kDotRows = 8;
#else
constexpr int kDotRows = 4;
#endif
struct F32Weights {
    using T = float;
    static float one(T v) { return v; }
#if defined(__AVX2__) && defined(__FMA__)
    static constexpr bool kVector = true;
    static __m256 eight(const T* p) {
        return _mm256_loadu_ps(p);
    }
#else
    static constexpr bool kVector = false;
#endif
};

template <class W> float dot_row(const void* row, const float* x, int64_t K) {
    const typename W::T* w = static_cast<const typename W::T*>(row);
    int64_t k = 0;
    float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (W::kVector) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (; k + 16 <= K; k += 16) {
            request_weights_ahead<16 * sizeof(typename W::T)>(w + k);
            acc0 = _mm256_fmadd_ps(W::eight(w + k), _mm256_loadu_ps(x + k), acc0);
            acc1 = _mm256_fmadd_ps(W::eight(w + k + 8), _mm256_loadu_ps(x + k + 8), acc1);
        }
        sum = hsum(_mm256_add_ps(acc0, acc1));
    }
#endif
    for (; k < K; ++k) sum = std::fma(W::one(w[k]), x[k], sum);
    return sum;
}

template <class W> void dot_rows(const char* rows, size_t row_bytes, const float* x, int64_t K, float* out) {
    using T = typename W::T;
    const T* w[kDotRows];
    for (int r = 0; r < kDotRows; ++r) w[r] = reinterpret_cast<const T*>(rows + r * row_bytes);
    int64_t k = 0;
    float sums[kDotRows] = {};
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (W::kVector) {
        __m256 acc[kDotRows][2];
        for (auto& a : acc) a[0] = a[1] = _mm256_setzero_ps();
        for (; k + 16 <= K; k += 16) {
            const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
            for (int r = 0; r < kDotRows; ++r) {
                request_weights_ahead<16 * sizeof(T)>(w[r] + k);
                acc[r][0] = _mm256_fmadd_ps(W::eight(w[r] + k), x0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(W::eight(w[r] + k + 8), x1, acc[r][1]);
            }
        }
        for (int r = 0; r < kDotRows; ++r) sums[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
    }
#endif
    for (int r = 0; r < kDotRows; ++r) {
        for (int64_t t = k; t < K; ++t) sums[r] = std::fma(W::one(w[r][t]), x[t], sums[r]);
        out[r] = sums[r];
    }
}

float dot_f32(const void* row, const float* x, int64_t K) {
    return dot_row<F32Weights>(row, x, K);
}

// 16-bit (f16 or bf16) weights in decoding: the row against the column rounded to f16 once
// per product (half_column, scaled), as llama.cpp's CPU product reads f16 rows. One row at a
// time is one memory stream through the matrix (its rows follow each other), and the f16
// column is half the bytes of the f32 one in L1 beside the stream: a Zen 4 core reads f16 rows
// so at about 28.5 GB/s, against 20-22 for dot_rows' eight rows with the f32 column and 16-25
// for one row with it (an f32 column of K = 5632 is 22 KB of the 32 KB L1); bf16 rows at 26-28
// against 18.5-19.7. Two accumulators of 16 (8 without AVX-512) over alternating chunks, then a
// 16-value step, then the tail one value at a time: each row's sum is the same whichever
// thread computes it.
template <Type W> float dot_half_column(const void* row, const uint16_t* x, int64_t K) {
    static_assert(W == Type::F16 || W == Type::BF16);
    const uint16_t* w = static_cast<const uint16_t*>(row);
    int64_t k = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    // (Zero-masked forms here: GCC 12's unmasked ones warn of their own undefined operand.)
    auto halves = [](const uint16_t* p) {
        return _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    };
    auto weights = [&](const uint16_t* p) {
        if constexpr (W == Type::F16) return halves(p);
        const __m512i bits =
            _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xffff, bits, 16)); // bf16: an f32's top half
    };
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        request_weights_ahead<64>(w + k);
        acc0 = _mm512_fmadd_ps(weights(w + k), halves(x + k), acc0);
        acc1 = _mm512_fmadd_ps(weights(w + k + 16), halves(x + k + 16), acc1);
    }
    if (k + 16 <= K) {
        acc0 = _mm512_fmadd_ps(weights(w + k), halves(x + k), acc0);
        k += 16;
    }
    const __m512d both = _mm512_castps_pd(_mm512_add_ps(acc0, acc1));
    sum = hsum(_mm256_add_ps(_mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xf, both, 0)),
                             _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xf, both, 1))));
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    auto halves = [](const uint16_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    };
    auto weights = [&](const uint16_t* p) {
        if constexpr (W == Type::F16) return halves(p);
        const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
    };
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        request_weights_ahead<32>(w + k);
        acc0 = _mm256_fmadd_ps(weights(w + k), halves(x + k), acc0);
        acc1 = _mm256_fmadd_ps(weights(w + k + 8), halves(x + k + 8), acc1);
    }
    sum = hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; k < K; ++k) {
        const float wk = W == Type::F16 ? fp16_to_fp32(w[k]) : bf16_to_fp32(w[k]);
        sum = std::fma(wk, fp16_to_fp32(x[k]), sum);
    }
    return sum;
}

// A column of K values rounded to f16 for dot_half_column, each value x * 2^s, with s
// chosen so that the largest magnitude lies in [2^14, 2^15): nothing overflows f16's range
// (65504), every magnitude within 2^28 of the largest keeps f16's 11 significant bits, and a
// column of small values is not flushed to f16's subnormals. Powers of two scale exactly, so
// the only error is the rounding: at most 2^-11 of each value. Returns 2^-s, the factor that
// takes the dot products back (1 for a column of zeros, or one holding an infinity or NaN,
// which then stays in the products as it would in f32).
float half_column(const float* x, int64_t K, float* scaled, uint16_t* out) {
    float largest = 0.0f;
    for (int64_t k = 0; k < K; ++k) largest = std::max(largest, std::fabs(x[k]));
    int shift = 0;
    if (largest > 0.0f && std::isfinite(largest))        // (NaN compares false: largest stays finite)
        shift = std::min(14 - std::ilogb(largest), 126); // 2^126 keeps f32's range
    const float scale = std::ldexp(1.0f, shift);
    for (int64_t k = 0; k < K; ++k) scaled[k] = x[k] * scale;
    type_traits(Type::F16).from_float(scaled, out, K);
    return std::ldexp(1.0f, -shift);
}

// The kDotRows-row kernel for a weight type, or null (types without one take dot_for's).
using DotRowsFn = void (*)(const char* rows, size_t row_bytes, const float* x, int64_t K, float* out);
DotRowsFn dot_rows_for(Type t) {
    switch (t) {
    case Type::F32:
        return dot_rows<F32Weights>;
    default:
        return nullptr;
    }
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

#if GFA_INT_DOTS
// ---- integer dot products for quantized weights (AVX2) ----------------------------------
//
// The f32 column is quantized once per call to 8 bits, and each weight block meets its
// column values in 8-bit multiply-adds: unsigned weight codes times signed column values,
// pairs summed into 16 bits (maddubs), pairs of those into 32 bits (madd), and one f32 FMA
// per block with the product of the scales. That is a few vector instructions per 32
// weights instead of 16 for converting the weights to f32, which keeps a core ahead of
// memory bandwidth. Weight offsets (q4_0's -8, q4_1's min, the K formats' mins, q6_K's -32)
// are not applied per weight: they multiply the sum of the column values, which the column
// carries precomputed.
//
// Two column layouts:
//  * Column32, one f32 scale per 32 values, for the formats with blocks of 32. Its rounding
//    error (under 0.4% of each block's largest value) is far below the weights'. It is
//    three arrays, so that the scales of four consecutive blocks are one vector load.
//  * ColumnBlockK, one scale per 256 values, for the K formats: their sub-block scales are
//    small integers, so the 8 (q4_K, q5_K) or 16 (q6_K) sub-block products of a 256-block
//    are scaled and summed in 32-bit integers and converted to f32 once. The price is
//    ggml's q8_K trade: a column value much larger than the rest of its 256 coarsens their
//    rounding (a step is 1/127 of the block's largest magnitude). Measured with one value
//    per 256 at 30x the others (uniform in [-1, 1]): 2.6% relative error in q4_K/q6_K
//    products, against 1.1% with a scale per 32 and 0.4% without such outliers.
struct Column32 {
    int8_t* qs; // 32 per block
    float* d;   // per block
    float* sum; // per block: d * sum of its qs, the block's share of a weight offset
};

struct alignas(32) ColumnBlockK {
    int8_t qs[QK_K];
    int16_t sums[QK_K / 16]; // sum of qs per 16 values, unscaled
    float d;
};

// Largest magnitude of n floats (n a multiple of 8).
float abs_max(const float* x, int64_t n) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 8)
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(x + k)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

// 32 floats times inv, rounded to nearest (ties to even), narrowed to 32 bytes in order.
__m256i round_to_i8(const float* x, __m256 inv) {
    __m256i q[4];
    for (int u = 0; u < 4; ++u) q[u] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * u), inv));
    // Narrow 32 -> 16 -> 8 bits; the packs interleave 128-bit lanes, the permute undoes it.
    const __m256i q16 = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
    return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, q16b),
                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Sums of 32 signed bytes in groups of four: i32 lanes 0..3 hold values 0..15, 4..7 hold 16..31.
__m256i sums_of_4(__m256i q) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q), _mm256_set1_epi16(1));
}

void quantize_column(const float* x, int64_t K, const Column32& out) {
    for (int64_t i = 0; i < K / 32; ++i) {
        const float d = abs_max(x + i * 32, 32) / 127.0f;
        const __m256i q = round_to_i8(x + i * 32, _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.qs + 32 * i), q);
        const __m256i s = sums_of_4(q);
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        out.d[i] = d;
        out.sum[i] = d * float(_mm_cvtsi128_si32(s4));
    }
}

void quantize_column_k(const float* x, int64_t K, ColumnBlockK* out) {
    for (int64_t i = 0; i < K / QK_K; ++i) {
        const float* xb = x + i * QK_K;
        const float d = abs_max(xb, QK_K) / 127.0f;
        const __m256 inv = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        for (int g = 0; g < QK_K / 32; ++g) {
            const __m256i q = round_to_i8(xb + 32 * g, inv);
            _mm256_store_si256(reinterpret_cast<__m256i*>(out[i].qs + 32 * g), q);
            // Two horizontal adds leave the sums of 16 in lanes 0 and 4.
            __m256i s = sums_of_4(q);
            s = _mm256_hadd_epi32(s, s);
            s = _mm256_hadd_epi32(s, s);
            out[i].sums[2 * g] = int16_t(_mm256_extract_epi32(s, 0));
            out[i].sums[2 * g + 1] = int16_t(_mm256_extract_epi32(s, 4));
        }
        out[i].d = d;
    }
}

inline __m256i load256(const void* p) {
    return _mm256_loadu_si256(static_cast<const __m256i*>(p));
}

float hsum128(__m128 v) {
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}

// An f16 field of four consecutive blocks as four floats: with the column scales of those
// blocks (one load) that makes four block scales in three vector instructions, instead of
// a conversion, a multiply and a broadcast per block.
template <auto kField, class Block> inline __m128 four_f16(const Block* b) {
    __m128i h = _mm_cvtsi32_si128(b[0].*kField);
    h = _mm_insert_epi16(h, b[1].*kField, 1);
    h = _mm_insert_epi16(h, b[2].*kField, 2);
    h = _mm_insert_epi16(h, b[3].*kField, 3);
    return _mm_cvtph_ps(h);
}
// Lane i of four floats, in all eight lanes.
inline __m256 broadcast_lane(__m128 v, int i) {
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_set1_epi32(i));
}

// The shared loop of the blocks-of-32 formats: four blocks per step, each with its own
// accumulator (no FMA waits for the previous block's), their four scales computed at once.
// block_sum(i) gives block i's 8 partial sums of codes times column values as f32;
// offsets(i, dw) the four blocks' weight offsets, which multiply the column sums (zero for
// formats without offsets); offset(i, dw) one block's, for the last K/32 % 4 blocks.
template <class Block, class BlockSum, class Offsets, class Offset>
float dot_blocks32(const Block* w, const Column32& x, int64_t nb, BlockSum block_sum, Offsets offsets,
                   Offset offset) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    __m128 offset_acc = _mm_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) {
        request_weights_ahead<4 * sizeof(Block)>(w + i);
        const __m128 dw = four_f16<&Block::d>(w + i);
        const __m128 scales = _mm_mul_ps(dw, _mm_loadu_ps(x.d + i));
        acc0 = _mm256_fmadd_ps(block_sum(i), broadcast_lane(scales, 0), acc0);
        acc1 = _mm256_fmadd_ps(block_sum(i + 1), broadcast_lane(scales, 1), acc1);
        acc2 = _mm256_fmadd_ps(block_sum(i + 2), broadcast_lane(scales, 2), acc2);
        acc3 = _mm256_fmadd_ps(block_sum(i + 3), broadcast_lane(scales, 3), acc3);
        offset_acc = _mm_fmadd_ps(offsets(i, dw), _mm_loadu_ps(x.sum + i), offset_acc);
    }
    float tail = 0.0f;
    for (; i < nb; ++i) {
        const float dw = scale_to_f32(w[i].d);
        acc0 = _mm256_fmadd_ps(block_sum(i), _mm256_set1_ps(dw * x.d[i]), acc0);
        tail += offset(i, dw) * x.sum[i];
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3))) + hsum128(offset_acc) +
           tail;
}

// Unsigned bytes u times signed bytes s, each four adjacent products summed into one i32
// lane. AVX-512 VNNI does it in one instruction; AVX2 sums pairs into 16 bits (maddubs,
// which saturates, but no operand here comes near: at most 63 * 127 * 2) and pairs of those
// into 32 (madd). The sums are the same either way.
inline __m256i dot_u8_i8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// 32 signed 8-bit weights times 32 signed 8-bit column values -> 8 partial sums (i32 as f32).
inline __m256 i8_dot(__m256i w, __m256i x) {
    return _mm256_cvtepi32_ps(dot_u8_i8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)));
}

// q8_0 keeps a scale multiply and broadcast per block and two accumulators: the four-block
// loop of dot_blocks32 measured about 5% slower for it from L2 and no faster from memory.
float dot_q8_0_int(const void* row, const void* column, int64_t K) {
    const block_q8_0* w = static_cast<const block_q8_0*>(row);
    const Column32& x = *static_cast<const Column32*>(column);
    auto term = [&](int64_t i, __m256 acc) {
        return _mm256_fmadd_ps(i8_dot(load256(w[i].qs), load256(x.qs + 32 * i)),
                               _mm256_set1_ps(scale_to_f32(w[i].d) * x.d[i]), acc);
    };
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const int64_t nb = K / 32;
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
        request_weights_ahead<2 * sizeof(block_q8_0)>(w + i);
        acc0 = term(i, acc0);
        acc1 = term(i + 1, acc1);
    }
    if (i < nb) acc0 = term(i, acc0);
    return hsum(_mm256_add_ps(acc0, acc1));
}

// ---- blocks of 32 with unsigned codes: q4_0, q4_1, q5_0, q5_1 ----
//
// x = d q + m per block, with m = -8 d (q4_0), -16 d (q5_0) or stored (q4_1, q5_1). Against a
// column block (dx, qx): sum x dx qx = d dx sum(q qx) + m dx sum(qx), the last factor being
// the column block's `sum`. The codes (at most 31) go into maddubs' unsigned operand as
// they are: 31 * 127 * 2 fits 16 bits.

// 16 bytes of nibbles -> 32 codes in element order: byte j's low nibble is element j, its
// high nibble element j + 16. The bytes are loaded into both halves and the upper half
// shifted by 4, which is cheaper than shifting and inserting a 128-bit half.
inline __m256i nibbles_32(const uint8_t* qs) {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    return _mm256_and_si256(_mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0f));
}

// Bit i of the little-endian 32-bit word at qh -> 0x10 in byte i (q5_0/q5_1's fifth bits).
inline __m256i fifth_bits_32(const uint8_t* qh) {
    uint32_t bits;
    std::memcpy(&bits, qh, sizeof bits);
    // Byte i gets byte i / 8 of the word and keeps bit i % 8.
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(int(bits)),
        _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201));
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

struct Q4_0Codes {
    using Block = block_q4_0;
    static __m256i codes(const Block& b) { return nibbles_32(b.qs); }
    static __m128 offsets(const Block*, __m128 d) { return _mm_mul_ps(d, _mm_set1_ps(-8.0f)); }
    static float offset(const Block&, float d) { return -8.0f * d; }
};
struct Q4_1Codes {
    using Block = block_q4_1;
    static __m256i codes(const Block& b) { return nibbles_32(b.qs); }
    static __m128 offsets(const Block* b, __m128) { return four_f16<&Block::m>(b); }
    static float offset(const Block& b, float) { return scale_to_f32(b.m); }
};
struct Q5_0Codes {
    using Block = block_q5_0;
    static __m256i codes(const Block& b) { return _mm256_or_si256(nibbles_32(b.qs), fifth_bits_32(b.qh)); }
    static __m128 offsets(const Block*, __m128 d) { return _mm_mul_ps(d, _mm_set1_ps(-16.0f)); }
    static float offset(const Block&, float d) { return -16.0f * d; }
};
struct Q5_1Codes {
    using Block = block_q5_1;
    static __m256i codes(const Block& b) { return _mm256_or_si256(nibbles_32(b.qs), fifth_bits_32(b.qh)); }
    static __m128 offsets(const Block* b, __m128) { return four_f16<&Block::m>(b); }
    static float offset(const Block& b, float) { return scale_to_f32(b.m); }
};

template <class Format> float dot_q32_int(const void* row, const void* column, int64_t K) {
    using Block = typename Format::Block;
    const Block* w = static_cast<const Block*>(row);
    const Column32& x = *static_cast<const Column32*>(column);
    return dot_blocks32(
        w, x, K / 32,
        [&](int64_t i) { return _mm256_cvtepi32_ps(dot_u8_i8(Format::codes(w[i]), load256(x.qs + 32 * i))); },
        [&](int64_t i, __m128 dw) { return Format::offsets(w + i, dw); },
        [&](int64_t i, float dw) { return Format::offset(w[i], dw); });
}

// ---- K formats: 256-blocks against ColumnBlockK ----

// Shuffle masks (for _mm256_shuffle_epi8) that copy one 16-bit lane of each 128-bit half
// into all of that half: kBroadcastLane16[j] takes lane j in both halves (q4_K/q5_K
// sub-block j), kBroadcastLane16[8 + g] lane 2g in the lower and 2g + 1 in the upper half
// (q6_K group g). A table in memory, not constants built in the loop: GCC rebuilt those
// from immediates on every block, and vpshufb takes the mask as a memory operand for free.
struct alignas(32) ShuffleMasks {
    uint8_t bytes[12][32];
};
constexpr ShuffleMasks make_lane16_masks() {
    ShuffleMasks m{};
    for (int j = 0; j < 12; ++j)
        for (int i = 0; i < 32; ++i) {
            const int lane = j < 8 ? j : 2 * (j - 8) + i / 16;
            m.bytes[j][i] = uint8_t(2 * lane + i % 2);
        }
    return m;
}
constexpr ShuffleMasks kBroadcastLane16 = make_lane16_masks();
inline __m256i broadcast_lane16(__m256i v, int mask) {
    return _mm256_shuffle_epi8(
        v, _mm256_load_si256(reinterpret_cast<const __m256i*>(kBroadcastLane16.bytes[mask])));
}

// Scales and mins of q4_K/q5_K (six bits each in 12 bytes, layout at block_q4_K), unpacked
// as three 32-bit words with byte-wise masks: bytes 0..7 of the result are sc[0..7], bytes
// 8..15 are mn[0..7].
inline __m128i unpack_k4_scales(const uint8_t* packed) {
    uint32_t s[3]; // three loads: one memcpy of 12 bytes went through the stack
    for (int i = 0; i < 3; ++i) std::memcpy(&s[i], packed + 4 * i, 4);
    constexpr uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
    const uint32_t sc_lo = s[0] & low6, mn_lo = s[1] & low6;
    const uint32_t sc_hi = (s[2] & low4) | ((s[0] >> 6) & low2) << 4;
    const uint32_t mn_hi = ((s[2] >> 4) & low4) | ((s[1] >> 6) & low2) << 4;
    return _mm_setr_epi32(int(sc_lo), int(sc_hi), int(mn_lo), int(mn_hi));
}

// The mins term of a q4_K/q5_K block: i32 lane j = mn[j] * (column sum of sub-block j),
// from the two sums of 16 per sub-block in one multiply-add.
inline __m256i k4_mins_term(__m128i scales_mins, const int16_t* sums16) {
    const __m128i mins_twice = _mm_unpackhi_epi8(scales_mins, scales_mins); // mn0 mn0 mn1 mn1 ...
    return _mm256_madd_epi16(_mm256_cvtepu8_epi16(mins_twice), load256(sums16));
}

// q4_K / q5_K: sub-block j of a 256-block is x = d sc_j q - dmin mn_j, so the block adds
// d dx sum_j sc_j sum(q qx) - dmin dx sum_j mn_j sum(qx). Each 32-byte chunk c of codes
// holds sub-block 2c (low nibbles) and 2c + 1 (high nibbles); the madd that pairs the
// maddubs results also multiplies by the sub-block's scale (15 * 127 * 2 * 63 * 2 fits 32
// bits many times over). Even and odd sub-blocks sum into separate registers.
template <bool kFifthBit> float dot_k4_int(const void* row, const void* column, int64_t K) {
    using Block = std::conditional_t<kFifthBit, block_q5_K, block_q4_K>;
    const Block* w = static_cast<const Block*>(row);
    const ColumnBlockK* x = static_cast<const ColumnBlockK*>(column);
    const __m256i low_mask = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
    __m256 acc = _mm256_setzero_ps(), acc_mins = _mm256_setzero_ps();
    for (int64_t ib = 0; ib < K / QK_K; ++ib) {
        const Block& b = w[ib];
        const ColumnBlockK& xb = x[ib];
        request_weights_ahead<sizeof(Block)>(&b);
        const __m128i scales_mins = unpack_k4_scales(b.scales);
        const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scales_mins));
        __m256i high = _mm256_setzero_si256();
        if constexpr (kFifthBit) high = load256(b.qh); // bit j of byte l: element l of sub-block j
        __m256i sum_even = _mm256_setzero_si256(), sum_odd = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
            const __m256i q = load256(b.qs + 32 * c);
            __m256i lo = _mm256_and_si256(q, low_mask),
                    hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low_mask);
            if constexpr (kFifthBit) {
                // Bits 2c and 2c + 1 of each byte (brought to bits 0 and 1 by the running
                // shift) move to bit 4; 16-bit shifts by at most 4 never cross bytes here.
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(high, 4), bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(high, 3), bit4));
                high = _mm256_srli_epi16(high, 2);
            }
            const __m256i p_lo = _mm256_maddubs_epi16(lo, load256(xb.qs + 64 * c));
            const __m256i p_hi = _mm256_maddubs_epi16(hi, load256(xb.qs + 64 * c + 32));
            sum_even = _mm256_add_epi32(sum_even, _mm256_madd_epi16(p_lo, broadcast_lane16(scales, 2 * c)));
            sum_odd = _mm256_add_epi32(sum_odd, _mm256_madd_epi16(p_hi, broadcast_lane16(scales, 2 * c + 1)));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(sum_even, sum_odd)),
                              _mm256_set1_ps(scale_to_f32(b.d) * xb.d), acc);
        acc_mins = _mm256_fmadd_ps(_mm256_cvtepi32_ps(k4_mins_term(scales_mins, xb.sums)),
                                   _mm256_set1_ps(scale_to_f32(b.dmin) * xb.d), acc_mins);
    }
    return hsum(_mm256_sub_ps(acc, acc_mins));
}

#if GFA_INT_GEMM
// Scales and mins of q4_K/q5_K as unpack_k4_scales gives them (bytes 0..7 sc, 8..15 mn), in
// vector registers throughout, without the scalar words and their moves into a vector. 16
// bytes are read from the 12 packed ones (the 4 after them, the block's own, are not used).
inline __m128i unpack_k4_scales_vec(const uint8_t* packed) {
    const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed)); // words w0 w1 w2 (w3)
    const __m128i low = _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 1, 2, 0));           // w0 w2 w1 w2
    const __m128i top = _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 1, 0, 0));           // w0 w0 w1 w1
    // sc_lo = w0 & 0x3f.., sc_hi = (w2 & 0x0f..) | ((w0 >> 6) & 0x03..) << 4, mn_lo = w1 & 0x3f..,
    // mn_hi = ((w2 >> 4) & 0x0f..) | ((w1 >> 6) & 0x03..) << 4.
    const __m128i low_bits = _mm_and_si128(_mm_srlv_epi32(low, _mm_setr_epi32(0, 0, 0, 4)),
                                           _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    const __m128i high_bits = _mm_and_si128(_mm_slli_epi32(_mm_srli_epi32(top, 6), 4),
                                            _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    return _mm_or_si128(low_bits, high_bits); // words sc_lo sc_hi mn_lo mn_hi
}

// Word tables for dot_k4_int512, one 512-bit row per 32-byte chunk c of codes: lane i holds 2c
// in the lower half and 2c + 1 in the upper (the sub-blocks the chunk's low and high nibbles
// belong to); nibble_shift 0 and 4. (Loaded, not built from set1/insert intrinsics: GCC 12
// flags those as reading uninitialized registers.)
struct alignas(64) K4WordTables {
    int16_t sub_block[4][32];
    int16_t nibble_shift[32];
};
constexpr K4WordTables make_k4_word_tables() {
    K4WordTables t{};
    for (int c = 0; c < 4; ++c)
        for (int i = 0; i < 32; ++i) t.sub_block[c][i] = int16_t(2 * c + i / 16);
    for (int i = 0; i < 32; ++i) t.nibble_shift[i] = int16_t(i < 16 ? 0 : 4);
    return t;
}
constexpr K4WordTables kK4Words = make_k4_word_tables();

inline __m512i load512(const void* p) {
    return _mm512_loadu_si512(p);
}
// 32 bytes into both halves of a register.
inline __m512i broadcast256(const void* p) {
    return _mm512_maskz_broadcast_i64x4(__mmask8(0xff), load256(p));
}

// dot_k4_int in 512-bit registers (AVX-512 BW): each 32-byte chunk c of codes is read once into
// both halves of a register (a broadcast load), the upper half shifted by 4, so that one
// register holds sub-block 2c (low nibbles) then 2c + 1 (high nibbles): the order of the
// column's values 64c .. 64c + 63, one load. One maddubs and one madd (with each half's
// sub-block scale, picked by a permute) per 64 values, half the instructions of the 256-bit
// loop; the integer sums are the same, the f32 accumulation is in 16 lanes instead of 8. On a
// 2-core Xeon it took a 1.1B q4_K model's generation from 15.4 to 21.1 tok/s (docs/BENCHMARKS.md;
// not yet measured on the AMD parts, which split 512-bit instructions in two).
template <bool kFifthBit> float dot_k4_int512(const void* row, const void* column, int64_t K) {
    using Block = std::conditional_t<kFifthBit, block_q5_K, block_q4_K>;
    const Block* w = static_cast<const Block*>(row);
    const ColumnBlockK* x = static_cast<const ColumnBlockK*>(column);
    const __m512i low_mask = _mm512_set1_epi8(0x0f), bit0 = _mm512_set1_epi8(0x01);
    const __m512i nibble_shift = load512(kK4Words.nibble_shift);
    __m512 acc = _mm512_setzero_ps();
    __m256 acc_mins = _mm256_setzero_ps();
    for (int64_t ib = 0; ib < K / QK_K; ++ib) {
        const Block& b = w[ib];
        const ColumnBlockK& xb = x[ib];
        request_weights_ahead<sizeof(Block)>(&b);
        const __m128i scales_mins = unpack_k4_scales_vec(b.scales);
        // Words sc0..7, mn0..7 (twice: the upper half unused).
        const __m512i scales = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(scales_mins));
        __m512i sum = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
            const __m512i sub_blocks = load512(kK4Words.sub_block[c]);
            __m512i codes =
                _mm512_and_si512(_mm512_srlv_epi16(broadcast256(b.qs + 32 * c), nibble_shift), low_mask);
            if constexpr (kFifthBit) {
                // Bit 2c of qh[l] for the lower half, bit 2c + 1 for the upper, moved to bit 4
                // (16-bit shifts by at most 7 leave bit 0 of each byte its own byte's bit).
                const __m512i high =
                    _mm512_and_si512(_mm512_srlv_epi16(broadcast256(b.qh), sub_blocks), bit0);
                codes = _mm512_or_si512(codes, _mm512_slli_epi16(high, 4));
            }
            const __m512i p = _mm512_maddubs_epi16(codes, load512(xb.qs + 64 * c));
            sum = _mm512_add_epi32(sum, _mm512_madd_epi16(p, _mm512_permutexvar_epi16(sub_blocks, scales)));
        }
        acc = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(__mmask16(0xffff), sum),
                              _mm512_set1_ps(scale_to_f32(b.d) * xb.d), acc);
        acc_mins = _mm256_fmadd_ps(_mm256_cvtepi32_ps(k4_mins_term(scales_mins, xb.sums)),
                                   _mm256_set1_ps(scale_to_f32(b.dmin) * xb.d), acc_mins);
    }
    alignas(64) float lanes[16]; // through memory: GCC 12 flags the 512-to-256-bit casts
    _mm512_store_ps(lanes, acc);
    const __m256 acc8 = _mm256_add_ps(_mm256_load_ps(lanes), _mm256_load_ps(lanes + 8));
    return hsum(_mm256_sub_ps(acc8, acc_mins));
}
#endif

// The 16-bit sub-block scales 8h .. 8h + 7 of a 256-block (lanes of scales16) in both 128-bit
// halves, for the 128-value half h of the formats with sub-blocks of 16 (q2_K, q3_K, q6_K).
inline __m256i half_scales(__m256i scales16, int h) {
    return h == 0 ? _mm256_permute2x128_si256(scales16, scales16, 0x00)
                  : _mm256_permute2x128_si256(scales16, scales16, 0x11);
}

// q6_K: x = d sc_i (q - 32) with q in 0..63 and a signed 8-bit scale per 16 values. The
// codes go into maddubs unsigned (63 * 127 * 2 fits 16 bits) and the -32 becomes
// -32 sum_i sc_i (column sum of group i), one multiply-add per 256-block. Each 128-value
// half h holds its codes as: values 0..31 low nibbles of ql[0..31] with bits 0-1 of
// qh[0..31], 32..63 low nibbles of ql[32..63] with bits 2-3, 64..95 high nibbles of
// ql[0..31] with bits 4-5, 96..127 high nibbles of ql[32..63] with bits 6-7.
float dot_q6_K_int(const void* row, const void* column, int64_t K) {
    const block_q6_K* w = static_cast<const block_q6_K*>(row);
    const ColumnBlockK* x = static_cast<const ColumnBlockK*>(column);
    const __m256i low_mask = _mm256_set1_epi8(0x0f), high_mask = _mm256_set1_epi8(0x30);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t ib = 0; ib < K / QK_K; ++ib) {
        const block_q6_K& b = w[ib];
        const ColumnBlockK& xb = x[ib];
        request_weights_ahead<sizeof(block_q6_K)>(&b);
        const __m256i scales16 =
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales)));
        __m256i sum_a = _mm256_setzero_si256(), sum_b = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            // Scales 8h..8h+7 in both 128-bit halves; a 32-value group g uses 8h + 2g in its
            // lower half (values 0..15) and 8h + 2g + 1 in its upper half.
            const __m256i scales = half_scales(scales16, h);
            const __m256i l0 = load256(b.ql + 64 * h), l1 = load256(b.ql + 64 * h + 32);
            const __m256i hb = load256(b.qh + 32 * h);
            // 16-bit shifts by 2 or 4 keep bits 4-5 of each byte within the byte.
            const __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(l0, low_mask),
                                _mm256_and_si256(_mm256_slli_epi16(hb, 4), high_mask)),
                _mm256_or_si256(_mm256_and_si256(l1, low_mask),
                                _mm256_and_si256(_mm256_slli_epi16(hb, 2), high_mask)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low_mask),
                                _mm256_and_si256(hb, high_mask)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low_mask),
                                _mm256_and_si256(_mm256_srli_epi16(hb, 2), high_mask)),
            };
#pragma GCC unroll 4
            for (int g = 0; g < 4; ++g) {
                const __m256i p = _mm256_maddubs_epi16(q[g], load256(xb.qs + 128 * h + 32 * g));
                const __m256i scaled = _mm256_madd_epi16(p, broadcast_lane16(scales, 8 + g));
                if (g % 2 == 0)
                    sum_a = _mm256_add_epi32(sum_a, scaled);
                else
                    sum_b = _mm256_add_epi32(sum_b, scaled);
            }
        }
        const __m256i offset = _mm256_madd_epi16(scales16, load256(xb.sums)); // sum_i sc_i sums_i
        const __m256i sum = _mm256_sub_epi32(_mm256_add_epi32(sum_a, sum_b), _mm256_slli_epi32(offset, 5));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale_to_f32(b.d) * xb.d), acc);
    }
    return hsum(acc);
}

// ---- two- and three-bit K formats: q2_K, q3_K ----
//
// Both lay out a 128-value half h as q6_K's groups do: group g (values 32g .. 32g + 31 of the
// half) is bits 2g, 2g + 1 of qs[32h .. 32h + 31], its first 16 values under sub-block scale
// 8h + 2g and the rest under 8h + 2g + 1 (broadcast_lane16(scales, 8 + g) after placing scales
// 8h .. 8h + 7 in both 128-bit halves).

// q2_K: x = d sc_i q - dmin mn_i, sc_i and mn_i the low and high nibbles of scales[i]: the
// codes times the column with the scales in the madd, the mins against the column sums.
float dot_q2_K_int(const void* row, const void* column, int64_t K) {
    const block_q2_K* w = static_cast<const block_q2_K*>(row);
    const ColumnBlockK* x = static_cast<const ColumnBlockK*>(column);
    const __m128i nibble = _mm_set1_epi8(0x0f);
    const __m256i two_bits = _mm256_set1_epi8(0x03);
    __m256 acc = _mm256_setzero_ps(), acc_mins = _mm256_setzero_ps();
    for (int64_t ib = 0; ib < K / QK_K; ++ib) {
        const block_q2_K& b = w[ib];
        const ColumnBlockK& xb = x[ib];
        request_weights_ahead<sizeof(block_q2_K)>(&b);
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales));
        const __m256i scales16 = _mm256_cvtepu8_epi16(_mm_and_si128(packed, nibble));
        const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), nibble));
        __m256i sum = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const __m256i scales = half_scales(scales16, h);
            const __m256i q = load256(b.qs + 32 * h);
#pragma GCC unroll 4
            for (int g = 0; g < 4; ++g) {
                // 16-bit shifts by at most 6: the two bits kept never come from the next byte
                const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(q, 2 * g), two_bits);
                const __m256i p = _mm256_maddubs_epi16(codes, load256(xb.qs + 128 * h + 32 * g));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, broadcast_lane16(scales, 8 + g)));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale_to_f32(b.d) * xb.d), acc);
        acc_mins = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(mins16, load256(xb.sums))),
                                   _mm256_set1_ps(scale_to_f32(b.dmin) * xb.d), acc_mins);
    }
    return hsum(_mm256_sub_ps(acc, acc_mins));
}

// The unsigned 3-bit codes u of group g of a q3_K half: bits 2g, 2g + 1 of q, and bit k of
// hm moved to bit 2. The 16-bit shifts bring each byte's own bit k to its bit 2 (what they
// shift in from the neighbouring byte lands on other bits, masked off), where a compare
// against a one-bit constant took three instructions and a constant per group.
inline __m256i q3_K_codes(__m256i q, __m256i hm, int k, int g, __m256i two_bits, __m256i four) {
    const __m256i third = k >= 2 ? _mm256_srli_epi16(hm, k - 2) : _mm256_slli_epi16(hm, 2 - k);
    const __m256i low = _mm256_and_si256(g == 0 ? q : _mm256_srli_epi16(q, 2 * g), two_bits);
#if defined(__AVX512VL__)
    return _mm256_ternarylogic_epi32(third, low, four, 0xec); // (third & four) | low
#else
    return _mm256_or_si256(low, _mm256_and_si256(third, four));
#endif
}

// q3_K: x = d (sc_i - 32) (u - 4) with u = low two bits + 4 * the hmask bit, in 0..7: u goes
// into maddubs unsigned, the signed scales into the madd, and the -4 meets the column sums.
float dot_q3_K_int(const void* row, const void* column, int64_t K) {
    const block_q3_K* w = static_cast<const block_q3_K*>(row);
    const ColumnBlockK* x = static_cast<const ColumnBlockK*>(column);
    const __m256i two_bits = _mm256_set1_epi8(0x03), four = _mm256_set1_epi8(0x04);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t ib = 0; ib < K / QK_K; ++ib) {
        const block_q3_K& b = w[ib];
        const ColumnBlockK& xb = x[ib];
        request_weights_ahead<sizeof(block_q3_K)>(&b);
        // The sixteen 6-bit scales (layout at block_q3_K), minus 32.
        uint32_t s[3];
        for (int i = 0; i < 3; ++i) std::memcpy(&s[i], b.scales + 4 * i, 4);
        constexpr uint32_t low4 = 0x0f0f0f0f, low2 = 0x03030303;
        const uint32_t u[4] = {(s[0] & low4) | (s[2] & low2) << 4, (s[1] & low4) | ((s[2] >> 2) & low2) << 4,
                               ((s[0] >> 4) & low4) | ((s[2] >> 4) & low2) << 4,
                               ((s[1] >> 4) & low4) | ((s[2] >> 6) & low2) << 4};
        const __m128i sc8 =
            _mm_sub_epi8(_mm_setr_epi32(int(u[0]), int(u[1]), int(u[2]), int(u[3])), _mm_set1_epi8(32));
        const __m256i scales16 = _mm256_cvtepi8_epi16(sc8);
        const __m256i hm = load256(b.hmask); // bit 4h + g of byte l: the third bit of value l of group g
        __m256i sum = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const __m256i scales = half_scales(scales16, h);
            const __m256i q = load256(b.qs + 32 * h);
#pragma GCC unroll 4
            for (int g = 0; g < 4; ++g) {
                const __m256i codes = q3_K_codes(q, hm, 4 * h + g, g, two_bits, four);
                const __m256i p = _mm256_maddubs_epi16(codes, load256(xb.qs + 128 * h + 32 * g));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, broadcast_lane16(scales, 8 + g)));
            }
        }
        const __m256i offset = _mm256_madd_epi16(scales16, load256(xb.sums)); // sum_i sc_i sums_i
        sum = _mm256_sub_epi32(sum, _mm256_slli_epi32(offset, 2));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale_to_f32(b.d) * xb.d), acc);
    }
    return hsum(acc);
}

// ---- non-linear 4-bit formats: iq4_nl, iq4_xs ----
//
// The 4-bit indices become their signed levels by one byte shuffle (the 16 levels are the
// table), then signed times signed bytes as in q8_0 (sign moved onto the column).

inline __m256i iq4_levels_32(const uint8_t* qs) {
    const __m256i table =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Levels)));
    return _mm256_shuffle_epi8(table, nibbles_32(qs));
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
// With VNNI the levels go in as unsigned bytes, level + 128 (1 .. 241), as q4_0's codes do,
// and the 128 becomes an offset against the column sums: vpdpbusd does not saturate (the
// AVX2 maddubs would, at 241 * 127 * 2), and this saves the two sign moves per block, which
// made iq4_nl the slowest 4-bit format to decode.
inline __m256i iq4_levels_u8_32(const uint8_t* qs) {
    alignas(16) static constexpr auto kLevelsU8 = [] {
        std::array<uint8_t, 16> t{};
        for (int i = 0; i < 16; ++i) t[size_t(i)] = uint8_t(kIq4Levels[i] + 128);
        return t;
    }();
    const __m256i table =
        _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kLevelsU8.data())));
    return _mm256_shuffle_epi8(table, nibbles_32(qs));
}
struct IQ4_NLCodes {
    using Block = block_iq4_nl;
    static __m256i codes(const Block& b) { return iq4_levels_u8_32(b.qs); }
    static __m128 offsets(const Block*, __m128 d) { return _mm_mul_ps(d, _mm_set1_ps(-128.0f)); }
    static float offset(const Block&, float d) { return -128.0f * d; }
};
float dot_iq4_nl_int(const void* row, const void* column, int64_t K) {
    return dot_q32_int<IQ4_NLCodes>(row, column, K);
}
#else
float dot_iq4_nl_int(const void* row, const void* column, int64_t K) {
    const block_iq4_nl* w = static_cast<const block_iq4_nl*>(row);
    const Column32& x = *static_cast<const Column32*>(column);
    return dot_blocks32(
        w, x, K / 32, [&](int64_t i) { return i8_dot(iq4_levels_32(w[i].qs), load256(x.qs + 32 * i)); },
        [&](int64_t, __m128) { return _mm_setzero_ps(); }, [&](int64_t, float) { return 0.0f; });
}
#endif

// iq4_xs: eight sub-blocks of 32 with signed 6-bit scales (sc - 32), applied in the madd that
// pairs the byte products (at most 127 * 127 * 2 * 32 per lane).
float dot_iq4_xs_int(const void* row, const void* column, int64_t K) {
    const block_iq4_xs* w = static_cast<const block_iq4_xs*>(row);
    const ColumnBlockK* x = static_cast<const ColumnBlockK*>(column);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t ib = 0; ib < K / QK_K; ++ib) {
        const block_iq4_xs& b = w[ib];
        const ColumnBlockK& xb = x[ib];
        request_weights_ahead<sizeof(block_iq4_xs)>(&b);
        __m256i sum = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int j = 0; j < QK_K / 32; ++j) {
            const int sc = ((b.scales_l[j / 2] >> (4 * (j % 2))) & 0x0f) | ((b.scales_h >> (2 * j)) & 3) << 4;
            const __m256i levels = iq4_levels_32(b.qs + 16 * j), xq = load256(xb.qs + 32 * j);
            const __m256i p =
                _mm256_maddubs_epi16(_mm256_sign_epi8(levels, levels), _mm256_sign_epi8(xq, levels));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, _mm256_set1_epi16(int16_t(sc - 32))));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale_to_f32(b.d) * xb.d), acc);
    }
    return hsum(acc);
}
#endif

#if GFA_INT_GEMM
// ---- quantized prompts: an integer GEMM (AVX-512 VNNI) -----------------------------------------
//
// A prompt's product with quantized weights (every GGUF block type), on a CPU with VNNI. The
// weights are small integers times a scale per block of 32 (plus an offset per block for
// q4_1, q5_0, q5_1, q4_K and q5_K; the sub-block scales of q2_K, q3_K and q6_K go into their
// codes, and q2_K's two mins per block of 32 are subtracted after the GEMM), so
// instead of converting them to f32 for the f32 micro-kernel they stay integers: the columns
// of b are rounded to 16 bits per 32 values (a scale per block; the rounding, 1/65534 of the
// block's largest value, costs about 1e-5 of relative error in a product; q6_K takes 14 bits,
// see Q6_KUnits; q2_K, q3_K and q6_K take a scale per 256 or 64, see column_scale_blocks) and one vpdpwssd
// multiplies 32 pairs of 16-bit values and sums them by two into 16 i32 lanes: twice the
// multiply-adds of an f32 FMA. A tile of 16 weight rows is unpacked once per block of 32
// into sixteen vectors, vector p holding codes 2p and 2p + 1 of each row in that row's lane,
// so a pair of a column, broadcast, meets all 16 rows at once; the tile is then reused for
// every column. Per block and column: 16 vpdpwssd, a conversion and one FMA with the product
// of the two scales (and, where there are offsets, one more with the rows' offsets and the
// column block's sum), for 16 outputs. The block sums stay exact in i32 (at most 128 * 32767 * 32).
// Rounding b to 8 bits instead (vpdpbusd, what the decoding path does) is about 1.7 times
// faster again, but moved the logits of the test models with sharp attention by up to 36%
// (16 bits: up to 3%, f32: 0.7%, both from values crossing an 8-bit step of the KV cache),
// so it is a product's choice: MatMulPrecision::Q8 (Columns8 below).

constexpr int kTileRows = 16; // one 512-bit lane per weight row
constexpr int kTileCols = 8;  // columns of b per pass (accumulators in registers)

// The blocks of 32 of a weight row as codes, a scale and an offset (weight = scale * code +
// offset). q4_0: nibble - 8; q8_0: the byte; q4_K/q5_K: the four or five bits, with sub-block
// j's six-bit scale and min (scale d * sc_j, offset -dmin * m_j).
struct Q4_0Units {
    static constexpr bool kOffset = false;
    static constexpr int kU8Bias = 8;
    static constexpr bool kInt8Codes = true; // -8 .. 7
    static constexpr int kColumnMax = 32767;
    static void unit(const char* row, int64_t b, __m512i& codes, float& scale, float& offset) {
        const block_q4_0& blk = reinterpret_cast<const block_q4_0*>(row)[b];
        codes = _mm512_cvtepi8_epi16(_mm256_sub_epi8(nibbles_32(blk.qs), _mm256_set1_epi8(8)));
        scale = scale_to_f32(blk.d);
        offset = 0.0f;
    }
};
struct Q8_0Units {
    static constexpr bool kOffset = false;
    static constexpr int kU8Bias = 128;
    static constexpr bool kInt8Codes = true;
    static constexpr int kColumnMax = 32767;
    static void unit(const char* row, int64_t b, __m512i& codes, float& scale, float& offset) {
        const block_q8_0& blk = reinterpret_cast<const block_q8_0*>(row)[b];
        codes = _mm512_cvtepi8_epi16(load256(blk.qs));
        scale = scale_to_f32(blk.d);
        offset = 0.0f;
    }
};
// q4_1, q5_0, q5_1: the unsigned codes and per-block offsets of their dot products above.
template <class Format> struct Blocks32Units {
    static constexpr bool kOffset = true;
    static constexpr int kU8Bias = 0;
    static constexpr bool kInt8Codes = true; // 0 .. 31
    static constexpr int kColumnMax = 32767;
    static void unit(const char* row, int64_t b, __m512i& codes, float& scale, float& offset) {
        const auto& blk = reinterpret_cast<const typename Format::Block*>(row)[b];
        codes = _mm512_cvtepi8_epi16(Format::codes(blk));
        scale = scale_to_f32(blk.d);
        offset = Format::offset(blk, scale);
    }
};
// q4_K and q5_K (kFifthBit: bit j of qh[l] is the fifth bit of element l of sub-block j).
template <bool kFifthBit> struct K4Units {
    using Block = std::conditional_t<kFifthBit, block_q5_K, block_q4_K>;
    static constexpr bool kOffset = true;
    static constexpr int kU8Bias = 0;
    static constexpr bool kInt8Codes = true; // 0 .. 31
    static constexpr int kColumnMax = 32767;
    static void unit(const char* row, int64_t b, __m512i& codes16, float& scale, float& offset) {
        const Block& blk = reinterpret_cast<const Block*>(row)[b / 8];
        const int j = int(b % 8);
        const __m256i q = load256(blk.qs + 32 * (j / 2));
        __m256i codes = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(q, 4) : q, _mm256_set1_epi8(0x0f));
        if constexpr (kFifthBit) {
            const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(load256(blk.qh), _mm_cvtsi32_si128(j)),
                                                 _mm256_set1_epi8(1));
            codes = _mm256_or_si256(codes, _mm256_slli_epi16(bit, 4));
        }
        codes16 = _mm512_cvtepi8_epi16(codes);
        alignas(16) uint8_t scales_mins[16]; // sc[0..7], then m[0..7]
        _mm_store_si128(reinterpret_cast<__m128i*>(scales_mins), unpack_k4_scales(blk.scales));
        scale = scale_to_f32(blk.d) * float(scales_mins[j]);
        offset = -scale_to_f32(blk.dmin) * float(scales_mins[8 + j]);
    }
};
// A block of 32 codes (16-bit lanes) times the scales of its two sub-blocks of 16: `first` for
// codes 0-15, `second` for 16-31 (q2_K, q3_K and q6_K put their sub-block scales in the codes).
inline __m512i times_sub_block_scales(__m512i codes16, int first, int second) {
    const __m512i scales = _mm512_mask_blend_epi16(__mmask32(0xffff0000u), _mm512_set1_epi16(short(first)),
                                                   _mm512_set1_epi16(short(second)));
    return _mm512_mullo_epi16(codes16, scales);
}

// q6_K: six-bit codes minus 32 in sub-blocks of 16 with signed 8-bit scales. A block of 32
// spans two sub-blocks, so their scales go into the codes (at most 32 * 128 = 4096 in
// magnitude) and the block's scale is d; with 16-bit columns the i32 sums could then
// overflow, so q6_K's columns are rounded to 14 bits, one scale per 64 values (at most
// 64 * 4096 * 8191 < 2^31; column_scale_blocks).
// Element 32u + l of a 256-block (u < 8, half h = u / 4, quarter t = u % 4): low bits from
// ql[64h + 32 (t % 2) + l], nibble t / 2; high bits from qh[32h + l], bits 2t and 2t + 1.
struct Q6_KUnits {
    static constexpr bool kOffset = false;
    static constexpr int kU8Bias = -1; // codes with the sub-block scales in them: 16 bits
    static constexpr bool kInt8Codes = false;
    static constexpr int kColumnMax = 8191;
    static constexpr int kCodeMax = 4096;
    static constexpr int kColumnScaleBlocks = 2;
    static void unit(const char* row, int64_t b, __m512i& codes16, float& scale, float& offset) {
        const block_q6_K& blk = reinterpret_cast<const block_q6_K*>(row)[b / 8];
        const int u = int(b % 8), h = u / 4, t = u % 4;
        const __m256i low = _mm256_and_si256(
            _mm256_srl_epi16(load256(blk.ql + 64 * h + 32 * (t % 2)), _mm_cvtsi32_si128(4 * (t / 2))),
            _mm256_set1_epi8(0x0f));
        const __m256i high = _mm256_and_si256(
            _mm256_srl_epi16(load256(blk.qh + 32 * h), _mm_cvtsi32_si128(2 * t)), _mm256_set1_epi8(0x03));
        const __m256i codes =
            _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), _mm256_set1_epi8(32));
        const int k = 8 * h + 2 * t; // the scales of elements 0-15 and 16-31
        codes16 = times_sub_block_scales(_mm512_cvtepi8_epi16(codes), blk.scales[k], blk.scales[k + 1]);
        scale = scale_to_f32(blk.d);
        offset = 0.0f;
    }
};

// q2_K: two-bit codes in sub-blocks of 16, each with a 4-bit scale and a 4-bit min (x = d sc q -
// dmin m). As for q3_K, a block of 32 spans two sub-blocks, so their scales go into the codes
// (0 .. 3 * 15 = 45: bytes as they are; a column takes one scale per 256 values, see
// column_scale_blocks) and the block's scale is d. Its two mins are more than
// the one offset per block of the tile can carry: int_gemm_q2_K subtracts them after the GEMM.
// Element 32u + l of a 256-block (half h = u / 4, g = u % 4): bits 2g, 2g + 1 of qs[32h + l].
struct Q2_KUnits {
    static constexpr bool kOffset = false;
    static constexpr int kU8Bias = 0;
    static constexpr bool kInt8Codes = true; // 0 .. 45
    static constexpr int kColumnMax = 32767;
    static constexpr int kCodeMax = 45;
    static constexpr int kColumnScaleBlocks = 8;
    static void unit(const char* row, int64_t b, __m512i& codes16, float& scale, float& offset) {
        const block_q2_K& blk = reinterpret_cast<const block_q2_K*>(row)[b / 8];
        const int u = int(b % 8), h = u / 4, g = u % 4;
        const __m256i codes = _mm256_and_si256(
            _mm256_srl_epi16(load256(blk.qs + 32 * h), _mm_cvtsi32_si128(2 * g)), _mm256_set1_epi8(0x03));
        codes16 = times_sub_block_scales(_mm512_cvtepu8_epi16(codes), blk.scales[2 * u] & 15,
                                         blk.scales[2 * u + 1] & 15);
        scale = scale_to_f32(blk.d);
        offset = 0.0f;
    }
};

// q3_K: three-bit codes (two bits in qs, the third in hmask, minus 4) in sub-blocks of 16 with
// signed 6-bit scales (sc - 32); as q6_K, a block of 32 spans two sub-blocks, so their scales
// go into the codes and the block's scale is d. Those products lie in -124 .. 128 (-4 * 31 and
// -4 * -32): 16-bit columns keep the i32 sums of a whole 256-block exact (so a column takes one
// scale per 256 values, column_scale_blocks), and plus 124 they are bytes.
// Element 32u + l of a 256-block (half h = u / 4, group g = u % 4): bits 2g of qs[32h + l], bit
// 4h + g of hmask[l].
struct Q3_KUnits {
    static constexpr bool kOffset = false;
    static constexpr int kU8Bias = 124;
    static constexpr bool kInt8Codes = false; // -124 .. 128
    static constexpr int kColumnMax = 32767;
    static constexpr int kCodeMax = 128;
    static constexpr int kColumnScaleBlocks = 8;
    static void unit(const char* row, int64_t b, __m512i& codes16, float& scale, float& offset) {
        const block_q3_K& blk = reinterpret_cast<const block_q3_K*>(row)[b / 8];
        const int u = int(b % 8), h = u / 4, g = u % 4;
        const __m256i low = _mm256_and_si256(
            _mm256_srl_epi16(load256(blk.qs + 32 * h), _mm_cvtsi32_si128(2 * g)), _mm256_set1_epi8(0x03));
        const __m256i high = _mm256_and_si256(
            _mm256_srl_epi16(load256(blk.hmask), _mm_cvtsi32_si128(4 * h + g)), _mm256_set1_epi8(0x01));
        const __m256i codes =
            _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 2)), _mm256_set1_epi8(4));
        // the 6-bit scales of sub-blocks 2u and 2u + 1 (layout at block_q3_K), minus 32
        auto scale_of = [&](int j) {
            const int low4 = j < 8 ? blk.scales[j] & 15 : blk.scales[j - 8] >> 4;
            return (low4 | ((blk.scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4) - 32;
        };
        codes16 = times_sub_block_scales(_mm512_cvtepi8_epi16(codes), scale_of(2 * u), scale_of(2 * u + 1));
        scale = scale_to_f32(blk.d);
        offset = 0.0f;
    }
};
// iq4_nl, iq4_xs: the signed levels of the 4-bit indices as codes (at most 127), the block's
// scale (iq4_xs: d times its sub-block's sc - 32; a block of 32 is one sub-block).
struct IQ4_NLUnits {
    static constexpr bool kOffset = false;
    static constexpr int kU8Bias = 128;
    static constexpr bool kInt8Codes = true; // levels -127 .. 113
    static constexpr int kColumnMax = 32767;
    static void unit(const char* row, int64_t b, __m512i& codes16, float& scale, float& offset) {
        const block_iq4_nl& blk = reinterpret_cast<const block_iq4_nl*>(row)[b];
        codes16 = _mm512_cvtepi8_epi16(iq4_levels_32(blk.qs));
        scale = scale_to_f32(blk.d);
        offset = 0.0f;
    }
};
struct IQ4_XSUnits {
    static constexpr bool kOffset = false;
    static constexpr int kU8Bias = 128;
    static constexpr bool kInt8Codes = true;
    static constexpr int kColumnMax = 32767;
    static void unit(const char* row, int64_t b, __m512i& codes16, float& scale, float& offset) {
        const block_iq4_xs& blk = reinterpret_cast<const block_iq4_xs*>(row)[b / 8];
        const int j = int(b % 8);
        const int sc = ((blk.scales_l[j / 2] >> (4 * (j % 2))) & 0x0f) | ((blk.scales_h >> (2 * j)) & 3) << 4;
        codes16 = _mm512_cvtepi8_epi16(iq4_levels_32(blk.qs + 16 * j));
        scale = scale_to_f32(blk.d) * float(sc - 32);
        offset = 0.0f;
    }
};

// A column of b (K values at x) rounded to integers of at most max_level in magnitude (32767: 16
// bits) with one scale per `block` values (32 times column_scale_blocks): the integers at
// q, the scales at d and the blocks' sums (scale times the sum of the rounded values, for the
// weight offsets) at sum, K / block of each.
void round_column_i16(const float* x, int64_t K, int max_level, int block, int16_t* q, float* d, float* sum) {
    for (int64_t i = 0; i < K / block; ++i) {
        const float* xb = x + block * i;
        int16_t* qb = q + block * i;
        const float di = abs_max(xb, block) / float(max_level), inv = di != 0.0f ? 1.0f / di : 0.0f;
        const __m512 vinv = _mm512_set1_ps(inv);
        int32_t total = 0;
        for (int h = 0; h < block / 16; ++h) {
            // Zero-masked conversions, as in tile_times_columns (GCC 12's warning).
            const __m512i v = _mm512_maskz_cvtps_epi32(__mmask16(0xffff),
                                                       _mm512_mul_ps(_mm512_loadu_ps(xb + 16 * h), vinv));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 16 * h),
                                _mm512_maskz_cvtsepi32_epi16(__mmask16(0xffff), v));
        }
        for (int k = 0; k < block; ++k) total += qb[k];
        d[i] = di;
        sum[i] = di * float(total);
    }
}

// How many blocks of 32 of a 16-bit column share one scale: one, unless the format's weight scale
// is its 256-block's (q2_K, q3_K and q6_K, whose sub-block scales are in the codes); then as many
// as keep a lane's i32 sum over their products exact (kCodeMax * kColumnMax * 32 * S < 2^31):
// eight for q2_K and q3_K, whose codes are small, two for q6_K (4096 * 8191 * 64 < 2^31). The
// column is rounded per 32 S values, and the tile's sums are converted and scaled once per S
// blocks instead of once per block: that conversion, scale and FMA cost about a fifth of the
// instructions of a block's 16 vpdpwssd. The rounding step becomes that of the largest value of
// 32 S instead of 32.
template <class Units> constexpr int column_scale_blocks() {
    if constexpr (requires { Units::kColumnScaleBlocks; }) {
        static_assert(int64_t(Units::kCodeMax) * Units::kColumnMax * 32 * Units::kColumnScaleBlocks <
                          (int64_t(1) << 31),
                      "the i32 sums of a column scale's products could overflow");
        return Units::kColumnScaleBlocks;
    } else {
        return 1;
    }
}

// The two column widths. Either way a weight row's block of 32 becomes kGroups groups of 4
// bytes, group p of row r in lane r of the tile's vector p, and a column's matching 4 bytes,
// broadcast, meet all 16 rows in one instruction.
//  * Columns16: codes as 16-bit values (group p: codes 2p, 2p + 1), columns rounded to 16 bits
//    (round_column_i16), vpdpwssd.
//  * Columns8: codes plus the format's kU8Bias as unsigned bytes (group p: codes 4p .. 4p + 3),
//    columns rounded to 8 bits (quantize_column, as decoding does), vpdpbusd: twice the
//    multiply-adds per instruction. The bias times the scale joins the block's offset, which
//    meets the column block's sum, so every format with a bias has an offset here.
struct Columns16 {
    using Value = int16_t;
    static constexpr int kGroups = 16;
    template <class Units> static constexpr bool kOffset = Units::kOffset;
    template <class Units> static constexpr int kScaleBlocks = column_scale_blocks<Units>();
    static __m512i madd(__m512i acc, __m512i codes, __m512i column) {
        return _mm512_dpwssd_epi32(acc, codes, column);
    }
    template <class Units>
    static void row_codes(const char* row, int64_t b, uint8_t* bytes, float& scale, float& offset) {
        __m512i codes16;
        Units::unit(row, b, codes16, scale, offset);
        _mm512_storeu_si512(bytes, codes16);
    }
    template <class Units>
    static void round_column(const float* x, int64_t K, Value* q, float* d, float* sum) {
        round_column_i16(x, K, Units::kColumnMax, 32 * kScaleBlocks<Units>, q, d, sum);
    }
};
struct Columns8 {
    using Value = int8_t;
    static constexpr int kGroups = 8;
    template <class Units> static constexpr bool kOffset = Units::kOffset || Units::kU8Bias != 0;
    template <class Units> static constexpr int kScaleBlocks = 1;
    static __m512i madd(__m512i acc, __m512i codes, __m512i column) {
        return _mm512_dpbusd_epi32(acc, codes, column);
    }
    template <class Units>
    static void row_codes(const char* row, int64_t b, uint8_t* bytes, float& scale, float& offset) {
        static_assert(Units::kU8Bias >= 0, "the format's codes do not fit bytes");
        __m512i codes16;
        Units::unit(row, b, codes16, scale, offset);
        // codes + bias lie in 0 .. 255, so keeping the low byte of each is exact
        const __m512i biased = _mm512_add_epi16(codes16, _mm512_set1_epi16(short(Units::kU8Bias)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(bytes),
                            _mm512_maskz_cvtepi16_epi8(__mmask32(0xffffffffu), biased));
        offset -= float(Units::kU8Bias) * scale;
    }
    template <class Units>
    static void round_column(const float* x, int64_t K, Value* q, float* d, float* sum) {
        quantize_column(x, K, {q, d, sum});
    }
};

// One block of 32 of a tile's 16 rows.
template <class Columns> struct alignas(64) TileBlock {
    __m512i groups[Columns::kGroups]; // group p of row r in lane r
    __m512 d;                         // row scales
    __m512 offset;                    // row offsets (the value of code 0), where there are any
};

// Rows m0 .. m0 + rows - 1 of one weight matrix, all nb blocks of 32, as TileBlocks; lanes
// of missing rows are zero.
template <class Units, class Columns>
void unpack_tile(const char* a_mat, size_t row_bytes, int64_t m0, int rows, int64_t nb,
                 TileBlock<Columns>* out) {
    constexpr int G = Columns::kGroups;
    alignas(64) uint32_t groups[G][kTileRows];
    alignas(64) float d[kTileRows], offset[kTileRows];
    for (int64_t b = 0; b < nb; ++b) {
        for (int r = 0; r < kTileRows; ++r) {
            alignas(64) uint8_t bytes[4 * G] = {};
            float dr = 0.0f, off = 0.0f;
            if (r < rows)
                Columns::template row_codes<Units>(a_mat + size_t(m0 + r) * row_bytes, b, bytes, dr, off);
            for (int p = 0; p < G; ++p) std::memcpy(&groups[p][r], bytes + 4 * p, sizeof(uint32_t));
            d[r] = dr;
            offset[r] = off;
        }
        for (int p = 0; p < G; ++p) out[b].groups[p] = _mm512_load_si512(groups[p]);
        out[b].d = _mm512_load_ps(d);
        out[b].offset = _mm512_load_ps(offset);
    }
}

// Outputs of the tile's rows for NC columns: column j's values at xq + j * K, its scales (one per
// S blocks of 32) at xd + j * nb / S and block sums at xs + j * nb / S, its outputs at c + j * ldc.
// Rows whose blocks share a scale over S blocks (column_scale_blocks) sum them in i32 first.
template <int NC, class Columns, bool kOffset, int S>
void tile_times_columns(const TileBlock<Columns>* tile, int64_t nb, int64_t K,
                        const typename Columns::Value* xq, const float* xd, const float* xs, float* c,
                        int64_t ldc, __mmask16 rows) {
    static_assert(S == 1 || !kOffset, "per-block weight offsets need per-block column sums");
    constexpr int kPerGroup = 4 / int(sizeof(typename Columns::Value)); // column values per group
    const int64_t ns = nb / S;
    __m512 acc[NC];
    for (int j = 0; j < NC; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < ns; ++s) {
        __m512i sums[NC];
        for (int j = 0; j < NC; ++j) sums[j] = _mm512_setzero_si512();
        // Unrolled (pragmas): left rolled, GCC 12 copied every column's sum to another register
        // and back around each multiply-add.
        for (int64_t b = S * s; b < S * s + S; ++b)
#pragma GCC unroll 16
            for (int p = 0; p < Columns::kGroups; ++p)
#pragma GCC unroll 8
                for (int j = 0; j < NC; ++j) {
                    int32_t group;
                    std::memcpy(&group, xq + j * K + 32 * b + kPerGroup * p, sizeof group);
                    sums[j] = Columns::madd(sums[j], tile[b].groups[p], _mm512_set1_epi32(group));
                }
        const TileBlock<Columns>& t = tile[S * s]; // the S blocks' rows share scales
        for (int j = 0; j < NC; ++j) {
            const __m512 scale = _mm512_mul_ps(t.d, _mm512_set1_ps(xd[j * ns + s]));
            // The zero-masked form of the conversion: GCC 12 warns about the plain one's
            // undefined pass-through operand.
            acc[j] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(__mmask16(0xffff), sums[j]), scale, acc[j]);
            if constexpr (kOffset) acc[j] = _mm512_fmadd_ps(t.offset, _mm512_set1_ps(xs[j * ns + s]), acc[j]);
        }
    }
    for (int j = 0; j < NC; ++j) _mm512_mask_storeu_ps(c + j * ldc, rows, acc[j]);
}

// tile_times_columns for 1 .. kTileCols columns.
template <class Columns, bool kOffset, int S, int... NC>
constexpr auto tile_kernels(std::integer_sequence<int, NC...>) {
    using Fn = void (*)(const TileBlock<Columns>*, int64_t, int64_t, const typename Columns::Value*,
                        const float*, const float*, float*, int64_t, __mmask16);
    return std::array<Fn, sizeof...(NC)>{tile_times_columns<NC + 1, Columns, kOffset, S>...};
}

// Whether mul_mat(a, b) -> dst has the layout the integer GEMM reads: packed weight rows, f32
// columns with packed elements, f32 dst with packed columns.
bool int_gemm_layout(const Tensor* a, const Tensor* b, const Tensor* dst) {
    return a->nb[0] == type_traits(a->type).type_size && b->type == Type::F32 && b->nb[0] == sizeof(float) &&
           dst->nb[0] == sizeof(float) && a->ne[0] % 32 == 0;
}

template <class Units, class Columns>
void int_gemm(const ComputeCtx& ctx, const Tensor* a, const Tensor* b, Tensor* dst) {
    constexpr int S = Columns::template kScaleBlocks<Units>;
    static constexpr auto kernels = tile_kernels<Columns, Columns::template kOffset<Units>, S>(
        std::make_integer_sequence<int, kTileCols>{});
    // (S > 1 only for the formats of 256-blocks, so nb is a multiple of S.)
    const int64_t K = a->ne[0], M = a->ne[1], N = b->ne[1], nb = K / 32, ns = nb / S;
    const int64_t r2 = b->ne[2] / a->ne[2], r3 = b->ne[3] / a->ne[3];
    const int64_t tiles = (M + kTileRows - 1) / kTileRows;
    std::vector<typename Columns::Value> qs(size_t(N * K));
    std::vector<float> scales(size_t(2 * N * ns)); // the scales of every column, then the block sums
    for (int64_t i3 = 0; i3 < b->ne[3]; ++i3)
        for (int64_t i2 = 0; i2 < b->ne[2]; ++i2) {
            ctx.pool.run([&](int ith, int nth) {
                const auto [begin, end] = split_range(N, ith, nth);
                for (int64_t n = begin; n < end; ++n)
                    Columns::template round_column<Units>(
                        reinterpret_cast<const float*>(element_ptr(b, 0, n, i2, i3)), K, qs.data() + n * K,
                        scales.data() + n * ns, scales.data() + (N + n) * ns);
            });
            const char* a_mat = element_ptr(a, 0, 0, i2 / r2, i3 / r3);
            ctx.pool.run([&](int ith, int nth) {
                std::vector<TileBlock<Columns>> tile(static_cast<size_t>(nb));
                const auto [begin, end] = split_range(tiles, ith, nth);
                for (int64_t t = begin; t < end; ++t) {
                    const int64_t m0 = t * kTileRows;
                    const int rows = int(std::min<int64_t>(kTileRows, M - m0));
                    unpack_tile<Units>(a_mat, a->nb[1], m0, rows, nb, tile.data());
                    const __mmask16 mask = __mmask16((1u << rows) - 1);
                    for (int64_t n0 = 0; n0 < N; n0 += kTileCols) {
                        const int nc = int(std::min<int64_t>(kTileCols, N - n0));
                        kernels[size_t(nc - 1)](tile.data(), nb, K, qs.data() + n0 * K,
                                                scales.data() + n0 * ns, scales.data() + (N + n0) * ns,
                                                f32_row(dst, n0, i2, i3) + m0,
                                                int64_t(dst->nb[1] / sizeof(float)), mask);
                    }
                }
            });
        }
}

#if GFA_AMX_GEMM
// ---- quantized prompts on AMX tiles ------------------------------------------------------------
//
// CPUs with AMX (Intel since Sapphire Rapids) have eight tile registers of up to 16 rows of 64
// bytes and a unit that multiplies two byte tiles into a tile of 16 x 16 i32 sums (TDPB*D: A of
// 16 rows x 4G bytes times B of G rows x 16 groups of 4 bytes, added into C). One such
// instruction does the 16 x 16 x 32 multiply-adds of a block of 32 for sixteen weight rows and
// sixteen columns, which the vector path spends 32 vpdpwssd on, so with AMX the 16-bit GEMM's
// cost moves to its per-block epilogue.
//
// The arithmetic is the 16-bit path's exactly. The tile of weights is the 8-bit layout
// (TileBlock<ColumnsAmx>: group p of row r in lane r is B's row p) with the codes as signed
// bytes where they fit (kInt8Codes), else as the unsigned bytes code + kU8Bias (q3_K; q6_K's
// codes, with its sub-block scales in them, fit neither and keep the vector path). AMX
// multiplies bytes only, so a 16-bit column value v is held as a signed high byte and an
// unsigned low byte (v = 256 hi + lo) in two A tiles of 16 columns x 32 bytes; per block one
// tile product forms codes x hi and another codes x lo, and 256 times the first plus the
// second (minus the bias times the column block's sum, for biased codes) is the i32 sum the
// vector path forms, bit for bit (i32 arithmetic wraps, and the true sum fits). The epilogue
// (conversion, the product of the two scales, the offset) is the vector path's too, so the
// outputs are the same bits either way. 8-bit columns (MatMulPrecision::Q8) take one byte and
// one tile product a block, with Columns8's layout and epilogue. Columns are taken sixteen at a
// time; the columns past the last are zeros whose sums are not stored.

// Tiles of one pass: the weights' block, the columns' high and low bytes (8-bit columns: high
// only), their i32 sums in two sets. (Macros: the tile intrinsics paste the register number
// into their assembly.)
#define GFA_AMX_CODES 0
#define GFA_AMX_HIGH 1
#define GFA_AMX_LOW 2
#define GFA_AMX_HIGH_SUMS 3
#define GFA_AMX_LOW_SUMS 4
#define GFA_AMX_HIGH_SUMS_NEXT 5
#define GFA_AMX_LOW_SUMS_NEXT 6
constexpr int kAmxCols = 16;
constexpr int64_t kAmxGroupBytes = kAmxCols * 32; // a column group's bytes of one block of 32

// The tile intrinsics are assembly statements that do not tell the compiler which memory they
// read or write: a compiler barrier before tile loads of data written in C++, and after tile
// stores read back in C++, keeps those accesses in order.
inline void amx_memory_barrier() {
    asm volatile("" ::: "memory");
}

// Linux gives a thread the tile registers' state only after the process asks for it
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); asked once. GFA_CPU_AMX=0 keeps the
// vector path (read on every call, for comparing the two).
bool amx_gemm_enabled() {
    static const bool usable = [] {
        if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) return false;
        constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    }();
    const char* env = std::getenv("GFA_CPU_AMX");
    return usable && !(env && std::string(env) == "0");
}

// The tile shapes of a pass (palette 1), loaded by each worker before its first tile product.
struct alignas(64) AmxConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
};
void configure_amx_tiles() {
    AmxConfig c;
    c.bytes_per_row[GFA_AMX_CODES] = 64, c.rows[GFA_AMX_CODES] = 8; // 8 groups of 4 codes x 16 weight rows
    for (int t : {GFA_AMX_HIGH, GFA_AMX_LOW}) c.bytes_per_row[t] = 32, c.rows[t] = kAmxCols;
    for (int t : {GFA_AMX_HIGH_SUMS, GFA_AMX_LOW_SUMS, GFA_AMX_HIGH_SUMS_NEXT, GFA_AMX_LOW_SUMS_NEXT})
        c.bytes_per_row[t] = 64, c.rows[t] = kAmxCols;
    _tile_loadconfig(&c);
}

// Whether a format's codes go to the tiles, and whether as unsigned bytes biased by kU8Bias.
template <class Units> constexpr bool amx_codes() {
    return Units::kInt8Codes || Units::kU8Bias >= 0;
}
template <class Units> constexpr bool amx_biased_codes() {
    return !Units::kInt8Codes;
}

// The weight tile as bytes: codes 4p .. 4p + 3 of row r in lane r of group p.
struct ColumnsAmx {
    static constexpr int kGroups = 8;
    template <class Units>
    static void row_codes(const char* row, int64_t b, uint8_t* bytes, float& scale, float& offset) {
        static_assert(amx_codes<Units>(), "the format's codes do not fit bytes");
        __m512i codes16;
        Units::unit(row, b, codes16, scale, offset);
        if constexpr (amx_biased_codes<Units>())
            codes16 = _mm512_add_epi16(codes16, _mm512_set1_epi16(short(Units::kU8Bias)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(bytes),
                            _mm512_maskz_cvtepi16_epi8(__mmask32(0xffffffffu), codes16));
    }
};

// How one product runs on the tiles: a column value as two bytes (16-bit columns) or one (8-bit
// columns, MatMulPrecision::Q8), codes as signed or unsigned bytes, the bias taken off the i32
// sums (q3_K with 16-bit columns; the 8-bit columns' bias is in the weight offsets, as in
// Columns8), S blocks of 32 a column scale, and whether the rows have offsets.
struct AmxPlan {
    bool two_bytes;
    bool unsigned_codes;
    int bias;
    int S;
    bool offset;
};

// The i32 sums of one column group and S blocks of 32 starting at block b0, stored as 16
// columns x 16 rows (high bytes' sums, then low bytes'). Set 0 and 1 use different sum tiles,
// so the tile unit can work on the next blocks while the vector unit scales these.
template <AmxPlan P, int kSet, class Codes>
void amx_block_sums(const TileBlock<Codes>* tile, int64_t b0, const int8_t* high, const uint8_t* low,
                    int32_t (*sums)[kAmxCols][16]) {
    if constexpr (kSet == 0) {
        _tile_zero(GFA_AMX_HIGH_SUMS);
        if constexpr (P.two_bytes) _tile_zero(GFA_AMX_LOW_SUMS);
    } else {
        _tile_zero(GFA_AMX_HIGH_SUMS_NEXT);
        if constexpr (P.two_bytes) _tile_zero(GFA_AMX_LOW_SUMS_NEXT);
    }
    for (int64_t b = b0; b < b0 + P.S; ++b) {
        _tile_loadd(GFA_AMX_CODES, tile[b].groups, 64);
        _tile_loadd(GFA_AMX_HIGH, high + kAmxGroupBytes * b, 32);
        if constexpr (P.two_bytes) _tile_loadd(GFA_AMX_LOW, low + kAmxGroupBytes * b, 32);
        // (high) column bytes signed, low bytes unsigned; codes signed or unsigned
        if constexpr (kSet == 0 && !P.unsigned_codes) {
            _tile_dpbssd(GFA_AMX_HIGH_SUMS, GFA_AMX_HIGH, GFA_AMX_CODES);
            if constexpr (P.two_bytes) _tile_dpbusd(GFA_AMX_LOW_SUMS, GFA_AMX_LOW, GFA_AMX_CODES);
        } else if constexpr (kSet == 0) {
            _tile_dpbsud(GFA_AMX_HIGH_SUMS, GFA_AMX_HIGH, GFA_AMX_CODES);
            if constexpr (P.two_bytes) _tile_dpbuud(GFA_AMX_LOW_SUMS, GFA_AMX_LOW, GFA_AMX_CODES);
        } else if constexpr (!P.unsigned_codes) {
            _tile_dpbssd(GFA_AMX_HIGH_SUMS_NEXT, GFA_AMX_HIGH, GFA_AMX_CODES);
            if constexpr (P.two_bytes) _tile_dpbusd(GFA_AMX_LOW_SUMS_NEXT, GFA_AMX_LOW, GFA_AMX_CODES);
        } else {
            _tile_dpbsud(GFA_AMX_HIGH_SUMS_NEXT, GFA_AMX_HIGH, GFA_AMX_CODES);
            if constexpr (P.two_bytes) _tile_dpbuud(GFA_AMX_LOW_SUMS_NEXT, GFA_AMX_LOW, GFA_AMX_CODES);
        }
    }
    if constexpr (kSet == 0) {
        _tile_stored(GFA_AMX_HIGH_SUMS, sums[0], 64);
        if constexpr (P.two_bytes) _tile_stored(GFA_AMX_LOW_SUMS, sums[1], 64);
    } else {
        _tile_stored(GFA_AMX_HIGH_SUMS_NEXT, sums[0], 64);
        if constexpr (P.two_bytes) _tile_stored(GFA_AMX_LOW_SUMS_NEXT, sums[1], 64);
    }
    amx_memory_barrier();
}

// Outputs of the tile's rows for the 16 columns of one group (those past nc not stored): the
// group's high and low bytes at high / low (kAmxGroupBytes a block; 8-bit columns: their bytes
// at high), its columns' scales and block sums as tile_times_columns reads them; with a bias,
// the sums of the columns' integers per S blocks at qsum (ns a column). The sums of the next S
// blocks are asked of the tile unit before this S blocks' are scaled.
template <AmxPlan P, class Codes>
void tile_times_columns_amx(const TileBlock<Codes>* tile, int64_t nb, const int8_t* high, const uint8_t* low,
                            const float* xd, const float* xs, const int32_t* qsum, float* c, int64_t ldc,
                            int nc, __mmask16 rows) {
    const int64_t ns = nb / P.S;
    alignas(64) int32_t sums[2][2][kAmxCols][16]; // [set][high, low][column][row]
    __m512 acc[kAmxCols];
    for (auto& a : acc) a = _mm512_setzero_ps();
    amx_memory_barrier();
    amx_block_sums<P, 0>(tile, 0, high, low, sums[0]);
    for (int64_t s = 0; s < ns; ++s) {
        if (s + 1 < ns) {
            if (s % 2 == 0)
                amx_block_sums<P, 1>(tile, P.S * (s + 1), high, low, sums[1]);
            else
                amx_block_sums<P, 0>(tile, P.S * (s + 1), high, low, sums[0]);
        }
        const int32_t(*set)[kAmxCols][16] = sums[s % 2];
        const TileBlock<Codes>& t = tile[P.S * s];
#pragma GCC unroll 16
        for (int j = 0; j < kAmxCols; ++j) {
            __m512i sum = _mm512_load_si512(set[0][j]);
            if constexpr (P.two_bytes)
                sum = _mm512_add_epi32(_mm512_maskz_slli_epi32(__mmask16(0xffff), sum, 8),
                                       _mm512_load_si512(set[1][j]));
            if constexpr (P.bias != 0)
                sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(P.bias * qsum[j * ns + s]));
            const __m512 scale = _mm512_mul_ps(t.d, _mm512_set1_ps(xd[j * ns + s]));
            acc[j] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(__mmask16(0xffff), sum), scale, acc[j]);
            if constexpr (P.offset)
                acc[j] = _mm512_fmadd_ps(t.offset, _mm512_set1_ps(xs[j * ns + s]), acc[j]);
        }
        amx_memory_barrier();
    }
    for (int j = 0; j < nc; ++j) _mm512_mask_storeu_ps(c + j * ldc, rows, acc[j]);
}

// int_gemm<Units, Columns16> (kEightBit: Columns8) on AMX tiles: the same column rounding, then
// each column's values split into high and low bytes (8-bit columns: their bytes as they are)
// in groups of 16 columns, the column count padded with zero columns to a multiple of 16.
template <class Units, bool kEightBit>
void int_gemm_amx(const ComputeCtx& ctx, const Tensor* a, const Tensor* b, Tensor* dst) {
    using Codes = std::conditional_t<kEightBit, Columns8, ColumnsAmx>;
    constexpr AmxPlan P =
        kEightBit ? AmxPlan{false, true, 0, 1, Columns8::kOffset<Units>}
                  : AmxPlan{true, amx_biased_codes<Units>(), amx_biased_codes<Units>() ? Units::kU8Bias : 0,
                            column_scale_blocks<Units>(), Units::kOffset};
    const int64_t K = a->ne[0], M = a->ne[1], N = b->ne[1], nb = K / 32, ns = nb / P.S;
    const int64_t padded = (N + kAmxCols - 1) / kAmxCols * kAmxCols;
    const int64_t r2 = b->ne[2] / a->ne[2], r3 = b->ne[3] / a->ne[3];
    const int64_t tiles = (M + kTileRows - 1) / kTileRows;
    std::vector<int8_t> high(size_t(padded * K));
    std::vector<uint8_t> low(P.two_bytes ? size_t(padded * K) : 0);
    std::vector<float> scales(size_t(2 * padded * ns), 0.0f); // every column's scales, then block sums
    std::vector<int32_t> qsums(size_t(padded * ns), 0); // with a bias: their integers' sums per S blocks
    for (int64_t i3 = 0; i3 < b->ne[3]; ++i3)
        for (int64_t i2 = 0; i2 < b->ne[2]; ++i2) {
            ctx.pool.run([&](int ith, int nth) {
                std::vector<int16_t> q16(P.two_bytes ? size_t(K) : 0);
                std::vector<int8_t> q8(P.two_bytes ? 0 : size_t(K));
                const auto [begin, end] = split_range(N, ith, nth);
                for (int64_t n = begin; n < end; ++n) {
                    const float* x = reinterpret_cast<const float*>(element_ptr(b, 0, n, i2, i3));
                    float* d = scales.data() + n * ns;
                    float* sum = scales.data() + (padded + n) * ns;
                    if constexpr (P.two_bytes)
                        round_column_i16(x, K, Units::kColumnMax, 32 * P.S, q16.data(), d, sum);
                    else
                        Columns8::round_column<Units>(x, K, q8.data(), d, sum);
                    std::fill_n(qsums.begin() + n * ns, ns, 0);
                    // Group n / 16, block k / 32: 16 columns x 32 bytes, column n % 16's row.
                    const int64_t at = n / kAmxCols * K * kAmxCols + n % kAmxCols * 32;
                    for (int64_t blk = 0; blk < nb; ++blk) {
                        const size_t i = size_t(at + blk * kAmxGroupBytes);
                        if constexpr (P.two_bytes) {
                            // v = 256 high + low: high the arithmetic shift, low in 0 .. 255
                            const __m512i v = _mm512_loadu_si512(q16.data() + 32 * blk);
                            const __mmask32 all = __mmask32(0xffffffffu);
                            _mm256_storeu_si256(
                                reinterpret_cast<__m256i*>(high.data() + i),
                                _mm512_maskz_cvtepi16_epi8(all, _mm512_maskz_srai_epi16(all, v, 8)));
                            _mm256_storeu_si256(reinterpret_cast<__m256i*>(low.data() + i),
                                                _mm512_maskz_cvtepi16_epi8(all, v));
                            if constexpr (P.bias != 0) {
                                int32_t total = 0;
                                for (int k = 0; k < 32; ++k) total += q16[size_t(32 * blk + k)];
                                qsums[size_t(n * ns + blk / P.S)] += total;
                            }
                        } else {
                            std::memcpy(high.data() + i, q8.data() + 32 * blk, 32);
                        }
                    }
                }
            });
            const char* a_mat = element_ptr(a, 0, 0, i2 / r2, i3 / r3);
            ctx.pool.run([&](int ith, int nth) {
                std::vector<TileBlock<Codes>> tile(static_cast<size_t>(nb));
                const auto [begin, end] = split_range(tiles, ith, nth);
                if (begin < end) configure_amx_tiles();
                for (int64_t t = begin; t < end; ++t) {
                    const int64_t m0 = t * kTileRows;
                    const int rows = int(std::min<int64_t>(kTileRows, M - m0));
                    unpack_tile<Units>(a_mat, a->nb[1], m0, rows, nb, tile.data());
                    const __mmask16 mask = __mmask16((1u << rows) - 1);
                    for (int64_t n0 = 0; n0 < N; n0 += kAmxCols)
                        tile_times_columns_amx<P>(tile.data(), nb, high.data() + n0 * K,
                                                  P.two_bytes ? low.data() + n0 * K : nullptr,
                                                  scales.data() + n0 * ns, scales.data() + (padded + n0) * ns,
                                                  qsums.data() + n0 * ns, f32_row(dst, n0, i2, i3) + m0,
                                                  int64_t(dst->nb[1] / sizeof(float)),
                                                  int(std::min<int64_t>(kAmxCols, N - n0)), mask);
                }
                if (begin < end) _tile_release();
            });
        }
}
#endif

// Whether a product's columns may be rounded to 8 bits: its node allows it (set_matmul_precision).
bool eight_bit_columns(const Tensor* product) {
    return matmul_precision(product) >= MatMulPrecision::Q8;
}

// The integer GEMM on AMX tiles where the build, the CPU and GFA_CPU_AMX allow it and the
// format's codes fit bytes; false where the caller's vector path must run instead.
template <class Units, bool kEightBit>
bool amx_int_gemm(const ComputeCtx& ctx, const Tensor* a, const Tensor* b, Tensor* dst) {
#if GFA_AMX_GEMM
    if constexpr (kEightBit ? Units::kU8Bias >= 0 : amx_codes<Units>())
        if (amx_gemm_enabled()) {
            int_gemm_amx<Units, kEightBit>(ctx, a, b, dst);
            return true;
        }
#endif
    (void)ctx, (void)a, (void)b, (void)dst;
    return false;
}
template <class Units>
bool amx_int_gemm(const ComputeCtx& ctx, const Tensor* a, const Tensor* b, Tensor* dst, bool eight_bit) {
    return eight_bit ? amx_int_gemm<Units, true>(ctx, a, b, dst) : amx_int_gemm<Units, false>(ctx, a, b, dst);
}

template <class Units>
void int_gemm_for_units(const ComputeCtx& ctx, const Tensor* a, const Tensor* b, Tensor* dst) {
    if constexpr (Units::kU8Bias >= 0)
        if (eight_bit_columns(dst)) {
            if (!amx_int_gemm<Units, true>(ctx, a, b, dst)) int_gemm<Units, Columns8>(ctx, a, b, dst);
            return;
        }
    if (amx_int_gemm<Units, false>(ctx, a, b, dst)) return;
    int_gemm<Units, Columns16>(ctx, a, b, dst);
}

// The mins of a q2_K product, after the GEMM of its scaled codes: dst(r, n) -= sum_j dmin m_j
// S_n(j), with m_j the min of sub-block j of row r, dmin its 256-block's, and S_n(j) the sum of
// column n's values 16j .. 16j + 15 as the GEMM saw them: in f32, or, where the GEMM rounded the
// column to 8 bits (eight_bit), of the rounded values, so that the product is the weights' with
// that one column. Sixteen rows at a time: one vector per sub-block holds their sixteen dmin
// m_j, and each column's sums meet it broadcast, K / 16 FMAs per column for sixteen outputs: an
// eighth of the instructions of the GEMM itself.
void subtract_q2_K_mins(const ComputeCtx& ctx, const Tensor* a, const Tensor* b, Tensor* dst,
                        bool eight_bit) {
    const int64_t K = a->ne[0], M = a->ne[1], N = b->ne[1], J = K / 16;
    const int64_t r2 = b->ne[2] / a->ne[2], r3 = b->ne[3] / a->ne[3];
    const int64_t tiles = (M + kTileRows - 1) / kTileRows;
    std::vector<float> sums(size_t(N * J));
    for (int64_t i3 = 0; i3 < b->ne[3]; ++i3)
        for (int64_t i2 = 0; i2 < b->ne[2]; ++i2) {
            ctx.pool.run([&](int ith, int nth) {
                const auto [begin, end] = split_range(N, ith, nth);
                std::vector<int8_t> qs(eight_bit ? size_t(K) : 0);
                std::vector<float> d(eight_bit ? size_t(K / 32) : 0), block_sums(d.size());
                for (int64_t n = begin; n < end; ++n) {
                    const float* x = reinterpret_cast<const float*>(element_ptr(b, 0, n, i2, i3));
                    if (!eight_bit) {
                        for (int64_t j = 0; j < J; ++j)
                            sums[size_t(n * J + j)] = hsum(
                                _mm256_add_ps(_mm256_loadu_ps(x + 16 * j), _mm256_loadu_ps(x + 16 * j + 8)));
                        continue;
                    }
                    quantize_column(x, K, {qs.data(), d.data(), block_sums.data()});
                    for (int64_t j = 0; j < J; ++j) {
                        int32_t total = 0;
                        for (int64_t k = 16 * j; k < 16 * j + 16; ++k) total += qs[size_t(k)];
                        sums[size_t(n * J + j)] = d[size_t(j / 2)] * float(total);
                    }
                }
            });
            const char* a_mat = element_ptr(a, 0, 0, i2 / r2, i3 / r3);
            ctx.pool.run([&](int ith, int nth) {
                std::vector<float> mins(size_t(kTileRows * J)); // sub-block j: the 16 rows' dmin m_j
                const auto [begin, end] = split_range(tiles, ith, nth);
                for (int64_t t = begin; t < end; ++t) {
                    const int64_t m0 = t * kTileRows;
                    const int rows = int(std::min<int64_t>(kTileRows, M - m0));
                    for (int r = 0; r < kTileRows; ++r) {
                        const block_q2_K* w =
                            r < rows ? reinterpret_cast<const block_q2_K*>(a_mat + (m0 + r) * a->nb[1])
                                     : nullptr;
                        for (int64_t j = 0; j < J; ++j)
                            mins[size_t(j * kTileRows + r)] =
                                w ? scale_to_f32(w[j / 16].dmin) * float(w[j / 16].scales[j % 16] >> 4)
                                  : 0.0f;
                    }
                    const __mmask16 mask = __mmask16((1u << rows) - 1);
                    // Eight columns at a time (eight independent chains of FMAs, one load of each
                    // sub-block vector), the last few one at a time.
                    auto subtract = [&](int64_t n, __m512 acc) {
                        float* out = f32_row(dst, n, i2, i3) + m0;
                        _mm512_mask_storeu_ps(out, mask,
                                              _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, out), acc));
                    };
                    int64_t n0 = 0;
                    for (; n0 + kTileCols <= N; n0 += kTileCols) {
                        __m512 acc[kTileCols];
                        for (int c = 0; c < kTileCols; ++c) acc[c] = _mm512_setzero_ps();
                        for (int64_t k = 0; k < J; ++k) {
                            const __m512 m = _mm512_loadu_ps(mins.data() + k * kTileRows);
                            for (int c = 0; c < kTileCols; ++c)
                                acc[c] = _mm512_fmadd_ps(m, _mm512_set1_ps(sums[size_t((n0 + c) * J + k)]),
                                                         acc[c]);
                        }
                        for (int c = 0; c < kTileCols; ++c) subtract(n0 + c, acc[c]);
                    }
                    for (; n0 < N; ++n0) {
                        __m512 acc = _mm512_setzero_ps();
                        for (int64_t k = 0; k < J; ++k)
                            acc = _mm512_fmadd_ps(_mm512_loadu_ps(mins.data() + k * kTileRows),
                                                  _mm512_set1_ps(sums[size_t(n0 * J + k)]), acc);
                        subtract(n0, acc);
                    }
                }
            });
        }
}

void int_gemm_q2_K(const ComputeCtx& ctx, const Tensor* a, const Tensor* b, Tensor* dst) {
    const bool eight_bit = eight_bit_columns(dst);
    if (!amx_int_gemm<Q2_KUnits>(ctx, a, b, dst, eight_bit)) {
        if (eight_bit)
            int_gemm<Q2_KUnits, Columns8>(ctx, a, b, dst);
        else
            int_gemm<Q2_KUnits, Columns16>(ctx, a, b, dst);
    }
    subtract_q2_K_mins(ctx, a, b, dst, eight_bit);
}

using IntGemmFn = void (*)(const ComputeCtx&, const Tensor*, const Tensor*, Tensor*);
// The integer GEMM for a weight type, or null.
IntGemmFn int_gemm_for(Type t) {
    switch (t) {
    case Type::Q4_0:
        return int_gemm_for_units<Q4_0Units>;
    case Type::Q8_0:
        return int_gemm_for_units<Q8_0Units>;
    case Type::Q4_1:
        return int_gemm_for_units<Blocks32Units<Q4_1Codes>>;
    case Type::Q5_0:
        return int_gemm_for_units<Blocks32Units<Q5_0Codes>>;
    case Type::Q5_1:
        return int_gemm_for_units<Blocks32Units<Q5_1Codes>>;
    case Type::Q4_K:
        return int_gemm_for_units<K4Units<false>>;
    case Type::Q5_K:
        return int_gemm_for_units<K4Units<true>>;
    case Type::Q6_K:
        return int_gemm_for_units<Q6_KUnits>;
    case Type::Q2_K:
        return int_gemm_q2_K;
    case Type::Q3_K:
        return int_gemm_for_units<Q3_KUnits>;
    case Type::IQ4_NL:
        return int_gemm_for_units<IQ4_NLUnits>;
    case Type::IQ4_XS:
        return int_gemm_for_units<IQ4_XSUnits>;
    default:
        return nullptr;
    }
}
#endif

using DotFn = float (*)(const void* row, const float* x, int64_t K);
DotFn dot_for(Type t) {
    switch (t) {
    case Type::F32:
        return dot_f32;
    case Type::Q8_0:
        return dot_q8_0;
    case Type::Q4_0:
        return dot_q4_0;
    default:
        return nullptr; // any other type: the row is converted to f32 first
    }
}

// Dot product of a quantized weight row with a column prepared by quantize_column (a
// Column32) or quantize_column_k (ColumnBlockK array).
using IntDotFn = float (*)(const void* row, const void* column, int64_t K);
struct IntDot {
    IntDotFn fn = nullptr;
    bool k_column = false; // the column is ColumnBlockK[], else Column32
};
IntDot int_dot_for(Type t) {
#if GFA_INT_DOTS
    switch (t) {
    case Type::Q8_0:
        return {dot_q8_0_int, false};
    case Type::Q4_0:
        return {dot_q32_int<Q4_0Codes>, false};
    case Type::Q4_1:
        return {dot_q32_int<Q4_1Codes>, false};
    case Type::Q5_0:
        return {dot_q32_int<Q5_0Codes>, false};
    case Type::Q5_1:
        return {dot_q32_int<Q5_1Codes>, false};
#if GFA_INT_GEMM
    case Type::Q4_K:
        return {dot_k4_int512<false>, true};
    case Type::Q5_K:
        return {dot_k4_int512<true>, true};
#else
    case Type::Q4_K:
        return {dot_k4_int<false>, true};
    case Type::Q5_K:
        return {dot_k4_int<true>, true};
#endif
    case Type::Q6_K:
        return {dot_q6_K_int, true};
    case Type::Q2_K:
        return {dot_q2_K_int, true};
    case Type::Q3_K:
        return {dot_q3_K_int, true};
    case Type::IQ4_NL:
        return {dot_iq4_nl_int, false};
    case Type::IQ4_XS:
        return {dot_iq4_xs_int, true};
    default:
        break;
    }
#endif
    (void)t;
    return {};
}

// mul_mat for a few columns of b: workers split the weight rows of each matrix.
void gemv(const ComputeCtx& ctx, const Tensor* a, const Tensor* b, Tensor* dst) {
    const int64_t K = a->ne[0], M = a->ne[1], N = b->ne[1];
    const int64_t r2 = b->ne[2] / a->ne[2], r3 = b->ne[3] / a->ne[3];
    const TypeTraits& ta = type_traits(a->type);
    const bool packed_a = a->nb[0] == ta.type_size;
    const DotFn dot = packed_a ? dot_for(a->type) : nullptr;
    const DotRowsFn dot_several = packed_a ? dot_rows_for(a->type) : nullptr;
    const IntDot int_dot_entry = packed_a ? int_dot_for(a->type) : IntDot{};
    const IntDotFn int_dot = int_dot_entry.fn;
    const bool packed_b = b->nb[0] == sizeof(float);
    // 16-bit weights meet the columns rounded to f16 (dot_half_column).
    using HalfColumnDot = float (*)(const void* row, const uint16_t* x, int64_t K);
    const HalfColumnDot half_dot = !packed_a               ? nullptr
                                   : a->type == Type::F16  ? dot_half_column<Type::F16>
                                   : a->type == Type::BF16 ? dot_half_column<Type::BF16>
                                                           : nullptr;
    const bool half_columns = half_dot != nullptr;
    ctx.pool.run([&](int ith, int nth) {
        std::vector<float> columns, row;
        std::vector<uint16_t> half(half_columns ? size_t(N * K) : 0);
        std::vector<float> half_scaled(half_columns ? size_t(K) : 0);
        float half_unscale[kGemvMaxN] = {};
        if (!packed_b) columns.resize(size_t(N * K));
        if (!dot) row.resize(size_t(K));
#if GFA_INT_DOTS
        const bool column32 = int_dot && !int_dot_entry.k_column;
        std::vector<int8_t> column32_qs(column32 ? size_t(N * K) : 0);
        std::vector<float> column32_scales(column32 ? size_t(2 * N * K / 32) : 0); // d, then sum
        Column32 column32_views[kGemvMaxN];
        std::vector<ColumnBlockK> quantized_k(int_dot && int_dot_entry.k_column ? size_t(N * K / QK_K) : 0);
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
                    if (half_columns)
                        half_unscale[n] = half_column(x[n], K, half_scaled.data(), half.data() + n * K);
#if GFA_INT_DOTS
                    if (int_dot && int_dot_entry.k_column) {
                        quantize_column_k(x[n], K, quantized_k.data() + n * (K / QK_K));
                        xq[n] = quantized_k.data() + n * (K / QK_K);
                    } else if (int_dot) {
                        float* scales = column32_scales.data() + 2 * n * (K / 32);
                        column32_views[n] = {column32_qs.data() + n * K, scales, scales + K / 32};
                        quantize_column(x[n], K, column32_views[n]);
                        xq[n] = &column32_views[n];
                    }
#endif
                }
                const auto [m_begin, m_end] = split_range(M, ith, nth);
                int64_t m = m_begin;
                if (half_columns) {
                    for (; m < m_end; ++m) {
                        const char* w = element_ptr(a, 0, m, i2 / r2, i3 / r3);
                        float* out = f32_row(dst, 0, i2, i3) + m;
                        for (int64_t n = 0; n < N; ++n)
                            out[n * M] = half_unscale[n] * half_dot(w, half.data() + n * K, K);
                    }
                } else if (dot_several && N == 1)
                    for (; m + kDotRows <= m_end; m += kDotRows)
                        dot_several(element_ptr(a, 0, m, i2 / r2, i3 / r3), a->nb[1], x[0], K,
                                    f32_row(dst, 0, i2, i3) + m);
                for (; m < m_end; ++m) {
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

// ---- bf16 pair products (MatMulPrecision::BF16) -----------------------------------------------

#if GFA_BF16_PAIRS
// b's columns become bf16 rows of whole pairs (K rounded up to even); each worker then takes
// panels of kPairPanel weight rows, packs them as pairs along k for 16-lane vectors (row m's
// pair p at panel[p][m - m0]) and multiplies every column against them (bf16::gemm, columns of
// b as the broadcast operand), through a panel of C that is copied into dst.
constexpr int64_t kPairPanel = 16 * bf16::kNV;

bool pair_gemm_applies(const Tensor* a, const Tensor* dst) {
    return matmul_precision(dst) >= MatMulPrecision::BF16 &&
           (a->type == Type::F32 || a->type == Type::F16 || a->type == Type::BF16) &&
           a->nb[0] == a->element_size() && dst->is_contiguous();
}

// n f32 values to bf16 (round to nearest even), any n.
void round_to_bf16(const float* x, uint16_t* out, int64_t n) {
    const int64_t n16 = n / 16 * 16;
    bf16::to_bf16(x, out, n16);
    for (int64_t i = n16; i < n; ++i) out[i] = fp32_to_bf16(x[i]);
}

// The columns of b rounded to bf16, as rows of row_len values (K, then zeros) at
// out + (batch * stride + n) * row_len.
void columns_as_bf16_rows(const ComputeCtx& ctx, const Tensor* b, int64_t stride, int64_t row_len,
                          uint16_t* out) {
    const int64_t K = b->ne[0], N = b->ne[1], B2 = b->ne[2], batches = B2 * b->ne[3];
    ctx.pool.run([&](int ith, int nth) {
        std::vector<float> x(static_cast<size_t>(K));
        const auto [begin, end] = split_range(batches * N, ith, nth);
        for (int64_t r = begin; r < end; ++r) {
            const int64_t n = r % N, bi = r / N;
            const char* col = static_cast<const char*>(b->data) + size_t(n) * b->nb[1] +
                              size_t(bi % B2) * b->nb[2] + size_t(bi / B2) * b->nb[3];
            for (int64_t k = 0; k < K; ++k)
                x[size_t(k)] = *reinterpret_cast<const float*>(col + size_t(k) * b->nb[0]);
            uint16_t* row = out + (bi * stride + n) * row_len;
            round_to_bf16(x.data(), row, K);
            std::fill(row + K, row + row_len, uint16_t(0));
        }
    });
}

// Item `item` of a pair GEMM's (batch, panel) items: batch bi of b's batches, weight rows m0 ..
// m0 + rows - 1 of the matrix that batch meets.
struct PairPanel {
    int64_t bi, m0, rows;
};

// Packs item `item` (panels of `width` weight rows) as bf16 pairs along k: row m's pair p at
// packed[p * width + m - m0], P pairs a row (past K zeros), rows past the matrix zero. row (K
// floats) and row16 (2P values) are scratch.
PairPanel pack_weight_pairs(const Tensor* a, const Tensor* b, int64_t item, int64_t width, int64_t P,
                            std::vector<float>& row, std::vector<uint16_t>& row16, uint32_t* packed) {
    const int64_t K = a->ne[0], M = a->ne[1], B2 = b->ne[2], panels = (M + width - 1) / width;
    const int64_t bi = item / panels, m0 = item % panels * width, rows = std::min(width, M - m0);
    const int64_t i2 = bi % B2, i3 = bi / B2, r2 = B2 / a->ne[2], r3 = b->ne[3] / a->ne[3];
    const char* a_mat =
        static_cast<const char*>(a->data) + size_t(i2 / r2) * a->nb[2] + size_t(i3 / r3) * a->nb[3];
    if (rows < width) std::fill(packed, packed + P * width, 0u);
    std::fill(row16.begin() + K, row16.end(), uint16_t(0));
    for (int64_t j = 0; j < rows; ++j) {
        const char* src = a_mat + size_t(m0 + j) * a->nb[1];
        if (a->type == Type::BF16) {
            std::memcpy(row16.data(), src, size_t(K) * 2);
        } else {
            type_traits(a->type).to_float(src, row.data(), K);
            round_to_bf16(row.data(), row16.data(), K);
        }
        for (int64_t p = 0; p < P; ++p)
            packed[size_t(p * width + j)] =
                uint32_t(row16[size_t(2 * p)]) | uint32_t(row16[size_t(2 * p + 1)]) << 16;
    }
    return {bi, m0, rows};
}

void pair_gemm(const ComputeCtx& ctx, const Tensor* a, const Tensor* b, Tensor* dst) {
    const int64_t K = a->ne[0], M = a->ne[1], N = b->ne[1], B2 = b->ne[2], B3 = b->ne[3];
    const int64_t K2 = K + K % 2, P = K2 / 2, batches = B2 * B3;
    // 1. the columns of b, as bf16 rows [batch][n][K2]
    std::vector<uint16_t> cols(static_cast<size_t>(batches * N * K2));
    columns_as_bf16_rows(ctx, b, N, K2, cols.data());
    // 2. panels of weight rows, shared out as (batch, panel) items
    const int64_t panels = (M + kPairPanel - 1) / kPairPanel;
    ctx.pool.run([&](int ith, int nth) {
        std::vector<uint32_t> packed(static_cast<size_t>(P * kPairPanel));
        std::vector<float> row(static_cast<size_t>(K)), c(static_cast<size_t>(N * kPairPanel));
        std::vector<uint16_t> row16(static_cast<size_t>(K2));
        const auto [begin, end] = split_range(batches * panels, ith, nth);
        for (int64_t item = begin; item < end; ++item) {
            const auto [bi, m0, rows] =
                pack_weight_pairs(a, b, item, kPairPanel, P, row, row16, packed.data());
            const int64_t width = (rows + 15) / 16 * 16;
            bf16::gemm(N, width, P, reinterpret_cast<const uint32_t*>(cols.data() + bi * N * K2), P, 1,
                       packed.data(), kPairPanel, c.data(), kPairPanel, nullptr, false);
            float* out = static_cast<float*>(dst->data) + size_t(bi * N) * size_t(M) + m0;
            for (int64_t n = 0; n < N; ++n)
                std::memcpy(out + n * M, c.data() + n * kPairPanel, size_t(rows) * sizeof(float));
        }
    });
}
#endif

#if GFA_AMX_GEMM && GFA_BF16_PAIRS && defined(__AMX_BF16__)
#define GFA_AMX_BF16 1
// pair_gemm on AMX tiles: one TDPBF16PS multiplies 16 columns x 32 bf16 values by 16 weight rows
// in pairs and adds the f32 products into a 16 x 16 tile, which keeps its sums over all of K, so
// the tiles need no vector work but the final copy. Tiles: two of columns (32 columns), two of
// weight pairs (32 rows), four of sums; for each 32 values of K, four loads and four products.
// The operands are pair_gemm's (both rounded to bf16, f32 sums), K padded with zeros to 32.
// Tiles: columns n0 .. n0 + 15 and n0 + 16 .. n0 + 31; weight rows m0 .. m0 + 15 and m0 + 16
// .. m0 + 31; the sums of [column half][row half].
#define GFA_AMX_BF_COLS_0 0
#define GFA_AMX_BF_COLS_1 1
#define GFA_AMX_BF_ROWS_0 2
#define GFA_AMX_BF_ROWS_1 3
#define GFA_AMX_BF_SUMS_00 4
#define GFA_AMX_BF_SUMS_01 5
#define GFA_AMX_BF_SUMS_10 6
#define GFA_AMX_BF_SUMS_11 7
constexpr int64_t kAmxPanel = 32; // weight rows (and columns) a pass

bool amx_bf16_enabled() {
    static const bool usable = __builtin_cpu_supports("amx-bf16");
    return usable && amx_gemm_enabled();
}

void configure_amx_bf16_tiles() {
    AmxConfig c;
    for (int t = 0; t < 8; ++t) c.bytes_per_row[t] = 64, c.rows[t] = 16;
    _tile_loadconfig(&c);
}

void pair_gemm_amx(const ComputeCtx& ctx, const Tensor* a, const Tensor* b, Tensor* dst) {
    const int64_t K = a->ne[0], M = a->ne[1], N = b->ne[1], B2 = b->ne[2], B3 = b->ne[3];
    const int64_t K32 = (K + 31) / 32 * 32, P = K32 / 2, batches = B2 * B3;
    const int64_t padded = (N + kAmxPanel - 1) / kAmxPanel * kAmxPanel;
    // 1. the columns of b as bf16 rows [batch][padded][K32]: an A tile's rows
    std::vector<uint16_t> cols(static_cast<size_t>(batches * padded * K32), 0);
    columns_as_bf16_rows(ctx, b, padded, K32, cols.data());
    // 2. panels of 32 weight rows as pairs along k (row m's pair p at panel[p][m - m0]: the rows
    // of two B tiles), shared out as (batch, panel) items
    const int64_t panels = (M + kAmxPanel - 1) / kAmxPanel;
    ctx.pool.run([&](int ith, int nth) {
        const auto [begin, end] = split_range(batches * panels, ith, nth);
        if (begin >= end) return;
        std::vector<uint32_t> packed(static_cast<size_t>(P * kAmxPanel));
        std::vector<float> row(static_cast<size_t>(K));
        std::vector<uint16_t> row16(static_cast<size_t>(K32), 0);
        alignas(64) float sums[kAmxPanel][kAmxPanel]; // [column][row]
        configure_amx_bf16_tiles();
        for (int64_t item = begin; item < end; ++item) {
            const auto [bi, m0, rows] =
                pack_weight_pairs(a, b, item, kAmxPanel, P, row, row16, packed.data());
            float* out = static_cast<float*>(dst->data) + size_t(bi * N) * size_t(M) + m0;
            amx_memory_barrier();
            for (int64_t n0 = 0; n0 < N; n0 += kAmxPanel) {
                const uint16_t* c0 = cols.data() + (bi * padded + n0) * K32;
                _tile_zero(GFA_AMX_BF_SUMS_00);
                _tile_zero(GFA_AMX_BF_SUMS_01);
                _tile_zero(GFA_AMX_BF_SUMS_10);
                _tile_zero(GFA_AMX_BF_SUMS_11);
                for (int64_t k0 = 0; k0 < K32; k0 += 32) {
                    const uint32_t* pairs = packed.data() + k0 / 2 * kAmxPanel;
                    _tile_loadd(GFA_AMX_BF_COLS_0, c0 + k0, K32 * 2);
                    _tile_loadd(GFA_AMX_BF_COLS_1, c0 + 16 * K32 + k0, K32 * 2);
                    _tile_loadd(GFA_AMX_BF_ROWS_0, pairs, kAmxPanel * 4);
                    _tile_loadd(GFA_AMX_BF_ROWS_1, pairs + 16, kAmxPanel * 4);
                    _tile_dpbf16ps(GFA_AMX_BF_SUMS_00, GFA_AMX_BF_COLS_0, GFA_AMX_BF_ROWS_0);
                    _tile_dpbf16ps(GFA_AMX_BF_SUMS_01, GFA_AMX_BF_COLS_0, GFA_AMX_BF_ROWS_1);
                    _tile_dpbf16ps(GFA_AMX_BF_SUMS_10, GFA_AMX_BF_COLS_1, GFA_AMX_BF_ROWS_0);
                    _tile_dpbf16ps(GFA_AMX_BF_SUMS_11, GFA_AMX_BF_COLS_1, GFA_AMX_BF_ROWS_1);
                }
                _tile_stored(GFA_AMX_BF_SUMS_00, &sums[0][0], kAmxPanel * 4);
                _tile_stored(GFA_AMX_BF_SUMS_01, &sums[0][16], kAmxPanel * 4);
                _tile_stored(GFA_AMX_BF_SUMS_10, &sums[16][0], kAmxPanel * 4);
                _tile_stored(GFA_AMX_BF_SUMS_11, &sums[16][16], kAmxPanel * 4);
                amx_memory_barrier();
                for (int64_t n = n0; n < std::min(N, n0 + kAmxPanel); ++n)
                    std::memcpy(out + n * M, sums[n - n0], size_t(rows) * sizeof(float));
            }
        }
        _tile_release();
    });
}
#else
#define GFA_AMX_BF16 0
#endif

void run_mul_mat(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *a = dst->src[0], *b = dst->src[1];
    if (b->ne[1] < kGemvMaxN) {
        gemv(ctx, a, b, dst);
        return;
    }
#if GFA_BF16_PAIRS
    if (pair_gemm_applies(a, dst)) {
#if GFA_AMX_BF16
        if (amx_bf16_enabled()) return pair_gemm_amx(ctx, a, b, dst);
#endif
        pair_gemm(ctx, a, b, dst);
        return;
    }
#endif
#if GFA_INT_GEMM
    if (const IntGemmFn integer = int_gemm_for(a->type); integer && int_gemm_layout(a, b, dst)) {
        integer(ctx, a, b, dst);
        return;
    }
#endif
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

// mul_mat_id: each expert's (slot, token) columns are gathered into one packed matrix and
// multiplied by that expert's weights as a mul_mat (a prompt's experts get the GEMMs, a
// decoded token's the dot products), then scattered to their places in dst.
void run_mul_mat_id(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *as = dst->src[0], *b = dst->src[1], *ids = dst->src[2];
    const int64_t K = as->ne[0], M = as->ne[1], E = as->ne[2], k = ids->ne[0], T = ids->ne[1];
    std::vector<std::vector<std::pair<int64_t, int64_t>>> columns(
        static_cast<size_t>(E)); // (slot, token) per expert
    for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < k; ++i) {
            const int32_t e = *reinterpret_cast<const int32_t*>(element_ptr(ids, i, t, 0, 0));
            if (e < 0 || e >= E)
                fail("mul_mat_id: expert " + std::to_string(e) + " of token " + std::to_string(t) +
                     " is outside [0, " + std::to_string(E) + ")");
            columns[size_t(e)].push_back({i, t});
        }
    std::vector<float> gathered, product;
    for (int64_t e = 0; e < E; ++e) {
        const auto& cols = columns[size_t(e)];
        const int64_t n = int64_t(cols.size());
        if (n == 0) continue;
        gathered.resize(size_t(n * K));
        product.resize(size_t(n * M));
        for (int64_t j = 0; j < n; ++j) {
            const auto [i, t] = cols[size_t(j)];
            const char* src = element_ptr(b, 0, b->ne[1] == 1 ? 0 : i, t, 0);
            for (int64_t kk = 0; kk < K; ++kk)
                gathered[size_t(j * K + kk)] = *reinterpret_cast<const float*>(src + kk * b->nb[0]);
        }
        Context scratch; // tensors over the memory above and the expert's matrix, no data of their own
        Tensor* weights = scratch.new_tensor(as->type, {K, M});
        weights->data = static_cast<char*>(as->data) + size_t(e) * as->nb[2];
        weights->nb[1] = as->nb[1];
        weights->nb[2] = weights->nb[3] = as->nb[1] * size_t(M);
        Tensor* columns_e = scratch.new_tensor(Type::F32, {K, n});
        columns_e->data = gathered.data();
        Tensor* out = mul_mat(scratch, weights, columns_e);
        out->data = product.data();
        set_matmul_precision(out, matmul_precision(dst));
        run_mul_mat(ctx, out);
        for (int64_t j = 0; j < n; ++j) {
            const auto [i, t] = cols[size_t(j)];
            std::memcpy(element_ptr(dst, 0, i, t, 0), product.data() + j * M, size_t(M) * sizeof(float));
        }
    }
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

bool supports_mul_mat_id(const Tensor* dst) {
    const Tensor *as = dst->src[0], *b = dst->src[1], *ids = dst->src[2];
    const TypeTraits& ta = type_traits(as->type);
    return ta.to_float && b->type == Type::F32 && ids->type == Type::I32 && writes_packed_f32(dst) &&
           (ta.block_size == 1 || as->nb[0] == ta.type_size);
}

bool supports_out_prod(const Tensor* dst) {
    const Tensor *a = dst->src[0], *b = dst->src[1];
    return a->type == Type::F32 && b->type == Type::F32 && writes_packed_f32(dst);
}

} // namespace

bool bf16_pair_products() {
#if GFA_BF16_PAIRS
    return true;
#else
    return false;
#endif
}

bool integer_quantized_prompts() {
    return GFA_INT_GEMM != 0;
}

bool amx_quantized_prompts() {
#if GFA_AMX_GEMM
    return amx_gemm_enabled();
#else
    return false;
#endif
}

void register_matmul_kernels(KernelTable& t) {
    t[size_t(Op::MulMat)] = {run_mul_mat, supports_mul_mat};
    t[size_t(Op::MulMatId)] = {run_mul_mat_id, supports_mul_mat_id};
    t[size_t(Op::OutProd)] = {run_out_prod, supports_out_prod};
}

} // namespace gfa::cpu
