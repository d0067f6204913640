#include "device_op_cases.h"

#include "op_def.h"

#include <ggml-fa/ops.h>

#include <cmath>
#include <random>

namespace gfa::test::device_cases {

namespace {
Context data_ctx() {
    return Context(ContextParams{.alloc_data = true});
}
} // namespace

// Binary ops with b broadcast over a by rows, columns and a permuted a.
void binary_broadcast(const Check& check) {
    for (auto op : {add, sub, mul, div}) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {17, 5, 3, 2});
        Tensor* b = ctx.new_tensor(Type::F32, {17, 1, 3, 1});
        Tensor* c = ctx.new_tensor(Type::F32, {1, 5, 1, 2});
        fill_uniform(a);
        fill_uniform(b, 0.5f, 1.5f);
        fill_uniform(c, 0.5f, 1.5f);
        check(op(ctx, a, b), 1e-6);
        check(op(ctx, a, c), 1e-6);
        check(op(ctx, permute(ctx, a, 1, 0, 2, 3), reshape(ctx, cont(ctx, transpose(ctx, c)), {5, 1, 1, 2})),
              1e-6);
    }
}

// Unary math, sums and means (strided too), a long sum.
void unary_and_reductions(const Check& check) {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {113, 7, 3});
    fill_uniform(a, 0.1f, 2.0f);
    check(scale(ctx, a, -1.5f, 0.25f), 1e-6);
    check(sqr(ctx, a), 1e-6);
    check(sqrt(ctx, a), 1e-6);
    check(exp(ctx, a), 1e-6);
    check(log(ctx, a), 1e-6);
    check(neg(ctx, transpose(ctx, a)), 1e-6);
    check(tanh(ctx, scale(ctx, a, 20.0f, -21.0f)), 1e-6); // -19 .. 19: both saturated ends
    check(sum(ctx, a), 1e-6);
    check(sum_rows(ctx, a), 1e-6);
    check(mean(ctx, a), 1e-6);
    check(sum_rows(ctx, permute(ctx, a, 2, 0, 1, 3)), 1e-6);
    Context c2 = data_ctx();
    Tensor* big = c2.new_tensor(Type::F32, {3001, 1});
    fill_uniform(big);
    check(sum(c2, big), 1e-5);
}

// out_prod with broadcast batches and transposed operands.
void out_prod_batches(const Check& check) {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {13, 29, 1, 2});
    Tensor* b = ctx.new_tensor(Type::F32, {7, 29, 3, 2});
    fill_uniform(a);
    fill_uniform(b);
    check(out_prod(ctx, a, b), 1e-5);
    Tensor* at = ctx.new_tensor(Type::F32, {29, 13});
    Tensor* bt = ctx.new_tensor(Type::F32, {29, 7});
    fill_uniform(at);
    fill_uniform(bt);
    check(out_prod(ctx, transpose(ctx, at), transpose(ctx, bt)), 1e-5);
    check(out_prod(ctx, transpose(ctx, at), reshape(ctx, cont(ctx, transpose(ctx, bt)), {7, 29})), 1e-5);
}

// norm and rms_norm with their backward ops, strided rows.
void norms_with_backward(const Check& check) {
    Context ctx = data_ctx();
    Tensor* x = ctx.new_tensor(Type::F32, {113, 5, 3});
    Tensor* dy = ctx.new_tensor(Type::F32, {113, 5, 3});
    fill_uniform(x, -2.0f, 2.0f);
    fill_uniform(dy);
    check(norm(ctx, x, 1e-5f), 1e-5);
    check(rms_norm(ctx, x, 1e-5f), 1e-5);
    check(norm_back(ctx, dy, x, 1e-5f), 1e-5);
    check(rms_norm_back(ctx, dy, x, 1e-5f), 1e-5);
    check(rms_norm(ctx, permute(ctx, x, 1, 0, 2, 3), 1e-6f), 1e-5); // strided rows
}

