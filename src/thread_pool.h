// A fixed set of worker threads that run one data-parallel job at a time. Kernels receive
// (ith, nth) and split their work themselves; run() returns when every worker is done.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace gfa {

class ThreadPool {
  public:
    using Job = std::function<void(int ith, int nth)>;

    explicit ThreadPool(int n_threads); // n_threads <= 0: hardware concurrency
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }
    // Runs job(ith, n) for ith in [0, n) with n = min(size(), max_workers); the calling
    // thread takes ith = 0. The first exception thrown by any worker is rethrown here.
    void run(const Job& job, int max_workers = 1 << 30);

  private:
    void worker_loop(int ith);

    // A graph runs one job per node, hundreds per decoded token, each a few microseconds to
    // milliseconds long. Waking a thread blocked on a condition variable costs tens of
    // microseconds, so both sides first spin for a short while (kSpin) on the atomics below
    // and only then block; a Dekker-style handshake (the waiter announces itself, then
    // re-checks; the signaller publishes, then looks for waiters, all sequentially
    // consistent) keeps a wake-up from being lost between the two.
    static constexpr std::chrono::microseconds kSpin{100};

    int n_threads_;
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable start_cv_, done_cv_;
    // The job's generation and worker count in one word, so a worker that is not needed
    // for a job never reads job_ while the next job may be writing it; a needed worker reads
    // job_ after seeing its generation, and run() does not return before it is done.
    static constexpr int kCountBits = 16;
    std::atomic<uint64_t> job_state_{0}; // generation << kCountBits | workers
    const Job* job_ = nullptr;
    std::atomic<int> pending_{0}; // workers still running the job
    std::atomic<int> sleeping_workers_{0};
    std::atomic<bool> caller_sleeping_{false};
    std::atomic<bool> stop_{false};
    std::exception_ptr error_; // guarded by mutex_
};

// Splits [0, n) into nth nearly equal contiguous ranges; returns worker ith's range.
inline std::pair<int64_t, int64_t> split_range(int64_t n, int ith, int nth) {
    const int64_t per = n / nth, extra = n % nth;
    const int64_t begin = ith * per + (ith < extra ? ith : extra);
    return {begin, begin + per + (ith < extra ? 1 : 0)};
}

} // namespace gfa
