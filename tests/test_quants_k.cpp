// The GGUF block formats beyond Q8_0/Q4_0. Bit-exact agreement of the decoders with the
// reference implementation is checked by the interop test (tests/interop); these tests check
// the encoders' error, coverage of every output, and decoding of arbitrary blocks.
#include <catch2/catch.hpp>

#include <ggml-fa/error.h>
#include <ggml-fa/types.h>

#include "quants.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using namespace gfa;

namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();

struct Case {
    Type type;
    double max_rel_rms; // ||x - dequant(quant(x))|| / ||x|| for Gaussian data
};

// Bounds sit about 1.5x above what the encoders reach on Gaussian data (2 bits ~ 0.27, 3 bits
// ~ 0.15, 4 bits ~ 0.07-0.10, 5 bits ~ 0.04-0.05, 6 bits ~ 0.02): loose enough for any seed,
// tight enough that a wrong bit layout or a lost scale fails.
const Case kCases[] = {
    {Type::Q4_1, 0.13}, {Type::Q5_0, 0.07},  {Type::Q5_1, 0.065}, {Type::Q2_K, 0.4},    {Type::Q3_K, 0.22},
    {Type::Q4_K, 0.13}, {Type::Q5_K, 0.065}, {Type::Q6_K, 0.035}, {Type::IQ4_NL, 0.12}, {Type::IQ4_XS, 0.12},
};

double rel_rms(const std::vector<float>& x, const std::vector<float>& y) {
    double num = 0, den = 0;
    for (size_t i = 0; i < x.size(); ++i) {
        num += double(x[i] - y[i]) * double(x[i] - y[i]);
        den += double(x[i]) * double(x[i]);
    }
    return std::sqrt(num / den);
}

} // namespace

TEST_CASE("GGUF block formats have the file layout sizes", "[types][quants]") {
    CHECK(type_traits(Type::Q4_1).type_size == 20);
    CHECK(type_traits(Type::Q5_0).type_size == 22);
    CHECK(type_traits(Type::Q5_1).type_size == 24);
    CHECK(type_traits(Type::Q4_K).type_size == 144);
    CHECK(type_traits(Type::Q5_K).type_size == 176);
    CHECK(type_traits(Type::Q6_K).type_size == 210);
    CHECK(type_traits(Type::Q2_K).type_size == 84);
    CHECK(type_traits(Type::Q3_K).type_size == 110);
    CHECK(type_traits(Type::IQ4_NL).type_size == 18);
    CHECK(type_traits(Type::IQ4_XS).type_size == 136);
    CHECK(type_traits(Type::IQ4_NL).block_size == 32);
    CHECK(type_traits(Type::IQ4_XS).block_size == 256);
    CHECK(type_traits(Type::Q4_K).block_size == 256);
    CHECK(row_size(Type::Q6_K, 512) == 420);
    CHECK_THROWS_AS(row_size(Type::Q5_K, 128), Error);
}

TEST_CASE("GGUF block formats round-trip Gaussian data within their error bound", "[types][quants]") {
    const unsigned seed = std::random_device{}();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    for (const Case& c : kCases) {
        const TypeTraits& tt = type_traits(c.type);
        INFO("type " << tt.name);
        for (int64_t blocks : {1, 3, 17}) {
            const int64_t n = blocks * tt.block_size;
            INFO("elements " << n);
            // A different scale per run, so the f16 scales are exercised away from 1.
            std::normal_distribution<float> dist(0.3f, std::ldexp(1.0f, int(rng() % 12) - 6));
            std::vector<float> x(static_cast<size_t>(n)), y(static_cast<size_t>(n), kNaN);
            for (float& v : x) v = dist(rng);
            std::vector<uint8_t> q(row_size(c.type, n), 0xAB);
            tt.from_float(x.data(), q.data(), n);
            tt.to_float(q.data(), y.data(), n);
            for (float v : y) REQUIRE(std::isfinite(v));
            // One block's error is set by its largest value, and spreads wider: over 30000
            // draws of one block, q5_0 reached 0.091 and q4_1 0.132 (bounds 0.07 and 0.13,
            // which 17 blocks stay 30% under), so a single block gets 1.6x the bound.
            const double bound = c.max_rel_rms * (blocks == 1 ? 1.6 : 1.0);
            const double err = rel_rms(x, y);
            INFO("relative rms error " << err << " (bound " << bound << ")");
            CHECK(err < bound);
            // Re-encoding the decoded values must not lose more: it is already on the grid
            // (up to the encoder's choice of scale), so the error stays within the same bound.
            std::vector<float> z(static_cast<size_t>(n), kNaN);
            tt.from_float(y.data(), q.data(), n);
            tt.to_float(q.data(), z.data(), n);
            CHECK(rel_rms(y, z) < bound);
        }
    }
}