// rope (normal and NeoX, 14 of 18 dims) and rope_back at positions below 3000, with and
// without frequency factors.
void rope_and_back(const Check& check) {
    for (RopeMode mode : {RopeMode::Normal, RopeMode::NeoX}) {
        Context ctx = data_ctx();
        Tensor* x = ctx.new_tensor(Type::F32, {18, 3, 7, 2}); // head_dim, heads, tokens, batch
        fill_uniform(x);
        Tensor* pos = ctx.new_tensor(Type::I32, {7});
        set_i32(pos, random_indices(7, 3000));
        const RopeParams p{14, mode, 10000.0f, 0.5f}; // 14 of 18 dims rotate
        INFO("mode " << int(mode));
        check(rope(ctx, x, pos, p), 1e-5);
        check(rope_back(ctx, x, pos, p), 1e-5);
        Tensor* factors = ctx.new_tensor(Type::F32, {7}); // Llama 3.1 style, one per pair
        fill_uniform(factors, 1.0f, 8.0f);
        check(rope(ctx, x, pos, p, factors), 1e-5);
        check(rope_back(ctx, x, pos, p, factors), 1e-5);
    }
}

// soft_max_ext with f32/f16 masks (more rows than x), ALiBi and scale; soft_max, diag_mask and soft_max_back.
void softmax_and_backward(const Check& check) {
    for (Type mask_type : {Type::F32, Type::F16})
        for (float max_bias : {0.0f, 8.0f}) {
            Context ctx = data_ctx();
            Tensor* x = ctx.new_tensor(Type::F32, {37, 5, 6, 2});
            Tensor* mask = ctx.new_tensor(mask_type, {37, 7, 1, 2}); // more mask rows than x rows
            fill_uniform(x, -3.0f, 3.0f);
            fill_uniform(mask, -2.0f, 0.0f);
            INFO("mask " << type_name(mask_type) << ", max_bias " << max_bias);
            check(soft_max_ext(ctx, x, mask, 0.7f, max_bias), 1e-5);
        }
    Context ctx = data_ctx();
    Tensor* x = ctx.new_tensor(Type::F32, {9, 7, 2});
    fill_uniform(x);
    check(soft_max(ctx, x), 1e-5);
    check(soft_max(ctx, diag_mask_inf(ctx, x, 2)), 1e-5);
    check(diag_mask_inf(ctx, x, 2), 0.0);
    check(diag_mask_fill(ctx, x, 1, 0.0f), 0.0);
    Tensor* dy = ctx.new_tensor(Type::F32, {37, 5, 3});
    Tensor* y = ctx.new_tensor(Type::F32, {37, 5, 3});
    fill_uniform(dy);
    fill_uniform(y, 0.0f, 0.1f);
    check(soft_max_back(ctx, dy, y, 0.7f), 1e-5);
}

// silu, relu, step, swiglu, gelu (both forms) and the backward ops.
void activations_and_backward(const Check& check) {
    Context ctx = data_ctx();
    Tensor* x = ctx.new_tensor(Type::F32, {33, 7, 3});
    Tensor* u = ctx.new_tensor(Type::F32, {33, 7, 3});
    fill_uniform(x, -4.0f, 4.0f);
    fill_uniform(u);
    check(silu(ctx, x), 1e-6);
    check(relu(ctx, x), 0.0);
    check(step(ctx, x), 0.0);
    check(swiglu(ctx, x, u), 1e-6);
    check(silu_back(ctx, u, x), 1e-6);
    for (GeluApprox approx : {GeluApprox::Tanh, GeluApprox::Erf}) {
        check(gelu(ctx, x, approx), 1e-6);
        check(gelu_back(ctx, u, x, approx), 1e-5);
    }
}

