// Element-wise arithmetic with row broadcasting (b repeated over a) and unary math.
// Inputs and results are f32; cast() converts other types first.
#include "op_def.h"
#include "reference.h"

#include <cmath>

namespace gfa {

namespace {

Tensor* binary(Context& ctx, Op op, Tensor* a, Tensor* b) {
    require_not_null(op, {a, b});
    if (a->type != Type::F32 || b->type != Type::F32) op_error(op, "inputs must be f32 (use cast)", {a, b});
    if (!can_repeat(b, a)) op_error(op, "b cannot be broadcast to a: each dim of b must divide a's", {a, b});
    Tensor* t = ctx.new_node(op, Type::F32, a->ne);
    set_sources(t, {a, b});
    return t;
}

Tensor* unary(Context& ctx, Op op, Tensor* a) {
    require_not_null(op, {a});
    if (a->type != Type::F32) op_error(op, "input must be f32 (use cast)", {a});
    Tensor* t = ctx.new_node(op, Type::F32, a->ne);
    set_sources(t, {a});
    return t;
}

void add_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], grad);
    if (g.needs_grad(node->src[1])) g.accumulate(node->src[1], repeat_back(g.ctx, grad, node->src[1]));
}
void sub_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], grad);
    if (g.needs_grad(node->src[1]))
        g.accumulate(node->src[1], repeat_back(g.ctx, neg(g.ctx, grad), node->src[1]));
}
void mul_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    Tensor *a = node->src[0], *b = node->src[1];
    if (g.needs_grad(a)) g.accumulate(a, mul(g.ctx, grad, b));
    if (g.needs_grad(b)) g.accumulate(b, repeat_back(g.ctx, mul(g.ctx, grad, a), b));
}
void div_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    Tensor *a = node->src[0], *b = node->src[1];
    if (g.needs_grad(a)) g.accumulate(a, div(g.ctx, grad, b));
    // d(a/b)/db = -a/b^2 = -node/b
    if (g.needs_grad(b))
        g.accumulate(b, repeat_back(g.ctx, neg(g.ctx, div(g.ctx, mul(g.ctx, grad, node), b)), b));
}
void scale_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], scale(g.ctx, grad, node->params<ScaleParams>().scale));
}
void sqr_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], mul(g.ctx, scale(g.ctx, grad, 2.0f), node->src[0]));
}
void sqrt_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], div(g.ctx, scale(g.ctx, grad, 0.5f), node));
}
void exp_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], mul(g.ctx, grad, node));
}
void log_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], div(g.ctx, grad, node->src[0]));
}
void neg_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], neg(g.ctx, grad));
}
void tanh_backward(GradCtx& g, Tensor* node, Tensor* grad) { // d tanh = 1 - tanh^2
    g.accumulate(node->src[0], mul(g.ctx, grad, scale(g.ctx, sqr(g.ctx, node), -1.0f, 1.0f)));
}

template <class F> void binary_reference(ref::Evaluator& ev, const Tensor* node, F f) {
    const Tensor *a = node->src[0], *b = node->src[1];
    ref::for_each_index(node, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        const double y = ev.get(b, i0 % b->ne[0], i1 % b->ne[1], i2 % b->ne[2], i3 % b->ne[3]);
        ev.set(node, f(ev.get(a, i0, i1, i2, i3), y), i0, i1, i2, i3);
    });
}
template <class F> void unary_reference(ref::Evaluator& ev, const Tensor* node, F f) {
    ref::for_each_index(node, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        ev.set(node, f(ev.get(node->src[0], i0, i1, i2, i3)), i0, i1, i2, i3);
    });
}