TEST_CASE("GGUF block formats keep zeros and constant blocks", "[types][quants]") {
    for (const Case& c : kCases) {
        const TypeTraits& tt = type_traits(c.type);
        INFO("type " << tt.name);
        const int64_t n = 2 * tt.block_size;
        std::vector<float> x(size_t(n), 0.0f), y(size_t(n), kNaN);
        std::vector<uint8_t> q(row_size(c.type, n));
        tt.from_float(x.data(), q.data(), n);
        tt.to_float(q.data(), y.data(), n);
        for (float v : y) REQUIRE(v == 0.0f);
        // A block of one repeated value: exact for the affine formats up to f16 rounding.
        std::fill(x.begin(), x.end(), -1.75f);
        tt.from_float(x.data(), q.data(), n);
        tt.to_float(q.data(), y.data(), n);
        for (float v : y) REQUIRE(std::fabs(v + 1.75f) < 1.75f * 0.02f);
    }
}

TEST_CASE("GGUF block formats decode arbitrary bytes with finite scales to finite values",
          "[types][quants]") {
    const unsigned seed = std::random_device{}();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    struct Scales {
        Type type;
        std::vector<size_t> f16_offsets; // where the block's f16 fields sit
    };
    const Scales formats[] = {
        {Type::Q4_1, {0, 2}}, {Type::Q5_0, {0}},    {Type::Q5_1, {0, 2}}, {Type::Q2_K, {80, 82}},
        {Type::Q3_K, {108}},  {Type::Q4_K, {0, 2}}, {Type::Q5_K, {0, 2}}, {Type::Q6_K, {208}},
        {Type::IQ4_NL, {0}},  {Type::IQ4_XS, {0}},
    };
    for (const Scales& f : formats) {
        const TypeTraits& tt = type_traits(f.type);
        INFO("type " << tt.name);
        const int64_t blocks = 29, n = blocks * tt.block_size;
        std::vector<uint8_t> q(row_size(f.type, n));
        for (uint8_t& b : q) b = uint8_t(rng());
        // Every f16 field whose exponent is all ones (inf/NaN) gets a finite exponent: then
        // the format guarantees finite outputs, since no product can overflow a float.
        for (int64_t b = 0; b < blocks; ++b)
            for (size_t off : f.f16_offsets) {
                uint8_t& hi = q[size_t(b) * tt.type_size + off + 1];
                if ((hi & 0x7c) == 0x7c) hi &= uint8_t(~0x04);
            }
        std::vector<float> y(static_cast<size_t>(n), kNaN);
        tt.to_float(q.data(), y.data(), n);
        for (float v : y) REQUIRE(std::isfinite(v));
    }
}

// The layout a GPU keeps weights of one scale per block in (quants.h): every body byte and
// scale moves to its place in the row, and back to the same bytes; other formats and rows
// that are not whole blocks are refused.
TEST_CASE("rows with the scales last hold every byte where the layout says, and convert back",
          "[types][quants]") {
    std::mt19937 rng(std::random_device{}());
    for (Type t : {Type::Q8_0, Type::Q4_0, Type::Q5_0, Type::IQ4_NL, Type::Q6_K}) {
        const quant::SingleScaleBlock* blk = quant::scales_last_block(t);
        REQUIRE(blk != nullptr);
        const int64_t per_block = type_traits(t).block_size;
        for (int64_t blocks_per_row : {1, 3, 64}) {
            const int64_t K = blocks_per_row * per_block, rows = 3, row_bytes = blocks_per_row * blk->bytes;
            REQUIRE(row_bytes == int64_t(row_size(t, K)));
            std::vector<uint8_t> file(size_t(rows * row_bytes)), laid_out(file.size(), 0xAB),
                back(file.size());
            for (uint8_t& b : file) b = uint8_t(rng());
            quant::rows_to_scales_last(t, file.data(), laid_out.data(), K, rows);
            const int body = blk->body_bytes();
            int64_t misplaced = 0;
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t i = 0; i < blocks_per_row; ++i) {
                    const uint8_t* block = file.data() + (r * blocks_per_row + i) * blk->bytes;
                    const uint8_t* row = laid_out.data() + r * row_bytes;
                    misplaced += std::memcmp(row + i * body, block + blk->body_offset(), size_t(body)) != 0;
                    misplaced +=
                        std::memcmp(row + blocks_per_row * body + 2 * i, block + blk->scale_offset, 2) != 0;
                }
            INFO(type_name(t) << " K " << K);
            CHECK(misplaced == 0);
            quant::rows_from_scales_last(t, laid_out.data(), back.data(), K, rows);
            CHECK(back == file);
        }
        CHECK_THROWS_WITH(quant::rows_to_scales_last(t, nullptr, nullptr, per_block + 16, 1),
                          Catch::Contains("not a whole number of blocks"));
    }
    for (Type t : {Type::F16, Type::Q4_1, Type::Q5_1, Type::Q4_K})
        CHECK(quant::scales_last_block(t) == nullptr);
    CHECK_THROWS_WITH(quant::rows_to_scales_last(Type::Q4_K, nullptr, nullptr, 256, 1),
                      Catch::Contains("no scales-last layout for type q4_K"));
}
