// The graph allocator: liveness over one execution order, best-fit reuse of freed ranges in
// one virtual address range, and in-place reuse for ops that allow it.
#include <ggml-fa/alloc.h>

#include "op_def.h"

#include <algorithm>

namespace gfa {

namespace {

const Tensor* owner_of(const Tensor* t) {
    return t->view_src ? t->view_src : t;
}

size_t align_up(size_t n, size_t alignment) {
    return (n + alignment - 1) / alignment * alignment;
}

// Free ranges of a virtual address space that grows at its top. alloc() takes the smallest
// free range that fits (best fit); a range freed at the top lowers the top, so the next
// allocation can extend it. The peak is the highest top ever reached.
class FreeList {
  public:
    size_t alloc(size_t size) {
        size_t best = free_.size();
        for (size_t i = 0; i < free_.size(); ++i)
            if (free_[i].size >= size && (best == free_.size() || free_[i].size < free_[best].size)) best = i;
        if (best != free_.size()) {
            const size_t offset = free_[best].offset;
            free_[best].offset += size;
            free_[best].size -= size;
            if (free_[best].size == 0) free_.erase(free_.begin() + std::ptrdiff_t(best));
            return offset;
        }
        const size_t offset = top_;
        top_ += size;
        peak_ = std::max(peak_, top_);
        return offset;
    }

    void release(size_t offset, size_t size) {
        if (size == 0) return;
        auto it = std::lower_bound(free_.begin(), free_.end(), offset,
                                   [](const Range& r, size_t off) { return r.offset < off; });
        it = free_.insert(it, Range{offset, size});
        // Merge with the following range, then with the preceding one.
        if (it + 1 != free_.end() && it->offset + it->size == (it + 1)->offset) {
            it->size += (it + 1)->size;
            free_.erase(it + 1);
        }
        if (it != free_.begin() && (it - 1)->offset + (it - 1)->size == it->offset) {
            (it - 1)->size += it->size;
            it = free_.erase(it) - 1;
        }
        if (!free_.empty() && free_.back().offset + free_.back().size == top_) {
            top_ = free_.back().offset;
            free_.pop_back();
        }
    }

    size_t peak() const { return peak_; }