void add_reference(ref::Evaluator& ev, const Tensor* n) {
    binary_reference(ev, n, [](double x, double y) { return x + y; });
}
void sub_reference(ref::Evaluator& ev, const Tensor* n) {
    binary_reference(ev, n, [](double x, double y) { return x - y; });
}
void mul_reference(ref::Evaluator& ev, const Tensor* n) {
    binary_reference(ev, n, [](double x, double y) { return x * y; });
}
void div_reference(ref::Evaluator& ev, const Tensor* n) {
    binary_reference(ev, n, [](double x, double y) { return x / y; });
}
void scale_reference(ref::Evaluator& ev, const Tensor* n) {
    const ScaleParams p = n->params<ScaleParams>();
    unary_reference(ev, n, [p](double x) { return x * p.scale + p.bias; });
}
void sqr_reference(ref::Evaluator& ev, const Tensor* n) {
    unary_reference(ev, n, [](double x) { return x * x; });
}
void sqrt_reference(ref::Evaluator& ev, const Tensor* n) {
    unary_reference(ev, n, [](double x) { return std::sqrt(x); });
}
void exp_reference(ref::Evaluator& ev, const Tensor* n) {
    unary_reference(ev, n, [](double x) { return std::exp(x); });
}
void log_reference(ref::Evaluator& ev, const Tensor* n) {
    unary_reference(ev, n, [](double x) { return std::log(x); });
}
void neg_reference(ref::Evaluator& ev, const Tensor* n) {
    unary_reference(ev, n, [](double x) { return -x; });
}
void tanh_reference(ref::Evaluator& ev, const Tensor* n) {
    unary_reference(ev, n, [](double x) { return std::tanh(x); });
}

} // namespace

Tensor* add(Context& ctx, Tensor* a, Tensor* b) {
    return binary(ctx, Op::Add, a, b);
}
Tensor* sub(Context& ctx, Tensor* a, Tensor* b) {
    return binary(ctx, Op::Sub, a, b);
}
Tensor* mul(Context& ctx, Tensor* a, Tensor* b) {
    return binary(ctx, Op::Mul, a, b);
}
Tensor* div(Context& ctx, Tensor* a, Tensor* b) {
    return binary(ctx, Op::Div, a, b);
}
Tensor* scale(Context& ctx, Tensor* a, float s, float bias) {
    Tensor* t = unary(ctx, Op::Scale, a);
    t->set_params(ScaleParams{s, bias});
    return t;
}
Tensor* sqr(Context& ctx, Tensor* a) {
    return unary(ctx, Op::Sqr, a);
}
Tensor* sqrt(Context& ctx, Tensor* a) {
    return unary(ctx, Op::Sqrt, a);
}
Tensor* exp(Context& ctx, Tensor* a) {
    return unary(ctx, Op::Exp, a);
}
Tensor* log(Context& ctx, Tensor* a) {
    return unary(ctx, Op::Log, a);
}
Tensor* neg(Context& ctx, Tensor* a) {
    return unary(ctx, Op::Neg, a);
}
Tensor* tanh(Context& ctx, Tensor* a) {
    return unary(ctx, Op::Tanh, a);
}

void define_elementwise_ops(OpTable& t) {
    t[size_t(Op::Add)] = {
        .name = "add", .backward = add_backward, .reference = add_reference, .inplace_ok = true};
    t[size_t(Op::Sub)] = {
        .name = "sub", .backward = sub_backward, .reference = sub_reference, .inplace_ok = true};
    t[size_t(Op::Mul)] = {
        .name = "mul", .backward = mul_backward, .reference = mul_reference, .inplace_ok = true};
    t[size_t(Op::Div)] = {
        .name = "div", .backward = div_backward, .reference = div_reference, .inplace_ok = true};
    t[size_t(Op::Scale)] = {
        .name = "scale", .backward = scale_backward, .reference = scale_reference, .inplace_ok = true};
    t[size_t(Op::Sqr)] = {
        .name = "sqr", .backward = sqr_backward, .reference = sqr_reference, .inplace_ok = true};
    t[size_t(Op::Sqrt)] = {
        .name = "sqrt", .backward = sqrt_backward, .reference = sqrt_reference, .inplace_ok = true};
    t[size_t(Op::Exp)] = {
        .name = "exp", .backward = exp_backward, .reference = exp_reference, .inplace_ok = true};
    t[size_t(Op::Log)] = {
        .name = "log", .backward = log_backward, .reference = log_reference, .inplace_ok = true};
    t[size_t(Op::Neg)] = {
        .name = "neg", .backward = neg_backward, .reference = neg_reference, .inplace_ok = true};
    t[size_t(Op::Tanh)] = {
        .name = "tanh", .backward = tanh_backward, .reference = tanh_reference, .inplace_ok = true};
}

} // namespace gfa
