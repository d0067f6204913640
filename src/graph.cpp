#include <ggml-fa/graph.h>
#include <ggml-fa/ops.h>

#include "op_def.h"

#include <functional>

namespace gfa {

void Graph::visit(Tensor* t) {
    // Iterative post-order walk: deep graphs (hundreds of layers) must not overflow the stack.
    struct Frame {
        Tensor* t;
        int next_src;
    };
    if (visited_.count(t)) return;
    std::vector<Frame> stack{{t, 0}};
    visited_[t] = false; // false: on the stack
    while (!stack.empty()) {
        Frame& f = stack.back();
        Tensor* dep = nullptr;
        while (f.next_src <= kMaxSrc && !dep) {
            Tensor* s = f.next_src < kMaxSrc ? f.t->src[f.next_src] : f.t->view_src;
            ++f.next_src;
            if (s && !visited_.count(s)) dep = s;
        }
        if (dep) {
            visited_[dep] = false;
            stack.push_back({dep, 0});
            continue;
        }
        Tensor* done = f.t;
        stack.pop_back();
        visited_[done] = true;
        (done->op == Op::None ? leafs_ : nodes_).push_back(done);
    }
}

void Graph::expand(Tensor* out) {
    if (!out) fail("Graph::expand: null tensor");
    visit(out);
}

Tensor* Graph::grad(const Tensor* t) const {
    auto it = grads_.find(t);
    return it == grads_.end() ? nullptr : it->second;
}

Graph build_forward(Tensor* out) {
    Graph g;
    g.expand(out);
    return g;
}

// ---- autodiff --------------------------------------------------------------------------

bool GradCtx::needs_grad(const Tensor* t) const {
    return t && needs_.count(t) != 0;
}

void GradCtx::accumulate(Tensor* t, Tensor* g) {
    if (!needs_grad(t)) return;
    if (g->ne != t->ne)
        fail(std::string("autodiff: gradient ") + g->shape_str() + " does not match its tensor " +
             t->shape_str() + " (made by " + op_name(t->op) + ")");
    if (g->type != Type::F32) g = cast(ctx, g, Type::F32);
    Tensor* prev = graph_.grad(t);
    graph_.set_grad(t, prev ? add(ctx, prev, g) : g);
}

void build_backward(Context& ctx, Graph& graph, Tensor* loss) {
    if (!loss) {
        for (Tensor* n : graph.nodes())
            if (n->has_flag(kFlagLoss)) loss = n;
        if (!loss) fail("build_backward: no loss given and no node is marked with set_loss");
    }
    if (!graph.contains(loss)) fail("build_backward: the loss is not part of the graph");
    if (loss->nelements() != 1)
        fail("build_backward: the loss must have one element, got " + loss->shape_str());

    GradCtx gctx(ctx, graph);
    // Forward order: a tensor needs a gradient when a parameter reaches it.
    std::vector<Tensor*> params;
    for (Tensor* l : graph.leafs())
        if (l->has_flag(kFlagParam)) {
            gctx.mark_needs_grad(l);
            params.push_back(l);
        }
    for (Tensor* n : graph.nodes()) {
        if (n->has_flag(kFlagParam)) {
            gctx.mark_needs_grad(n);
            params.push_back(n);
        }
        for (Tensor* s : n->src)
            if (gctx.needs_grad(s)) gctx.mark_needs_grad(n);
    }
    if (params.empty()) fail("build_backward: no tensor is marked with set_param");

    const std::vector<Tensor*> forward = graph.nodes(); // the backward appends; iterate a copy
    graph.set_grad(loss, fill(ctx, Type::F32, {loss->ne[0], loss->ne[1], loss->ne[2], loss->ne[3]}, 1.0f));
    for (auto it = forward.rbegin(); it != forward.rend(); ++it) {
        Tensor* node = *it;
        Tensor* grad = graph.grad(node);
        if (!grad || !gctx.needs_grad(node)) continue;
        const OpDef& def = op_def(node->op);
        if (!def.backward) {
            fail(std::string("build_backward: op '") + def.name + "' (tensor '" + node->name + "' " +
                 node->shape_str() + ") has no gradient, but a parameter's gradient flows through it");
        }
        def.backward(gctx, node, grad);
    }
    for (Tensor* p : params) {
        Tensor* g = graph.grad(p);
        if (!g) fail("build_backward: parameter '" + p->name + "' does not influence the loss");
        if (g->op == Op::None || g->is_view()) { // e.g. the loss itself: give it its own node
            g = cont(ctx, g);
            graph.set_grad(p, g);
        }
        set_output(g);
        graph.expand(g);
    }
}

} // namespace gfa
