// Training ops: cross-entropy loss (and its backward op) and the AdamW optimizer step.
#include "op_def.h"
#include "reference.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace gfa {

Optimizer build_optimizer_step(Context& state, Context& nodes, Graph& graph) {
    std::vector<std::pair<Tensor*, Tensor*>> param_grads;
    for (Tensor* l : graph.leafs())
        if (l->has_flag(kFlagParam)) {
            Tensor* g = graph.grad(l);
            if (!g)
                fail("build_optimizer_step: parameter '" + l->name +
                     "' has no gradient; call build_backward first");
            param_grads.emplace_back(l, g);
        }
    return build_optimizer_step(state, nodes, graph, param_grads);
}

Optimizer build_optimizer_step(Context& state, Context& nodes, Graph& graph,
                               const std::vector<std::pair<Tensor*, Tensor*>>& param_grads) {
    if (param_grads.empty()) fail("build_optimizer_step: the graph has no parameters (set_param)");
    Optimizer opt;
    opt.values = set_name(state.new_tensor(Type::F32, {kAdamWValues}), "adamw.values");
    set_input(opt.values);
    for (const auto& [param, g] : param_grads) {
        Tensor* sq = sum(nodes, sqr(nodes, g));
        opt.grad_norm_sq = opt.grad_norm_sq ? add(nodes, opt.grad_norm_sq, sq) : sq;
    }
    set_name(opt.grad_norm_sq, "adamw.grad_norm_sq");
    set_output(opt.grad_norm_sq);
    graph.expand(opt.grad_norm_sq); // every update comes after the norm, which reads every gradient
    for (const auto& [param, g] : param_grads) {
        Tensor* m = set_name(state.new_tensor(Type::F32, param->ne), param->name + ".adam_m");
        Tensor* v = set_name(state.new_tensor(Type::F32, param->ne), param->name + ".adam_v");
        opt.moments.push_back(m);
        opt.moments.push_back(v);
        graph.expand(adamw_step(nodes, param, g, m, v, opt.values, opt.grad_norm_sq));
    }
    return opt;
}

std::array<float, kAdamWValues> adamw_values(const AdamWParams& p) {
    if (p.step < 1) fail("adamw: the step is 1-based, got " + std::to_string(p.step));
    if (!(p.beta1 >= 0.0f && p.beta1 < 1.0f && p.beta2 >= 0.0f && p.beta2 < 1.0f))
        fail("adamw: beta1 and beta2 must lie in [0, 1), got " + std::to_string(p.beta1) + " and " +
             std::to_string(p.beta2));
    // The bias corrections in double: in float, 1 - 0.999^1 keeps only ~4 digits.
    const double c1 = 1.0 - std::pow(double(p.beta1), p.step), c2 = 1.0 - std::pow(double(p.beta2), p.step);
    if (!(p.grad_clip >= 0.0f))
        fail("adamw: grad_clip must not be negative, got " + std::to_string(p.grad_clip));
    return {p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, float(c1), float(c2), p.grad_clip};
}

void Optimizer::set(const AdamWParams& p) const {
    const std::array<float, kAdamWValues> a = adamw_values(p);
    tensor_set_f32(values, std::vector<float>(a.begin(), a.end()));
}

float Optimizer::grad_norm() const {
    return std::sqrt(tensor_get_f32(grad_norm_sq)[0]);
}

void Optimizer::reset() const {
    for (Tensor* t : moments) tensor_set_f32(t, std::vector<float>(size_t(t->nelements()), 0.0f));
}

