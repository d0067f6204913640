// Matrix products: mul_mat for every weight type on odd shapes (both the dot-product path
// for few columns and the packed GEMM path), batch broadcasting, strided operands, out_prod,
// gradients against finite differences, and the errors bad inputs produce.
#include "op_check.h"

#include <ggml-fa/backend.h>

#include "reference.h"
#include "scoped_env.h"
#include "../backends/cpu/cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

using namespace gfa;
using gfa::test::check_forward;
using gfa::test::check_gradients;
using gfa::test::fill_uniform;

namespace {

Context data_ctx() {
    return Context(ContextParams{.alloc_data = true});
}

// Tolerance for comparing with the double-precision reference: the weights are stored in
// their type already (the reference reads the same stored values), so only f32 rounding of
// the accumulation remains for every type...
constexpr double kTol = 1e-5;
// ...except where the CPU multiplies GGUF block weights with few columns (N < 4): there the
// column is rounded to 8 bits for an integer dot product. Each column value then carries an
// error of up to half a step (1/127 of its block's largest magnitude, per 32 values or per
// 256 for the K formats), uniform and independent: for values spread over [-1, 1] that is
// sqrt(1/12) / 127 ~ 0.23% against an rms value of sqrt(1/3) ~ 0.58, so ~0.4% relative rms
// error in the products: the kernels' median is 0.38%. How far one result strays from that
// depends on how many outputs (and terms) it has: over about 14000 results from 70 seeds the
// largest seen were 1.3% with 19 outputs of K = 96, 1.0% with 19 outputs of K >= 256 and
// 0.8% with 67 outputs. kIntDotTol (1e-2) serves results of 64 outputs or more,
// kIntDotTolFewOutputs (2e-2) the few-output shapes; a lost scale, offset or bit of a code
// costs far more than either.
constexpr double kIntDotTol = 1e-2;
constexpr double kIntDotTolFewOutputs = 2e-2;
bool has_int_dot(Type weights) {
    switch (weights) {
    case Type::Q8_0:
    case Type::Q4_0:
    case Type::Q4_1:
    case Type::Q5_0:
    case Type::Q5_1:
    case Type::Q4_K:
    case Type::Q5_K:
    case Type::Q6_K:
    case Type::Q2_K:
    case Type::Q3_K:
    case Type::IQ4_NL:
    case Type::IQ4_XS:
        return true;
    default:
        return false;
    }
}
// Whether the product rounds b to 8 bits: the few-column path of every block type.
bool rounds_b(Type weights, int64_t n) {
    return has_int_dot(weights) && n < 4;
}
// With AVX-512 VNNI, every block type times many columns rounds b to 16 bits (14 for q6_K)
// per 32 values (per 256 for q2_K and q3_K, 64 for q6_K; integer GEMM): about 1e-5 of
// relative error in a product (q6_K: 6e-5), against f32 rounding's 1e-7.
bool integer_gemm(Type weights, int64_t n) {
    return gfa::cpu::integer_quantized_prompts() && n >= 4 && has_int_dot(weights);
}
// f16 and bf16 weights times few columns (N < 4) meet each column rounded to f16 (scaled by a
// power of two into f16's range first): each value's error is at most 2^-11 of it, uniform, so
// about 2^-11 / sqrt(3) ~ 2.8e-4 of each term, rms; a product of many terms keeps about that
// relative error or less (the kernels' results: 0.6-2.2e-4). An f32 column would give 1e-7.
constexpr double kHalfColumnTol = 1e-3;
double tolerance(Type weights, int64_t n) {
    if (rounds_b(weights, n)) return kIntDotTolFewOutputs;
    if ((weights == Type::F16 || weights == Type::BF16) && n < 4) return kHalfColumnTol;
    if (integer_gemm(weights, n)) return weights == Type::Q6_K ? 3e-4 : 1e-4;
    return kTol;
}

// Weights whose magnitude changes every 16 values (a random factor in [0.05, 1]) and whose
// centre shifts every 32: the sub-block scales and mins of the K formats then differ from
// each other, so a kernel that applied the wrong sub-block's scale or min would fail.
std::vector<float> uneven_weights(int64_t n) {
    std::uniform_real_distribution<float> unit(-1.0f, 1.0f), factor(0.05f, 1.0f), centre(-0.5f, 0.5f);
    std::vector<float> v(static_cast<size_t>(n));
    float scale = 1.0f, shift = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
        if (i % 16 == 0) scale = factor(gfa::test::rng());
        if (i % 32 == 0) shift = centre(gfa::test::rng());
        v[size_t(i)] = shift + scale * unit(gfa::test::rng());
    }
    return v;
}

