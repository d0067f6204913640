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

namespace {

// The nucleus by brute force: every token sorted, the smallest most likely prefix whose
// share of the softmax (at temperature t, over all tokens) reaches top_p.
std::vector<int32_t> nucleus_of(const std::vector<float>& logits, float t, float top_p) {
    std::vector<int32_t> ids(logits.size());
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(i);
    std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    const double top = logits[size_t(ids[0])];
    double total = 0;
    for (float l : logits) total += std::exp((l - top) / t);
    double cumulative = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
        cumulative += std::exp((logits[size_t(ids[i])] - top) / t) / total;
        if (cumulative >= top_p)
            return std::vector<int32_t>(ids.begin(), ids.begin() + std::ptrdiff_t(i + 1));
    }
    return ids;
}

} // namespace

TEST_CASE("Sampler: with every token kept, top-p picks only from the nucleus", "[sampling]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    for (int trial = 0; trial < 200; ++trial) {
        const size_t n = 2 + rng() % 3000;
        std::vector<float> logits(n);
        for (float& l : logits) l = normal(rng); // continuous: no ties at the nucleus' edge
        const float t = 0.3f + float(rng() % 100) / 50.0f, top_p = 0.05f + float(rng() % 90) / 100.0f;
        INFO("n " << n << ", temperature " << t << ", top-p " << top_p);
        std::vector<int32_t> nucleus = nucleus_of(logits, t, top_p);
        std::sort(nucleus.begin(), nucleus.end());
        gfa::cli::Sampler s{t, 0, top_p, std::mt19937_64(rng())};
        for (int draw = 0; draw < 20; ++draw) {
            const int32_t id = s.sample(logits.data(), int64_t(n));
            REQUIRE(std::binary_search(nucleus.begin(), nucleus.end(), id));
        }
    }
}

TEST_CASE("Sampler: with every token kept, picks follow the softmax of the nucleus", "[sampling]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    // Six tokens, temperature 1: shares 0.467, 0.258, 0.158, 0.070, 0.035, 0.012 (rounded).
    const std::vector<float> logits = {0.5f, -1.2f, 1.7f, 0.2f, 1.1f, -0.5f};
    for (const float top_p : {1.0f, 0.8f}) {
        INFO("top-p " << top_p);
        // top-p 0.8: tokens 2, 4, 0 (0.467 + 0.258 + 0.158 >= 0.8), renormalized among them.
        const std::vector<int32_t> kept =
            top_p < 1.0f ? std::vector<int32_t>{2, 4, 0} : std::vector<int32_t>{0, 1, 2, 3, 4, 5};
        double kept_total = 0;
        for (int32_t id : kept) kept_total += std::exp(double(logits[size_t(id)]));
        gfa::cli::Sampler s{1.0f, 0, top_p, std::mt19937_64(seed)};
        const int draws = 40000;
        std::vector<int> count(logits.size(), 0);
        for (int i = 0; i < draws; ++i) ++count[size_t(s.sample(logits.data(), int64_t(logits.size())))];
        for (size_t id = 0; id < logits.size(); ++id) {
            INFO("token " << id << " drawn " << count[id] << " times");
            const bool in = std::find(kept.begin(), kept.end(), int32_t(id)) != kept.end();
            if (!in) {
                CHECK(count[id] == 0);
                continue;
            }
            const double share = std::exp(double(logits[id])) / kept_total;
            const double sigma = std::sqrt(draws * share * (1 - share));
            CHECK(std::abs(count[id] - draws * share) < 5 * sigma);
        }
    }
}
