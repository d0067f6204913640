// Element-wise and data-movement ops: forward against the reference evaluator, gradients
// against finite differences, and the errors bad shapes produce.
#include "op_check.h"

#include <ggml-fa/backend.h>

using namespace gfa;
using gfa::test::check_forward;
using gfa::test::check_gradients;
using gfa::test::fill_uniform;

namespace {
Context data_ctx() {
    return Context(ContextParams{.alloc_data = true});
}
} // namespace

TEST_CASE("binary ops broadcast rows and match the reference", "[ops]") {
    for (auto op : {add, sub, mul, div}) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {17, 5, 3, 2});
        Tensor* b = ctx.new_tensor(Type::F32, {17, 1, 3, 1});
        fill_uniform(a);
        fill_uniform(b, 0.5f, 1.5f); // keeps div away from zero
        check_forward(op(ctx, a, b), 1e-6);
        Tensor* c = ctx.new_tensor(Type::F32, {1, 5, 1, 2}); // column broadcast
        fill_uniform(c, 0.5f, 1.5f);
        check_forward(op(ctx, a, c), 1e-6);
    }
}

TEST_CASE("unary ops match the reference", "[ops]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {33, 7, 3});
    fill_uniform(a, 0.1f, 2.0f);
    check_forward(scale(ctx, a, -1.5f, 0.25f), 1e-6);
    check_forward(sqr(ctx, a), 1e-6);
    check_forward(sqrt(ctx, a), 1e-6);
    check_forward(exp(ctx, a), 1e-6);
    check_forward(log(ctx, a), 1e-6);
    check_forward(neg(ctx, a), 1e-6);
    check_forward(tanh(ctx, scale(ctx, a, 20.0f, -21.0f)), 1e-6);
}

TEST_CASE("element-wise gradients match finite differences", "[ops][grad]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {5, 3, 2});
    Tensor* b = ctx.new_tensor(Type::F32, {5, 1, 2});
    fill_uniform(a, 0.5f, 1.5f);
    fill_uniform(b, 0.5f, 1.5f);
    Tensor* y = div(ctx, mul(ctx, add(ctx, a, b), sub(ctx, a, b)), b); // (a+b)(a-b)/b
    y = log(ctx, sqrt(ctx, sqr(ctx, exp(ctx, scale(ctx, tanh(ctx, y), 0.7f, 0.1f)))));
    Tensor* loss = sum_rows(ctx, reshape(ctx, mul(ctx, y, a), {a->nelements()}));
    check_gradients(ctx, loss, {a, b}, 1e-5);
}

TEST_CASE("views, permutes and copies round-trip with gradients", "[ops][grad]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {6, 5, 3, 2});
    fill_uniform(a);
    Tensor* p = permute(ctx, a, 2, 0, 3, 1); // -> [5, 2, 6, 3]
    CHECK(p->ne == std::array<int64_t, 4>{5, 2, 6, 3});
    check_forward(cont(ctx, p), 0.0);
    check_forward(cont(ctx, transpose(ctx, a)), 0.0);
    for (Type t : {Type::F16, Type::BF16, Type::Q8_0}) {
        Context c2 = data_ctx();
        Tensor* x = c2.new_tensor(Type::F32, {64, 3});
        fill_uniform(x);
        const double tol = t == Type::Q8_0 ? 1e-2 : 5e-3;
        check_forward(cast(c2, cast(c2, x, t), Type::F32), tol);
    }
    Tensor* w = ctx.new_tensor(Type::F32, {4, 6});
    fill_uniform(w);
    Tensor* q = reshape(ctx, cont(ctx, permute(ctx, mul(ctx, a, a), 1, 0, 2, 3)), {5 * 6, 6});
    Tensor* loss = sum_rows(ctx, reshape(ctx, q, {q->nelements()}));
    check_gradients(ctx, loss, {a}, 1e-5);
}