// A loss that weighs every element of t differently, so gradients are not all alike.
Tensor* weighted_sum(Context& ctx, Tensor* t) {
    Tensor* w = ctx.new_tensor(Type::F32, t->ne);
    fill_uniform(w);
    Tensor* prod = mul(ctx, t, w);
    return sum_rows(ctx, reshape(ctx, prod, {prod->nelements()}));
}

} // namespace

TEST_CASE("mul_mat matches the reference for every weight type on odd shapes", "[matmul]") {
    const Type types[] = {Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0};
    struct Shape {
        int64_t K, M, N;
    };
    // N < 4 takes the dot-product path, larger N the packed GEMM path; M and N cross the
    // micro-tile sizes (16/32 rows, 6/12 columns) and K crosses the 256-wide k blocks.
    const Shape shapes[] = {{32, 1, 1},   {96, 17, 3},     {64, 113, 1},
                            {320, 3, 17}, {288, 129, 113}, {32, 1, 129}};
    for (Type type : types)
        for (const Shape& s : shapes) {
            INFO(type_name(type) << " K=" << s.K << " M=" << s.M << " N=" << s.N);
            // An 8-bit column makes single dot products near zero relatively inexact; the
            // quantized few-column path is checked on shapes with many outputs.
            if (tolerance(type, s.N) > kTol && s.M * s.N < 16) continue;
            Context ctx = data_ctx();
            Tensor* a = ctx.new_tensor(type, {s.K, s.M});
            Tensor* b = ctx.new_tensor(Type::F32, {s.K, s.N});
            // With one or a few outputs a signed dot product can cancel to near zero, and its
            // relative error then measures the cancellation, not the kernel: keep those
            // inputs positive.
            const float lo = s.M * s.N < 16 ? 0.1f : -1.0f;
            fill_uniform(a, lo, 1.0f);
            fill_uniform(b, lo, 1.0f);
            check_forward(mul_mat(ctx, a, b), tolerance(type, s.N));
        }
}

// The other GGUF block types (blocks of 32 or 256), both paths. Many outputs per case, so
// the 8-bit column of the integer paths is judged over a whole result.
TEST_CASE("mul_mat matches the reference for the other GGUF block types", "[matmul][quants]") {
    const Type types[] = {Type::Q4_1, Type::Q5_0, Type::Q5_1, Type::Q2_K,   Type::Q3_K,
                          Type::Q4_K, Type::Q5_K, Type::Q6_K, Type::IQ4_NL, Type::IQ4_XS};
    for (Type type : types)
        for (int64_t K : {256, 768})
            for (int64_t M : {17, 113})
                for (int64_t N : {1, 3, 5}) {
                    INFO(type_name(type) << " K=" << K << " M=" << M << " N=" << N);
                    Context ctx = data_ctx();
                    Tensor* a = ctx.new_tensor(type, {K, M});
                    Tensor* b = ctx.new_tensor(Type::F32, {K, N});
                    fill_uniform(a);
                    fill_uniform(b);
                    check_forward(mul_mat(ctx, a, b), tolerance(type, N));
                }
}

// The decoding path (N < 4: integer dot products against an 8-bit column on AVX2) for every
// GGUF block type: K of several 256-blocks and, for the blocks of 32, counts of blocks that
// leave a remainder after the kernels' steps of four; odd row counts, at least 67 outputs
// per result (see kIntDotTol); 1 and 3 threads.
TEST_CASE("mul_mat's few-column path matches the reference for every GGUF block type", "[matmul][quants]") {
    const Type types[] = {Type::Q8_0, Type::Q4_0, Type::Q4_1, Type::Q5_0, Type::Q5_1,   Type::Q2_K,
                          Type::Q3_K, Type::Q4_K, Type::Q5_K, Type::Q6_K, Type::IQ4_NL, Type::IQ4_XS};
    for (Type type : types) {
        std::vector<int64_t> ks = {256, 768, 1280};
        if (type_traits(type).block_size == 32) ks.insert(ks.end(), {96, 352});
        for (int64_t K : ks)
            for (int64_t M : {67, 131})
                for (int64_t N : {1, 2, 3}) {
                    const int threads = M == 67 ? 1 : 3;
                    INFO(type_name(type) << " K=" << K << " M=" << M << " N=" << N << " threads=" << threads);
                    Context ctx = data_ctx();
                    Tensor* a = ctx.new_tensor(type, {K, M});
                    Tensor* b = ctx.new_tensor(Type::F32, {K, N});
                    tensor_set_f32(a, uneven_weights(K * M));
                    fill_uniform(b);
                    check_forward(mul_mat(ctx, a, b), kIntDotTol, threads);
                }
    }
}

