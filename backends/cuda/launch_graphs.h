// CUDA graphs for repeated node lists: the work one compute() call enqueues is recorded with
// stream capture and replayed as one graph launch, which removes the per-kernel launch cost
// that dominates small graphs (decoding one token launches hundreds of tiny kernels).
//
// Every call is captured afresh, so the graph always holds the call's own kernel parameters
// (pointers, sizes, grids); what is kept between calls is the instantiated executable graph,
// which cudaGraphExecUpdate brings up to date far more cheaply than instantiating anew. Calls
// are grouped by a signature of their node list (ops, types, result shapes); each group keeps
// its own executable graph in a small least-recently-used cache. The first call of a group
// runs eagerly: it grows scratch memory and lets cuBLAS and the kernels set themselves up
// (none of which may happen inside a capture); capturing starts with the second call.
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
    // How many node-list signatures keep an executable graph.
    static constexpr size_t kMaxCached = 8;

    // enabled: false runs everything eagerly (GFA_CUDA_GRAPHS=0 sets it at backend creation).
    explicit LaunchGraphs(bool enabled) : enabled_(enabled) {}
    ~LaunchGraphs();
    LaunchGraphs(const LaunchGraphs&) = delete;
    LaunchGraphs& operator=(const LaunchGraphs&) = delete;

    // Runs enqueue(), which puts work on `stream` and nothing else, either eagerly or
    // captured into a graph and launched (see the file comment). Errors of an eager run
    // propagate; a failed capture is discarded and the work runs eagerly instead.
    void run(cudaStream_t stream, uint64_t signature, const std::function<void()>& enqueue);

    bool enabled() const { return enabled_; }

    struct Counters {
        int64_t eager = 0;            // calls run without a graph
        int64_t graph_launches = 0;   // calls run as a graph
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
        uint64_t signature = 0;
        cudaGraphExec_t exec = nullptr; // null until the second call of the signature
        uint64_t last_use = 0;
    };
    Entry& entry_for(uint64_t signature, bool& is_new);
    // Captures enqueue() into a graph; nullptr when the capture failed or was aborted.
    cudaGraph_t capture(cudaStream_t stream, const std::function<void()>& enqueue);
    // Points e.exec at `graph`'s work: an update in place, else a fresh instantiation.
    bool make_executable(Entry& e, cudaGraph_t graph);
    void note_failure();

    bool enabled_;
    int failures_ = 0;
    uint64_t clock_ = 0;
    std::vector<Entry> entries_;
    Counters counters_;
};

} // namespace gfa::cuda
