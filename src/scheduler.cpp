// The scheduler: assignment of nodes to backends, splits, copies between backends' memory,
// one graph allocator per backend, and the run loop.
#include <ggml-fa/scheduler.h>

#include "op_def.h"

#include <cstdio>
#include <map>

namespace gfa {

namespace {

Tensor* owner_of(Tensor* t) {
    return t->view_src ? t->view_src : t;
}
const Tensor* owner_of(const Tensor* t) {
    return t->view_src ? t->view_src : t;
}

// Bytes from a tensor's first element to the end of its last, for any stride order.
size_t strided_span(const Tensor* t) {
    const TypeTraits& tt = type_traits(t->type);
    if (t->nelements() == 0) return 0;
    if (tt.block_size > 1) return t->nbytes();
    size_t span = tt.type_size;
    for (int i = 0; i < kMaxDims; ++i) span += size_t(t->ne[i] - 1) * t->nb[i];
    return span;
}

bool is_pure_view(const Tensor* t) {
    return t->op != Op::None && op_def(t->op).is_view;
}

// Puts the copies in place of the sources they stand for while a graph runs, and restores
// the user's graph afterwards, even when a backend throws.
class RedirectGuard {
  public:
    template <class R> explicit RedirectGuard(const std::vector<R>& redirects) {
        for (const R& r : redirects) {
            saved_.push_back({r.node, r.src_index, r.node->src[size_t(r.src_index)]});
            r.node->src[size_t(r.src_index)] = r.replacement;
        }
    }
    ~RedirectGuard() {
        for (auto it = saved_.rbegin(); it != saved_.rend(); ++it)
            it->node->src[size_t(it->index)] = it->original;
    }

