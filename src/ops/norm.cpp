// Normalization, position encoding and softmax: norm, rms_norm, rope, soft_max(_ext),
// diag_mask_inf, and their backward ops (NormBack, RmsNormBack, RopeBack, SoftMaxBack; the
// gradient of diag_mask_inf is the same op filling zeros).
#include "op_def.h"
#include "reference.h"

#include <cmath>
#include <limits>

namespace gfa {

namespace {

Tensor* row_op(Context& ctx, Op op, std::initializer_list<Tensor*> srcs) {
    for (const Tensor* s : srcs) {
        if (!s) op_error(op, "a required input is null", {});
        if (s->type != Type::F32) op_error(op, "inputs must be f32 (use cast)", {srcs.begin()[0]});
    }
    Tensor* t = ctx.new_node(op, Type::F32, srcs.begin()[0]->ne);
    set_sources(t, srcs);
    return t;
}

void check_eps(Op op, float eps, const Tensor* a) {
    if (!(eps >= 0.0f) || !std::isfinite(eps))
        op_error(op, "eps must be finite and >= 0, got " + std::to_string(eps), {a});
}

Tensor* norm_like(Context& ctx, Op op, Tensor* a, float eps) {
    require_not_null(op, {a});
    check_eps(op, eps, a);
    Tensor* t = row_op(ctx, op, {a});
    t->set_params(NormParams{eps});
    return t;
}

Tensor* norm_back_like(Context& ctx, Op op, Tensor* grad, Tensor* x, float eps) {
    require_not_null(op, {grad, x});
    if (!same_shape(grad, x)) op_error(op, "gradient and input shapes differ", {grad, x});
    Tensor* t = row_op(ctx, op, {grad, x});
    t->set_params(NormParams{eps});
    return t;
}

void validate_rope(Op op, const Tensor* a, const Tensor* pos, const RopeParams& p, const Tensor* factors) {
    require_not_null(op, {a, pos});
    if (a->type != Type::F32) op_error(op, "a must be f32 (use cast)", {a, pos});
    if (pos->type != Type::I32) op_error(op, "positions must be i32", {a, pos});
    if (pos->nelements() != pos->ne[0] || pos->ne[0] != a->ne[2])
        op_error(op,
                 "positions must be 1-d with one entry per token (a.ne2 = " + std::to_string(a->ne[2]) + ")",
                 {a, pos});
    if (p.mode != RopeMode::Normal && p.mode != RopeMode::NeoX)
        op_error(op, "mode must be Normal (0) or NeoX (2), got " + std::to_string(int(p.mode)), {a});
    if (p.n_dims <= 0 || p.n_dims % 2 != 0 || p.n_dims > a->ne[0])
        op_error(op,
                 "n_dims must be even and in 2..head_dim (" + std::to_string(a->ne[0]) + "), got " +
                     std::to_string(p.n_dims),
                 {a});
    if (!(p.freq_base > 0.0f) || !std::isfinite(p.freq_base) || !std::isfinite(p.freq_scale))
        op_error(op, "freq_base must be > 0 and freq_scale finite", {a});
    if (factors && (factors->type != Type::F32 || factors->nelements() != factors->ne[0] ||
                    factors->ne[0] != p.n_dims / 2))
        op_error(op,
                 "freq_factors must be f32 [n_dims / 2] = [" + std::to_string(p.n_dims / 2) + "], got " +
                     factors->shape_str(),
                 {a, pos, factors});
}

Tensor* rope_impl(Context& ctx, Op op, Tensor* a, Tensor* pos, const RopeParams& p, Tensor* factors) {
    validate_rope(op, a, pos, p, factors);
    Tensor* t = ctx.new_node(op, Type::F32, a->ne);
    set_sources(t, {a, pos, factors});
    t->set_params(p);
    return t;
}

// ---- gradients ----

void norm_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], norm_back(g.ctx, grad, node->src[0], node->params<NormParams>().eps));
}
void rms_norm_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], rms_norm_back(g.ctx, grad, node->src[0], node->params<NormParams>().eps));
}
// The frequency factors are constants: they get no gradient.
void rope_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], rope_back(g.ctx, grad, node->src[1], node->params<RopeParams>(), node->src[2]));
}
void rope_back_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], rope(g.ctx, grad, node->src[1], node->params<RopeParams>(), node->src[2]));
}
// The mask (src[1]) is treated as a constant: it gets no gradient.
void soft_max_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], soft_max_back(g.ctx, grad, node, node->params<SoftMaxParams>().scale));
}
// Masked entries do not depend on the input: their gradient is zero.
void diag_mask_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], diag_mask_fill(g.ctx, grad, node->params<DiagMaskNodeParams>().n_past, 0.0f));
}

