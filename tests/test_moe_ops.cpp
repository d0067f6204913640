// The ops of a mixture of experts: mul_mat_id (each token's chosen experts' products) and
// top_k (the router's choice), against the double-precision reference, with the errors bad
// shapes and expert numbers produce.
#include "op_check.h"

#include "reference.h"

#include <algorithm>
#include <cmath>
#include <numeric>

using namespace gfa;
using gfa::test::fill_uniform;

namespace {

Context data_ctx() {
    return Context(ContextParams{.alloc_data = true});
}

} // namespace

// Weights of f32 (exact but for f32 accumulation), f16 and block types; b shared by a token's
// experts (Nb = 1, the gate and up products) or one column per expert (Nb = k, the down
// product); a single token (decoding) and prompts where one expert takes most columns; odd
// sizes; the output poisoned first, so a column left unwritten fails.
TEST_CASE("mul_mat_id multiplies each token's inputs by its chosen experts", "[moe]") {
    for (Type type : {Type::F32, Type::F16, Type::Q8_0, Type::Q4_K, Type::IQ4_NL})
        for (int64_t k : {1, 2, 3})
            for (int64_t T : {1, 5, 13})
                for (bool shared_input : {true, false}) {
                    const int64_t K =
                        type_traits(type).block_size == 256 ? 256 : (type == Type::F32 ? 37 : 64);
                    const int64_t M = 19, E = 5, Nb = shared_input ? 1 : k;
                    const bool crowded = T > 1 && k > 1;
                    INFO(type_name(type) << " K=" << K << " M=" << M << " E=" << E << " k=" << k << " T=" << T
                                         << " Nb=" << Nb);
                    Context ctx = data_ctx();
                    const auto in = gfa::test::expert_inputs(ctx, type, K, M, E, Nb, k, T, crowded);
                    Tensor* out = mul_mat_id(ctx, in.as, in.b, in.ids);
                    REQUIRE(out->ne == std::array<int64_t, kMaxDims>{M, k, T, 1});
                    // f32 weights: f32 products; where an expert has fewer than 4 columns (as
                    // mul_mat rounds it) b is rounded to f16 for f16 weights (about 2e-4) and to
                    // 8 bits for block types.
                    const double tol = type_traits(type).block_size > 1 ? 2e-2
                                       : type == Type::F16              ? 1e-3
                                                                        : 1e-5;
                    gfa::test::check_forward(out, tol, T == 13 ? 3 : 2);
                }
}

TEST_CASE("mul_mat_id names what is wrong with its inputs", "[moe][errors]") {
    Context ctx = data_ctx();
    Tensor* as = ctx.new_tensor(Type::F32, {8, 3, 4});
    Tensor* b = ctx.new_tensor(Type::F32, {8, 1, 5});
    Tensor* ids = ctx.new_tensor(Type::I32, {2, 5});
    CHECK_THROWS_WITH(mul_mat_id(ctx, as, ctx.new_tensor(Type::F32, {7, 1, 5}), ids),
                      Catch::Contains("inner dims differ"));
    CHECK_THROWS_WITH(mul_mat_id(ctx, as, b, ctx.new_tensor(Type::F32, {2, 5})),
                      Catch::Contains("ids must be i32"));
    CHECK_THROWS_WITH(mul_mat_id(ctx, as, b, ctx.new_tensor(Type::I32, {2, 4})), Catch::Contains("tokens"));
    CHECK_THROWS_WITH(mul_mat_id(ctx, as, ctx.new_tensor(Type::F32, {8, 3, 5}), ids),
                      Catch::Contains("b.ne[1] must be 1 or the experts per token"));
    CHECK_THROWS_WITH(mul_mat_id(ctx, as, ctx.new_tensor(Type::F16, {8, 1, 5}), ids), Catch::Contains("f32"));
    // An expert number outside [0, E) stops the run with the token named.
    fill_uniform(as);
    fill_uniform(b);
    gfa::test::set_i32(ids, {0, 1, 2, 3, 3, 0, 1, 4, 2, 2});
    Tensor* out = mul_mat_id(ctx, as, b, ids);
    Graph g = build_forward(out);
    CHECK_THROWS_WITH(gfa::test::compute_cpu(g), Catch::Contains("expert 4 of token 3 is outside [0, 4)"));
    CHECK_THROWS_WITH(ref::evaluate(g, out), Catch::Contains("expert 4 of token 3"));
}

// Rows with ties (values drawn from a few levels) and a NaN, which ranks last; every k from 1
// to the row length; odd row lengths; rows spread over dims 1 and 2.
TEST_CASE("top_k gives each row's largest positions, largest first, ties by position", "[moe]") {
    for (int64_t n : {1, 7, 8, 33})
        for (int64_t k = 1; k <= n; k += (n > 8 ? 5 : 1)) {
            INFO("n=" << n << " k=" << k);
            Context ctx = data_ctx();
            Tensor* a = ctx.new_tensor(Type::F32, {n, 6, 2});
            std::vector<float> v = gfa::test::random_values(size_t(a->nelements()));
            for (float& x : v) x = std::round(x * 3.0f) / 3.0f; // ties
            v[size_t(n)] = std::nanf("");                       // row 1 has a NaN
            tensor_set_f32(a, v);
            Tensor* idx = top_k(ctx, a, k);
            REQUIRE(idx->type == Type::I32);
            Graph g = build_forward(idx);
            gfa::test::compute_cpu(g, 3);
            const std::vector<double> ref = ref::evaluate(g, idx);
            std::vector<int32_t> got(size_t(idx->nelements()));
            tensor_get(idx, got.data(), 0, got.size() * sizeof(int32_t));
            for (size_t i = 0; i < got.size(); ++i) {
                INFO("element " << i);
                REQUIRE(got[i] == int32_t(ref[i]));
            }
            // The positions' values never increase along a row.
            for (int64_t r = 0; r < 12; ++r)
                for (int64_t j = 1; j < k; ++j) {
                    const float prev = v[size_t(r * n + got[size_t(r * k + j - 1)])];
                    const float cur = v[size_t(r * n + got[size_t(r * k + j)])];
                    if (!std::isnan(cur)) CHECK(prev >= cur);
                }
        }
}

TEST_CASE("top_k refuses k outside the row and inputs that are not f32", "[moe][errors]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {5, 2});
    CHECK_THROWS_WITH(top_k(ctx, a, 0), Catch::Contains("k = 0 must be in [1, 5]"));
    CHECK_THROWS_WITH(top_k(ctx, a, 6), Catch::Contains("k = 6"));
    CHECK_THROWS_WITH(top_k(ctx, ctx.new_tensor(Type::F16, {5, 2}), 2), Catch::Contains("f32"));
}