// cross_entropy_loss (rows not summing to 1), its backward, one AdamW step and two in a row.
void loss_and_adamw(const Check& check) {
    Context ctx = data_ctx();
    Tensor* logits = ctx.new_tensor(Type::F32, {41, 6, 2});
    Tensor* labels = ctx.new_tensor(Type::F32, {41, 6, 2});
    fill_uniform(logits, -3.0f, 3.0f);
    fill_uniform(labels, 0.0f, 1.0f); // rows do not sum to 1: the exact derivative is tested
    check(cross_entropy_loss(ctx, logits, labels), 1e-5);
    Tensor* g = ctx.new_tensor(Type::F32, {1});
    tensor_set_f32(g, {1.7f});
    check(cross_entropy_loss_back(ctx, g, logits, labels), 1e-5);
    check(cross_entropy_loss_back(ctx, g, logits, soft_max(ctx, labels)), 1e-5);
    // Classes (i32, one per row) instead of label rows.
    Tensor* classes = ctx.new_tensor(Type::I32, {6, 2});
    set_i32(classes, random_indices(12, 41));
    check(cross_entropy_loss(ctx, logits, classes), 1e-5);
    check(cross_entropy_loss_back(ctx, g, logits, classes), 1e-5);

    Tensor* w = ctx.new_tensor(Type::F32, {37, 3});
    Tensor* gw = ctx.new_tensor(Type::F32, {37, 3});
    Tensor* m = ctx.new_tensor(Type::F32, {37, 3});
    Tensor* v = ctx.new_tensor(Type::F32, {37, 3});
    fill_uniform(w);
    fill_uniform(gw);
    fill_uniform(m, -0.1f, 0.1f);
    fill_uniform(v, 0.0f, 0.1f);
    auto values_of = [&](const AdamWParams& p) {
        const auto a = adamw_values(p);
        Tensor* t = ctx.new_tensor(Type::F32, {kAdamWValues});
        tensor_set_f32(t, {a.begin(), a.end()});
        return t;
    };
    const AdamWParams p{.lr = 0.01f, .weight_decay = 0.1f, .step = 3};
    check(adamw_step(ctx, w, gw, m, v, values_of(p)), 1e-6);
    // A second step reads the moments the first one wrote, and its own values.
    AdamWParams p2 = p;
    p2.step = 4;
    p2.lr = 0.02f;
    check(adamw_step(ctx, adamw_step(ctx, w, gw, m, v, values_of(p)), gw, m, v, values_of(p2)), 1e-6);
    // Gradient clipping: a global norm of 5 above a limit of 2 scales every gradient by 0.4; a
    // limit of 10 leaves them alone.
    Tensor* norm_sq = ctx.new_tensor(Type::F32, {1});
    tensor_set_f32(norm_sq, {25.0f});
    for (float limit : {2.0f, 10.0f}) {
        AdamWParams pc = p;
        pc.grad_clip = limit;
        check(adamw_step(ctx, w, gw, m, v, values_of(pc), norm_sq), 1e-6);
    }
}

// The gradients autodiff builds for a small graph of matmuls, norms, rope, softmax, activations and the loss,
// each checked at `tol`.
void autodiff_gradients(const Check& check, double tol) {
    Context ctx = data_ctx();
    Tensor* x = ctx.new_tensor(Type::F32, {16, 5});
    Tensor* w1 = ctx.new_tensor(Type::F32, {16, 24});
    Tensor* w2 = ctx.new_tensor(Type::F32, {24, 7});
    Tensor* labels = ctx.new_tensor(Type::F32, {7, 5});
    Tensor* q = ctx.new_tensor(Type::F32, {8, 3, 5});
    Tensor* pos = ctx.new_tensor(Type::I32, {5});
    for (Tensor* t : {x, w1, w2, labels, q}) fill_uniform(t);
    set_i32(pos, {0, 3, 9, 1, 4});
    for (Tensor* t : {w1, w2, q}) set_param(t);

    Tensor* h = gelu(ctx, mul_mat(ctx, w1, rms_norm(ctx, x, 1e-5f)));
    Tensor* logits = mul_mat(ctx, w2, h);
    Tensor* r = rope(ctx, q, pos, RopeParams{8, RopeMode::NeoX, 10000.0f, 1.0f});
    Tensor* attn = soft_max_ext(ctx, reshape(ctx, r, {24, 5}), nullptr, 0.5f, 0.0f);
    Tensor* loss = add(ctx, cross_entropy_loss(ctx, logits, soft_max(ctx, labels)),
                       sum(ctx, mul(ctx, attn, silu(ctx, norm(ctx, reshape(ctx, q, {24, 5}), 1e-5f)))));
    set_loss(loss);
    Graph g = build_forward(loss);
    build_backward(ctx, g, loss);
    for (Tensor* p : {w1, w2, q}) {
        Tensor* grad = g.grad(p);
        REQUIRE(grad != nullptr);
        INFO("gradient of " << p->shape_str());
        check(grad, tol);
    }
}