// Block types with many columns (the packed GEMM path; with AVX-512 VNNI the integer GEMM,
// 16 weight rows per tile, 8 columns per pass): weights whose scale and centre change every
// 16 and 32 values, so a block scale or offset applied to the wrong block or row fails; row
// counts around the tile (15, 16, 17, 37) and column counts around the pass (4, 8, 9, 17).
TEST_CASE("mul_mat's many-column path for every block type matches the reference on tile edges",
          "[matmul][quants]") {
    for (Type type : {Type::Q4_0, Type::Q8_0, Type::Q4_1, Type::Q5_0, Type::Q5_1, Type::Q2_K, Type::Q3_K,
                      Type::Q4_K, Type::Q5_K, Type::Q6_K, Type::IQ4_NL, Type::IQ4_XS})
        for (int64_t K : type_traits(type).block_size == 256 ? std::vector<int64_t>{256, 768}
                                                             : std::vector<int64_t>{64, 352})
            for (int64_t M : {15, 16, 17, 37})
                for (int64_t N : {4, 8, 9, 17}) {
                    INFO(type_name(type) << " K=" << K << " M=" << M << " N=" << N);
                    Context ctx = data_ctx();
                    Tensor* a = ctx.new_tensor(type, {K, M});
                    Tensor* b = ctx.new_tensor(Type::F32, {K, N});
                    tensor_set_f32(a, uneven_weights(K * M));
                    fill_uniform(b);
                    check_forward(mul_mat(ctx, a, b), tolerance(type, N), M == 37 ? 3 : 2);
                }
}

// On a CPU with AMX the integer GEMM's products run on tiles (16 weight rows x 16 columns, a
// column's 16-bit values as two bytes) for every block type whose codes fit bytes (q3_K's with
// a bias taken off the sums after); its results must be the vector path's bit for bit (the same
// i32 sums and epilogue), with 16-bit columns and with 8-bit ones (MatMulPrecision::Q8). Columns
// past a group of 16 (4, 17, 33), row counts around the tile, K of one and of several column
// scales, and batches broadcast over the weights (each batch's columns rounded afresh); q6_K
// keeps the vector path either way.
TEST_CASE("mul_mat's integer GEMM on AMX tiles gives the vector path's bits", "[matmul][quants]") {
    if (!gfa::cpu::amx_quantized_prompts()) {
        WARN("no AMX tiles on this CPU or build: nothing to compare");
        return;
    }
    for (Type type : {Type::Q4_0, Type::Q8_0, Type::Q4_1, Type::Q5_0, Type::Q5_1, Type::Q2_K, Type::Q3_K,
                      Type::Q4_K, Type::Q5_K, Type::Q6_K, Type::IQ4_NL, Type::IQ4_XS})
        for (int64_t K : type_traits(type).block_size == 256 ? std::vector<int64_t>{256, 768}
                                                             : std::vector<int64_t>{32, 352})
            for (int64_t M : {15, 16, 37})
                for (int64_t N : {4, 17, 33})
                    for (bool eight_bit : {false, true}) {
                        INFO(type_name(type) << " K=" << K << " M=" << M << " N=" << N
                                             << (eight_bit ? " (8-bit columns)" : ""));
                        Context ctx = data_ctx();
                        Tensor* a = ctx.new_tensor(type, {K, M, 1, 1});
                        Tensor* b = ctx.new_tensor(Type::F32, {K, N, M == 37 ? 2 : 1, 1});
                        tensor_set_f32(a, uneven_weights(K * M));
                        fill_uniform(b, -3.0f, 3.0f);
                        Tensor* p = mul_mat(ctx, a, b);
                        if (eight_bit) set_matmul_precision(p, MatMulPrecision::Q8);
                        const Graph g = build_forward(p);
                        std::vector<float> with_tiles, vector_path;
                        for (const char* setting : {"1", "0"}) {
                            gfa::test::ScopedEnv amx("GFA_CPU_AMX", setting);
                            tensor_set_f32(p, std::vector<float>(size_t(p->nelements()), std::nanf("")));
                            gfa::test::compute_cpu(g, 2);
                            (setting[0] == '1' ? with_tiles : vector_path) = tensor_get_f32(p);
                        }
                        REQUIRE(std::all_of(with_tiles.begin(), with_tiles.end(),
                                            [](float v) { return std::isfinite(v); }));
                        CHECK(std::memcmp(with_tiles.data(), vector_path.data(),
                                          with_tiles.size() * sizeof(float)) == 0);
                        // (8-bit columns: about 4e-3 from the rounding, checked against it in the test above)
                        CHECK(test::rel_error(with_tiles, ref::evaluate(g, p)) <=
                              (eight_bit && type != Type::Q6_K ? 2e-2 : tolerance(type, N)));
                    }
}

