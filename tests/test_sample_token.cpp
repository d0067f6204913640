// sample_token, the draw a session makes where the logits are: its tokens follow the softmax
// of logits / temperature over the kept tokens (checked by counting many draws against
// probabilities computed here, independently of the op's code), top_k and top_p keep exactly
// the tokens they should, the draw depends on the seed and the position alone, and bad
// parameters give errors naming them.
#include "op_check.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <vector>

using namespace gfa;

namespace {

// Draws one token for each position in [0, n_draws) from the same logits, on the CPU backend.
std::vector<int32_t> draws(const std::vector<float>& logits, int64_t n_draws, const SampleParams& p,
                           int64_t first_position = 0) {
    Context ctx(ContextParams{.alloc_data = true});
    const int64_t V = int64_t(logits.size());
    Tensor* l = ctx.new_tensor(Type::F32, {V, n_draws});
    std::vector<float> all;
    for (int64_t c = 0; c < n_draws; ++c) all.insert(all.end(), logits.begin(), logits.end());
    tensor_set_f32(l, all);
    Tensor* positions = ctx.new_tensor(Type::I32, {n_draws});
    std::vector<int32_t> at(static_cast<size_t>(n_draws));
    std::iota(at.begin(), at.end(), int32_t(first_position));
    tensor_set(positions, at.data(), 0, at.size() * sizeof(int32_t));
    Tensor* picked = sample_token(ctx, l, positions, p);
    Graph g = build_forward(picked);
    test::compute_cpu(g, 2);
    std::vector<int32_t> out(static_cast<size_t>(n_draws));
    tensor_get(picked, out.data(), 0, out.size() * sizeof(int32_t));
    return out;
}

// The kept tokens' probabilities, computed from the definition: the top_k largest logits (ties
// by position), softmax at the temperature, then the shortest most-likely-first run holding
// top_p, renormalized.
std::map<int32_t, double> expected(const std::vector<float>& logits, const SampleParams& p) {
    std::vector<int32_t> ids(logits.size());
    std::iota(ids.begin(), ids.end(), 0);
    std::stable_sort(ids.begin(), ids.end(),
                     [&](int32_t a, int32_t b) { return logits[size_t(a)] > logits[size_t(b)]; });
    const size_t k = p.top_k == 0 ? ids.size() : std::min(ids.size(), size_t(p.top_k));
    ids.resize(k);
    std::vector<double> w;
    for (int32_t id : ids)
        w.push_back(std::exp((double(logits[size_t(id)]) - logits[size_t(ids[0])]) / p.temperature));
    const double total = std::accumulate(w.begin(), w.end(), 0.0);
    size_t run = k;
    for (size_t i = 0; i < k; ++i) {
        if (std::accumulate(w.begin(), w.begin() + std::ptrdiff_t(i + 1), 0.0) / total >= p.top_p - 1e-12) {
            run = i + 1;
            break;
        }
    }
    const double mass = std::accumulate(w.begin(), w.begin() + std::ptrdiff_t(run), 0.0);
    std::map<int32_t, double> prob;
    for (size_t i = 0; i < run; ++i) prob[ids[i]] = w[i] / mass;
    return prob;
}

// Every drawn token is a kept one, and each kept token's count is within 5 standard deviations
// (plus one) of its expectation.
void check_counts(const std::vector<float>& logits, const SampleParams& p, int64_t n_draws) {
    const std::map<int32_t, double> prob = expected(logits, p);
    std::map<int32_t, int64_t> count;
    for (int32_t id : draws(logits, n_draws, p)) count[id]++;
    for (const auto& [id, c] : count) {
        INFO("token " << id << " drawn " << c << " times");
        CHECK(prob.count(id) == 1);
    }
    for (const auto& [id, q] : prob) {
        const double mean = double(n_draws) * q, sd = std::sqrt(double(n_draws) * q * (1.0 - q));
        INFO("token " << id << ": probability " << q << ", drawn " << count[id] << " of " << n_draws);
        CHECK(std::abs(double(count[id]) - mean) <= 5.0 * sd + 1.0);
    }
}

} // namespace

TEST_CASE("sample_token draws with the softmax's probabilities at the temperature", "[sampling]") {
    std::mt19937 rng(test::seed());
    std::vector<float> logits(12);
    for (float& l : logits) l = std::uniform_real_distribution<float>(-2.0f, 2.0f)(rng);
    for (float t : {0.5f, 1.0f, 3.0f}) {
        INFO("temperature " << t);
        check_counts(logits, {.temperature = t, .top_k = 0, .top_p = 1.0f, .seed = rng()}, 30000);
    }
}