// sample_token: the drawn token must be the reference's exactly (the rule is deterministic
// given the seed and the position). Columns of ties (values on a few levels), NaN and +-inf,
// a column with nothing but -inf and NaN, columns shorter than top_k, vocabulary-sized
// columns (the device kernels select the candidates digit by digit), strided (transposed)
// logits, and parameters from argmax-like (top_k 1, tiny temperature, tiny top_p) to flat
// (high temperature, top_p 1). Positions are random, so every column draws anew.
void sample_token_draws(const Check& check) {
    std::mt19937 rng(test::seed());
    const SampleParams params[] = {
        {.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .seed = rng()},
        {.temperature = 1.0f, .top_k = 1, .top_p = 1.0f, .seed = rng()},
        {.temperature = 2.5f, .top_k = 128, .top_p = 1.0f, .seed = rng()},
        {.temperature = 0.3f, .top_k = 7, .top_p = 0.5f, .seed = rng()},
        {.temperature = 1e-3f, .top_k = 100, .top_p = 0.99f, .seed = rng()},
        {.temperature = 1.2f, .top_k = 64, .top_p = 1e-6f, .seed = rng()},
    };
    for (int64_t n : {1, 5, 37, 128, 129, 1000, 32003, 131075}) {
        for (const SampleParams& p : params) {
            INFO("n=" << n << " temperature " << p.temperature << " top_k " << p.top_k << " top_p "
                      << p.top_p);
            Context ctx = data_ctx();
            const int64_t cols = 6;
            Tensor* logits = ctx.new_tensor(Type::F32, {n, cols});
            std::vector<float> v = test::random_values(size_t(logits->nelements()), -6.0f, 6.0f);
            auto value = [&](int64_t col, int64_t i) -> float& { return v[size_t(col * n + i % n)]; };
            for (int64_t i = 0; i < n; ++i) value(1, i) = std::round(value(1, i)); // ties
            value(2, 0) = std::nanf("");
            value(2, n / 2) = INFINITY;
            value(2, n / 3) = -INFINITY;
            for (int64_t i = 0; i < n; ++i) value(3, i) = i % 2 ? -INFINITY : std::nanf(""); // no weight
            for (int64_t i = 0; i < n; i += 2) value(4, i) = -INFINITY;
            tensor_set_f32(logits, v);
            Tensor* positions = ctx.new_tensor(Type::I32, {cols});
            std::vector<int32_t> at(cols);
            for (int32_t& x : at) x = int32_t(rng() % 100000);
            tensor_set(positions, at.data(), 0, at.size() * sizeof(int32_t));
            check(sample_token(ctx, logits, positions, p), 0.0);
            if (n <= 1000) {
                Tensor* by_column = ctx.new_tensor(Type::F32, {cols, n});
                fill_uniform(by_column);
                check(sample_token(ctx, transpose(ctx, by_column), positions, p), 0.0);
            }
        }
    }
    // Every token (top_k 0) of short columns.
    Context ctx = data_ctx();
    Tensor* logits = ctx.new_tensor(Type::F32, {100, 3});
    fill_uniform(logits);
    Tensor* positions = ctx.new_tensor(Type::I32, {3});
    const int32_t at[3] = {0, 1, 1 << 30};
    tensor_set(positions, at, 0, sizeof(at));
    check(sample_token(ctx, logits, positions, {.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = 5}),
          0.0);
    check(sample_token(ctx, logits, positions, {.temperature = 0.7f, .top_k = 0, .top_p = 0.8f, .seed = 6}),
          0.0);
}

