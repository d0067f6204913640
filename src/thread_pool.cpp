#include "thread_pool.h"

#include <algorithm>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace gfa {

namespace {

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
}

// Spins until done() or `limit` has passed; returns done().
template <class Done> bool spin_until(Done done, std::chrono::microseconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    for (int i = 1;; ++i) {
        if (done()) return true;
        cpu_relax();
        if (i % 64 == 0 && std::chrono::steady_clock::now() >= until) return done();
    }
}

} // namespace

ThreadPool::ThreadPool(int n_threads)
    : n_threads_(
          std::min((1 << kCountBits) - 1,
                   n_threads > 0 ? n_threads : std::max(1, int(std::thread::hardware_concurrency())))) {
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
    // Publish the job, then wake the workers that went to sleep (spinning ones see the
    // generation change by themselves).
    job_ = &job;
    pending_.store(n - 1);
    const uint64_t generation = (job_state_.load() >> kCountBits) + 1;
    job_state_.store(generation << kCountBits | uint64_t(n));
    if (sleeping_workers_.load() > 0) {
        std::lock_guard lock(mutex_);
        start_cv_.notify_all();
    }
    std::exception_ptr mine;
    try {
        job(0, n);
    } catch (...) {
        mine = std::current_exception();
    }
    auto all_done = [this] { return pending_.load() == 0; };
    if (!spin_until(all_done, kSpin)) {
        std::unique_lock lock(mutex_);
        caller_sleeping_.store(true);
        done_cv_.wait(lock, all_done);
        caller_sleeping_.store(false);
    }
    job_ = nullptr;
    if (mine) std::rethrow_exception(mine);
    std::exception_ptr err;
    {
        std::lock_guard lock(mutex_);
        err = std::exchange(error_, nullptr);
    }
    if (err) std::rethrow_exception(err);
}

void ThreadPool::worker_loop(int ith) {
    uint64_t seen = 0; // the last generation this worker looked at
    for (;;) {
        uint64_t state = 0;
        auto new_job = [&] {
            state = job_state_.load();
            return stop_.load() || (state >> kCountBits) != seen;
        };
        if (!spin_until(new_job, kSpin)) {
            std::unique_lock lock(mutex_);
            sleeping_workers_.fetch_add(1);
            start_cv_.wait(lock, new_job);
            sleeping_workers_.fetch_sub(1);
        }
        if (stop_.load()) return;
        seen = state >> kCountBits;
        const int n = int(state & ((uint64_t(1) << kCountBits) - 1));
        if (ith >= n) continue; // not needed for this job
        const Job* job = job_;  // stays valid: run() waits for this worker
        std::exception_ptr err;
        try {
            (*job)(ith, n);
        } catch (...) {
            err = std::current_exception();
        }
        if (err) {
            std::lock_guard lock(mutex_);
            if (!error_) error_ = err;
        }
        if (pending_.fetch_sub(1) == 1 && caller_sleeping_.load()) {
            std::lock_guard lock(mutex_);
            done_cv_.notify_one();
        }
    }
}

} // namespace gfa
