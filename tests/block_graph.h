// A small pre-norm transformer block (attention + MLP) built from element-wise ops,
// reductions and broadcasting only, with its loss and backward pass. The allocator and
// scheduler tests use it as a realistic graph: long chains of short-lived intermediates,
// views, broadcasts, and a backward pass that reads forward values late.
#pragma once

#include <ggml-fa/graph.h>
#include <ggml-fa/ops.h>

#include <cmath>
#include <vector>

namespace gfa::test {

struct BlockWeights {
    Tensor *wq, *wk, *wv, *wo, *w1, *w2, *g1, *g2;
    std::vector<Tensor*> all() const { return {wq, wk, wv, wo, w1, w2, g1, g2}; }
};

struct BlockGraph {
    BlockWeights w;
    Tensor *x, *mask, *target; // inputs
    Tensor* probs;             // attention probabilities (marked as an output)
    Tensor* y;                 // block output
    Tensor* loss;
    Graph graph;
};

// y = W x as a broadcast product: W [K, M] and x [K, N] meet in [K, M, N], summed over K.
inline Tensor* block_linear(Context& ctx, Tensor* w, Tensor* x) {
    const int64_t k = w->ne[0], m = w->ne[1], n = x->ne[1];
    Tensor* w3 = reshape(ctx, w, {k, m, 1});
    Tensor* x3 = reshape(ctx, x, {k, 1, n});
    Tensor* prod = mul(ctx, repeat(ctx, w3, ctx.new_tensor(Type::F32, {k, m, n})), x3);
    return reshape(ctx, sum_rows(ctx, prod), {m, n});
}

inline Tensor* block_rms_norm(Context& ctx, Tensor* x, Tensor* gain) {
    Tensor* rms = sqrt(ctx, scale(ctx, mean(ctx, sqr(ctx, x)), 1.0f, 1e-5f));
    return mul(ctx, div(ctx, x, rms), gain);
}

// Weights go into wctx, everything else into gctx (the same context is fine).
// backward: append the gradients of every weight (set_param) to the graph.
inline BlockGraph build_block(Context& wctx, Context& gctx, int64_t d, int64_t t, int64_t f, bool backward) {
    BlockGraph b;
    auto weight = [&](std::initializer_list<int64_t> ne, const char* name) {
        Tensor* w = set_name(wctx.new_tensor(Type::F32, ne), name);
        if (backward) set_param(w);
        return w;
    };
    b.w = {weight({d, d}, "wq"), weight({d, d}, "wk"), weight({d, d}, "wv"), weight({d, d}, "wo"),
           weight({d, f}, "w1"), weight({f, d}, "w2"), weight({d}, "g1"),    weight({d}, "g2")};
    b.x = set_name(gctx.new_tensor(Type::F32, {d, t}), "x");
    b.mask = set_name(gctx.new_tensor(Type::F32, {t, t}), "mask");
    b.target = set_name(gctx.new_tensor(Type::F32, {d, t}), "target");
    for (Tensor* in : {b.x, b.mask, b.target}) set_input(in);

    // Attention: scores[j, i] = k_j . q_i / sqrt(d) + mask, softmax over j.
    Tensor* xn = block_rms_norm(gctx, b.x, b.w.g1);
    Tensor* q = block_linear(gctx, b.w.wq, xn);
    Tensor* k = block_linear(gctx, b.w.wk, xn);
    Tensor* v = block_linear(gctx, b.w.wv, xn);
    Tensor* scores = add(gctx, scale(gctx, block_linear(gctx, k, q), 1.0f / std::sqrt(float(d))), b.mask);
    Tensor* e = exp(gctx, scores);
    b.probs = set_name(div(gctx, e, sum_rows(gctx, e)), "probs");
    set_output(b.probs);
    Tensor* attn = block_linear(gctx, cont(gctx, transpose(gctx, v)), b.probs); // [d, t]
    Tensor* h = add(gctx, b.x, block_linear(gctx, b.w.wo, attn));

    // MLP with SiLU: u / (1 + exp(-u)).
    Tensor* u = block_linear(gctx, b.w.w1, block_rms_norm(gctx, h, b.w.g2));
    Tensor* act = div(gctx, u, scale(gctx, exp(gctx, neg(gctx, u)), 1.0f, 1.0f));
    b.y = set_name(add(gctx, h, block_linear(gctx, b.w.w2, act)), "y");
    set_output(b.y);
    Tensor* diff = sub(gctx, b.y, b.target);
    b.loss = set_name(scale(gctx, sum(gctx, sqr(gctx, diff)), 1.0f / float(d * t)), "loss");
    set_output(b.loss);

    b.graph = build_forward(b.loss);
    if (backward) build_backward(gctx, b.graph, b.loss);
    return b;
}

// Causal mask values: 0 where key j <= query i, -30 elsewhere (exp underflows to ~1e-13,
// which keeps every value finite for finite differences).
inline std::vector<float> causal_mask(int64_t t) {
    std::vector<float> m(size_t(t * t));
    for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < t; ++j) m[size_t(i * t + j)] = j <= i ? 0.0f : -30.0f;
    return m;
}

} // namespace gfa::test
