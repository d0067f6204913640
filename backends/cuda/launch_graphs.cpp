// Stream capture, executable-graph update and replay for the CUDA backend (launch_graphs.h).
#include "launch_graphs.h"

#include "cuda_common.h"

#include <algorithm>

namespace gfa::cuda {

bool stream_is_capturing(cudaStream_t stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return status != cudaStreamCaptureStatusNone;
}

LaunchGraphs::~LaunchGraphs() {
    drop_all(); // an executable graph still running is freed by the driver when it completes
}

LaunchGraphs::Entry* LaunchGraphs::find(uint64_t fingerprint) {
    for (Entry& e : entries_)
        if (e.exec && e.fingerprint == fingerprint) return &e;
    return nullptr;
}

LaunchGraphs::Entry& LaunchGraphs::slot_for(uint64_t shape) {
    for (Entry& e : entries_)
        if (e.shape == shape) return e;
    if (entries_.size() >= kMaxCached) {
        auto oldest = std::min_element(entries_.begin(), entries_.end(), [](const Entry& a, const Entry& b) {
            return a.last_use < b.last_use;
        });
        if (oldest->exec) cudaGraphExecDestroy(oldest->exec);
        entries_.erase(oldest);
    }
    entries_.push_back(Entry{shape, 0, nullptr, 0});
    return entries_.back();
}

bool LaunchGraphs::seen_recently(uint64_t fingerprint) const {
    return std::find(recent_.begin(), recent_.end(), fingerprint) != recent_.end();
}

namespace {

enum class Capture { Done, Aborted, Failed };

// Records enqueue() on `stream` into *graph. Whatever goes wrong, the capture is ended, its
// partial graph destroyed and the runtime's last error cleared, so the stream is usable for
// an eager run. Relaxed mode, because cuBLAS and the runtime may make calls that the
// stricter modes refuse although they do not touch the captured stream.
Capture capture_into(cudaStream_t stream, const std::function<void()>& enqueue, cudaGraph_t* graph) {
    *graph = nullptr;
    if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
        (void)cudaGetLastError();
        return Capture::Failed;
    }
    Capture outcome = Capture::Done;
    try {
        enqueue();
    } catch (const CaptureAborted&) {
        outcome = Capture::Aborted;
    } catch (...) {
        // The eager run that follows repeats the work and reports the error if it is real.
        outcome = Capture::Failed;
    }
    cudaGraph_t captured = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream, &captured);
    if (outcome == Capture::Done && end == cudaSuccess && captured) {
        *graph = captured;
        return Capture::Done;
    }
    if (captured) cudaGraphDestroy(captured);
    (void)cudaGetLastError();
    return outcome == Capture::Aborted ? Capture::Aborted : Capture::Failed;
}

} // namespace

bool LaunchGraphs::make_executable(Entry& e, cudaGraph_t graph) {
    if (e.exec) {
        cudaGraphExecUpdateResultInfo info{};
        if (cudaGraphExecUpdate(e.exec, graph, &info) == cudaSuccess) {
            ++counters_.updates;
            return true;
        }
        // Topology or a kernel's launch attributes changed: build the executable anew.
        (void)cudaGetLastError();
        cudaGraphExecDestroy(e.exec);
        e.exec = nullptr;
    }
    if (cudaGraphInstantiate(&e.exec, graph, 0) != cudaSuccess) {
        (void)cudaGetLastError();
        e.exec = nullptr;
        return false;
    }
    ++counters_.instantiations;
    return true;
}

void LaunchGraphs::drop_all() {
    for (Entry& e : entries_)
        if (e.exec) cudaGraphExecDestroy(e.exec);
    entries_.clear();
}

void LaunchGraphs::note_failure() {
    ++counters_.capture_failures;
    if (++failures_ >= kMaxFailures) {
        enabled_ = false;
        drop_all();
    }
}

void LaunchGraphs::run(cudaStream_t stream, uint64_t shape, uint64_t fingerprint, uint64_t memory_epoch,
                       const std::function<void()>& enqueue) {
    if (!enabled_) {
        ++counters_.eager;
        enqueue();
        return;
    }
    if (memory_epoch != memory_epoch_) {
        drop_all(); // they refer to scratch memory that was freed
        memory_epoch_ = memory_epoch;
    }
    ++clock_;
    if (Entry* e = find(fingerprint)) {
        e->last_use = clock_;
        GFA_CUDA_CHECK(cudaGraphLaunch(e->exec, stream));
        ++counters_.replays;
        return;
    }
    const bool repeats = seen_recently(fingerprint);
    if (recent_.size() < kRecentCalls)
        recent_.push_back(fingerprint);
    else
        recent_[recent_next_++ % kRecentCalls] = fingerprint;
    if (!repeats) {
        ++counters_.eager;
        enqueue();
        return;
    }
    cudaGraph_t graph = nullptr;
    const Capture outcome = capture_into(stream, enqueue, &graph);
    Entry& e = slot_for(shape);
    e.last_use = clock_;
    const bool ready = outcome == Capture::Done && make_executable(e, graph);
    if (graph) cudaGraphDestroy(graph); // the executable graph does not need it
    if (!ready) {
        if (outcome == Capture::Done) e.fingerprint = 0; // make_executable failed: e.exec is gone
        ++counters_.eager;
        if (outcome == Capture::Aborted) ++counters_.capture_aborts;
        enqueue(); // errors of the work itself surface here
        // Only a failure of the graph machinery counts against graphs: the eager run got
        // through, so the work itself was fine.
        if (outcome != Capture::Aborted) note_failure();
        return;
    }
    e.fingerprint = fingerprint;
    GFA_CUDA_CHECK(cudaGraphLaunch(e.exec, stream));
    ++counters_.captures;
}

std::vector<std::pair<std::string, int64_t>> LaunchGraphs::counter_list() const {
    return {{"graphs_enabled", enabled_ ? 1 : 0},
            {"graph_launches", counters_.replays + counters_.captures},
            {"graph_replays", counters_.replays},
            {"graph_captures", counters_.captures},
            {"graph_updates", counters_.updates},
            {"graph_instantiations", counters_.instantiations},
            {"eager_runs", counters_.eager},
            {"capture_failures", counters_.capture_failures},
            {"capture_aborts", counters_.capture_aborts}};
}

} // namespace gfa::cuda