// ---- reference semantics ----

// Calls fn(i1, i2, i3) once per row of t.
template <class Fn> void for_each_row(const Tensor* t, Fn&& fn) {
    for (int64_t i3 = 0; i3 < t->ne[3]; ++i3)
        for (int64_t i2 = 0; i2 < t->ne[2]; ++i2)
            for (int64_t i1 = 0; i1 < t->ne[1]; ++i1) fn(i1, i2, i3);
}

std::vector<double> get_row(const ref::Evaluator& ev, const Tensor* t, int64_t i1, int64_t i2, int64_t i3) {
    std::vector<double> r(size_t(t->ne[0]));
    for (int64_t i0 = 0; i0 < t->ne[0]; ++i0) r[size_t(i0)] = ev.get(t, i0, i1, i2, i3);
    return r;
}
void set_row(ref::Evaluator& ev, const Tensor* t, const std::vector<double>& r, int64_t i1, int64_t i2,
             int64_t i3) {
    for (int64_t i0 = 0; i0 < t->ne[0]; ++i0) ev.set(t, r[size_t(i0)], i0, i1, i2, i3);
}

// y = (x - mean) / sqrt(var + eps)  (centered) or  y = x / sqrt(mean(x^2) + eps)  (RMS).
struct RowStats {
    double mean, inv_std;
};
RowStats row_stats(const std::vector<double>& x, double eps, bool centered) {
    const double n = double(x.size());
    double mean = 0.0;
    if (centered) {
        for (double v : x) mean += v;
        mean /= n;
    }
    double ss = 0.0;
    for (double v : x) ss += (v - mean) * (v - mean);
    return {mean, 1.0 / std::sqrt(ss / n + eps)};
}

void normalize_reference(ref::Evaluator& ev, const Tensor* n, bool centered) {
    const double eps = n->params<NormParams>().eps;
    for_each_row(n, [&](int64_t i1, int64_t i2, int64_t i3) {
        std::vector<double> x = get_row(ev, n->src[0], i1, i2, i3);
        const RowStats s = row_stats(x, eps, centered);
        for (double& v : x) v = (v - s.mean) * s.inv_std;
        set_row(ev, n, x, i1, i2, i3);
    });
}
void norm_reference(ref::Evaluator& ev, const Tensor* n) {
    normalize_reference(ev, n, true);
}
void rms_norm_reference(ref::Evaluator& ev, const Tensor* n) {
    normalize_reference(ev, n, false);
}

// Layer norm:  dx = inv_std * (dy - mean(dy) - y * mean(dy * y))
// RMS norm:    dx = inv_std * (dy - y * mean(dy * y))
void normalize_back_reference(ref::Evaluator& ev, const Tensor* n, bool centered) {
    const double eps = n->params<NormParams>().eps;
    for_each_row(n, [&](int64_t i1, int64_t i2, int64_t i3) {
        const std::vector<double> dy = get_row(ev, n->src[0], i1, i2, i3);
        const std::vector<double> x = get_row(ev, n->src[1], i1, i2, i3);
        const RowStats s = row_stats(x, eps, centered);
        const double count = double(x.size());
        double mean_dy = 0.0, mean_dy_y = 0.0;
        for (size_t i = 0; i < x.size(); ++i) {
            mean_dy += dy[i] / count;
            mean_dy_y += dy[i] * (x[i] - s.mean) * s.inv_std / count;
        }
        if (!centered) mean_dy = 0.0;
        std::vector<double> dx(x.size());
        for (size_t i = 0; i < x.size(); ++i)
            dx[i] = s.inv_std * (dy[i] - mean_dy - (x[i] - s.mean) * s.inv_std * mean_dy_y);
        set_row(ev, n, dx, i1, i2, i3);
    });
}
void norm_back_reference(ref::Evaluator& ev, const Tensor* n) {
    normalize_back_reference(ev, n, true);
}
void rms_norm_back_reference(ref::Evaluator& ev, const Tensor* n) {
    normalize_back_reference(ev, n, false);
}

