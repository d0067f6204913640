// Row helpers for the CPU row kernels (norms, softmax, rope, activations, losses): packed
// access to a row of any f32/f16 tensor, and reductions that the compiler can vectorize.
//
// Floating-point reductions are not reordered by the compiler without -ffast-math, so a
// plain `for (...) s += x[i]` runs one element at a time. The reductions below keep
// kLanes independent partial results instead (one SIMD register's worth, or two), which
// vectorizes under the default flags and, in double, is also more accurate.
#pragma once

#include "cpu_kernels.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace gfa::cpu {

inline constexpr int kLanes = 8;

// Row (i1, i2, i3) of t as packed floats: the row itself when dim 0 is packed f32,
// otherwise a converted/gathered copy in `scratch`.
inline const float* packed_row(const Tensor* t, int64_t i1, int64_t i2, int64_t i3,
                               std::vector<float>& scratch) {
    const char* p = element_ptr(t, 0, i1, i2, i3);
    if (t->type == Type::F32 && t->nb[0] == sizeof(float)) return reinterpret_cast<const float*>(p);
    scratch.resize(size_t(t->ne[0]));
    if (t->type == Type::F32) {
        for (int64_t i = 0; i < t->ne[0]; ++i)
            scratch[size_t(i)] = *reinterpret_cast<const float*>(p + i * t->nb[0]);
    } else { // F16 (the only other type the row kernels accept)
        for (int64_t i = 0; i < t->ne[0]; ++i)
            scratch[size_t(i)] = fp16_to_fp32(*reinterpret_cast<const uint16_t*>(p + i * t->nb[0]));
    }
    return scratch.data();
}

// sum_i x[i] in double.
inline double sum_f64(const float* x, int64_t n) {
    double lane[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int l = 0; l < kLanes; ++l) lane[l] += double(x[i + l]);
    double s = 0.0;
    for (; i < n; ++i) s += double(x[i]);
    for (double v : lane) s += v;
    return s;
}

// sum_i (x[i] - c)^2 in double.
inline double sum_sq_dev_f64(const float* x, int64_t n, double c) {
    double lane[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int l = 0; l < kLanes; ++l) {
            const double d = double(x[i + l]) - c;
            lane[l] += d * d;
        }
    double s = 0.0;
    for (; i < n; ++i) s += (double(x[i]) - c) * (double(x[i]) - c);
    for (double v : lane) s += v;
    return s;
}

// sum_i x[i] * y[i] in double.
inline double dot_f64(const float* x, const float* y, int64_t n) {
    double lane[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int l = 0; l < kLanes; ++l) lane[l] += double(x[i + l]) * double(y[i + l]);
    double s = 0.0;
    for (; i < n; ++i) s += double(x[i]) * double(y[i]);
    for (double v : lane) s += v;
    return s;
}

// max_i x[i] (-inf for an empty row; NaN entries are skipped). A max reduction stays scalar
// under the default flags whatever the loop looks like, so this one is written with the
// compiler's generic vector type (GCC and Clang; any target, no intrinsics).
inline float max_f32(const float* x, int64_t n) {
    using f32x8 = float __attribute__((vector_size(8 * sizeof(float))));
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    f32x8 lane = {kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        f32x8 v;
        std::memcpy(&v, x + i, sizeof(v));
        lane = v > lane ? v : lane;
    }
    float m = kNegInf;
    for (; i < n; ++i) m = x[i] > m ? x[i] : m;
    for (int l = 0; l < 8; ++l) m = lane[l] > m ? lane[l] : m;
    return m;
}

// e^x in float for vector loops (libm's expf is a call per element that the compiler cannot
// vectorize under the default flags). Relative error within ~1.5 ulp; overflow gives inf,
// underflow gives subnormals then 0, e^-inf = 0, e^+inf = inf and NaN stays NaN.
//   x = n ln2 + r with |r| <= ln2 / 2  (n by the round-to-nearest magic-number trick, ln2
//   split into a high part exact in float and a low correction), e^r by its degree-7 Taylor
//   polynomial, 2^n as two factors 2^(n/2) 2^(n - n/2) written straight into exponent bits:
//   both stay normal for every n the clamp allows, so the final products overflow to inf
//   or round down to subnormals / 0 by themselves. No float selects (see clamp_bits).
// min(max(x, lo), hi) with NaN passed through, as integer mask arithmetic: under GCC's
// default -ftrapping-math a float select next to other float math keeps a loop scalar
// ("control flow in loop"), while masks vectorize.
inline float clamp_bits(float x, float lo, float hi) {
    const int32_t below = -int32_t(x < lo), above = -int32_t(x > hi);
    return std::bit_cast<float>((std::bit_cast<int32_t>(x) & ~(below | above)) |
                                (std::bit_cast<int32_t>(lo) & below) | (std::bit_cast<int32_t>(hi) & above));
}

inline float vexp(float x) {
    constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693145752f, kLn2Lo = 1.42860677e-6f;
    constexpr float kRound = 12582912.0f; // 1.5 * 2^23: adding it rounds to an integer
    // e^89 overflows float and e^-104 rounds to 0; n stays within [-150, 129].
    const float xc = clamp_bits(x, -104.0f, 89.0f);
    const float shifted = xc * kLog2e + kRound;
    const float n = shifted - kRound;
    const int32_t ni = std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(kRound);
    const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t n_low = ni >> 1, n_high = ni - n_low;
    return p * std::bit_cast<float>((n_low + 127) << 23) * std::bit_cast<float>((n_high + 127) << 23);
}

// 1 / (1 + e^-x), branch-free.
inline float vsigmoid(float x) {
    return 1.0f / (1.0f + vexp(-x));
}

// tanh(x) = 1 - 2 / (e^(2x) + 1): exact limits +-1 at the ends, and near 0 the form
// loses only an ulp or so of absolute accuracy, fine next to the terms it is added to.
inline float vtanh(float x) {
    return 1.0f - 2.0f / (vexp(2.0f * x) + 1.0f);
}

} // namespace gfa::cpu
