#include <catch2/catch.hpp>

#include "thread_pool.h"

#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <stdexcept>
#include <vector>

TEST_CASE("thread pool runs every worker once per job and rethrows", "[core]") {
    gfa::ThreadPool pool(3);
    for (int rep = 0; rep < 50; ++rep) {
        std::vector<std::atomic<int>> hits(3);
        std::atomic<int> bad_nth{0}; // Catch's assertions are not for worker threads
        pool.run([&](int ith, int nth) {
            if (nth != 3) ++bad_nth;
            hits[ith]++;
        });
        REQUIRE(bad_nth == 0);
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

// Jobs of changing widths back to back (workers catch them while spinning) and after pauses
// longer than the spin (workers and caller block and must be woken): every needed worker runs
// each job exactly once, the others never, and a failing job leaves the pool usable.
TEST_CASE("thread pool hands over jobs of any width, spinning or asleep", "[core]") {
    gfa::ThreadPool pool(4);
    std::mt19937 rng(12345);
    for (int job = 0; job < 3000; ++job) {
        const int width = 1 + int(rng() % 5); // 5 asks for more workers than the pool has
        const int expect = std::min(width, 4);
        std::vector<std::atomic<int>> hits(4);
        std::atomic<int> bad_nth{0};
        const bool slow_worker = job % 97 == 3; // the caller waits past its spin
        pool.run(
            [&](int ith, int nth) {
                if (nth != expect) ++bad_nth;
                if (slow_worker && ith == nth - 1)
                    std::this_thread::sleep_for(std::chrono::microseconds(400));
                hits[ith]++;
            },
            width);
        REQUIRE(bad_nth == 0);
        for (int i = 0; i < 4; ++i) REQUIRE(hits[i] == (i < expect ? 1 : 0));
        if (job % 50 == 7) std::this_thread::sleep_for(std::chrono::microseconds(300)); // workers sleep
        if (job % 500 == 11)
            CHECK_THROWS_AS(pool.run([](int ith, int) {
                if (ith == 2) throw std::runtime_error("worker failed");
            }),
                            std::runtime_error);
    }
}
