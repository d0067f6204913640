// Activations: silu, gelu (tanh approximation or exact erf), relu, swiglu, and the internal
// ops their gradients use (SiluBack, GeluBack, Step). Inputs and results are f32.
#include "op_def.h"
#include "reference.h"

#include <cmath>
#include <numbers>

namespace gfa {

namespace {

Tensor* unary(Context& ctx, Op op, Tensor* a) {
    require_not_null(op, {a});
    if (a->type != Type::F32) op_error(op, "input must be f32 (use cast)", {a});
    Tensor* t = ctx.new_node(op, Type::F32, a->ne);
    set_sources(t, {a});
    return t;
}

// Two same-shaped f32 inputs (gradient and forward input, or gate and up).
Tensor* binary_same_shape(Context& ctx, Op op, Tensor* a, Tensor* b) {
    require_not_null(op, {a, b});
    if (a->type != Type::F32 || b->type != Type::F32) op_error(op, "inputs must be f32 (use cast)", {a, b});
    if (!same_shape(a, b)) op_error(op, "inputs must have the same shape", {a, b});
    Tensor* t = ctx.new_node(op, Type::F32, a->ne);
    set_sources(t, {a, b});
    return t;
}

// ---- the math, in double (the CPU kernels spell the same formulas in float) ----

constexpr double kGeluTanhC = 0.7978845608028654; // sqrt(2 / pi)
constexpr double kGeluCubic = 0.044715;

double sigmoid(double x) {
    return 1.0 / (1.0 + std::exp(-x));
}
double silu_value(double x) {
    return x * sigmoid(x);
}
// d silu / dx = s + x s (1 - s) = s (1 + x (1 - s))
double silu_slope(double x) {
    const double s = sigmoid(x);
    return s * (1.0 + x * (1.0 - s));
}
double gelu_value(double x, GeluApprox approx) {
    if (approx == GeluApprox::Erf) return 0.5 * x * (1.0 + std::erf(x / std::numbers::sqrt2));
    return 0.5 * x * (1.0 + std::tanh(kGeluTanhC * (x + kGeluCubic * x * x * x)));
}
double gelu_slope(double x, GeluApprox approx) {
    if (approx == GeluApprox::Erf) {
        // Phi(x) + x phi(x)
        const double pdf = std::exp(-0.5 * x * x) / std::sqrt(2.0 * std::numbers::pi);
        return 0.5 * (1.0 + std::erf(x / std::numbers::sqrt2)) + x * pdf;
    }
    const double th = std::tanh(kGeluTanhC * (x + kGeluCubic * x * x * x));
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * kGeluTanhC * (1.0 + 3.0 * kGeluCubic * x * x);
}

// ---- gradients ----

void silu_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], silu_back(g.ctx, grad, node->src[0]));
}
void gelu_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], gelu_back(g.ctx, grad, node->src[0], node->params<GeluParams>().approx));
}
void relu_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], mul(g.ctx, grad, step(g.ctx, node->src[0])));
}
// The step function is flat wherever it is differentiable.
void step_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], scale(g.ctx, grad, 0.0f));
}
void swiglu_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    Tensor *gate = node->src[0], *up = node->src[1];
    if (g.needs_grad(gate)) g.accumulate(gate, silu_back(g.ctx, mul(g.ctx, grad, up), gate));
    if (g.needs_grad(up)) g.accumulate(up, mul(g.ctx, grad, silu(g.ctx, gate)));
}

// ---- reference semantics ----

template <class F> void unary_reference(ref::Evaluator& ev, const Tensor* n, F f) {
    ref::for_each_index(n, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        ev.set(n, f(ev.get(n->src[0], i0, i1, i2, i3)), i0, i1, i2, i3);
    });
}
template <class F> void binary_reference(ref::Evaluator& ev, const Tensor* n, F f) {
    ref::for_each_index(n, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        ev.set(n, f(ev.get(n->src[0], i0, i1, i2, i3), ev.get(n->src[1], i0, i1, i2, i3)), i0, i1, i2, i3);
    });
}

