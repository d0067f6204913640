// Training ops: cross-entropy loss and the AdamW optimizer step.
#include "op_def.h"
#include "reference.h"

#include <cmath>

namespace gfa {

void build_optimizer_step(Context& ctx, Graph& graph, const AdamWParams& p, std::vector<Tensor*>* state) {
    std::vector<Tensor*> params;
    for (Tensor* l : graph.leafs())
        if (l->has_flag(kFlagParam)) params.push_back(l);
    for (Tensor* param : params) {
        Tensor* g = graph.grad(param);
        if (!g)
            fail("build_optimizer_step: parameter '" + param->name +
                 "' has no gradient; call build_backward first");
        Tensor* m = set_name(ctx.new_tensor(Type::F32, param->ne), param->name + ".adam_m");
        Tensor* v = set_name(ctx.new_tensor(Type::F32, param->ne), param->name + ".adam_v");
        if (state) {
            state->push_back(m);
            state->push_back(v);
        }
        graph.expand(adamw_step(ctx, param, g, m, v, p));
    }
}

Tensor* adamw_step(Context& ctx, Tensor* param, Tensor* grad, Tensor* m, Tensor* v, const AdamWParams& p) {
    require_not_null(Op::AdamW, {param, grad, m, v});
    for (const Tensor* t : {param, grad, m, v})
        if (t->type != Type::F32 || !t->is_contiguous() || t->ne != param->ne)
            op_error(Op::AdamW, "param, grad, m and v must be contiguous f32 of one shape",
                     {param, grad, m, v});
    if (p.step < 1) op_error(Op::AdamW, "step is 1-based, got " + std::to_string(p.step), {param});
    Tensor* t = ctx.new_view(param, param->type, param->ne, param->nb, 0, Op::AdamW);
    set_sources(t, {param, grad, m, v});
    t->set_params(p);
    return t;
}

namespace {

// One decoupled-weight-decay Adam update of element i (shared by the reference and the
// CPU kernel through the same formula, each in its own precision).
void adamw_reference(ref::Evaluator& ev, const Tensor* n) {
    const AdamWParams p = n->params<AdamWParams>();
    const Tensor *param = n->src[0], *grad = n->src[1], *m = n->src[2], *v = n->src[3];
    const double c1 = 1.0 - std::pow(double(p.beta1), p.step), c2 = 1.0 - std::pow(double(p.beta2), p.step);
    ref::for_each_index(param, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        const double g = ev.get(grad, i0, i1, i2, i3);
        const double mi = p.beta1 * ev.get(m, i0, i1, i2, i3) + (1.0 - p.beta1) * g;
        const double vi = p.beta2 * ev.get(v, i0, i1, i2, i3) + (1.0 - p.beta2) * g * g;
        const double w = ev.get(param, i0, i1, i2, i3);
        const double update = (mi / c1) / (std::sqrt(vi / c2) + p.eps) + p.weight_decay * w;
        ev.set(m, mi, i0, i1, i2, i3);
        ev.set(v, vi, i0, i1, i2, i3);
        ev.set(n, w - p.lr * update, i0, i1, i2, i3);
    });
}

} // namespace

void define_training_ops(OpTable& t) {
    t[size_t(Op::AdamW)] = {.name = "adamw", .reference = adamw_reference, .writes_view_src = true};
}

} // namespace gfa
