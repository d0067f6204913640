// Reductions: sum (all elements), sum_rows and mean (over dim 0), top_k (the positions of
// each row's largest values), and sample_token (a token drawn from each column of logits).
#include "op_def.h"
#include "reference.h"
#include "sample_rule.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace gfa {

namespace {

Tensor* reduce(Context& ctx, Op op, Tensor* a, std::array<int64_t, kMaxDims> ne) {
    require_not_null(op, {a});
    if (a->type != Type::F32) op_error(op, "input must be f32 (use cast)", {a});
    Tensor* t = ctx.new_node(op, Type::F32, ne);
    set_sources(t, {a});
    return t;
}

} // namespace

Tensor* top_k(Context& ctx, Tensor* a, int64_t k) {
    require_not_null(Op::TopK, {a});
    if (a->type != Type::F32) op_error(Op::TopK, "input must be f32 (use cast)", {a});
    if (k < 1 || k > a->ne[0])
        op_error(Op::TopK, "k = " + std::to_string(k) + " must be in [1, " + std::to_string(a->ne[0]) + "]",
                 {a});
    Tensor* t = ctx.new_node(Op::TopK, Type::I32, {k, a->ne[1], a->ne[2], a->ne[3]});
    set_sources(t, {a});
    return t;
}

Tensor* sample_token(Context& ctx, Tensor* logits, Tensor* positions, const SampleParams& p) {
    require_not_null(Op::SampleToken, {logits, positions});
    if (logits->type != Type::F32) op_error(Op::SampleToken, "logits must be f32", {logits, positions});
    if (positions->type != Type::I32) op_error(Op::SampleToken, "positions must be i32", {logits, positions});
    if (logits->ne[2] != 1 || logits->ne[3] != 1 || positions->ne[1] != 1 || positions->ne[2] != 1 ||
        positions->ne[3] != 1 || positions->ne[0] != logits->ne[1])
        op_error(Op::SampleToken, "needs logits [n_vocab, n] and one position per column [n]",
                 {logits, positions});
    if (!(p.temperature > 0.0f) || !std::isfinite(p.temperature))
        op_error(Op::SampleToken,
                 "temperature " + std::to_string(p.temperature) + " must be positive (greedy: top_k 1)",
                 {logits, positions});
    if (p.top_k < 0)
        op_error(Op::SampleToken, "top_k " + std::to_string(p.top_k) + " must be 0 (every token) or more",
                 {logits, positions});
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
        op_error(Op::SampleToken, "top_p " + std::to_string(p.top_p) + " must be in (0, 1]",
                 {logits, positions});
    Tensor* t = ctx.new_node(Op::SampleToken, Type::I32, {1, logits->ne[1], 1, 1});
    set_sources(t, {logits, positions});
    SampleParams stored = p;
    stored.unused = 0;
    t->set_params(stored);
    return t;
}

namespace {

void sample_token_reference(ref::Evaluator& ev, const Tensor* n) {
    const Tensor *logits = n->src[0], *positions = n->src[1];
    const SampleParams& p = n->params<SampleParams>();
    std::vector<double> column(static_cast<size_t>(logits->ne[0]));
    for (int64_t c = 0; c < logits->ne[1]; ++c) {
        for (int64_t i = 0; i < logits->ne[0]; ++i) column[size_t(i)] = ev.get(logits, i, c);
        const int64_t position = int64_t(ev.get(positions, c));
        ev.set(n, double(sample_rule::pick(column, p, position)), 0, c);
    }
}

void top_k_reference(ref::Evaluator& ev, const Tensor* n) {
    const Tensor* a = n->src[0];
    for (int64_t i3 = 0; i3 < a->ne[3]; ++i3)
        for (int64_t i2 = 0; i2 < a->ne[2]; ++i2)
            for (int64_t i1 = 0; i1 < a->ne[1]; ++i1) {
                std::vector<std::pair<double, int64_t>> row;
                for (int64_t i0 = 0; i0 < a->ne[0]; ++i0) {
                    const double v = ev.get(a, i0, i1, i2, i3);
                    row.push_back({std::isnan(v) ? INFINITY : -v, i0}); // NaN ranks last
                }
                std::sort(row.begin(), row.end()); // by value descending, then position ascending
                for (int64_t j = 0; j < n->ne[0]; ++j)
                    ev.set(n, double(row[size_t(j)].second), j, i1, i2, i3);
            }
}

void sum_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], repeat(g.ctx, grad, node->src[0]));
}
void mean_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    Tensor* a = node->src[0];
    g.accumulate(a, repeat(g.ctx, scale(g.ctx, grad, 1.0f / float(a->ne[0])), a));
}

void sum_reference(ref::Evaluator& ev, const Tensor* n) {
    double acc = 0.0;
    ref::for_each_index(n->src[0], [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        acc += ev.get(n->src[0], i0, i1, i2, i3);
    });
    ev.set(n, acc, 0);
}
void row_reference(ref::Evaluator& ev, const Tensor* n, bool average) {
    const Tensor* a = n->src[0];
    ref::for_each_index(n, [&](int64_t, int64_t i1, int64_t i2, int64_t i3) {
        double acc = 0.0;
        for (int64_t i0 = 0; i0 < a->ne[0]; ++i0) acc += ev.get(a, i0, i1, i2, i3);
        ev.set(n, average ? acc / double(a->ne[0]) : acc, 0, i1, i2, i3);
    });
}
void sum_rows_reference(ref::Evaluator& ev, const Tensor* n) {
    row_reference(ev, n, false);
}
void mean_reference(ref::Evaluator& ev, const Tensor* n) {
    row_reference(ev, n, true);
}

} // namespace

Tensor* sum(Context& ctx, Tensor* a) {
    return reduce(ctx, Op::Sum, a, {1, 1, 1, 1});
}
Tensor* sum_rows(Context& ctx, Tensor* a) {
    return reduce(ctx, Op::SumRows, a, {1, a->ne[1], a->ne[2], a->ne[3]});
}
Tensor* mean(Context& ctx, Tensor* a) {
    return reduce(ctx, Op::Mean, a, {1, a->ne[1], a->ne[2], a->ne[3]});
}

void define_reduce_ops(OpTable& t) {
    t[size_t(Op::Sum)] = {.name = "sum", .backward = sum_backward, .reference = sum_reference};
    t[size_t(Op::SumRows)] = {.name = "sum_rows", .backward = sum_backward, .reference = sum_rows_reference};
    t[size_t(Op::Mean)] = {.name = "mean", .backward = mean_backward, .reference = mean_reference};
    t[size_t(Op::TopK)] = {.name = "top_k", .reference = top_k_reference};
    t[size_t(Op::SampleToken)] = {.name = "sample_token", .reference = sample_token_reference};
}

} // namespace gfa