  private:
    struct Saved {
        Tensor* node;
        int index;
        Tensor* original;
    };
    std::vector<Saved> saved_;
};

} // namespace

Scheduler::Scheduler(std::vector<Backend*> backends) : backends_(std::move(backends)) {
    if (backends_.empty()) fail("Scheduler: no backends given");
    for (Backend* b : backends_) {
        if (!b) fail("Scheduler: null backend");
        allocators_.push_back(std::make_unique<GraphAllocator>(b->device()->buffer_type()));
    }
    log_ = [](const std::string& line) { std::fprintf(stderr, "ggml-fa: %s\n", line.c_str()); };
}

Scheduler::~Scheduler() = default;

const GraphAllocator& Scheduler::allocator(size_t i) const {
    if (i >= allocators_.size()) fail("Scheduler::allocator: no backend " + std::to_string(i));
    return *allocators_[i];
}

bool Scheduler::is_external(const Tensor* t) const {
    if (!t->data) return false;
    for (const auto& a : allocators_)
        if (a->placed(t)) return false;
    return true;
}

int Scheduler::home_backend(const BufferType* bt) const {
    for (size_t i = 0; i < backends_.size(); ++i)
        if (backends_[i]->device() == bt->device()) return int(i);
    return -1;
}

bool Scheduler::supports(int b, const Tensor* node) const {
    return backends_[size_t(b)]->device()->supports_op(node);
}

void Scheduler::log_fallback(const Tensor* node, int chosen) {
    if (!logged_.insert({int(node->op), chosen}).second || !log_) return;
    log_(std::string("op ") + op_name(node->op) + " on " + backends_[size_t(chosen)]->name() +
         ": not supported by " + backends_[0]->name());
}

int Scheduler::n_copies() const {
    int n = 0;
    if (plan_)
        for (const Split& s : plan_->splits) n += int(s.inputs.size());
    return n;
}

Backend* Scheduler::backend_of(const Tensor* t) const {
    if (!plan_) return nullptr;
    auto it = plan_->backend.find(t);
    return it == plan_->backend.end() || it->second < 0 ? nullptr : backends_[size_t(it->second)];
}

std::unique_ptr<Scheduler::Plan> Scheduler::make_plan(const Graph& graph) {
    auto plan = std::make_unique<Plan>();
    plan->copies = std::make_unique<Context>();
    plan->nodes = graph.nodes();
    plan->leafs = graph.leafs();
    auto& where = plan->backend;
    where.reserve(2 * (graph.nodes().size() + graph.leafs().size())); // with room for the copies
    const int n_backends = int(backends_.size());

    // Where a tensor's memory is: the buffer type it was given, or the one of its backend.
    auto location = [&](const Tensor* t) -> const BufferType* {
        const Tensor* o = owner_of(t);
        if (is_external(o)) return o->buffer->type();
        auto it = where.find(o);
        if (it == where.end() || it->second < 0) fail("Scheduler: tensor '" + o->name + "' has no placement");
        return backends_[size_t(it->second)]->device()->buffer_type();
    };

    // 1. Nodes that own their memory: weights pull them to their device; a node without
    //    weights stays with the data it reads when that data was placed by weights (or by
    //    data placed so), so a model split by layers crosses between backends once per
    //    boundary instead of at every op that has no weights (a norm, a rope, an add);
    //    otherwise the highest-priority backend that supports it. A node placed by
    //    fallback is not followed: the nodes after it return to the preferred backend.
    std::map<const Tensor*, int> placed_by_data; // and in which order
    for (Tensor* n : graph.nodes()) {
        if (n->view_src) continue;
        int chosen = -1;
        for (Tensor* s : n->src) {
            if (!s) continue;
            const Tensor* o = owner_of(s);
            if (o->op != Op::None || !is_external(o)) continue;
            const int home = home_backend(o->buffer->type());
            if (home >= 0 && supports(home, n)) {
                chosen = home;
                break;
            }
        }
        if (chosen < 0) {
            // The newest such source: the residual stream read beside a block's output is
            // older than the output, and the block's backend is where the next ops belong.
            int newest = -1;
            for (Tensor* s : n->src) {
                const Tensor* o = s ? owner_of(s) : nullptr;
                auto it = o ? placed_by_data.find(o) : placed_by_data.end();
                if (it != placed_by_data.end() && it->second > newest) {
                    newest = it->second;
                    chosen = where[o];
                }
            }
            if (chosen >= 0 && !supports(chosen, n)) chosen = -1;
        }
        if (chosen >= 0) placed_by_data.emplace(n, int(placed_by_data.size()));
        if (chosen < 0) {
            for (int b = 0; b < n_backends && chosen < 0; ++b)
                if (supports(b, n)) chosen = b;
            if (chosen < 0)
                fail(std::string("Scheduler: no backend supports ") + op_name(n->op) + " on " +
                     n->shape_str() + " (node '" + n->name + "')");
            if (chosen > 0) log_fallback(n, chosen);
        }
        where[n] = chosen;
    }

    // 2. Leaves the scheduler places (inputs): with the first node that reads them.
    for (Tensor* l : graph.leafs())
        if (!is_external(l)) where[l] = -1;
    for (Tensor* n : graph.nodes()) {
        if (n->view_src) continue;
        for (Tensor* s : n->src) {
            if (!s) continue;
            auto it = where.find(owner_of(s));
            if (it != where.end() && it->second < 0 && owner_of(s)->op == Op::None) it->second = where[n];
        }
    }
    // 3. Views live with their memory; nodes that write into a view's memory run on a
    //    backend that can use that memory, and the leaves they update (optimizer state)
    //    live with them.
    for (Tensor* n : graph.nodes()) {
        if (!n->view_src) continue;
        Tensor* o = n->view_src;
        int home = -1;
        if (is_external(o)) {
            home = home_backend(o->buffer->type());
        } else {
            auto it = where.find(o);
            if (it == where.end())
                fail("Scheduler: the source of view '" + n->name + "' is not in the graph");
            home = it->second;
        }
        if (is_pure_view(n)) {
            where[n] = home >= 0 ? home : 0; // only for placement: views compute nothing
            continue;
        }
        int chosen = -1;
        if (!is_external(o) && home < 0) { // writes into a leaf nobody else placed yet
            for (int b = 0; b < n_backends && chosen < 0; ++b)
                if (supports(b, n)) chosen = b;
            if (chosen > 0) log_fallback(n, chosen);
            if (chosen >= 0) where[o] = chosen;
        } else {
            const BufferType* bt = location(o);
            if (home >= 0 && supports(home, n)) chosen = home;
            for (int b = 0; b < n_backends && chosen < 0; ++b)
                if (backends_[size_t(b)]->device()->can_use(bt) && supports(b, n)) chosen = b;
            if (chosen >= 0 && chosen != home && home >= 0) log_fallback(n, chosen);
        }
        if (chosen < 0)
            fail(std::string("Scheduler: no backend that can use the memory it writes supports ") +
                 op_name(n->op) + " (node '" + n->name + "' " + n->shape_str() + ")");
        where[n] = chosen;
        for (Tensor* s : n->src) {
            if (!s) continue;
            auto it = where.find(owner_of(s));
            if (it != where.end() && it->second < 0) it->second = chosen;
        }
    }
    for (Tensor* l : graph.leafs())
        if (!is_external(l) && where[l] < 0) where[l] = n_backends - 1; // never read by a node

    // 4. Splits in graph order, with a copy for every source that lives where the split's
    //    backend cannot read it (one copy per source and split). The copies run before
    //    the split's first node, so their memory steps come first: nothing the split
    //    computes may be placed over a copy before it is read.
    for (Tensor* l : graph.leafs()) plan->steps.push_back(MemoryStep{.out = l, .reads = {}, .keep = true});
    std::map<const Tensor*, Tensor*> copied; // within the current split
    std::vector<MemoryStep> copy_steps, node_steps;
    auto flush = [&] {
        plan->steps.insert(plan->steps.end(), copy_steps.begin(), copy_steps.end());
        plan->steps.insert(plan->steps.end(), node_steps.begin(), node_steps.end());
        copy_steps.clear();
        node_steps.clear();
    };
    for (Tensor* n : graph.nodes()) {
        if (is_pure_view(n)) {
            node_steps.push_back(MemoryStep{.out = n, .reads = n->src, .keep = false});
            continue;
        }
        const int b = where[n];
        if (plan->splits.empty() || plan->splits.back().backend != b) {
            flush();
            plan->splits.push_back(Split{b, {}, {}});
            copied.clear();
        }
        Split& split = plan->splits.back();
        Device* dev = backends_[size_t(b)]->device();
        MemoryStep step{.out = n, .reads = n->src, .keep = false};
        for (int i = 0; i < kMaxSrc; ++i) {
            Tensor* s = n->src[size_t(i)];
            if (!s || dev->can_use(location(s))) continue;
            Tensor*& c = copied[s];
            if (!c) {
                c = plan->copies->new_tensor(s->type, s->ne);
                c->nb = s->nb; // same layout, so the bytes copy as they are
                c->extra_bytes = s->view_src ? 0 : s->extra_bytes;
                // A view's strides need not grow with the dim (transposes): cover every byte
                // up to its last element.
                if (c->alloc_bytes() < strided_span(s)) c->extra_bytes = strided_span(s) - c->nbytes();
                c->name = (s->name.empty() ? std::string(op_name(s->op)) : s->name) + "#" +
                          backends_[size_t(b)]->name();
                where[c] = b;
                split.inputs.push_back(Copy{s, c});
                copy_steps.push_back(MemoryStep{.out = c, .reads = {s}, .keep = false});
            }
            plan->redirects.push_back(Redirect{n, i, c});
            step.reads[size_t(i)] = c;
        }
        split.nodes.push_back(n);
        node_steps.push_back(step);
    }
    flush();
    return plan;
}

size_t Scheduler::reserve(const Graph& worst_case) {
    std::unique_ptr<Plan> plan = make_plan(worst_case);
    size_t total = 0;
    for (size_t b = 0; b < backends_.size(); ++b) {
        const auto& where = plan->backend;
        const GraphAllocator& alloc = *allocators_[b];
        PlacementFilter mine = [&where, &alloc, b](const Tensor* t) {
            auto it = where.find(t);
            return it != where.end() && it->second == int(b) && (!t->data || alloc.placed(t));
        };
        allocators_[b]->reserve(plan->steps, mine);
        total += allocators_[b]->buffer_size();
    }
    return total;
}

void Scheduler::allocate(Graph& graph) {
    if (plan_ && plan_->nodes == graph.nodes() && plan_->leafs == graph.leafs()) {
        bool placed = true;
        for (Tensor* n : graph.nodes()) placed = placed && n->data;
        if (placed) return;
    }
    plan_.reset();
    std::unique_ptr<Plan> plan = make_plan(graph);
    for (size_t b = 0; b < backends_.size(); ++b) {
        const GraphAllocator& alloc = *allocators_[b];
        const auto& where = plan->backend;
        PlacementFilter mine = [&where, &alloc, b](const Tensor* t) {
            auto it = where.find(t);
            return it != where.end() && it->second == int(b) && (!t->data || alloc.placed(t));
        };
        allocators_[b]->allocate(plan->steps, mine);
    }
    // Views whose memory another backend's allocator placed after theirs ran.
    for (Tensor* n : graph.nodes())
        if (n->view_src) {
            if (!n->view_src->data) fail("Scheduler: the source of view '" + n->name + "' has no memory");
            place_view(n);
        }
    plan_ = std::move(plan);
}

void Scheduler::copy_tensor(const Copy& c) const {
    const size_t bytes = c.to->alloc_bytes();
    if (bytes == 0) return;
    if (!c.from->data) fail("Scheduler: copy source '" + c.from->name + "' has no memory");
    const bool from_host = c.from->buffer->type()->is_host();
    const bool to_host = c.to->buffer->type()->is_host();
    if (from_host) {
        c.to->buffer->set(c.to, c.from->data, 0, bytes);
    } else if (to_host) {
        c.from->buffer->get(c.from, c.to->data, 0, bytes);
    } else { // device to device: through host memory
        std::vector<std::byte> staging(bytes);
        c.from->buffer->get(c.from, staging.data(), 0, bytes);
        c.to->buffer->set(c.to, staging.data(), 0, bytes);
    }
}

void Scheduler::submit(Graph& graph) {
    allocate(graph);
    // Backends read the sources while they queue the work, so the user's graph can be
    // restored as soon as the last split is handed over.
    RedirectGuard guard(plan_->redirects);
    for (const Split& split : plan_->splits) {
        if (!split.inputs.empty()) {
            // The sources were written by other backends, possibly still running.
            for (Backend* b : backends_) b->synchronize();
            for (const Copy& c : split.inputs) copy_tensor(c);
        }
        backends_[size_t(split.backend)]->compute(split.nodes);
    }
}

void Scheduler::wait() {
    for (Backend* b : backends_) b->synchronize();
}

void Scheduler::compute(Graph& graph) {
    submit(graph);
    wait();
}

std::string Scheduler::describe_counters() const {
    std::string out;
    for (const Backend* b : backends_) {
        const auto counters = b->counters();
        if (counters.empty()) continue;
        out += b->name();
        out += ":";
        for (const auto& [name, value] : counters) out += " " + name + " " + std::to_string(value);
        out += "\n";
    }
    return out;
}

std::string Scheduler::describe() const {
    std::string out;
    if (!plan_) return "no graph allocated\n";
    for (size_t i = 0; i < plan_->splits.size(); ++i) {
        const Split& s = plan_->splits[i];
        out += "split " + std::to_string(i) + ": " + backends_[size_t(s.backend)]->name() + ", " +
               std::to_string(s.nodes.size()) + " nodes";
        if (!s.inputs.empty()) {
            out += ", copies in:";
            for (const Copy& c : s.inputs) out += " " + c.to->name;
        }
        out += "\n";
    }
    return out;
}

} // namespace gfa
