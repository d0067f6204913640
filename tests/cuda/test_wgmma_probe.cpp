// The warpgroup product primitives (backends/cuda/wgmma.cuh) against a double-precision
// product, each operand layout on its own: where the Hopper attention kernel fails, these say
// whether a descriptor or a fragment layout is the cause.
#include <catch2/catch.hpp>

#include "wgmma_probe.h"

#include <ggml-fa/types.h>

#include <cmath>
#include <random>
#include <vector>

using namespace gfa;

namespace {

std::vector<uint16_t> random_f16(size_t n, std::mt19937& rng) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<uint16_t> v(n);
    for (uint16_t& x : v) x = fp32_to_fp16(u(rng));
    return v;
}

// Largest |got - want| over the largest |want|; NaN (an element never written) fails.
double max_error(const std::vector<float>& got, const std::vector<double>& want) {
    double err = 0.0, scale = 0.0;
    for (size_t i = 0; i < want.size(); ++i) {
        if (!std::isfinite(got[i])) return INFINITY;
        err = std::max(err, std::fabs(double(got[i]) - want[i]));
        scale = std::max(scale, std::fabs(want[i]));
    }
    return err / scale;
}

} // namespace

TEST_CASE("wgmma from swizzled shared memory and from registers, every operand layout", "[cuda][hopper]") {
    if (!test::wgmma_probe_available()) {
        WARN("not an sm_90 device or no sm_90a code: nothing to probe");
        return;
    }
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    constexpr int K = 128;
    for (int n : {64, 128}) {
        INFO("n = " << n);
        const std::vector<uint16_t> a = random_f16(size_t(64 * K), rng), bt = random_f16(size_t(n * K), rng),
                                    b = random_f16(size_t(K * n), rng);
        // a b^T with b^T stored [n][K] (K-major, as K in Q K^T)
        std::vector<double> want(size_t(64 * n), 0.0);
        for (int i = 0; i < 64; ++i)
            for (int j = 0; j < n; ++j)
                for (int k = 0; k < K; ++k)
                    want[size_t(i * n + j)] +=
                        double(fp16_to_fp32(a[size_t(i * K + k)])) * fp16_to_fp32(bt[size_t(j * K + k)]);
        CHECK(max_error(test::wgmma_probe_shared(n, a, bt), want) < 1e-5);
        // a b with b stored [K][n] (MN-major, as V in P V), a from registers
        std::fill(want.begin(), want.end(), 0.0);
        for (int i = 0; i < 64; ++i)
            for (int j = 0; j < n; ++j)
                for (int k = 0; k < K; ++k)
                    want[size_t(i * n + j)] +=
                        double(fp16_to_fp32(a[size_t(i * K + k)])) * fp16_to_fp32(b[size_t(k * n + j)]);
        CHECK(max_error(test::wgmma_probe_registers(n, a, b), want) < 1e-5);
        // at^T b with at stored [K][64] and b [K][n] (both MN-major, as dS^T and K in dQ = dS K)
        std::vector<uint16_t> at(size_t(K * 64));
        for (int i = 0; i < 64; ++i)
            for (int k = 0; k < K; ++k) at[size_t(k * 64 + i)] = a[size_t(i * K + k)];
        CHECK(max_error(test::wgmma_probe_transposed(n, at, b), want) < 1e-5);
    }
}