namespace {

// Labels given as i32 class indices, one per row of logits ([ne1, ne2, ne3]).
bool class_labels(const Tensor* logits, const Tensor* labels) {
    return labels->type == Type::I32 && labels->ne[0] == logits->ne[1] && labels->ne[1] == logits->ne[2] &&
           labels->ne[2] == logits->ne[3] && labels->ne[3] == 1;
}

void check_labels(Op op, Tensor* logits, Tensor* labels) {
    if (logits->type != Type::F32) op_error(op, "logits must be f32", {logits, labels});
    if (labels->type == Type::I32) {
        if (!class_labels(logits, labels))
            op_error(op,
                     "i32 labels hold one class per row of logits: their shape must be logits' without dim 0",
                     {logits, labels});
    } else if (labels->type != Type::F32 || !same_shape(logits, labels)) {
        op_error(op, "labels must be f32 of the logits' shape, or i32 classes per row", {logits, labels});
    }
}

} // namespace

Tensor* cross_entropy_loss(Context& ctx, Tensor* logits, Tensor* labels) {
    const Op op = Op::CrossEntropyLoss;
    require_not_null(op, {logits, labels});
    check_labels(op, logits, labels);
    Tensor* t = ctx.new_node(op, Type::F32, {1, 1, 1, 1});
    set_sources(t, {logits, labels});
    return t;
}

Tensor* cross_entropy_loss_back(Context& ctx, Tensor* grad, Tensor* logits, Tensor* labels) {
    const Op op = Op::CrossEntropyLossBack;
    require_not_null(op, {grad, logits, labels});
    if (grad->nelements() != 1 || grad->type != Type::F32)
        op_error(op, "the upstream gradient must be one f32 value", {grad, logits, labels});
    check_labels(op, logits, labels);
    Tensor* t = ctx.new_node(op, Type::F32, logits->ne);
    set_sources(t, {grad, logits, labels});
    return t;
}

Tensor* adamw_step(Context& ctx, Tensor* param, Tensor* grad, Tensor* m, Tensor* v, Tensor* values,
                   Tensor* grad_norm_sq) {
    require_not_null(Op::AdamW, {param, grad, m, v, values});
    for (const Tensor* t : {param, grad, m, v})
        if (t->type != Type::F32 || !t->is_contiguous() || t->ne != param->ne)
            op_error(Op::AdamW, "param, grad, m and v must be contiguous f32 of one shape",
                     {param, grad, m, v});
    if (values->type != Type::F32 || !values->is_contiguous() || values->nelements() != kAdamWValues)
        op_error(Op::AdamW, "values must be contiguous f32 of " + std::to_string(kAdamWValues) + " elements",
                 {values});
    if (grad_norm_sq && (grad_norm_sq->type != Type::F32 || grad_norm_sq->nelements() != 1))
        op_error(Op::AdamW, "grad_norm_sq must be one f32 value", {grad_norm_sq});
    Tensor* t = ctx.new_view(param, param->type, param->ne, param->nb, 0, Op::AdamW);
    set_sources(t, {param, grad, m, v, values, grad_norm_sq});
    return t;
}

namespace {

// One decoupled-weight-decay Adam update of element i (shared by the reference and the
// CPU kernel through the same formula, each in its own precision).
void adamw_reference(ref::Evaluator& ev, const Tensor* n) {
    const Tensor *param = n->src[0], *grad = n->src[1], *m = n->src[2], *v = n->src[3], *values = n->src[4];
    double a[kAdamWValues];
    for (int64_t i = 0; i < kAdamWValues; ++i) a[i] = ev.get(values, i);
    const double lr = a[0], beta1 = a[1], beta2 = a[2], eps = a[3], decay = a[4], c1 = a[5], c2 = a[6];
    const double clip = n->src[5] ? adamw_clip_factor(a[7], ev.get(n->src[5], 0)) : 1.0;
    ref::for_each_index(param, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        const double g = clip * ev.get(grad, i0, i1, i2, i3);
        const double mi = beta1 * ev.get(m, i0, i1, i2, i3) + (1.0 - beta1) * g;
        const double vi = beta2 * ev.get(v, i0, i1, i2, i3) + (1.0 - beta2) * g * g;
        const double w = ev.get(param, i0, i1, i2, i3);
        const double update = (mi / c1) / (std::sqrt(vi / c2) + eps) + decay * w;
        ev.set(m, mi, i0, i1, i2, i3);
        ev.set(v, vi, i0, i1, i2, i3);
        ev.set(n, w - lr * update, i0, i1, i2, i3);
    });
}

