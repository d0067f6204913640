// The rule of sample_token (ggml-fa/ops.h), written once for the reference and the CPU kernel;
// the uniform draw is shared with the device kernels too.
#pragma once

#include <ggml-fa/ops.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#if defined(__CUDACC__)
#define GFA_HOST_DEVICE __host__ __device__
#else
#define GFA_HOST_DEVICE
#endif

namespace gfa::sample_rule {

// SplitMix64's finalizer: every input bit reaches every output bit.
GFA_HOST_DEVICE inline uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// The draw for the logits at `position`: 53 random bits as a double in [0, 1).
GFA_HOST_DEVICE inline double sample_uniform(uint64_t seed, int64_t position) {
    return double(mix64(seed ^ mix64(uint64_t(position))) >> 11) * 0x1.0p-53;
}

#if !defined(__CUDA_ARCH__)
// The token drawn from one column of logits (values in double; NaN ranks as -inf). The
// device kernels repeat these steps in the same order and precision.
inline int64_t pick(const std::vector<double>& logits, const SampleParams& p, int64_t position) {
    const int64_t n = int64_t(logits.size());
    const int64_t k = p.top_k == 0 ? n : std::min<int64_t>(p.top_k, n);
    auto value = [&](int64_t i) { return std::isnan(logits[size_t(i)]) ? -INFINITY : logits[size_t(i)]; };
    std::vector<int64_t> ids(static_cast<size_t>(n));
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int64_t a, int64_t b) {
        return value(a) > value(b) || (value(a) == value(b) && a < b);
    });
    const double top = value(ids[0]);
    if (!(top > -INFINITY)) return ids[0]; // nothing has weight
    std::vector<double> w(static_cast<size_t>(k));
    double total = 0.0;
    for (int64_t i = 0; i < k; ++i) {
        const double v = value(ids[size_t(i)]);
        total += w[size_t(i)] = v > -INFINITY ? std::exp((v - top) / double(p.temperature)) : 0.0;
    }
    int64_t run = k;
    double share = 0.0, mass = 0.0;
    for (int64_t i = 0; i < k; ++i) {
        share += w[size_t(i)] / total;
        mass += w[size_t(i)];
        if (share >= double(p.top_p)) {
            run = i + 1;
            break;
        }
    }
    const double target = sample_uniform(p.seed, position) * mass;
    double sum = 0.0;
    for (int64_t i = 0; i < run; ++i) {
        sum += w[size_t(i)];
        if (sum > target) return ids[size_t(i)];
    }
    return ids[size_t(run - 1)];
}
#endif

} // namespace gfa::sample_rule
