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

// The tensors of an AdamW optimizer that build_optimizer_step created: values and moments in
// the state context (memory comes with the rest of it), the gradient norm in the graph.
struct Optimizer {
    Tensor* values = nullptr;       // f32 [kAdamWValues], read by every parameter's step
    std::vector<Tensor*> moments;   // m and v of each parameter, in graph order
    Tensor* grad_norm_sq = nullptr; // f32 [1]: the squared L2 norm of all the step's gradients
                                    // (a graph output, computed before the updates)

    // Writes p's hyperparameters and bias corrections into `values`. Call it before every
    // compute that runs the step, with p.step counting 1, 2, ... (the graph stays the same).
    void set(const AdamWParams& p) const;
    // Zeroes the moments, as before the first step (device memory starts undefined).
    void reset() const;
    // The global gradient norm of the step that ran last (before clipping).
    float grad_norm() const;
};

// Appends one AdamW step per parameter of the graph (set_param) to it, after the global norm
// of their gradients; call after build_backward. The moments and values go into `state` (give
// it memory afterwards, with the parameters or apart), the new nodes into `nodes` (the graph's
// context). Throws when a parameter has no gradient.
Optimizer build_optimizer_step(Context& state, Context& nodes, Graph& graph);
// The same with the gradients given, (parameter, gradient) pairs: an update graph of its own
// whose gradients were accumulated elsewhere (Trainer's micro-batches).
Optimizer build_optimizer_step(Context& state, Context& nodes, Graph& graph,
                               const std::vector<std::pair<Tensor*, Tensor*>>& param_grads);

} // namespace gfa
