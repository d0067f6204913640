// The programs' token choice (tools/sampling.h): the greedy pick is the first largest logit,
// as std::max_element finds it, whatever the length, ties and infinities.
#include "tools/sampling.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

using gfa::cli::first_max_index;

TEST_CASE("first_max_index: the first largest value, as std::max_element finds it", "[sampling]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    // Few distinct values, so that ties are common; lengths around the 16 lanes and a vocabulary's.
    for (int trial = 0; trial < 4000; ++trial) {
        const int64_t n = trial < 3000 ? 1 + int64_t(rng() % 70) : 31000 + int64_t(rng() % 2000);
        std::vector<float> x(static_cast<size_t>(n));
        const int levels = 1 + int(rng() % 6);
        for (float& v : x) v = float(int(rng() % uint32_t(levels))) - 2.5f;
        if (rng() % 4 == 0) x[rng() % x.size()] = -INFINITY;
        if (rng() % 4 == 0) x[rng() % x.size()] = INFINITY;
        if (rng() % 8 == 0) std::fill(x.begin(), x.end(), -INFINITY);
        INFO("n " << n << ", trial " << trial);
        REQUIRE(first_max_index(x.data(), n) == std::max_element(x.begin(), x.end()) - x.begin());
    }
}

TEST_CASE("first_max_index: NaN is never chosen", "[sampling]") {
    std::vector<float> x(100, 1.0f);
    x[40] = 2.0f;
    x[0] = x[17] = x[63] = NAN;
    CHECK(first_max_index(x.data(), int64_t(x.size())) == 40);
    x[40] = -INFINITY;
    CHECK(first_max_index(x.data(), int64_t(x.size())) == 1); // the first 1 after the NaN
    std::fill(x.begin(), x.end(), NAN);
    CHECK(first_max_index(x.data(), int64_t(x.size())) == 0);
    CHECK(first_max_index(x.data(), 0) == 0);
}

TEST_CASE("Sampler: temperature 0 is greedy; a top-k of 1 picks the largest at any temperature",
          "[sampling]") {
    std::mt19937 rng(std::random_device{}());
    std::uniform_real_distribution<float> u(-5.0f, 5.0f);
    std::vector<float> logits(1000);
    for (float& v : logits) v = u(rng);
    const int64_t best = std::max_element(logits.begin(), logits.end()) - logits.begin();
    gfa::cli::Sampler greedy{0.0f, 40, 0.95f, std::mt19937_64(1)};
    CHECK(greedy.sample(logits.data(), int64_t(logits.size())) == best);
    gfa::cli::Sampler one{1.5f, 1, 1.0f, std::mt19937_64(2)};
    for (int i = 0; i < 20; ++i) CHECK(one.sample(logits.data(), int64_t(logits.size())) == best);
}
