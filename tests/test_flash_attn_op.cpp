// flash_attn_ext as a graph op: the CPU backend against the reference evaluator, the LSE
// view, autodiff through the op (dQ, dK, dV, dSinks) against finite differences, and the
// builder's validation.
#include "backends/cpu/flash_attn_cpu.h"
#include "op_check.h"

#include <ggml-fa/backend.h>
#include <ggml-fa/ops.h>

#include <cmath>

using namespace gfa;
using gfa::test::check_forward;
using gfa::test::check_gradients;
using gfa::test::fill_uniform;

namespace {
Context data_ctx() {
    return Context(ContextParams{.alloc_data = true});
}
} // namespace

TEST_CASE("flash_attn_ext graph node matches the reference", "[attn][ops]") {
    struct Case {
        int64_t D, Sq, Skv, Hq, Hkv, B;
        bool causal, mask, sinks;
        Type kv;
        float softcap;
    };
    const Case cases[] = {
        {64, 17, 33, 4, 2, 1, true, false, false, Type::F32, 0.0f},
        {32, 1, 113, 8, 2, 2, false, true, true, Type::F16, 0.0f},
        {96, 9, 9, 2, 1, 1, true, true, false, Type::BF16, 30.0f},
        {64, 3, 40, 4, 4, 1, false, false, true, Type::Q8_0, 0.0f},
    };
    for (const Case& c : cases) {
        Context ctx = data_ctx();
        Tensor* q = ctx.new_tensor(Type::F32, {c.D, c.Sq, c.Hq, c.B});
        Tensor* k32 = ctx.new_tensor(Type::F32, {c.D, c.Skv, c.Hkv, c.B});
        Tensor* v32 = ctx.new_tensor(Type::F32, {c.D, c.Skv, c.Hkv, c.B});
        fill_uniform(q);
        fill_uniform(k32);
        fill_uniform(v32);
        Tensor* k = c.kv == Type::F32 ? k32 : cast(ctx, k32, c.kv);
        Tensor* v = c.kv == Type::F32 ? v32 : cast(ctx, v32, c.kv);
        Tensor* mask = nullptr;
        if (c.mask) {
            mask = ctx.new_tensor(Type::F16, {c.Skv, c.Sq, 1, 1});
            std::vector<float> m = gfa::test::random_values(size_t(mask->nelements()), -2.0f, 0.0f);
            for (size_t i = 0; i < m.size(); i += 5) m[i] = -INFINITY;
            tensor_set_f32(mask, m);
        }
        Tensor* sinks = nullptr;
        if (c.sinks) {
            sinks = ctx.new_tensor(Type::F32, {c.Hq});
            fill_uniform(sinks);
        }
        FlashAttnParams p;
        p.scale = 1.0f / std::sqrt(float(c.D));
        p.causal = c.causal;
        p.logit_softcap = c.softcap;
        Tensor* o = flash_attn_ext(ctx, q, k, v, mask, p, sinks);
        INFO("D " << c.D << " Sq " << c.Sq << " Skv " << c.Skv << " kv " << type_name(c.kv));
        check_forward(o, 1e-5);
        check_forward(flash_attn_lse(ctx, o), 1e-5);
    }
}

TEST_CASE("flash_attn_ext gradients flow through a graph", "[attn][grad]") {
    Context ctx = data_ctx();
    const int64_t D = 16, Sq = 5, Skv = 7, Hq = 4, Hkv = 2;
    Tensor* q = ctx.new_tensor(Type::F32, {D, Sq, Hq, 1});
    Tensor* k = ctx.new_tensor(Type::F32, {D, Skv, Hkv, 1});
    Tensor* v = ctx.new_tensor(Type::F32, {D, Skv, Hkv, 1});
    Tensor* sinks = ctx.new_tensor(Type::F32, {Hq});
    Tensor* w = ctx.new_tensor(Type::F32, {D, Hq, Sq, 1});
    for (Tensor* t : {q, k, v, sinks, w}) fill_uniform(t);
    FlashAttnParams p;
    p.scale = 0.4f;
    p.causal = true;
    p.logit_softcap = 2.0f;
    Tensor* o = flash_attn_ext(ctx, q, k, v, nullptr, p, sinks);
    Tensor* loss = sum(ctx, mul(ctx, o, w));
    // The evaluator hands attention f32 inputs, so finite differences carry f32 rounding of
    // the perturbed inputs: eps = 1e-2 keeps that far below the tolerance.
    check_gradients(ctx, loss, {q, k, v, sinks}, 2e-3, 1e-2);
}

// A scheduler that runs the forward on one backend and the backward on another hands the
// backward a copy of the forward's output: a plain tensor with the values but neither the
// forward's sources nor its parameters. The backward must get all else from its own node.
TEST_CASE("flash_attn_ext backward needs only the values of its forward's output", "[attn][grad]") {
    Context ctx = data_ctx();
    const int64_t D = 32, Sq = 9, Skv = 13, Hq = 4, Hkv = 2;
    Tensor* q = ctx.new_tensor(Type::F32, {D, Sq, Hq, 1});
    Tensor* k = ctx.new_tensor(Type::F32, {D, Skv, Hkv, 1});
    Tensor* v = ctx.new_tensor(Type::F32, {D, Skv, Hkv, 1});
    Tensor* w = ctx.new_tensor(Type::F32, {D, Hq, Sq, 1});
    for (Tensor* t : {q, k, v, w}) fill_uniform(t);
    for (Tensor* t : {q, k, v}) set_param(t);
    FlashAttnParams p;
    p.scale = 0.3f;
    p.causal = true;
    p.window_left = 4;
    Tensor* o = flash_attn_ext(ctx, q, k, v, nullptr, p);
    Tensor* loss = sum(ctx, mul(ctx, o, w));
    set_loss(loss);
    Graph g = build_forward(loss);
    build_backward(ctx, g, loss);
    test::compute_cpu(g);
    Tensor* back = nullptr;
    for (Tensor* n : g.nodes())
        if (n->op == Op::FlashAttnBack) back = n;
    REQUIRE(back != nullptr);
    REQUIRE(back->src[5] == o);
    std::vector<std::byte> expected(back->alloc_bytes()), got(back->alloc_bytes());
    tensor_get(back, expected.data(), 0, expected.size());

    Tensor* copy = ctx.new_tensor(Type::F32, o->ne);
    std::vector<std::byte> values(o->nbytes());
    tensor_get(o, values.data(), 0, values.size());
    tensor_set(copy, values.data(), 0, values.size());
    back->src[5] = copy;
    std::vector<std::byte> poison(back->alloc_bytes(), std::byte{0xFF});
    tensor_set(back, poison.data(), 0, poison.size());
    Tensor* nodes[] = {back};
    make_cpu_backend(2)->compute(nodes);
    back->src[5] = o;
    tensor_get(back, got.data(), 0, got.size());
    CHECK(got == expected);
}

