// Compute graphs and automatic differentiation.
//
// A graph is the topologically ordered list of nodes that produce its outputs, plus the
// leaves they read. build_backward() appends the gradient computation to the same graph,
// so one allocation plan and one compute call run forward and backward together.
#pragma once

#include <ggml-fa/ops.h>
#include <ggml-fa/tensor.h>

#include <unordered_map>
#include <vector>

namespace gfa {

class Graph {
  public:
    // Adds out and every node it depends on (once each) in dependency order.
    void expand(Tensor* out);

    const std::vector<Tensor*>& nodes() const { return nodes_; }
    const std::vector<Tensor*>& leafs() const { return leafs_; }
    bool contains(const Tensor* t) const { return visited_.count(t) != 0; }

    // The gradient tensor of t after build_backward (nullptr when t has none).
    Tensor* grad(const Tensor* t) const;

    // Internal (autodiff): record the accumulated gradient of t.
    void set_grad(const Tensor* t, Tensor* g) { grads_[t] = g; }

  private:
    void visit(Tensor* t);
    std::vector<Tensor*> nodes_;
    std::vector<Tensor*> leafs_;
    std::unordered_map<const Tensor*, bool> visited_;
    std::unordered_map<const Tensor*, Tensor*> grads_;
};

Graph build_forward(Tensor* out);

// Differentiates the graph's loss (a one-element tensor marked with set_loss, or `loss`)
// with respect to every tensor marked with set_param, appending the gradient nodes to the
// graph; grads are marked as outputs. Throws for a loss that is not a scalar, or when a
// path to a parameter goes through an op that has no gradient.
void build_backward(Context& ctx, Graph& graph, Tensor* loss);

// Appends one AdamW step per parameter (the optimizer state tensors m and v are created in
// ctx and returned through `state`, two per parameter in graph order). They must hold zeros
// before the first step: fill their buffer with 0 after allocating it (device memory, and
// reused host memory, start undefined).
void build_optimizer_step(Context& ctx, Graph& graph, const AdamWParams& p, std::vector<Tensor*>* state);

} // namespace gfa
