#include <catch2/catch.hpp>

#include <ggml-fa/error.h>
#include <ggml-fa/types.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using namespace gfa;

TEST_CASE("fp16 round trip matches IEEE half rounding", "[types]") {
    // Every half value survives half -> float -> half unchanged (NaNs stay NaN).
    for (uint32_t h = 0; h < 0x10000; ++h) {
        const float f = fp16_to_fp32(uint16_t(h));
        if (std::isnan(f)) {
            REQUIRE(std::isnan(fp16_to_fp32(fp32_to_fp16(f))));
            continue;
        }
        REQUIRE(fp32_to_fp16(f) == h);
    }
    CHECK(fp32_to_fp16(65520.0f) == 0x7c00);                     // rounds to inf
    CHECK(fp32_to_fp16(65519.0f) == 0x7bff);                     // largest finite
    CHECK(fp16_to_fp32(0x0001) == std::ldexp(1.0f, -24));        // smallest subnormal
    CHECK(fp32_to_fp16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00); // tie to even
}

TEST_CASE("bf16 rounds to nearest even", "[types]") {
    CHECK(fp32_to_bf16(1.0f) == 0x3f80);
    CHECK(bf16_to_fp32(fp32_to_bf16(3.140625f)) == 3.140625f);
    CHECK(std::isnan(bf16_to_fp32(fp32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST_CASE("f16 and bf16 rows convert exactly, every value, at every offset", "[types]") {
    // Rows are converted 8 values at a time where the CPU allows, the rest one by one: every
    // 16-bit pattern must come out as the scalar conversion gives it, whichever path it
    // takes (the row starts at offsets 0..8, so each value meets both paths).
    std::vector<uint16_t> all(0x10000 + 8);
    for (size_t i = 0; i < all.size(); ++i) all[i] = uint16_t(i);
    for (const Type t : {Type::F16, Type::BF16}) {
        INFO(type_name(t));
        for (size_t start = 0; start <= 8; ++start) {
            const size_t n = 0x10000 - start % 5; // odd lengths leave a tail
            std::vector<float> out(n, 12345.0f);
            type_traits(t).to_float(all.data() + start, out.data(), int64_t(n));
            for (size_t i = 0; i < n; ++i) {
                const uint16_t h = all[start + i];
                const float want = t == Type::F16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
                if (std::isnan(want)) {
                    REQUIRE(std::isnan(out[i]));
                    continue;
                }
                REQUIRE(std::memcmp(&out[i], &want, sizeof(float)) == 0);
            }
        }
    }
}

TEST_CASE("q8_0 and q4_0 round trips stay within one quantization step", "[types]") {
    std::mt19937 rng(std::random_device{}());
    std::normal_distribution<float> dist(0.0f, 2.0f);
    for (Type t : {Type::Q8_0, Type::Q4_0}) {
        const TypeTraits& tt = type_traits(t);
        const int64_t n = 32 * 37;
        std::vector<float> x(n), y(n, std::numeric_limits<float>::quiet_NaN());
        for (float& v : x) v = dist(rng);
        std::vector<uint8_t> q(row_size(t, n));
        tt.from_float(x.data(), q.data(), n);
        tt.to_float(q.data(), y.data(), n);
        for (int64_t b = 0; b < n / 32; ++b) {
            float amax = 0;
            for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
            // q8_0 rounds to the nearest of 255 levels; q4_0 clamps the side opposite the
            // largest magnitude at 7 steps, so it can be off by one whole step there.
            const float bound = t == Type::Q8_0 ? 0.51f * amax / 127.0f : 1.01f * amax / 8.0f;
            for (int j = 0; j < 32; ++j)
                REQUIRE(std::fabs(x[b * 32 + j] - y[b * 32 + j]) <= bound + 1e-3f * amax);
        }
    }
    CHECK(row_size(Type::Q8_0, 64) == 68);
    CHECK_THROWS_AS(row_size(Type::Q4_0, 33), Error);
    CHECK_THROWS_AS(type_traits(Type(999)), Error);
}
