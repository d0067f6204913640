// Planned memory: the graph allocator walks an execution order once, gives each tensor
// memory when it is produced and takes it back after its last reader, reusing a source's
// memory in place where the op allows. A worst-case graph can be measured ahead of time
// (reserve), so later graphs of the same shape or smaller run without allocating.
#pragma once

#include <ggml-fa/backend.h>
#include <ggml-fa/graph.h>
#include <ggml-fa/tensor.h>

#include <array>
#include <functional>
#include <memory>
#include <span>
#include <unordered_map>
#include <unordered_set>

namespace gfa {

// One step of an execution order: `out` (may be null) is produced after `reads` are read.
// A graph gives one step per leaf (keep = true) and one per node (reads = its sources);
// the scheduler builds its own order with the copies it inserts between backends.
struct MemoryStep {
    Tensor* out = nullptr;
    std::array<Tensor*, kMaxSrc> reads{};
    bool keep = false; // out lives to the end of the order (leaves, inputs)
};

// Which tensors an allocator is responsible for placing.
using PlacementFilter = std::function<bool(const Tensor*)>;

class GraphAllocator {
  public:
    explicit GraphAllocator(BufferType* type);
    ~GraphAllocator();
    GraphAllocator(const GraphAllocator&) = delete;
    GraphAllocator& operator=(const GraphAllocator&) = delete;

    // Plans the graph, remembers its peak and allocates one buffer of that size (or keeps
    // the current one when it is large enough). Places nothing. Returns the peak in bytes.
    size_t reserve(const Graph& worst_case);
    // Places every node and every leaf that has no data yet in the buffer (views get their
    // source's memory), growing the buffer only when the plan needs more than it has.
    // Tensors placed by an earlier allocate() of this allocator are planned again.
    void allocate(Graph& graph);

    // The same over an explicit execution order; `mine` selects the tensors to place
    // (tensors it rejects are only followed as readers).
    size_t reserve(std::span<const MemoryStep> steps, const PlacementFilter& mine);
    void allocate(std::span<const MemoryStep> steps, const PlacementFilter& mine);

    // Peak bytes of the last plan (reserve or allocate).
    size_t peak_bytes() const { return peak_; }
    // What the last plan would take without any reuse: every placed tensor in its own block.
    size_t planned_total_bytes() const { return total_; }
    // Nodes of the last plan written over their source's memory.
    size_t n_inplace() const { return n_inplace_; }
    // Bytes all intermediates of the graph would take with no reuse (the same sizes and
    // alignment as the plan), the number the peak is compared against.
    size_t sum_of_intermediates(const Graph& graph) const;

    size_t buffer_size() const;
    Buffer* buffer() const { return buffer_.get(); }
    BufferType* buffer_type() const { return type_; }
    // How many buffers this allocator has allocated so far (reserve + growth).
    int n_buffer_allocations() const { return n_buffer_allocations_; }
    // Is t (a tensor or a view) still where an allocate() of this allocator put it?
    bool placed(const Tensor* t) const;
    // Byte offset of a tensor this allocator placed (views: their source's offset + theirs).
    size_t offset_of(const Tensor* t) const;

    // The default filter of the graph overloads: no data yet, or placed by this allocator.
    PlacementFilter unplaced_filter() const;

  private:
    struct Plan;
    Plan make_plan(std::span<const MemoryStep> steps, const PlacementFilter& mine) const;
    void ensure_buffer(size_t size);

    BufferType* type_;
    std::unique_ptr<Buffer> buffer_;
    int n_buffer_allocations_ = 0;
    size_t peak_ = 0, total_ = 0, n_inplace_ = 0;
    // What allocate() set on each tensor it placed: a tensor still holding exactly that is
    // ours to plan again; anything else with data belongs to someone else.
    struct Placement {
        void* data;
        Buffer* buffer;
    };
    std::unordered_map<const Tensor*, Placement> placed_;
};

// The execution order of a graph: one keep step per leaf, then one step per node.
std::vector<MemoryStep> graph_steps(const Graph& graph);

// Allocates every tensor of ctx that has no data (and is not a view) in one buffer of the
// given type and places it there; views of them follow. Meant for weights and inputs.
std::unique_ptr<Buffer> allocate_context_tensors(Context& ctx, BufferType* type);

} // namespace gfa