// Pair i of a head rotates by theta_i = pos * freq_scale * freq_base^(-2i / n_dims); Normal
// mode pairs elements (2i, 2i+1), NeoX pairs (i, i + n_dims/2). The back op rotates by -theta.
void rope_reference(ref::Evaluator& ev, const Tensor* n) {
    const RopeParams p = n->params<RopeParams>();
    const double sign = n->op == Op::RopeBack ? -1.0 : 1.0;
    const Tensor *a = n->src[0], *pos = n->src[1], *factors = n->src[2];
    const int64_t half = p.n_dims / 2;
    for_each_row(n, [&](int64_t i1, int64_t i2, int64_t i3) {
        std::vector<double> x = get_row(ev, a, i1, i2, i3);
        const double position = ev.get(pos, i2);
        for (int64_t i = 0; i < half; ++i) {
            const double factor = factors ? ev.get(factors, i) : 1.0;
            const double theta = sign * position * p.freq_scale *
                                 std::pow(double(p.freq_base), -2.0 * double(i) / p.n_dims) / factor;
            const int64_t j0 = p.mode == RopeMode::NeoX ? i : 2 * i;
            const int64_t j1 = p.mode == RopeMode::NeoX ? i + half : 2 * i + 1;
            const double x0 = x[size_t(j0)], x1 = x[size_t(j1)];
            x[size_t(j0)] = x0 * std::cos(theta) - x1 * std::sin(theta);
            x[size_t(j1)] = x0 * std::sin(theta) + x1 * std::cos(theta);
        }
        set_row(ev, n, x, i1, i2, i3);
    });
}

// softmax over dim 0 of x * scale + slope(head = i2) * mask; a row that is -inf everywhere
// (fully masked) gives zeros.
void soft_max_reference(ref::Evaluator& ev, const Tensor* n) {
    const SoftMaxParams p = n->params<SoftMaxParams>();
    const Tensor *a = n->src[0], *mask = n->src[1];
    for_each_row(n, [&](int64_t i1, int64_t i2, int64_t i3) {
        std::vector<double> v = get_row(ev, a, i1, i2, i3);
        const double slope = attn::alibi_slope(p.max_bias, i2, a->ne[2]);
        double max = -std::numeric_limits<double>::infinity();
        for (int64_t i0 = 0; i0 < a->ne[0]; ++i0) {
            double& s = v[size_t(i0)];
            s *= p.scale;
            if (mask) s += slope * ev.get(mask, i0, i1, i2 % mask->ne[2], i3 % mask->ne[3]);
            max = std::max(max, s);
        }
        double sum = 0.0;
        for (double& s : v)
            sum += s = (max == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(s - max));
        for (double& s : v) s = sum > 0.0 ? s / sum : 0.0;
        set_row(ev, n, v, i1, i2, i3);
    });
}

void soft_max_back_reference(ref::Evaluator& ev, const Tensor* n) {
    const double scale = n->params<SoftMaxParams>().scale;
    for_each_row(n, [&](int64_t i1, int64_t i2, int64_t i3) {
        const std::vector<double> dy = get_row(ev, n->src[0], i1, i2, i3);
        std::vector<double> y = get_row(ev, n->src[1], i1, i2, i3);
        double dot = 0.0;
        for (size_t i = 0; i < y.size(); ++i) dot += dy[i] * y[i];
        for (size_t i = 0; i < y.size(); ++i) y[i] = scale * y[i] * (dy[i] - dot);
        set_row(ev, n, y, i1, i2, i3);
    });
}

void diag_mask_reference(ref::Evaluator& ev, const Tensor* n) {
    const DiagMaskNodeParams p = n->params<DiagMaskNodeParams>();
    ref::for_each_index(n, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        ev.set(n, i0 > i1 + p.n_past ? double(p.fill) : ev.get(n->src[0], i0, i1, i2, i3), i0, i1, i2, i3);
    });
}

} // namespace

// ---- builders ----

Tensor* norm(Context& ctx, Tensor* a, float eps) {
    return norm_like(ctx, Op::Norm, a, eps);
}
Tensor* rms_norm(Context& ctx, Tensor* a, float eps) {
    return norm_like(ctx, Op::RmsNorm, a, eps);
}
Tensor* norm_back(Context& ctx, Tensor* grad, Tensor* x, float eps) {
    return norm_back_like(ctx, Op::NormBack, grad, x, eps);
}
Tensor* rms_norm_back(Context& ctx, Tensor* grad, Tensor* x, float eps) {
    return norm_back_like(ctx, Op::RmsNormBack, grad, x, eps);
}