// f32 weights against one column take several rows at a time (eight with AVX-512, else
// four), the rows left over one at a time; both add in the same order, so a row's bits must
// not depend on the thread count (which decides where each worker's groups start). f16 and
// bf16 weights take one row at a time against the column rounded to f16, which each worker
// rounds for itself: the same bits too. K with and without a tail after the 16- and 32-value
// steps; M below one group, and M that leaves each worker a few groups and a remainder.
TEST_CASE("16- and 32-bit matrix-vector products give the same bits on any thread count", "[matmul]") {
    for (Type type : {Type::F32, Type::F16, Type::BF16})
        for (int64_t K : {16, 23, 1000, 2051})
            for (int64_t M : {5, 67}) {
                INFO(type_name(type) << " K=" << K << " M=" << M);
                Context ctx = data_ctx();
                Tensor* a = ctx.new_tensor(type, {K, M});
                Tensor* b = ctx.new_tensor(Type::F32, {K, 1});
                fill_uniform(a, 0.1f, 1.0f); // positive: no cancellation in the relative error
                fill_uniform(b, 0.1f, 1.0f);
                Tensor* out = mul_mat(ctx, a, b);
                const Graph g = build_forward(out);
                const std::vector<double> want = ref::evaluate(g, out);
                std::vector<float> first;
                for (int threads : {1, 2, 3}) {
                    INFO(threads << " threads");
                    test::poison_nodes(g);
                    test::compute_cpu(g, threads);
                    const std::vector<float> got = tensor_get_f32(out);
                    CHECK(test::rel_error(got, want) <= tolerance(type, 1));
                    if (first.empty())
                        first = got;
                    else
                        CHECK(std::memcmp(first.data(), got.data(), got.size() * sizeof(float)) == 0);
                }
            }
}

// The f16 column of 16-bit weights in decoding is scaled by a power of two before rounding:
// columns whose values lie far above f16's range (which would round to infinity) or far below
// its normal range (which would keep few significant bits) must keep f16's precision.
TEST_CASE("16-bit weights in decoding keep their precision for columns of any magnitude", "[matmul]") {
    for (Type type : {Type::F16, Type::BF16})
        for (float magnitude : {1e6f, 3e-7f, 1.0f})
            for (int64_t N : {1, 3}) {
                INFO(type_name(type) << ", column values up to " << magnitude << ", N " << N);
                Context ctx = data_ctx();
                Tensor* a = ctx.new_tensor(type, {1000, 67});
                Tensor* b = ctx.new_tensor(Type::F32, {1000, N});
                fill_uniform(a);
                fill_uniform(b, -magnitude, magnitude);
                check_forward(mul_mat(ctx, a, b), kHalfColumnTol);
            }
}

TEST_CASE("mul_mat runs on 1 and 3 threads with the same result as the reference", "[matmul]") {
    for (int threads : {1, 3})
        for (int64_t n : {2, 37}) {
            Context ctx = data_ctx();
            Tensor* a = ctx.new_tensor(Type::Q8_0, {544, 71});
            Tensor* b = ctx.new_tensor(Type::F32, {544, n});
            fill_uniform(a);
            fill_uniform(b);
            check_forward(mul_mat(ctx, a, b), tolerance(Type::Q8_0, n), threads);
        }
}

