// Internal: how a split-KV launch cuts the key range (host code, no CUDA).
#pragma once

#include <algorithm>
#include <cstdint>

namespace gfa::cuda {

// Split-KV when `blocks` cannot fill the `slots` of the device: the number of key units (tiles,
// rounds of chunks) per split that keeps the wave efficiency (blocks x splits / (slots x
// waves)) within `within` of the best, as large as possible (the fewest splits) and at least
// min_units. All units in one split when the blocks fill the device anyway.
//
// The efficiency depends on the units per split u only through the split count
// ceil(units / u), so the search visits each split count once, at the largest u that gives
// it: at most about 2 sqrt(units) steps. Every decoding call plans on the host while the GPU
// waits; a scan over every u took 15 us at 64k keys.
inline int64_t units_per_split(int64_t blocks, int64_t slots, int64_t units, int64_t min_units,
                               double within) {
    if (blocks >= slots * 8 / 10 || units <= min_units) return std::max<int64_t>(units, 1);
    auto efficiency = [&](int64_t splits) {
        const int64_t n = blocks * splits;
        return double(n) / double(slots * ((n + slots - 1) / slots));
    };
    // visit(splits, u) for each split count, fewest first, u the largest giving it (>= min_units),
    // until visit returns true
    auto each_split_count = [&](auto&& visit) {
        for (int64_t u = units; u >= min_units;) {
            const int64_t splits = (units + u - 1) / u;
            if (visit(splits, u)) return;
            u = (units + splits - 1) / splits - 1; // below the smallest u of this count: the next count
        }
    };
    double best = 0.0;
    each_split_count([&](int64_t splits, int64_t) {
        best = std::max(best, efficiency(splits));
        return false;
    });
    int64_t chosen = min_units;
    each_split_count([&](int64_t splits, int64_t u) {
        if (efficiency(splits) < within * best) return false;
        chosen = u;
        return true;
    });
    return chosen;
}

} // namespace gfa::cuda
