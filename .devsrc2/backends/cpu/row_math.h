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
#include <cstdint>
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

// max_i x[i] (-inf for an empty row).
inline float max_f32(const float* x, int64_t n) {
    float lane[kLanes];
    std::fill(lane, lane + kLanes, -std::numeric_limits<float>::infinity());
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int l = 0; l < kLanes; ++l) lane[l] = x[i + l] > lane[l] ? x[i + l] : lane[l];
    float m = -std::numeric_limits<float>::infinity();
    for (; i < n; ++i) m = x[i] > m ? x[i] : m;
    for (float v : lane) m = v > m ? v : m;
    return m;
}

} // namespace gfa::cpu