TEST_CASE("mul_mat broadcasts a over b's dims 2 and 3 in groups", "[matmul]") {
    for (Type type : {Type::F32, Type::Q4_0})
        for (int64_t n : {1, 19}) {
            Context ctx = data_ctx();
            Tensor* a = ctx.new_tensor(type, {64, 13, 2, 1});
            Tensor* b = ctx.new_tensor(Type::F32, {64, n, 6, 3});
            fill_uniform(a);
            fill_uniform(b);
            Tensor* c = mul_mat(ctx, a, b);
            CHECK(c->ne == std::array<int64_t, 4>{13, n, 6, 3});
            check_forward(c, tolerance(type, n));
        }
    // Many small matrices (each worker takes whole matrices) and a few (workers share one).
    for (int64_t batches : {1, 3, 8}) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F16, {40, 33, batches});
        Tensor* b = ctx.new_tensor(Type::F32, {40, 21, batches});
        fill_uniform(a);
        fill_uniform(b);
        check_forward(mul_mat(ctx, a, b), kTol);
    }
}

TEST_CASE("mul_mat reads transposed and permuted operands", "[matmul]") {
    Context ctx = data_ctx();
    // b^T stored as [N, K]: its transpose is a [K, N] view with k strided.
    for (Type type : {Type::F32, Type::Q8_0})
        for (int64_t n : {1, 3, 29}) {
            Tensor* bt = ctx.new_tensor(Type::F32, {n, 64});
            Tensor* a = ctx.new_tensor(type, {64, 17});
            fill_uniform(bt);
            fill_uniform(a);
            check_forward(mul_mat(ctx, a, transpose(ctx, bt)), tolerance(type, n));
        }
    // Transposed f32 and f16 weights, and permuted batches.
    for (Type type : {Type::F32, Type::F16}) {
        Tensor* at = ctx.new_tensor(type, {19, 40});
        Tensor* b = ctx.new_tensor(Type::F32, {40, 23});
        fill_uniform(at);
        fill_uniform(b);
        check_forward(mul_mat(ctx, transpose(ctx, at), b), kTol);
        Tensor* b2 = ctx.new_tensor(Type::F32, {40, 2});
        fill_uniform(b2);
        check_forward(mul_mat(ctx, transpose(ctx, at), b2), kTol);
    }
    Tensor* q = ctx.new_tensor(Type::F32, {16, 3, 7}); // [D, heads, tokens] -> [D, tokens, heads]
    Tensor* k = ctx.new_tensor(Type::F32, {16, 3, 9});
    fill_uniform(q);
    fill_uniform(k);
    check_forward(mul_mat(ctx, permute(ctx, k, 0, 2, 1, 3), permute(ctx, q, 0, 2, 1, 3)), kTol);
}

TEST_CASE("out_prod matches the reference, strided and broadcast", "[matmul]") {
    Context ctx = data_ctx();
    for (auto [m, n, k] : {std::array<int64_t, 3>{1, 1, 5}, {17, 3, 33}, {113, 129, 7}, {40, 70, 300}}) {
        Tensor* a = ctx.new_tensor(Type::F32, {m, k});
        Tensor* b = ctx.new_tensor(Type::F32, {n, k});
        fill_uniform(a);
        fill_uniform(b);
        check_forward(out_prod(ctx, a, b), kTol);
    }
    Tensor* a = ctx.new_tensor(Type::F32, {9, 11, 1, 2});
    Tensor* bt = ctx.new_tensor(Type::F32, {11, 14, 4, 2}); // transposed view gives [14, 11, 4, 2]
    fill_uniform(a);
    fill_uniform(bt);
    check_forward(out_prod(ctx, a, transpose(ctx, bt)), kTol);
}

TEST_CASE("mul_mat gradients match finite differences", "[matmul][grad]") {
    SECTION("plain") {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {7, 5});
        Tensor* b = ctx.new_tensor(Type::F32, {7, 6});
        fill_uniform(a);
        fill_uniform(b);
        check_gradients(ctx, weighted_sum(ctx, mul_mat(ctx, a, b)), {a, b}, 1e-4);
    }
    SECTION("broadcast over dims 2 and 3, one column") {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {6, 5, 2, 1});
        Tensor* b = ctx.new_tensor(Type::F32, {6, 1, 4, 3});
        fill_uniform(a);
        fill_uniform(b);
        check_gradients(ctx, weighted_sum(ctx, mul_mat(ctx, a, b)), {a, b}, 1e-4);
    }
    SECTION("frozen quantized weights: gradient for b only") {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::Q8_0, {32, 4});
        Tensor* b = ctx.new_tensor(Type::F32, {32, 5, 2});
        fill_uniform(a);
        fill_uniform(b);
        check_gradients(ctx, weighted_sum(ctx, mul_mat(ctx, a, b)), {b}, 1e-4);
    }
}

