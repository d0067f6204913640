#include <catch2/catch.hpp>

#include "thread_pool.h"

#include <atomic>
#include <stdexcept>
#include <vector>

TEST_CASE("thread pool runs every worker once per job and rethrows", "[core]") {
    gfa::ThreadPool pool(3);
    for (int rep = 0; rep < 50; ++rep) {
        std::vector<std::atomic<int>> hits(3);
        pool.run([&](int ith, int nth) {
            REQUIRE(nth == 3);
            hits[ith]++;
        });
        for (auto& h : hits) REQUIRE(h == 1);
    }
    std::atomic<int> count{0};
    pool.run([&](int, int nth) { count += nth; }, 2);
    CHECK(count == 4);
    CHECK_THROWS_AS(pool.run([](int ith, int) {
        if (ith == 1) throw std::runtime_error("worker failed");
    }),
                    std::runtime_error);
    auto [b, e] = gfa::split_range(10, 2, 3);
    CHECK(b == 7);
    CHECK(e == 10);
}