// The labels are treated as constants: only the logits get a gradient.
void cross_entropy_loss_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], cross_entropy_loss_back(g.ctx, grad, node->src[0], node->src[1]));
}

// log_softmax of one row of logits, stably: x - max - log(sum(exp(x - max))).
std::vector<double> log_softmax_row(const ref::Evaluator& ev, const Tensor* x, int64_t i1, int64_t i2,
                                    int64_t i3) {
    std::vector<double> r(size_t(x->ne[0]));
    double max = -INFINITY;
    for (int64_t c = 0; c < x->ne[0]; ++c) max = std::max(max, r[size_t(c)] = ev.get(x, c, i1, i2, i3));
    double sum = 0.0;
    for (double v : r) sum += std::exp(v - max);
    const double lse = max + std::log(sum);
    for (double& v : r) v -= lse;
    return r;
}

// Row (i1, i2, i3)'s label for class c: the f32 value, or 1 for the row's class index.
double label_of(const ref::Evaluator& ev, const Tensor* logits, const Tensor* labels, int64_t c, int64_t i1,
                int64_t i2, int64_t i3) {
    if (labels->type != Type::I32) return ev.get(labels, c, i1, i2, i3);
    const double target = ev.get(labels, i1, i2, i3);
    if (target < 0 || target >= double(logits->ne[0]))
        fail("cross_entropy_loss: class " + std::to_string(int64_t(target)) + " is out of range [0, " +
             std::to_string(logits->ne[0]) + ")");
    return double(c) == target ? 1.0 : 0.0;
}

// loss = -(1 / n_rows) * sum_rows sum_c labels_c * log_softmax(logits)_c
void cross_entropy_loss_reference(ref::Evaluator& ev, const Tensor* n) {
    const Tensor *logits = n->src[0], *labels = n->src[1];
    double total = 0.0;
    ref::for_each_index(logits, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        if (i0 != 0) return;
        const std::vector<double> lsm = log_softmax_row(ev, logits, i1, i2, i3);
        for (int64_t c = 0; c < logits->ne[0]; ++c)
            total -= label_of(ev, logits, labels, c, i1, i2, i3) * lsm[size_t(c)];
    });
    ev.set(n, total / double(logits->nrows()), 0);
}

// d loss / d logits_c = (softmax_c * sum(labels) - labels_c) * grad / n_rows; with labels that
// are probabilities (rows summing to 1) this is the familiar softmax - labels.
void cross_entropy_loss_back_reference(ref::Evaluator& ev, const Tensor* n) {
    const Tensor *grad = n->src[0], *logits = n->src[1], *labels = n->src[2];
    const double g = ev.get(grad, 0) / double(logits->nrows());
    ref::for_each_index(logits, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        if (i0 != 0) return;
        const std::vector<double> lsm = log_softmax_row(ev, logits, i1, i2, i3);
        double label_sum = 0.0;
        for (int64_t c = 0; c < logits->ne[0]; ++c) label_sum += label_of(ev, logits, labels, c, i1, i2, i3);
        for (int64_t c = 0; c < logits->ne[0]; ++c)
            ev.set(n,
                   (std::exp(lsm[size_t(c)]) * label_sum - label_of(ev, logits, labels, c, i1, i2, i3)) * g,
                   c, i1, i2, i3);
    });
}

} // namespace

void define_training_ops(OpTable& t) {
    t[size_t(Op::CrossEntropyLoss)] = {.name = "cross_entropy_loss",
                                       .backward = cross_entropy_loss_backward,
                                       .reference = cross_entropy_loss_reference};
    t[size_t(Op::CrossEntropyLossBack)] = {.name = "cross_entropy_loss_back",
                                           .reference = cross_entropy_loss_back_reference};
    t[size_t(Op::AdamW)] = {.name = "adamw", .reference = adamw_reference, .writes_view_src = true};
}

} // namespace gfa
