// Choosing the next token from a decoding step's logits: greedy, or by temperature with
// top-k and top-p. Shared by the programs that generate text.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace gfa::cli {

// The index of the first largest of x[0..n), as std::max_element gives it, except that a NaN
// is never chosen (0 when every value is NaN or n is 0). Each of 16 lanes keeps its own
// running maximum: std::max_element's single chain of compares and selects, one element
// per step, took 50 us of a GPU's 1.1 ms decoding step for a 32000-token vocabulary.
inline int64_t first_max_index(const float* x, int64_t n) {
    constexpr int kLanes = 16;
    float best[kLanes];
    int64_t at[kLanes];
    for (int l = 0; l < kLanes; ++l) {
        best[l] = -INFINITY;
        at[l] = n;
    }
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int l = 0; l < kLanes; ++l)
            if (x[i + l] > best[l]) {
                best[l] = x[i + l];
                at[l] = i + l;
            }
    float top = -INFINITY;
    int64_t first = n;
    for (int l = 0; l < kLanes; ++l)
        if (best[l] > top || (best[l] == top && at[l] < first)) {
            top = best[l];
            first = at[l];
        }
    for (; i < n; ++i) // the tail's indices follow every lane's
        if (x[i] > top) {
            top = x[i];
            first = i;
        }
    if (first < n) return first;
    // No value above -inf: the first -inf, or 0.
    const int64_t minus_inf = std::find(x, x + n, -INFINITY) - x;
    return minus_inf < n ? minus_inf : 0;
}

struct Sampler {
    float temperature; // 0: greedy
    int top_k;         // 0: all tokens
    float top_p;       // in (0, 1]
    std::mt19937_64 rng;

    int32_t sample(const float* logits, int64_t n_vocab) {
        if (temperature <= 0.0f) return int32_t(first_max_index(logits, n_vocab));
        if (top_k > 0 && top_k < n_vocab) return sample_top_k(logits, n_vocab);
        return sample_all(logits, n_vocab);
    }

  private:
    double weight(float logit, double top) const { return std::exp((logit - top) / temperature); }

    // The top_k most likely tokens, then the smallest prefix of them holding top_p of their
    // probability.
    int32_t sample_top_k(const float* logits, int64_t n_vocab) {
        std::vector<int32_t> ids(static_cast<size_t>(n_vocab));
        std::iota(ids.begin(), ids.end(), 0);
        const size_t keep = size_t(top_k);
        std::partial_sort(ids.begin(), ids.begin() + std::ptrdiff_t(keep), ids.end(),
                          [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
        std::vector<double> p(keep);
        const double top = logits[ids[0]];
        double total = 0;
        for (size_t i = 0; i < keep; ++i) total += p[i] = weight(logits[ids[i]], top);
        double cumulative = 0;
        size_t nucleus = keep;
        for (size_t i = 0; i < keep; ++i) {
            cumulative += p[i] / total;
            if (cumulative >= top_p) {
                nucleus = i + 1;
                break;
            }
        }
        std::discrete_distribution<size_t> pick(p.begin(), p.begin() + std::ptrdiff_t(nucleus));
        return ids[pick(rng)];
    }

    // Every token, then (top_p < 1) the smallest set of the most likely holding top_p of the
    // probability. The whole vocabulary is not sorted: a sorted prefix grows, four times
    // longer each round, until it holds top_p (sorting all 32000 ids took 2 ms a token).
    int32_t sample_all(const float* logits, int64_t n_vocab) {
        const size_t n = size_t(n_vocab);
        const double top = logits[first_max_index(logits, n_vocab)];
        std::vector<double> p(n);
        double total = 0;
        for (size_t i = 0; i < n; ++i) total += p[i] = weight(logits[i], top);
        if (top_p >= 1.0f) {
            std::discrete_distribution<size_t> pick(p.begin(), p.end());
            return int32_t(pick(rng));
        }
        std::vector<int32_t> ids(n);
        std::iota(ids.begin(), ids.end(), 0);
        std::vector<double> nucleus;
        double cumulative = 0;
        for (size_t sorted = 0, want = std::min<size_t>(64, n); sorted < n; want = std::min(n, 4 * want)) {
            const auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b]; };
            const auto from = ids.begin() + std::ptrdiff_t(sorted), to = ids.begin() + std::ptrdiff_t(want);
            std::nth_element(from, to, ids.end(), by_logit);
            std::sort(from, to, by_logit);
            for (; sorted < want; ++sorted) {
                nucleus.push_back(p[size_t(ids[sorted])]);
                cumulative += nucleus.back() / total;
                if (cumulative >= top_p) {
                    std::discrete_distribution<size_t> pick(nucleus.begin(), nucleus.end());
                    return ids[pick(rng)];
                }
            }
        }
        // Rounding kept the sum of every token's share just short of top_p.
        std::discrete_distribution<size_t> pick(nucleus.begin(), nucleus.end());
        return ids[pick(rng)];
    }
};

} // namespace gfa::cli
