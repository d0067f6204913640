#include "thread_pool.h"

#include <algorithm>

namespace gfa {

ThreadPool::ThreadPool(int n_threads)
    : n_threads_(n_threads > 0 ? n_threads : std::max(1, int(std::thread::hardware_concurrency()))) {
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard lock(mutex_);
        stop_ = true;
    }
    start_cv_.notify_all();
    for (std::thread& t : workers_) t.join();
}

void ThreadPool::run(const Job& job, int max_workers) {
    const int n = std::max(1, std::min(n_threads_, max_workers));
    if (n == 1) {
        job(0, 1);
        return;
    }
    {
        std::lock_guard lock(mutex_);
        job_ = &job;
        job_workers_ = n;
        pending_ = n - 1;
        error_ = nullptr;
        ++generation_;
    }
    start_cv_.notify_all();
    std::exception_ptr mine;
    try {
        job(0, n);
    } catch (...) {
        mine = std::current_exception();
    }
    std::unique_lock lock(mutex_);
    done_cv_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
}

void ThreadPool::worker_loop(int ith) {
    uint64_t seen = 0;
    for (;;) {
        const Job* job;
        int n;
        {
            std::unique_lock lock(mutex_);
            start_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
            if (stop_) return;
            seen = generation_;
            job = job_;
            n = job_workers_;
        }
        if (ith >= n) continue; // not needed for this job
        std::exception_ptr err;
        try {
            (*job)(ith, n);
        } catch (...) {
            err = std::current_exception();
        }
        std::lock_guard lock(mutex_);
        if (err && !error_) error_ = err;
        if (--pending_ == 0) done_cv_.notify_one();
    }
}

} // namespace gfa