TEST_CASE("out_prod gradients match finite differences", "[matmul][grad]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {5, 4, 1, 2});
    Tensor* b = ctx.new_tensor(Type::F32, {7, 4, 3, 2});
    fill_uniform(a);
    fill_uniform(b);
    check_gradients(ctx, weighted_sum(ctx, out_prod(ctx, a, b)), {a, b}, 1e-4);
}

TEST_CASE("mul_mat and out_prod reject shapes and types that cannot work", "[matmul][errors]") {
    Context ctx; // metadata only
    Tensor* a = ctx.new_tensor(Type::F32, {8, 3});
    Tensor* b = ctx.new_tensor(Type::F32, {9, 4});
    CHECK_THROWS_WITH(mul_mat(ctx, a, b), Catch::Contains("mul_mat") && Catch::Contains("inner dims") &&
                                              Catch::Contains("f32[8,3,1,1]") &&
                                              Catch::Contains("f32[9,4,1,1]"));
    Tensor* b16 = ctx.new_tensor(Type::F16, {8, 4});
    CHECK_THROWS_WITH(mul_mat(ctx, a, b16), Catch::Contains("b must be f32"));
    Tensor* ai = ctx.new_tensor(Type::I32, {8, 3});
    CHECK_THROWS_WITH(mul_mat(ctx, ai, ctx.new_tensor(Type::F32, {8, 2})), Catch::Contains("i32"));
    Tensor* a3 = ctx.new_tensor(Type::F32, {8, 3, 3});
    Tensor* b4 = ctx.new_tensor(Type::F32, {8, 2, 4});
    CHECK_THROWS_WITH(mul_mat(ctx, a3, b4), Catch::Contains("multiples") && Catch::Contains("f32[8,3,3,1]"));
    CHECK_THROWS_WITH(mul_mat(ctx, b4, a3), Catch::Contains("multiples")); // b smaller than a
    Tensor* q = ctx.new_tensor(Type::Q8_0, {64, 64});
    CHECK_THROWS_WITH(mul_mat(ctx, transpose(ctx, q), ctx.new_tensor(Type::F32, {64, 2})),
                      Catch::Contains("quantized"));
    CHECK_THROWS_WITH(out_prod(ctx, a, b), Catch::Contains("out_prod") && Catch::Contains("shared dims"));
    CHECK_THROWS_WITH(out_prod(ctx, b16, b16), Catch::Contains("must be f32"));
    CHECK_THROWS_AS(mul_mat(ctx, nullptr, b), Error);
}

TEST_CASE("a gradient for quantized weights is refused with a clear error", "[matmul][errors]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::Q4_0, {32, 3});
    Tensor* b = ctx.new_tensor(Type::F32, {32, 2});
    set_param(a);
    Tensor* loss = sum_rows(ctx, reshape(ctx, mul_mat(ctx, a, b), {6}));
    Graph g = build_forward(loss);
    CHECK_THROWS_WITH(build_backward(ctx, g, loss),
                      Catch::Contains("mul_mat") && Catch::Contains("only available for f32"));
}

TEST_CASE("a product's precision is F32 unless set, and the gradients' products inherit it", "[matmul]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {8, 3});
    Tensor* b = ctx.new_tensor(Type::F32, {8, 5});
    Tensor* c = ctx.new_tensor(Type::F32, {3, 5});
    set_param(a);
    set_param(b);
    set_param(c);
    Tensor* p = mul_mat(ctx, a, b);  // [3, 5]
    Tensor* q = out_prod(ctx, p, c); // [3, 3]
    CHECK(matmul_precision(p) == MatMulPrecision::F32);
    set_matmul_precision(p, MatMulPrecision::TF32);
    CHECK(matmul_precision(p) == MatMulPrecision::TF32);
    CHECK(matmul_precision(q) == MatMulPrecision::F32);
    Tensor* loss = sum(ctx, q);
    Graph g = build_forward(loss);
    build_backward(ctx, g, loss);
    // The products made for p's gradients (of a and b) are TF32; those for q's stay F32.
    int tf32 = 0, f32 = 0;
    for (Tensor* n : g.nodes()) {
        if ((n->op != Op::MulMat && n->op != Op::OutProd) || n == p || n == q) continue;
        (matmul_precision(n) == MatMulPrecision::TF32 ? tf32 : f32) += 1;
    }
    CHECK(tf32 == 2);
    CHECK(f32 == 2);
    // The CPU computes f32 whatever the node allows.
    check_forward(q, kTol);
    CHECK_THROWS_WITH(set_matmul_precision(loss, MatMulPrecision::TF32), Catch::Contains("not a mul_mat"));
    CHECK_THROWS_WITH(set_matmul_precision(p, MatMulPrecision(7)), Catch::Contains("unknown precision"));
    set_matmul_precision(p, MatMulPrecision::Q8);
    CHECK(matmul_precision(p) == MatMulPrecision::Q8);
    check_forward(q, kTol); // f32 weights: Q8 changes nothing
}