// Rows of ties (values on a few levels) with NaN (ranked with -inf, ties by position), +-inf,
// both zeros and denormals in some of them; rows shorter and longer than the shader's
// workgroup (128) up to 1000 values, every k on short rows; transposed inputs; more rows
// than a dispatch has workgroups. The positions must equal the reference's exactly, and the
// results are poisoned first, so a rank nobody wrote fails.
void top_k_ranks(const Check& check) {
    for (int64_t n : {1, 2, 7, 8, 33, 127, 128, 129, 300, 1000}) {
        std::vector<int64_t> ks;
        if (n <= 8)
            for (int64_t k = 1; k <= n; ++k) ks.push_back(k);
        else
            ks = {1, 2, 8, n / 2, n - 1, n};
        for (int64_t k : ks) {
            INFO("n=" << n << " k=" << k);
            Context ctx = data_ctx();
            Tensor* a = ctx.new_tensor(Type::F32, {n, 5, 3});
            std::vector<float> v = test::random_values(size_t(a->nelements()), -2.0f, 2.0f);
            for (float& x : v) x = std::round(x * 3.0f) / 3.0f; // ties
            auto value = [&](int64_t row, int64_t i) -> float& { return v[size_t(row * n + i % n)]; };
            value(1, 0) = std::nanf("");
            value(1, n / 2) = std::nanf("");
            value(2, 3) = -INFINITY;
            value(2, 1) = std::nanf(""); // ties with -inf: position 1 comes first
            value(2, 5) = INFINITY;
            value(3, 2) = -0.0f;
            value(3, 4) = 0.0f; // ties with -0
            value(3, 6) = 1e-40f;
            value(3, 7) = -1e-40f;
            tensor_set_f32(a, v);
            check(top_k(ctx, a, k), 0.0);
            Tensor* by_column = ctx.new_tensor(Type::F32, {7, n}); // rows read with a stride of 7 values
            fill_uniform(by_column);
            check(top_k(ctx, transpose(ctx, by_column), k), 0.0);
        }
    }
    // k = 1 over vocabulary-sized rows (greedy decoding's pick; the GPU kernels walk such rows
    // a block at a time): the maximum placed at each end and in between, repeated later in
    // the row (the first must win), a row of NaN and -inf only, one whose first value is NaN.
    for (int64_t n : {1023, 1024, 1025, 4097, 32000, 50001}) {
        INFO("long row, n=" << n << " k=1");
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {n, 6});
        std::vector<float> v = test::random_values(size_t(a->nelements()), -30.0f, 30.0f);
        auto value = [&](int64_t row, int64_t i) -> float& { return v[size_t(row * n + i)]; };
        value(0, 0) = 40.0f;
        value(1, n - 1) = 40.0f;
        value(2, n / 3) = 40.0f;
        value(2, n / 3 + 1) = 40.0f;
        value(2, n - 2) = 40.0f;
        for (int64_t i = 0; i < n; ++i) value(3, i) = i % 3 == 0 ? -INFINITY : std::nanf("");
        value(4, 0) = std::nanf("");
        value(4, n / 2) = INFINITY;
        for (int64_t i = 0; i < n; ++i) value(5, i) = std::min(value(5, i), 29.0f); // ties, far apart
        value(5, n - 5) = 29.0f;
        tensor_set_f32(a, v);
        check(top_k(ctx, a, 1), 0.0);
        Tensor* by_column = ctx.new_tensor(Type::F32, {3, n});
        fill_uniform(by_column);
        check(top_k(ctx, transpose(ctx, by_column), 1), 0.0);
    }
    Context ctx = data_ctx();
    Tensor* many = ctx.new_tensor(Type::F32, {3, 70001}); // rows beyond 65535 workgroups
    fill_uniform(many);
    check(top_k(ctx, many, 2), 0.0);
    check(top_k(ctx, many, 1), 0.0);
    Tensor* many_long = ctx.new_tensor(Type::F32, {1024, 1100}); // more rows than the CUDA path's blocks
    fill_uniform(many_long);
    check(top_k(ctx, many_long, 1), 0.0);
}

