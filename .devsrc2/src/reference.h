// The reference evaluator: runs a graph in double precision with the plainest possible
// loops. Every op defines its reference semantics next to its builder (OpDef::reference);
// every backend's kernels are tested against this evaluator, and finite-difference gradient
// checks differentiate it.
#pragma once

#include <ggml-fa/graph.h>
#include <ggml-fa/tensor.h>

#include <unordered_map>
#include <vector>

namespace gfa::ref {

class Evaluator {
  public:
    // Takes the graph's leaves' current data (any type) as double values.
    explicit Evaluator(const Graph& graph);

    // Evaluates every node in graph order.
    void run();

    // Element (i0, i1, i2, i3) of t, following t's strides and view links.
    double get(const Tensor* t, int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) const;
    void set(const Tensor* t, double v, int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0);
    // Raw access to a tensor's memory at a byte offset past its start (secondary outputs).
    double get_at(const Tensor* t, size_t byte_offset) const;
    void set_at(const Tensor* t, size_t byte_offset, double v);

    // All elements of t in row-major order (dim 0 fastest).
    std::vector<double> values(const Tensor* t) const;
    // Replaces a leaf's values (row-major), e.g. to perturb it for finite differences.
    void set_values(const Tensor* leaf, const std::vector<double>& v);

  private:
    struct Storage {
        std::vector<double> slots;
    };
    size_t slot(const Tensor* t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) const;
    Storage& storage(const Tensor* t);
    const Storage& storage(const Tensor* t) const;
    void load_leaf(const Tensor* leaf);
    void quantize_rows(const Tensor* owner);

    const Graph& graph_;
    std::unordered_map<const Tensor*, Storage> memory_; // keyed by memory owner
};

// Calls fn(i0, i1, i2, i3) for every element index of t, dim 0 fastest.
template <class Fn> void for_each_index(const Tensor* t, Fn&& fn) {
    for (int64_t i3 = 0; i3 < t->ne[3]; ++i3)
        for (int64_t i2 = 0; i2 < t->ne[2]; ++i2)
            for (int64_t i1 = 0; i1 < t->ne[1]; ++i1)
                for (int64_t i0 = 0; i0 < t->ne[0]; ++i0) fn(i0, i1, i2, i3);
}

// Convenience: evaluate graph and return t's values.
std::vector<double> evaluate(const Graph& graph, const Tensor* t);

} // namespace gfa::ref