namespace {
// b rounded as a Q8 product rounds it: per 32 values, a step of the block's largest magnitude
// / 127 (in f32, as the kernel computes it), each value to the nearest step (ties to even).
std::vector<double> rounded_to_8_bits(const std::vector<float>& b) {
    std::vector<double> out(b.size());
    for (size_t i = 0; i < b.size(); i += 32) {
        float amax = 0.0f;
        for (size_t k = i; k < i + 32; ++k) amax = std::max(amax, std::fabs(b[k]));
        const float d = amax / 127.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
        for (size_t k = i; k < i + 32; ++k) out[k] = double(d) * std::nearbyint(b[k] * inv);
    }
    return out;
}
} // namespace

// A prompt's product allowed Q8 (with VNNI: the 8-bit integer GEMM) must equal the product
// of the stored weights with b rounded to 8 bits per 32 values: an f32-accurate match to
// that rounding (1e-4), where 16-bit columns would miss it by the rounding itself (~4e-3)
// and a wrong offset, bias or code order by far more. q2_K's mins must meet the rounded column
// too. q6_K, whose codes times its sub-block scales do not fit bytes, keeps 16-bit columns.
TEST_CASE("mul_mat allowed Q8 rounds b to 8 bits per 32 values against quantized weights",
          "[matmul][quants]") {
    const bool eight_bit = gfa::cpu::integer_quantized_prompts();
    for (Type type : {Type::Q4_0, Type::Q8_0, Type::Q4_1, Type::Q5_0, Type::Q5_1, Type::Q4_K, Type::Q5_K,
                      Type::IQ4_NL, Type::IQ4_XS, Type::Q2_K, Type::Q3_K, Type::Q6_K})
        for (int64_t K : type_traits(type).block_size == 256 ? std::vector<int64_t>{256, 768}
                                                             : std::vector<int64_t>{64, 352})
            for (int64_t M : {15, 17, 37})
                for (int64_t N : {4, 9, 17}) {
                    const bool rounds = eight_bit && type != Type::Q6_K;
                    INFO(type_name(type)
                         << " K=" << K << " M=" << M << " N=" << N << (rounds ? " (8-bit)" : ""));
                    Context ctx = data_ctx();
                    Tensor* a = ctx.new_tensor(type, {K, M});
                    Tensor* b = ctx.new_tensor(Type::F32, {K, N});
                    tensor_set_f32(a, uneven_weights(K * M));
                    fill_uniform(b);
                    Tensor* p = mul_mat(ctx, a, b);
                    set_matmul_precision(p, MatMulPrecision::Q8);
                    if (!rounds) {
                        check_forward(p, tolerance(type, N), 2);
                        continue;
                    }
                    const std::vector<float> w = tensor_get_f32(a), bv = tensor_get_f32(b);
                    const std::vector<double> br = rounded_to_8_bits(bv);
                    std::vector<double> ref(size_t(M * N));
                    for (int64_t n = 0; n < N; ++n)
                        for (int64_t m = 0; m < M; ++m) {
                            double s = 0;
                            for (int64_t k = 0; k < K; ++k)
                                s += double(w[size_t(m * K + k)]) * br[size_t(n * K + k)];
                            ref[size_t(n * M + m)] = s;
                        }
                    Graph g = build_forward(p);
                    tensor_set_f32(p, std::vector<float>(size_t(M * N), std::nanf(""))); // poison
                    gfa::test::compute_cpu(g, M == 37 ? 3 : 2);
                    const std::vector<float> out = tensor_get_f32(p);
                    double num = 0, den = 0;
                    for (size_t i = 0; i < out.size(); ++i) {
                        REQUIRE(std::isfinite(out[i]));
                        num += (out[i] - ref[i]) * (out[i] - ref[i]);
                        den += ref[i] * ref[i];
                    }
                    CHECK(std::sqrt(num / den) <= 1e-4);
                }
}