Tensor* rope(Context& ctx, Tensor* a, Tensor* pos, const RopeParams& p, Tensor* freq_factors) {
    return rope_impl(ctx, Op::Rope, a, pos, p, freq_factors);
}
Tensor* rope_back(Context& ctx, Tensor* grad, Tensor* pos, const RopeParams& p, Tensor* freq_factors) {
    return rope_impl(ctx, Op::RopeBack, grad, pos, p, freq_factors);
}

Tensor* soft_max_ext(Context& ctx, Tensor* a, Tensor* mask, float scale, float max_bias) {
    const Op op = Op::SoftMax;
    require_not_null(op, {a});
    if (a->type != Type::F32) op_error(op, "a must be f32 (use cast)", {a});
    if (!std::isfinite(scale)) op_error(op, "scale must be finite", {a});
    if (!(max_bias >= 0.0f) || !std::isfinite(max_bias))
        op_error(op, "max_bias must be finite and >= 0, got " + std::to_string(max_bias), {a});
    if (mask) {
        if (mask->type != Type::F32 && mask->type != Type::F16)
            op_error(op, "mask must be f32 or f16", {a, mask});
        if (mask->ne[0] != a->ne[0] || mask->ne[1] < a->ne[1] || a->ne[2] % mask->ne[2] != 0 ||
            a->ne[3] % mask->ne[3] != 0)
            op_error(op, "mask must be [a.ne0, >= a.ne1, 1|a.ne2, 1|a.ne3] (dims 2 and 3 broadcast)",
                     {a, mask});
    } else if (max_bias > 0.0f) {
        op_error(op, "max_bias > 0 (ALiBi) scales the mask, but no mask was given", {a});
    }
    Tensor* t = ctx.new_node(op, Type::F32, a->ne);
    set_sources(t, {a, mask});
    t->set_params(SoftMaxParams{scale, max_bias});
    return t;
}
Tensor* soft_max(Context& ctx, Tensor* a) {
    return soft_max_ext(ctx, a, nullptr, 1.0f, 0.0f);
}

Tensor* soft_max_back(Context& ctx, Tensor* grad, Tensor* y, float scale) {
    require_not_null(Op::SoftMaxBack, {grad, y});
    if (!same_shape(grad, y)) op_error(Op::SoftMaxBack, "gradient and output shapes differ", {grad, y});
    Tensor* t = row_op(ctx, Op::SoftMaxBack, {grad, y});
    t->set_params(SoftMaxParams{scale, 0.0f});
    return t;
}

Tensor* diag_mask_fill(Context& ctx, Tensor* a, int n_past, float fill) {
    require_not_null(Op::DiagMaskInf, {a});
    if (n_past < 0) op_error(Op::DiagMaskInf, "n_past must be >= 0, got " + std::to_string(n_past), {a});
    Tensor* t = row_op(ctx, Op::DiagMaskInf, {a});
    t->set_params(DiagMaskNodeParams{n_past, fill});
    return t;
}
Tensor* diag_mask_inf(Context& ctx, Tensor* a, int n_past) {
    return diag_mask_fill(ctx, a, n_past, -std::numeric_limits<float>::infinity());
}

void define_norm_ops(OpTable& t) {
    t[size_t(Op::Norm)] = {.name = "norm", .backward = norm_backward, .reference = norm_reference};
    t[size_t(Op::NormBack)] = {.name = "norm_back", .reference = norm_back_reference};
    t[size_t(Op::RmsNorm)] = {
        .name = "rms_norm", .backward = rms_norm_backward, .reference = rms_norm_reference};
    t[size_t(Op::RmsNormBack)] = {.name = "rms_norm_back", .reference = rms_norm_back_reference};
    t[size_t(Op::Rope)] = {.name = "rope", .backward = rope_backward, .reference = rope_reference};
    t[size_t(Op::RopeBack)] = {
        .name = "rope_back", .backward = rope_back_backward, .reference = rope_reference};
    t[size_t(Op::SoftMax)] = {
        .name = "soft_max", .backward = soft_max_backward, .reference = soft_max_reference};
    t[size_t(Op::SoftMaxBack)] = {.name = "soft_max_back", .reference = soft_max_back_reference};
    t[size_t(Op::DiagMaskInf)] = {.name = "diag_mask_inf",
                                  .backward = diag_mask_backward,
                                  .reference = diag_mask_reference,
                                  .inplace_ok = true};
}

} // namespace gfa