TEST_CASE("get_rows, set_rows, concat and repeat", "[ops][grad]") {
    Context ctx = data_ctx();
    Tensor* emb = ctx.new_tensor(Type::F32, {7, 11});
    fill_uniform(emb);
    Tensor* rows = ctx.new_tensor(Type::I32, {5});
    const int32_t idx[5] = {3, 0, 10, 3, 7};
    tensor_set(rows, idx, 0, sizeof(idx));
    check_forward(get_rows(ctx, emb, rows), 0.0);

    Tensor* cache = ctx.new_tensor(Type::F16, {7, 12});
    fill_uniform(cache);
    Tensor* fresh = ctx.new_tensor(Type::F32, {7, 2});
    fill_uniform(fresh);
    Tensor* at = ctx.new_tensor(Type::I32, {2});
    const int32_t where[2] = {11, 4};
    tensor_set(at, where, 0, sizeof(where));
    check_forward(set_rows(ctx, cache, fresh, at), 1e-3);

    Tensor* a = ctx.new_tensor(Type::F32, {3, 4, 2});
    Tensor* b = ctx.new_tensor(Type::F32, {3, 5, 2});
    fill_uniform(a);
    fill_uniform(b);
    Tensor* cat = concat(ctx, a, b, 1);
    check_forward(cat, 0.0);
    Tensor* like = ctx.new_tensor(Type::F32, {6, 9, 4});
    Tensor* rep = repeat(ctx, a, ctx.new_tensor(Type::F32, {6, 8, 4}));
    check_forward(rep, 0.0);
    (void)like;

    Tensor* g = get_rows(ctx, emb, rows);
    Tensor* loss = sum_rows(ctx, reshape(ctx, mul(ctx, g, g), {g->nelements()}));
    Tensor* loss2 = sum_rows(ctx, reshape(ctx,
                                          mul(ctx, repeat(ctx, cat, ctx.new_tensor(Type::F32, {6, 9, 2})),
                                              repeat(ctx, cat, ctx.new_tensor(Type::F32, {6, 9, 2}))),
                                          {6 * 9 * 2}));
    check_gradients(ctx, add(ctx, loss, loss2), {emb, a, b}, 1e-5);
}

TEST_CASE("bad shapes and types raise errors that name the op and shapes", "[ops][errors]") {
    Context ctx; // metadata only
    Tensor* a = ctx.new_tensor(Type::F32, {4, 3});
    Tensor* b = ctx.new_tensor(Type::F32, {3, 3});
    Tensor* h = ctx.new_tensor(Type::F16, {4, 3});
    CHECK_THROWS_WITH(add(ctx, a, b), Catch::Contains("add") && Catch::Contains("f32[4,3,1,1]") &&
                                          Catch::Contains("f32[3,3,1,1]"));
    CHECK_THROWS_WITH(mul(ctx, a, h), Catch::Contains("mul") && Catch::Contains("f32"));
    CHECK_THROWS_WITH(reshape(ctx, a, {5, 2}), Catch::Contains("reshape"));
    CHECK_THROWS_WITH(permute(ctx, a, 0, 0, 1, 2), Catch::Contains("permutation"));
    CHECK_THROWS_WITH(concat(ctx, a, b, 1), Catch::Contains("concat"));
    CHECK_THROWS_AS(ctx.new_tensor(Type::Q8_0, {33}), Error);
    CHECK_THROWS_AS(view(ctx, a, {4, 4}, {16}, 0), Error); // past the end
}

TEST_CASE("nbytes spans strided views", "[core]") {
    Context ctx;
    Tensor* a = ctx.new_tensor(Type::F32, {5, 3});
    CHECK(a->nbytes() == 60);
    Tensor* t = transpose(ctx, a); // [3, 5] with nb0 = 20
    CHECK(t->nbytes() == 60);
    Tensor* q = ctx.new_tensor(Type::Q8_0, {64, 3});
    CHECK(q->nbytes() == 3 * 68);
}