// MatMulPrecision::BF16 with f32, f16 and bf16 weights: on CPUs with AVX512-BF16 a prompt's
// product (4 or more columns) multiplies both operands rounded to bf16 (round to nearest even)
// with f32 sums, so it must equal the double-precision product of the rounded operands to f32
// accuracy; decoding products (1 to 3 columns, bound by reading the weights) and CPUs without
// the pairs stay f32 (decoding with f16 and bf16 weights rounds the column to f16 at every
// precision: kHalfColumnTol). Odd K (a pair padded with zero), panel edges (M not a multiple of
// 48 or 32), columns past a pass of 32, K past a tile's 32 values, broadcast batches and a
// transposed b; on AMX CPUs on the tiles and on the vector path.
TEST_CASE("mul_mat with BF16 precision multiplies bf16-rounded operands", "[matmul][bf16]") {
    const bool pairs = gfa::cpu::bf16_pair_products();
    auto rounded = [](Context& ctx, Tensor* t) { return cast(ctx, cast(ctx, t, Type::BF16), Type::F32); };
    struct Shape {
        int64_t K, M, N, a2, b2, b3;
        bool transposed_b;
    };
    // With AMX the pairs run on tiles (GFA_CPU_AMX=0: the vector path); both must pass.
    const std::vector<const char*> settings = gfa::cpu::amx_quantized_prompts()
                                                  ? std::vector<const char*>{"1", "0"}
                                                  : std::vector<const char*>{"1"};
    for (const char* setting : settings)
        for (Type type : {Type::F32, Type::F16, Type::BF16})
            for (const Shape& sh : {Shape{37, 13, 4, 1, 1, 1, false}, Shape{64, 61, 9, 1, 1, 1, false},
                                    Shape{256, 100, 130, 1, 1, 1, false}, Shape{96, 48, 17, 2, 6, 3, false},
                                    Shape{64, 50, 33, 1, 1, 1, true}, Shape{100, 45, 1, 1, 1, 1, false},
                                    Shape{37, 7, 2, 1, 1, 1, false}, Shape{256, 30, 3, 2, 4, 1, true},
                                    Shape{1000, 67, 70, 1, 1, 1, false}}) {
                gfa::test::ScopedEnv amx("GFA_CPU_AMX", setting);
                INFO(type_name(type) << " K=" << sh.K << " M=" << sh.M << " N=" << sh.N << " batches "
                                     << sh.b2 << "x" << sh.b3 << (sh.transposed_b ? " transposed b" : "")
                                     << " GFA_CPU_AMX=" << setting);
                Context ctx = data_ctx();
                Tensor* a = ctx.new_tensor(type, {sh.K, sh.M, sh.a2, 1});
                Tensor* b = sh.transposed_b ? ctx.new_tensor(Type::F32, {sh.N, sh.K, sh.b2, sh.b3})
                                            : ctx.new_tensor(Type::F32, {sh.K, sh.N, sh.b2, sh.b3});
                fill_uniform(a);
                fill_uniform(b);
                Tensor* bv = sh.transposed_b ? transpose(ctx, b) : b;
                Tensor* product = mul_mat(ctx, a, bv);
                set_matmul_precision(product, MatMulPrecision::BF16);
                Graph g = build_forward(product);
                gfa::test::poison_nodes(g);
                gfa::test::compute_cpu(g);
                const std::vector<float> got = tensor_get_f32(product);
                for (float v : got) REQUIRE(std::isfinite(v));
                const bool rounds = pairs && sh.N >= 4;
                Tensor* expected =
                    rounds ? mul_mat(ctx, type == Type::BF16 ? a : rounded(ctx, a), rounded(ctx, bv))
                           : mul_mat(ctx, a, bv);
                const std::vector<double> want = ref::evaluate(build_forward(expected), expected);
                const double err = gfa::test::rel_error(got, want);
                INFO("relative error " << err);
                CHECK(err < (type != Type::F32 && sh.N < 4 ? kHalfColumnTol : 1e-5));
                if (rounds) { // and the rounding shows against the exact product
                    Tensor* exact = mul_mat(ctx, a, bv);
                    const double off = gfa::test::rel_error(got, ref::evaluate(build_forward(exact), exact));
                    INFO("from the exact product " << off);
                    CHECK(off > 1e-4);
                    CHECK(off < 1e-2);
                }
            }
}