TEST_CASE("sample_token keeps the top_k most likely, then the shortest run holding top_p", "[sampling]") {
    std::mt19937 rng(test::seed());
    std::vector<float> logits(60);
    for (float& l : logits) l = std::uniform_real_distribution<float>(-3.0f, 3.0f)(rng);
    check_counts(logits, {.temperature = 1.0f, .top_k = 5, .top_p = 1.0f, .seed = rng()}, 20000);
    check_counts(logits, {.temperature = 0.7f, .top_k = 0, .top_p = 0.6f, .seed = rng()}, 20000);
    check_counts(logits, {.temperature = 1.3f, .top_k = 9, .top_p = 0.8f, .seed = rng()}, 20000);
    // Argmax in the limits: top_k 1 and a tiny top_p keep the first of the equal largest
    // logits; a tiny temperature draws among the equal largest only; -inf and NaN never drawn.
    logits[17] = logits[41] = 10.0f;
    logits[3] = std::nanf("");
    logits[4] = -INFINITY;
    for (const SampleParams& p : {SampleParams{.temperature = 5.0f, .top_k = 1, .top_p = 1.0f, .seed = 1},
                                  SampleParams{.temperature = 1.0f, .top_k = 0, .top_p = 1e-9f, .seed = 2}}) {
        const std::vector<int32_t> got = draws(logits, 500, p);
        CHECK(std::all_of(got.begin(), got.end(), [](int32_t id) { return id == 17; }));
    }
    const std::vector<int32_t> cold =
        draws(logits, 500, {.temperature = 1e-6f, .top_k = 50, .top_p = 1.0f, .seed = 3});
    CHECK(std::all_of(cold.begin(), cold.end(), [](int32_t id) { return id == 17 || id == 41; }));
    CHECK(std::count(cold.begin(), cold.end(), 17) > 150);
    CHECK(std::count(cold.begin(), cold.end(), 41) > 150);
    const std::vector<int32_t> flat =
        draws(logits, 3000, {.temperature = 50.0f, .top_k = 0, .top_p = 1.0f, .seed = 4});
    CHECK(std::none_of(flat.begin(), flat.end(), [](int32_t id) { return id == 3 || id == 4; }));
    // A column with no weight at all gives its first-ranked position.
    const std::vector<float> none = {-INFINITY, std::nanf(""), -INFINITY};
    CHECK(draws(none, 4, {.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = 5}) ==
          std::vector<int32_t>(4, 0));
}

TEST_CASE("sample_token's draw depends on the seed and the position alone", "[sampling]") {
    std::mt19937 rng(test::seed());
    std::vector<float> logits(30);
    for (float& l : logits) l = std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng);
    const SampleParams p{.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = rng()};
    const std::vector<int32_t> a = draws(logits, 200, p), b = draws(logits, 200, p);
    CHECK(a == b);
    // The same positions in another order of columns: the same tokens per position.
    const std::vector<int32_t> later = draws(logits, 100, p, 100);
    CHECK(std::equal(later.begin(), later.end(), a.begin() + 100));
    SampleParams other = p;
    other.seed = p.seed + 1;
    CHECK(draws(logits, 200, other) != a);
}

TEST_CASE("sample_token refuses bad parameters and inputs by name", "[sampling][errors]") {
    Context ctx;
    Tensor* logits = ctx.new_tensor(Type::F32, {10, 2});
    Tensor* positions = ctx.new_tensor(Type::I32, {2});
    CHECK_THROWS_WITH(sample_token(ctx, logits, positions, {.temperature = 0.0f}),
                      Catch::Contains("temperature"));
    CHECK_THROWS_WITH(sample_token(ctx, logits, positions, {.temperature = -1.0f}),
                      Catch::Contains("temperature"));
    CHECK_THROWS_WITH(sample_token(ctx, logits, positions, {.temperature = std::nanf("")}),
                      Catch::Contains("temperature"));
    CHECK_THROWS_WITH(sample_token(ctx, logits, positions, {.top_k = -1}), Catch::Contains("top_k -1"));
    CHECK_THROWS_WITH(sample_token(ctx, logits, positions, {.top_p = 0.0f}), Catch::Contains("top_p"));
    CHECK_THROWS_WITH(sample_token(ctx, logits, positions, {.top_p = 1.5f}), Catch::Contains("top_p"));
    CHECK_THROWS_WITH(sample_token(ctx, logits, ctx.new_tensor(Type::I32, {3}), {}),
                      Catch::Contains("one position per column"));
    CHECK_THROWS_WITH(sample_token(ctx, logits, ctx.new_tensor(Type::F32, {2}), {}), Catch::Contains("i32"));
    CHECK_THROWS_WITH(sample_token(ctx, ctx.new_tensor(Type::F16, {10, 2}), positions, {}),
                      Catch::Contains("f32"));
}