TEST_CASE("flash_attn_ext rejects bad inputs with clear errors", "[attn][errors]") {
    Context ctx;
    Tensor* q = ctx.new_tensor(Type::F32, {64, 10, 8, 1});
    Tensor* k = ctx.new_tensor(Type::F16, {64, 20, 3, 1});
    Tensor* v = ctx.new_tensor(Type::F16, {64, 20, 3, 1});
    CHECK_THROWS_WITH(flash_attn_ext(ctx, q, k, v, nullptr, {}), Catch::Contains("flash_attn_ext") &&
                                                                     Catch::Contains("GQA") &&
                                                                     Catch::Contains("f32[64,10,8,1]"));
    Tensor* k2 = ctx.new_tensor(Type::F16, {64, 20, 4, 1});
    Tensor* v2 = ctx.new_tensor(Type::F16, {64, 21, 4, 1});
    CHECK_THROWS_WITH(flash_attn_ext(ctx, q, k2, v2, nullptr, {}), Catch::Contains("sequence lengths"));
    Tensor* v3 = ctx.new_tensor(Type::F16, {64, 20, 4, 1});
    Tensor* bad_mask = ctx.new_tensor(Type::F32, {20, 9});
    CHECK_THROWS_WITH(flash_attn_ext(ctx, q, k2, v3, bad_mask, {}), Catch::Contains("mask"));
    FlashAttnParams alibi;
    alibi.max_bias = 8.0f;
    CHECK_THROWS_WITH(flash_attn_ext(ctx, q, k2, v3, nullptr, alibi), Catch::Contains("ALiBi"));
    Tensor* q_odd = ctx.new_tensor(Type::F32, {60, 10, 8, 1});
    Tensor* k_q8 = ctx.new_tensor(Type::Q8_0, {64, 20, 4, 1});
    CHECK_THROWS_WITH(flash_attn_ext(ctx, q_odd, k_q8, v3, nullptr, {}), Catch::Contains("head dims differ"));
    Tensor* o = flash_attn_ext(ctx, q, k2, v3, nullptr, {});
    CHECK_THROWS_WITH(flash_attn_lse(ctx, o), Catch::Contains("with_lse"));
    Tensor* o2 =
        flash_attn_ext(ctx, q, k2, v3, nullptr, {}, nullptr, {.out_type = Type::BF16, .with_lse = true});
    Tensor* lse = flash_attn_lse(ctx, o2);
    CHECK(lse->ne == std::array<int64_t, 4>{10, 8, 1, 1});
    CHECK(lse->view_offs % 16 == 0);
    FlashAttnParams odd_precision;
    odd_precision.precision = FlashAttnPrecision(7);
    CHECK_THROWS_WITH(flash_attn_ext(ctx, q, k2, v3, nullptr, odd_precision),
                      Catch::Contains("precision must be F32 or BF16, not 7"));
    CHECK_THROWS_WITH(set_attention_precision(lse, FlashAttnPrecision::BF16),
                      Catch::Contains("not a flash_attn_ext node"));
    CHECK_THROWS_WITH(set_attention_precision(o, FlashAttnPrecision(3)),
                      Catch::Contains("unknown precision 3"));
}

// set_attention_precision(BF16) on a built node: the CPU backend's result is that of bf16
// operands where the build multiplies bf16 pairs (under 1e-2 from the reference, and further
// than the f32 products go, which shows the pairs ran), else the f32 products'.
TEST_CASE("flash_attn_ext with bf16 products, set on the node", "[attn][ops][bf16]") {
    Context ctx = data_ctx();
    Tensor* q = ctx.new_tensor(Type::F32, {128, 77, 4, 1});
    Tensor* k = ctx.new_tensor(Type::F32, {128, 150, 2, 1});
    Tensor* v = ctx.new_tensor(Type::F32, {128, 150, 2, 1});
    for (Tensor* t : {q, k, v}) fill_uniform(t);
    FlashAttnParams p;
    p.scale = 1.0f / std::sqrt(128.0f);
    p.causal = true;
    Tensor* kh = cast(ctx, k, Type::F16);
    Tensor* vh = cast(ctx, v, Type::F16);
    Tensor* o = flash_attn_ext(ctx, q, kh, vh, nullptr, p);
    set_attention_precision(o, FlashAttnPrecision::BF16);
    CHECK(o->params<FlashAttnNodeParams>().attn.precision == FlashAttnPrecision::BF16);
    const bool pairs = cpu::flash_attn_has_pair_products();
    const double err = check_forward(o, pairs ? 1e-2 : 1e-5);
    if (pairs) CHECK(err > 5e-5);
}
