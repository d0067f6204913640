// CUDA graphs for repeated node lists: the work one compute() call enqueues is recorded with
// stream capture and replayed as one graph launch, which removes the per-kernel launch cost
// that dominates small graphs (decoding one token launches hundreds of tiny kernels).
//
// A call is described by two hashes: its shape (ops, result types and shapes) and its
// fingerprint (everything its launches depend on: the pointers, shapes, strides and
// parameters of every node and source); a replaced scratch block drops every graph.
//  * A call whose fingerprint is the one an executable graph was captured from replays it:
//    no launcher runs, and the host's cost is one graph launch. A decoding step whose graph
//    the session reused (same tensors in the same memory, new input values) is such a call.
//  * A call whose fingerprint was seen among the last few calls is captured: it repeats, so
//    the capture will be replayed. The executable graph of an earlier call of the same shape
//    is updated in place (far cheaper than instantiating anew), else one is instantiated.
//  * Any other call runs eagerly. Capturing calls that never repeat costs as much host time
//    as launching them and then starts the GPU late (on an H200, capturing every decoding
//    step of a rebuilt graph gave 155 tokens/s against 171 eagerly).
// The first call of a fingerprint is always eager, so scratch memory grows and cuBLAS and
// the kernels set themselves up outside any capture. Replaying relies on the launchers
// depending only on what the fingerprint covers; a 64-bit hash collision would replay the
// wrong graph, which at these call counts is far less likely than a hardware fault.
#pragma once

#include <ggml-fa/error.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace gfa::cuda {

// Thrown by code that would have to synchronize or allocate while its stream is being
// captured (Scratch growth). It ends that capture; the work then runs eagerly.
class CaptureAborted : public Error {
  public:
    using Error::Error;
};

// True when `stream` is being captured into a graph (active or already invalidated).
bool stream_is_capturing(cudaStream_t stream);

class LaunchGraphs {
  public:
    // How many capture or instantiation failures turn graphs off for good.
    static constexpr int kMaxFailures = 3;
    // How many executable graphs are kept (least recently used ones go).
    static constexpr size_t kMaxCached = 8;
    // How many recent calls' fingerprints count as "seen" for capturing.
    static constexpr size_t kRecentCalls = 16;

    // enabled: false runs everything eagerly (GFA_CUDA_GRAPHS=0 sets it at backend creation).
    explicit LaunchGraphs(bool enabled) : enabled_(enabled) {}
    ~LaunchGraphs();
    LaunchGraphs(const LaunchGraphs&) = delete;
    LaunchGraphs& operator=(const LaunchGraphs&) = delete;

    // Runs enqueue(), which puts work on `stream` and nothing else: replayed, captured and
    // launched, or eagerly (see the file comment). Errors of an eager run propagate; a
    // failed capture is discarded and the work runs eagerly instead. memory_epoch changes
    // whenever memory the launches use besides the nodes' own (scratch) was replaced: the
    // executable graphs of earlier epochs are dropped.
    void run(cudaStream_t stream, uint64_t shape, uint64_t fingerprint, uint64_t memory_epoch,
             const std::function<void()>& enqueue);

    bool enabled() const { return enabled_; }

    struct Counters {
        int64_t eager = 0;            // calls run without a graph
        int64_t replays = 0;          // calls that launched an executable graph as it was
        int64_t captures = 0;         // calls captured, then launched
        int64_t updates = 0;          // executable graphs brought up to date in place
        int64_t instantiations = 0;   // executable graphs made from scratch
        int64_t capture_failures = 0; // captures that failed (the call then ran eagerly)
        int64_t capture_aborts = 0;   // captures ended on purpose (scratch had to grow)
    };
    const Counters& counters() const { return counters_; }
    // The counters as (name, value) pairs, for Backend::counters().
    std::vector<std::pair<std::string, int64_t>> counter_list() const;

  private:
    struct Entry {
        uint64_t shape = 0;
        uint64_t fingerprint = 0; // of the call the executable graph holds
        cudaGraphExec_t exec = nullptr;
        uint64_t last_use = 0;
    };
    Entry* find(uint64_t fingerprint);
    // The entry to capture a call of this shape into: one of the same shape (its executable
    // graph can be updated), else a new one, replacing the least recently used.
    Entry& slot_for(uint64_t shape);
    bool seen_recently(uint64_t fingerprint) const;
    // Points e.exec at `graph`'s work: an update in place, else a fresh instantiation.
    bool make_executable(Entry& e, cudaGraph_t graph);
    void note_failure();
    void drop_all();

    bool enabled_;
    uint64_t memory_epoch_ = 0;
    int failures_ = 0;
    uint64_t clock_ = 0;
    std::vector<Entry> entries_;
    std::vector<uint64_t> recent_; // ring of the last kRecentCalls fingerprints
    size_t recent_next_ = 0;
    Counters counters_;
};

} // namespace gfa::cuda
