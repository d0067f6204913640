// How an op is defined (internal). Each op family file in src/ops/ holds, for its ops, the
// builder (shape rule + validation + params, declared in ggml-fa/ops.h) and the OpDef below
// (name, gradient rule, memory behaviour). Backends register kernels separately.
#pragma once

#include <ggml-fa/graph.h>
#include <ggml-fa/ops.h>
#include <ggml-fa/tensor.h>

#include <array>
#include <unordered_map>
#include <unordered_set>
#include <string>

namespace gfa {

namespace ref {
class Evaluator;
}

// What a gradient rule gets: the context to build nodes in and the accumulator.
class GradCtx {
  public:
    GradCtx(Context& ctx, Graph& graph) : ctx(ctx), graph_(graph) {}
    Context& ctx;
    // Does t lie on a path from a parameter (so its gradient is wanted)?
    bool needs_grad(const Tensor* t) const;
    // Adds g to t's gradient (g must have t's shape; it is reduced to t's type as f32).
    void accumulate(Tensor* t, Tensor* g);
    // Internal, used by build_backward.
    void mark_needs_grad(const Tensor* t) { needs_.insert(t); }
    Graph& graph() { return graph_; }

  private:
    Graph& graph_;
    std::unordered_set<const Tensor*> needs_;
};

struct OpDef {
    const char* name = nullptr;
    // Appends nodes computing the sources' gradients from dL/dnode (`grad`, f32, the node's
    // shape). nullptr: the op has no gradient (differentiating through it is an error).
    void (*backward)(GradCtx& g, Tensor* node, Tensor* grad) = nullptr;
    // The op's meaning in double precision, written as plainly as possible: reads the
    // sources and writes the node through the evaluator. Every backend is tested against it.
    void (*reference)(ref::Evaluator& ev, const Tensor* node) = nullptr;
    // The node only reinterprets its source's memory (reshape, view, permute, transpose).
    bool is_view = false;
    // The output may be written over src[0]'s memory when src[0] has no later reader and
    // the same size (element-wise ops). The allocator uses this to reuse memory in place.
    bool inplace_ok = false;
    // The op writes into the memory of the tensor it views (cpy into b, set_rows, adamw):
    // it must run even though nothing reads it afterwards.
    bool writes_view_src = false;
};

using OpTable = std::array<OpDef, size_t(Op::Count)>;
const OpDef& op_def(Op op);

// Op families register their definitions here (one function per src/ops/ file).
void define_movement_ops(OpTable& t);
void define_elementwise_ops(OpTable& t);
void define_reduce_ops(OpTable& t);
void define_matmul_ops(OpTable& t);
void define_norm_ops(OpTable& t);
void define_activation_ops(OpTable& t);
void define_training_ops(OpTable& t);
void define_attention_ops(OpTable& t);

// ---- helpers for builders --------------------------------------------------------------

// Throws "op: message (a = f32[...], b = ...)".
[[noreturn]] void op_error(Op op, const std::string& message, std::initializer_list<const Tensor*> tensors);
void require_not_null(Op op, std::initializer_list<const Tensor*> tensors);
// Gradient helpers shared by op families: sum a broadcast gradient back to `like`'s shape
// (identity when the shapes agree), and scatter-add rows back (get_rows' gradient).
Tensor* repeat_back(Context& ctx, Tensor* grad, Tensor* like);
Tensor* get_rows_back(Context& ctx, Tensor* grad, Tensor* rows, Tensor* like);

// ---- internal ops of the nn families (backward ops and their parameters) ---------------

// Stored on DiagMaskInf nodes: the public n_past, then the value written above the
// diagonal: -inf for diag_mask_inf, 0 for its gradient (which masks the same entries).
struct DiagMaskNodeParams {
    int32_t n_past;
    float fill;
};
Tensor* diag_mask_fill(Context& ctx, Tensor* a, int n_past, float fill);
// dx of layer norm / RMS norm from dy and the forward input x (params: NormParams).
Tensor* norm_back(Context& ctx, Tensor* grad, Tensor* x, float eps);
Tensor* rms_norm_back(Context& ctx, Tensor* grad, Tensor* x, float eps);
// Rotates by the negated angle: the transpose of rope, hence its gradient (params: RopeParams).
Tensor* rope_back(Context& ctx, Tensor* grad, Tensor* pos, const RopeParams& p, Tensor* freq_factors = nullptr);
// dx = scale * y * (dy - sum(dy * y)) per row, y the softmax output (params: SoftMaxParams).
Tensor* soft_max_back(Context& ctx, Tensor* grad, Tensor* y, float scale);
// grad * d act(x)/dx (GeluBack carries GeluParams).
Tensor* silu_back(Context& ctx, Tensor* grad, Tensor* x);
Tensor* gelu_back(Context& ctx, Tensor* grad, Tensor* x, GeluApprox approx);
Tensor* step(Context& ctx, Tensor* a); // 1 where a > 0, else 0
// d(cross-entropy)/d logits from the scalar upstream gradient (sources: grad, logits, labels).
Tensor* cross_entropy_loss_back(Context& ctx, Tensor* grad, Tensor* logits, Tensor* labels);

// Copies the source pointers into node->src.
void set_sources(Tensor* node, std::initializer_list<Tensor*> srcs);

} // namespace gfa