  private:
    struct Range {
        size_t offset, size;
    };
    std::vector<Range> free_; // sorted by offset, never adjacent
    size_t top_ = 0, peak_ = 0;
};

constexpr size_t kMaxRememberedPlacements = size_t(1) << 16;

bool is_kept_by_flags(const Tensor* t) {
    return (t->flags & (kFlagInput | kFlagOutput | kFlagParam)) != 0;
}

} // namespace

struct GraphAllocator::Plan {
    std::unordered_map<const Tensor*, size_t> offsets; // tensors to place (not views)
    std::vector<Tensor*> views;                        // views to point at their source
    size_t peak = 0, total = 0, n_inplace = 0;
};

GraphAllocator::GraphAllocator(BufferType* type) : type_(type) {
    if (!type) fail("GraphAllocator: null buffer type");
}

GraphAllocator::~GraphAllocator() = default;

std::vector<MemoryStep> graph_steps(const Graph& graph) {
    std::vector<MemoryStep> steps;
    steps.reserve(graph.leafs().size() + graph.nodes().size());
    for (Tensor* leaf : graph.leafs()) steps.push_back(MemoryStep{.out = leaf, .reads = {}, .keep = true});
    for (Tensor* node : graph.nodes())
        steps.push_back(MemoryStep{.out = node, .reads = node->src, .keep = false});
    return steps;
}

bool GraphAllocator::placed(const Tensor* t) const {
    auto it = placed_.find(t);
    return it != placed_.end() && it->second.data == t->data && it->second.buffer == t->buffer;
}

PlacementFilter GraphAllocator::unplaced_filter() const {
    return [this](const Tensor* t) { return t->data == nullptr || placed(t); };
}

GraphAllocator::Plan GraphAllocator::make_plan(std::span<const MemoryStep> steps,
                                               const PlacementFilter& mine) const {
    const size_t alignment = type_->alignment();
    // Readers left per memory owner: a view's readers keep its owner alive.
    // Sized up front: rehashing as they grow is a good part of planning a decode graph.
    std::unordered_map<const Tensor*, int> readers_left;
    std::unordered_map<const Tensor*, int> direct_readers;
    readers_left.reserve(steps.size());
    direct_readers.reserve(steps.size());
    for (const MemoryStep& s : steps)
        for (Tensor* r : s.reads)
            if (r) {
                ++readers_left[owner_of(r)];
                ++direct_readers[r];
            }
    // Memory that must survive the whole order: leaves and inputs, flagged outputs and
    // params, and the owner of a view that is itself a result (nobody reads it, the user will).
    std::unordered_set<const Tensor*> kept;
    for (const MemoryStep& s : steps) {
        if (!s.out) continue;
        if (s.keep || is_kept_by_flags(s.out)) kept.insert(owner_of(s.out));
        if (s.out->view_src && direct_readers.count(s.out) == 0) kept.insert(owner_of(s.out));
    }
    for (const MemoryStep& s : steps)
        for (Tensor* r : s.reads)
            if (r && is_kept_by_flags(r)) kept.insert(owner_of(r));

    Plan plan;
    plan.offsets.reserve(steps.size());
    FreeList free_list;
    struct Block {
        size_t offset, size;
    };
    std::unordered_map<const Tensor*, Block> live; // memory owner -> its block
    live.reserve(steps.size());

    for (const MemoryStep& s : steps) {
        Tensor* t = s.out;
        if (t && t->view_src) {
            // Views follow their source: one this plan places, or one that already has
            // memory elsewhere when the view itself is this allocator's.
            if (plan.offsets.count(t->view_src) || (mine(t) && !mine(t->view_src))) plan.views.push_back(t);
        } else if (t && mine(t) && !plan.offsets.count(t)) {
            const size_t size = align_up(t->alloc_bytes(), alignment);
            plan.total += size;
            bool done = false;
            const OpDef& def = op_def(t->op);
            Tensor* src = t->src[0];
            if (!s.keep && def.inplace_ok && src && size > 0) {
                const Tensor* o = owner_of(src);
                auto block = live.find(o);
                // In place: the source is ours and alive, nobody reads it after this step,
                // and it has exactly the node's layout (so element i is read before written).
                int reads_here = 0;
                bool aliases_ok = true;
                for (Tensor* r : s.reads)
                    if (r && owner_of(r) == o) {
                        ++reads_here;
                        if (r != src) aliases_ok = false;
                    }
                if (block != live.end() && !kept.count(o) && readers_left[o] == reads_here && aliases_ok &&
                    src->type == t->type && src->is_contiguous() && t->is_contiguous() &&
                    (!src->view_src || src->view_offs == 0) && block->second.size == size &&
                    src->alloc_bytes() == t->alloc_bytes()) {
                    plan.offsets[t] = block->second.offset;
                    live[t] = block->second;
                    live.erase(block);
                    ++plan.n_inplace;
                    done = true;
                }
            }
            if (!done) {
                const size_t offset = size ? free_list.alloc(size) : 0;
                plan.offsets[t] = offset;
                if (size) live[t] = Block{offset, size};
            }
        }
        for (Tensor* r : s.reads) {
            if (!r) continue;
            const Tensor* o = owner_of(r);
            if (--readers_left[o] > 0 || kept.count(o)) continue;
            auto block = live.find(o);
            if (block == live.end()) continue;
            free_list.release(block->second.offset, block->second.size);
            live.erase(block);
        }
    }
    plan.peak = free_list.peak();
    return plan;
}

void GraphAllocator::ensure_buffer(size_t size) {
    if (buffer_ && buffer_->size() >= size) return;
    buffer_.reset(); // give the old memory back before asking for more
    buffer_ = type_->allocate(std::max<size_t>(size, type_->alignment()));
    ++n_buffer_allocations_;
}

size_t GraphAllocator::reserve(std::span<const MemoryStep> steps, const PlacementFilter& mine) {
    const Plan plan = make_plan(steps, mine);
    peak_ = plan.peak;
    total_ = plan.total;
    n_inplace_ = plan.n_inplace;
    ensure_buffer(plan.peak);
    return plan.peak;
}

void GraphAllocator::allocate(std::span<const MemoryStep> steps, const PlacementFilter& mine) {
    const Plan plan = make_plan(steps, mine);
    peak_ = plan.peak;
    total_ = plan.total;
    n_inplace_ = plan.n_inplace;
    ensure_buffer(plan.peak);
    // Remember every placement (so alternating graphs are each planned again), but do not
    // grow without bound when every call brings a fresh graph.
    if (placed_.size() > kMaxRememberedPlacements) placed_.clear();
    for (const auto& [t, offset] : plan.offsets) {
        Tensor* mut = const_cast<Tensor*>(t);
        mut->data = nullptr;
        buffer_->place(mut, offset);
        placed_[t] = Placement{mut->data, mut->buffer};
    }
    for (Tensor* v : plan.views) {
        if (!v->view_src->data) continue; // its source is another allocator's, placed later
        place_view(v);
        placed_[v] = Placement{v->data, v->buffer};
    }
}

size_t GraphAllocator::reserve(const Graph& worst_case) {
    const std::vector<MemoryStep> steps = graph_steps(worst_case);
    return reserve(steps, unplaced_filter());
}

void GraphAllocator::allocate(Graph& graph) {
    const std::vector<MemoryStep> steps = graph_steps(graph);
    allocate(steps, unplaced_filter());
}

size_t GraphAllocator::sum_of_intermediates(const Graph& graph) const {
    const PlacementFilter mine = unplaced_filter();
    size_t sum = 0;
    for (const Tensor* n : graph.nodes())
        if (!n->view_src && mine(n)) sum += align_up(n->alloc_bytes(), type_->alignment());
    return sum;
}

size_t GraphAllocator::buffer_size() const {
    return buffer_ ? buffer_->size() : 0;
}

size_t GraphAllocator::offset_of(const Tensor* t) const {
    if (!placed(t) || !buffer_ || t->buffer != buffer_.get())
        fail("GraphAllocator::offset_of: tensor '" + t->name + "' was not placed by this allocator");
    return size_t(static_cast<const char*>(t->data) - static_cast<const char*>(buffer_->base()));
}

std::unique_ptr<Buffer> allocate_context_tensors(Context& ctx, BufferType* type) {
    if (!type) fail("allocate_context_tensors: null buffer type");
    const size_t alignment = type->alignment();
    std::vector<Tensor*> todo;
    size_t total = 0;
    for (Tensor* t : ctx.tensors())
        if (!t->data && !t->view_src) {
            todo.push_back(t);
            total += align_up(t->alloc_bytes(), alignment);
        }
    std::unique_ptr<Buffer> buffer = type->allocate(std::max(total, alignment));
    size_t offset = 0;
    for (Tensor* t : todo) {
        buffer->place(t, offset);
        offset += align_up(t->alloc_bytes(), alignment);
    }
    for (Tensor* t : ctx.tensors())
        if (t->view_src && !t->data && t->view_src->data) place_view(t);
    return buffer;
}

} // namespace gfa