// Experts of every type mul_mat reads (f32 and f16 at odd and even K, the f16 pairs path; bf16;
// every block type); b shared by a token's experts (Nb = 1, the gate and up products) or one
// column per expert (Nb = k, the down product); a single token (decoding) and prompts where
// one expert serves every token; results poisoned first. The reference multiplies the
// CPU-decoded weights in double.
void mul_mat_id_experts(const Check& check, double tol) {
    std::vector<Type> types = {Type::F32, Type::F16, Type::BF16};
    for (Type t : all_quant_types()) types.push_back(t);
    for (Type type : types) {
        const int64_t block = type_traits(type).block_size;
        const std::vector<int64_t> Ks = block == 256  ? std::vector<int64_t>{256}
                                        : block == 32 ? std::vector<int64_t>{96}
                                                      : std::vector<int64_t>{37, 64};
        for (int64_t K : Ks)
            for (int64_t k : {1, 2, 3})
                for (int64_t T : {1, 5, 13})
                    for (bool shared_input : {true, false}) {
                        const int64_t M = 19, E = 5, Nb = shared_input ? 1 : k;
                        INFO(type_name(type) << " K=" << K << " M=" << M << " E=" << E << " k=" << k
                                             << " T=" << T << " Nb=" << Nb);
                        Context ctx = data_ctx();
                        const ExpertInputs in = expert_inputs(ctx, type, K, M, E, Nb, k, T, T > 1 && k > 1);
                        check(mul_mat_id(ctx, in.as, in.b, in.ids), tol);
                    }
    }
    // Strided inputs: b transposed (each value 3 apart), f16 experts one element into their
    // rows (no word-aligned pairs).
    Context ctx = data_ctx();
    const int64_t K = 64, M = 23, E = 7, k = 3, T = 6;
    Tensor* bt = ctx.new_tensor(Type::F32, {k, K, T});
    Tensor* w = ctx.new_tensor(Type::F16, {K + 2, M, E});
    Tensor* ids = ctx.new_tensor(Type::I32, {k, T});
    fill_uniform(bt);
    fill_uniform(w);
    set_i32(ids, expert_choices(E, k, T, false));
    Tensor* shifted = view(ctx, w, {K, M, E}, {w->nb[1], w->nb[2]}, sizeof(uint16_t));
    check(mul_mat_id(ctx, shifted, transpose(ctx, bt), ids), tol);
    // Many experts, eight per token (a 64-expert router's choice).
    Tensor* many = ctx.new_tensor(Type::Q4_K, {256, 9, 64});
    Tensor* x = ctx.new_tensor(Type::F32, {256, 1, 4});
    Tensor* ids8 = ctx.new_tensor(Type::I32, {8, 4});
    fill_uniform(many);
    fill_uniform(x);
    set_i32(ids8, expert_choices(64, 8, 4, false));
    check(mul_mat_id(ctx, many, x, ids8), tol);
    // More (slot, token) columns than a dispatch has workgroups in y.
    Tensor* small = ctx.new_tensor(Type::F32, {8, 3, 4});
    Tensor* xs = ctx.new_tensor(Type::F32, {8, 1, 33000});
    Tensor* ids2 = ctx.new_tensor(Type::I32, {2, 33000});
    fill_uniform(small);
    fill_uniform(xs);
    set_i32(ids2, expert_choices(4, 2, 33000, false));
    check(mul_mat_id(ctx, small, xs, ids2), tol);
}

} // namespace gfa::test::device_cases
