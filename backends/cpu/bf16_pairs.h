// Products of bf16 pairs on AVX512-BF16. vdpbf16ps adds, in each of 16 f32 lanes, the two
// products of a pair of bf16 values from each operand: a 32-bit word per lane holds the pair,
// the even element in the low half. That is 32 multiplies per instruction against 16 for an
// f32 FMA of the same width, at f32 accumulation.
//
// The products below take A as 32-bit words (one pair each) read with any row and pair
// stride, broadcast one at a time, and B as rows of 16 NV packed pairs: C[m][n] += sum_p
// A(m, p) . B(p, n), the dot product of the two pairs. Operands are packed by pack_pairs:
// two f32 rows (the even and the odd element of each pair) into one row of words.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define GFA_BF16_PAIRS 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace gfa::cpu::bf16 {

// dst[i] = (bf16(even[i]), bf16(odd[i])) for i < n (n a multiple of 16); odd null: zeros.
inline void pack_pairs(const float* even, const float* odd, uint32_t* dst, int64_t n) {
    // cvtne2ps puts the second operand's 16 values in the low half and the first's in the
    // high half; the permutation interleaves them into (low, high) pairs.
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 lo = _mm512_loadu_ps(even + i);
        const __m512 hi = odd ? _mm512_loadu_ps(odd + i) : _mm512_setzero_ps();
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(dst + i, _mm512_permutexvar_epi16(interleave, both));
    }
}

// n f32 values to bf16 (round to nearest even); n a multiple of 16.
inline void to_bf16(const float* src, uint16_t* dst, int64_t n) {
    for (int64_t i = 0; i < n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
}

// C[MR][16 NV] (+)= sum_{p < P} A(r, p) . B[p][16 NV], A(r, p) = A[r * a_rs + p * a_cs]. With
// accumulate, C is first multiplied by col_scale (16 NV floats, one per column) if given.
template <int MR, int NV>
void micro_kernel(int64_t P, const uint32_t* A, int64_t a_rs, int64_t a_cs, const uint32_t* B, int64_t ldb,
                  float* C, int64_t ldc, const float* col_scale, bool accumulate) {
    __m512 c[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) {
            c[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
            if (accumulate && col_scale)
                c[r][v] = _mm512_mul_ps(c[r][v], _mm512_loadu_ps(col_scale + 16 * v));
        }
    for (int64_t p = 0; p < P; ++p) {
        __m512bh b[NV];
        for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + p * ldb + 16 * v);
        for (int r = 0; r < MR; ++r) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(int(A[r * a_rs + p * a_cs]));
            for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], a, b[v]);
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

// 8 rows x 48 columns: 24 accumulators, 3 B loads and 8 broadcasts per pair step, within
// the 32 vector registers.
constexpr int kMR = 8, kNV = 3;

using MicroKernel = void (*)(int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, float*,
                             int64_t, const float*, bool);

template <int... R> constexpr auto kernel_rows(std::integer_sequence<int, R...>) {
    struct Table {
        MicroKernel k[kMR][kNV];
    } t{};
    ((t.k[R][0] = micro_kernel<R + 1, 1>, t.k[R][1] = micro_kernel<R + 1, 2>,
      t.k[R][2] = micro_kernel<R + 1, 3>),
     ...);
    return t;
}

// C[M][N] (+)= A . B over P pairs; N a multiple of 16 (buffers are padded to it).
inline void gemm(int64_t M, int64_t N, int64_t P, const uint32_t* A, int64_t a_rs, int64_t a_cs,
                 const uint32_t* B, int64_t ldb, float* C, int64_t ldc, const float* col_scale,
                 bool accumulate) {
    static constexpr auto kernels = kernel_rows(std::make_integer_sequence<int, kMR>{});
    for (int64_t n0 = 0; n0 < N; n0 += 16 * kNV) {
        const int nv = int(std::min<int64_t>(kNV, (N - n0) / 16));
        for (int64_t m0 = 0; m0 < M; m0 += kMR) {
            const int mr = int(std::min<int64_t>(kMR, M - m0));
            kernels.k[mr - 1][nv - 1](P, A + m0 * a_rs, a_rs, a_cs, B + n0, ldb, C + m0 * ldc + n0, ldc,
                                      col_scale ? col_scale + n0 : nullptr, accumulate);
        }
    }
}

} // namespace gfa::cpu::bf16

#endif
