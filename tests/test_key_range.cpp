// The CUDA kernels mask a tile's scores with each row's visible key range (host code of the
// kernel arguments, so it is tested on every machine): the range must hold exactly the keys
// j < Skv that the per-score visibility rule admits, for causal masks, windows on either
// side, queries past the keys, and window offsets as large as an int holds.
#include "../backends/cuda/fa_args.h"

#include <catch2/catch.hpp>

#include <climits>
#include <random>

namespace {

using gfa::cuda::fa::Shape;

void check_every_row(const Shape& s) {
    for (int i = 0; i < s.Sq; ++i) {
        const Shape::KeyRange keys = s.visible_keys(i);
        INFO("Sq " << s.Sq << " Skv " << s.Skv << " hi " << s.has_hi << "/" << s.hi_off << " lo " << s.has_lo
                   << "/" << s.lo_off << " row " << i << " range [" << keys.lo << ", " << keys.hi << "]");
        REQUIRE(keys.lo >= 0);
        REQUIRE(keys.hi <= s.Skv - 1);
        // every key, and one past each end of [0, Skv), against the rule
        for (int j = -1; j <= s.Skv; ++j) {
            const bool in_range = j >= keys.lo && j <= keys.hi;
            const bool rule = j >= 0 && j < s.Skv && s.visible(i, j);
            REQUIRE(in_range == rule);
        }
    }
}

} // namespace

TEST_CASE("visible key range matches the visibility rule", "[fa][mask]") {
    std::mt19937 rng(std::random_device{}());
    auto draw = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    const int offsets[] = {0, 1, -1, 5, -5, 40, -40, INT_MAX, INT_MIN + 1};
    for (int trial = 0; trial < 300; ++trial) {
        Shape s;
        s.Sq = draw(1, 70);
        s.Skv = draw(1, 90);
        s.has_hi = draw(0, 1) != 0;
        s.has_lo = draw(0, 1) != 0;
        s.hi_off = draw(0, 2) == 0 ? offsets[draw(0, 8)] : draw(-100, 100);
        s.lo_off = draw(0, 2) == 0 ? offsets[draw(0, 8)] : draw(-100, 100);
        check_every_row(s);
    }
}
