// The CUDA backend's split-KV planner (host code, so it is tested on every machine): it visits
// split counts rather than every split size, and must pick what a scan over every size picks.
#include "../backends/cuda/split_plan.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <random>

namespace {

int64_t scan_every_size(int64_t blocks, int64_t slots, int64_t units, int64_t min_units, double within) {
    if (blocks >= slots * 8 / 10 || units <= min_units) return std::max<int64_t>(units, 1);
    auto efficiency = [&](int64_t u) {
        const int64_t n = blocks * ((units + u - 1) / u);
        return double(n) / double(slots * ((n + slots - 1) / slots));
    };
    double best = 0.0;
    for (int64_t u = min_units; u <= units; ++u) best = std::max(best, efficiency(u));
    for (int64_t u = units; u > min_units; --u)
        if (efficiency(u) >= within * best) return u;
    return min_units;
}

} // namespace

TEST_CASE("split-KV planning picks what a scan over every split size picks", "[split_plan]") {
    std::mt19937 rng(std::random_device{}());
    std::uniform_int_distribution<int64_t> blocks(1, 300), slots(1, 600), units(1, 3000), min_units(1, 5);
    for (int trial = 0; trial < 3000; ++trial) {
        const int64_t b = blocks(rng), sl = slots(rng), u = units(rng), mu = min_units(rng);
        const double within = trial % 2 ? 0.95 : 0.85;
        INFO("blocks " << b << " slots " << sl << " units " << u << " min " << mu << " within " << within);
        REQUIRE(gfa::cuda::units_per_split(b, sl, u, mu, within) == scan_every_size(b, sl, u, mu, within));
    }
    // the benchmark's decoding shapes: 8 or 64 blocks on 264 slots (H200), 64 to 1024 rounds
    for (int64_t b : {8, 64})
        for (int64_t u : {64, 256, 1024}) {
            const int64_t per_split = gfa::cuda::units_per_split(b, 264, u, 4, 0.95);
            CHECK(per_split == scan_every_size(b, 264, u, 4, 0.95));
            CHECK(per_split >= 4);
        }
    // blocks that fill the device, or too few units to split: one split
    CHECK(gfa::cuda::units_per_split(264, 264, 500, 2, 0.95) == 500);
    CHECK(gfa::cuda::units_per_split(8, 264, 2, 2, 0.95) == 2);
    CHECK(gfa::cuda::units_per_split(8, 264, 0, 1, 0.85) == 1);
}