void silu_reference(ref::Evaluator& ev, const Tensor* n) {
    unary_reference(ev, n, silu_value);
}
void gelu_reference(ref::Evaluator& ev, const Tensor* n) {
    const GeluApprox approx = n->params<GeluParams>().approx;
    unary_reference(ev, n, [approx](double x) { return gelu_value(x, approx); });
}
void relu_reference(ref::Evaluator& ev, const Tensor* n) {
    unary_reference(ev, n, [](double x) { return x > 0.0 ? x : 0.0; });
}
void step_reference(ref::Evaluator& ev, const Tensor* n) {
    unary_reference(ev, n, [](double x) { return x > 0.0 ? 1.0 : 0.0; });
}
void swiglu_reference(ref::Evaluator& ev, const Tensor* n) {
    binary_reference(ev, n, [](double gate, double up) { return silu_value(gate) * up; });
}
// Sources: (dy, x).
void silu_back_reference(ref::Evaluator& ev, const Tensor* n) {
    binary_reference(ev, n, [](double dy, double x) { return dy * silu_slope(x); });
}
void gelu_back_reference(ref::Evaluator& ev, const Tensor* n) {
    const GeluApprox approx = n->params<GeluParams>().approx;
    binary_reference(ev, n, [approx](double dy, double x) { return dy * gelu_slope(x, approx); });
}

} // namespace

Tensor* silu(Context& ctx, Tensor* a) {
    return unary(ctx, Op::Silu, a);
}
Tensor* gelu(Context& ctx, Tensor* a, GeluApprox approx) {
    if (approx != GeluApprox::Tanh && approx != GeluApprox::Erf)
        op_error(Op::Gelu, "approximation must be Tanh or Erf, got " + std::to_string(int(approx)), {a});
    Tensor* t = unary(ctx, Op::Gelu, a);
    t->set_params(GeluParams{approx});
    return t;
}
Tensor* relu(Context& ctx, Tensor* a) {
    return unary(ctx, Op::Relu, a);
}
Tensor* step(Context& ctx, Tensor* a) {
    return unary(ctx, Op::Step, a);
}
Tensor* swiglu(Context& ctx, Tensor* gate, Tensor* up) {
    return binary_same_shape(ctx, Op::Swiglu, gate, up);
}
Tensor* silu_back(Context& ctx, Tensor* grad, Tensor* x) {
    return binary_same_shape(ctx, Op::SiluBack, grad, x);
}
Tensor* gelu_back(Context& ctx, Tensor* grad, Tensor* x, GeluApprox approx) {
    Tensor* t = binary_same_shape(ctx, Op::GeluBack, grad, x);
    t->set_params(GeluParams{approx});
    return t;
}

void define_activation_ops(OpTable& t) {
    t[size_t(Op::Silu)] = {
        .name = "silu", .backward = silu_backward, .reference = silu_reference, .inplace_ok = true};
    t[size_t(Op::SiluBack)] = {.name = "silu_back", .reference = silu_back_reference, .inplace_ok = true};
    t[size_t(Op::Gelu)] = {
        .name = "gelu", .backward = gelu_backward, .reference = gelu_reference, .inplace_ok = true};
    t[size_t(Op::GeluBack)] = {.name = "gelu_back", .reference = gelu_back_reference, .inplace_ok = true};
    t[size_t(Op::Relu)] = {
        .name = "relu", .backward = relu_backward, .reference = relu_reference, .inplace_ok = true};
    t[size_t(Op::Step)] = {
        .name = "step", .backward = step_backward, .reference = step_reference, .inplace_ok = true};
    t[size_t(Op::Swiglu)] = {
        .name = "swiglu", .backward = swiglu_backward, .reference = swiglu_reference, .inplace_ok = true};
}

} // namespace gfa
