// A fixed set of worker threads that run one data-parallel job at a time. Kernels receive
// (ith, nth) and split their work themselves; run() returns when every worker is done.
#pragma once

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

    int n_threads_;
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable start_cv_, done_cv_;
    const Job* job_ = nullptr;
    int job_workers_ = 0;
    uint64_t generation_ = 0;
    int pending_ = 0;
    bool stop_ = false;
    std::exception_ptr error_;
};

// Splits [0, n) into nth nearly equal contiguous ranges; returns worker ith's range.
inline std::pair<int64_t, int64_t> split_range(int64_t n, int ith, int nth) {
    const int64_t per = n / nth, extra = n % nth;
    const int64_t begin = ith * per + (ith < extra ? ith : extra);
    return {begin, begin + per + (ith < extra ? 1 : 0)};
}

} // namespace gfa
