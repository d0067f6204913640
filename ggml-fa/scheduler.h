// The scheduler runs one graph over several backends. Each node goes to the highest
// priority backend whose device supports it (a node that reads a weight prefers the device
// the weight lives on); the graph is cut into per-backend splits in graph order, with
// explicit copies of the inputs a split reads from another backend's memory; each backend's
// memory is planned by its own graph allocator. An op that falls back to a lower-priority
// backend is logged once, so a slow path is visible, never silent.
#pragma once

#include <ggml-fa/alloc.h>
#include <ggml-fa/backend.h>
#include <ggml-fa/graph.h>

#include <functional>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace gfa {

// Receives one line per event (no trailing newline). An empty function silences the log.
using LogCallback = std::function<void(const std::string& line)>;

class Scheduler {
  public:
    // Backends in priority order, most preferred first. The last one should be able to run
    // everything (normally the CPU): nodes no backend supports are an error.
    explicit Scheduler(std::vector<Backend*> backends_in_priority_order);
    ~Scheduler();
    Scheduler(const Scheduler&) = delete;
    Scheduler& operator=(const Scheduler&) = delete;

    // Default: lines go to stderr prefixed with "ggml-fa: ".
    void set_log(LogCallback log) { log_ = std::move(log); }

    // Plans a worst-case graph and reserves every backend's buffer for it; graphs no
    // larger run without allocating. Returns the bytes reserved over all backends.
    size_t reserve(const Graph& worst_case);
    // Assigns, splits and places the graph (inputs without data get memory here: set their
    // values after this call). Calling it again for the same graph keeps the placement.
    void allocate(Graph& graph);
    // Runs the graph, allocating it first when it is not the graph last allocated:
    // submit() then wait().
    void compute(Graph& graph);
    // compute() in two halves, for callers that time them: submit() hands every split to its
    // backend (waiting only where a split reads another backend's results), wait() waits
    // until every backend has finished.
    void submit(Graph& graph);
    void wait();

    // The plan of the graph last allocated.
    int n_splits() const { return int(plan_ ? plan_->splits.size() : 0); }
    int n_copies() const;
    // The backend that computes the node (views: where their memory lives); nullptr when
    // the tensor is not part of the last plan or lives outside every backend.
    Backend* backend_of(const Tensor* t) const;
    // One line per split: backend, node count, copied inputs.
    std::string describe() const;
    // One line per backend with the counters it keeps (Backend::counters()), e.g. how many
    // calls a CUDA backend replayed as graphs, or each op's time with GFA_CPU_OP_TIMES=1;
    // empty when none keeps any.
    std::string describe_counters() const;

    const std::vector<Backend*>& backends() const { return backends_; }
    // The graph allocator of each backend (same order as backends()).
    const GraphAllocator& allocator(size_t backend_index) const;

  private:
    struct Copy {
        Tensor* from;
        Tensor* to;
    };
    struct Split {
        int backend;
        std::vector<Tensor*> nodes; // nodes to compute (no views)
        std::vector<Copy> inputs;   // copied in before the split runs
    };
    struct Redirect {
        Tensor* node;
        int src_index;
        Tensor* replacement;
    };
    struct Plan {
        std::unique_ptr<Context> copies; // the copy tensors
        std::unordered_map<const Tensor*, int> backend;
        std::vector<Split> splits;
        std::vector<Redirect> redirects;
        std::vector<MemoryStep> steps;
        std::vector<Tensor*> nodes, leafs; // the graph this plan is for
    };

    std::unique_ptr<Plan> make_plan(const Graph& graph);
    bool is_external(const Tensor* t) const; // has memory the scheduler did not give it
    int home_backend(const BufferType* bt) const;
    bool supports(int b, const Tensor* node) const;
    void log_fallback(const Tensor* node, int chosen);
    void copy_tensor(const Copy& c) const;

    std::vector<Backend*> backends_;
    std::vector<std::unique_ptr<GraphAllocator>> allocators_;
    std::unique_ptr<Plan> plan_;
    LogCallback log_;
    std::set<std::pair<int, int>> logged_; // (op, backend) fallbacks already reported
};

} // namespace gfa
