// The Vulkan kernels of every op besides attention against the double-precision reference:
// random inputs, odd shapes, strided views, results poisoned with NaN before each run, and
// every node of the graph required to run on Vulkan. The shaders compute in f32 whatever the
// storage, so the tolerances are f32's.
#include "device_op_cases.h"
#include "op_check.h"
#include "op_def.h"
#include "reference.h"
#include "vulkan_device.h"

#include <ggml-fa/alloc.h>
#include <ggml-fa/ops.h>
#include <ggml-fa/scheduler.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

using namespace gfa;
using gfa::test::all_quant_types;
using gfa::test::cpu_dequantized;
using gfa::test::fill_uniform;
using gfa::test::random_indices;
using gfa::test::rel_error;
using gfa::test::set_i32;

namespace {

Context data_ctx() {
    return Context(ContextParams{.alloc_data = true});
}

std::vector<float> run_on_vulkan(Tensor* out) {
    return test::run_on_device(vulkan0(), build_forward(out), out);
}

// Computes out's graph on the device (every node there) and compares it with the reference.
void check_vulkan(Tensor* out, double tol) {
    gfa::test::check_on_device(vulkan0(), out, tol);
}

int64_t mismatches(const std::vector<float>& got, const std::vector<float>& want) {
    REQUIRE(got.size() == want.size());
    int64_t bad = 0;
    for (size_t i = 0; i < got.size(); ++i) bad += got[i] == want[i] ? 0 : 1; // NaN never equals
    return bad;
}

} // namespace

// ---- element-wise ----------------------------------------------------------------------------

TEST_CASE("Vulkan binary ops broadcast rows and columns", "[vulkan][ops]") {
    test::device_cases::binary_broadcast(check_vulkan);
}

TEST_CASE("Vulkan unary ops, activations and their backward ops", "[vulkan][ops]") {
    test::device_cases::unary_and_reductions(check_vulkan);
    test::device_cases::activations_and_backward(check_vulkan);
    // Near zero, where tanh and erf lose digits when computed naively.
    Context ctx = data_ctx();
    Tensor* small = ctx.new_tensor(Type::F32, {64, 3});
    fill_uniform(small, -1e-3f, 1e-3f);
    check_vulkan(gelu(ctx, small, GeluApprox::Tanh), 1e-6);
    check_vulkan(gelu(ctx, small, GeluApprox::Erf), 1e-6);
}

TEST_CASE("Vulkan row sums, means and the normalizations with their backward ops", "[vulkan][ops]") {
    test::device_cases::norms_with_backward(check_vulkan);
    // Rows longer than a workgroup's invocations, strided rows, a row of one value.
    Context ctx = data_ctx();
    Tensor* x = ctx.new_tensor(Type::F32, {1013, 5, 3});
    fill_uniform(x, -2.0f, 2.0f);
    check_vulkan(sum_rows(ctx, x), 1e-6);
    check_vulkan(mean(ctx, x), 1e-6);
    check_vulkan(sum_rows(ctx, permute(ctx, x, 2, 0, 1, 3)), 1e-6);
    check_vulkan(sum(ctx, permute(ctx, x, 2, 0, 1, 3)), 1e-5); // 15195 terms of either sign
    check_vulkan(norm(ctx, x, 1e-5f), 1e-5);
    check_vulkan(rms_norm(ctx, x, 1e-5f), 1e-5);
    Tensor* one = ctx.new_tensor(Type::F32, {1, 4});
    fill_uniform(one);
    check_vulkan(norm(ctx, one, 1e-5f), 0.0); // a row of one value normalizes to zero
}

TEST_CASE("Vulkan soft_max_ext with f32/f16 masks, ALiBi and scale, and its backward", "[vulkan][ops]") {
    test::device_cases::softmax_and_backward(check_vulkan);
    Context ctx = data_ctx();
    Tensor* x = ctx.new_tensor(Type::F32, {300, 7, 2});
    fill_uniform(x);
    check_vulkan(soft_max(ctx, x), 1e-5);
    // Rows hidden entirely by the mask come out as zeros.
    Tensor* mask = ctx.new_tensor(Type::F32, {300, 7});
    std::vector<float> m(300 * 7, 0.0f);
    for (size_t i = 0; i < 300; ++i) m[2 * 300 + i] = -INFINITY;
    tensor_set_f32(mask, m);
    check_vulkan(soft_max_ext(ctx, x, mask, 1.0f, 0.0f), 1e-5);
}

TEST_CASE("Vulkan rope (normal and NeoX) and rope_back at positions in the thousands", "[vulkan][ops]") {
    test::device_cases::rope_and_back(check_vulkan);
    for (RopeMode mode : {RopeMode::Normal, RopeMode::NeoX}) {
        Context ctx = data_ctx();
        Tensor* pos = ctx.new_tensor(Type::I32, {7});
        set_i32(pos, random_indices(7, 30000)); // f32 angles would be off by ~5e-5 here
        const RopeParams p{14, mode, 10000.0f, 0.5f};
        INFO("mode " << int(mode));
        // A strided view, as the model's fused q/k projection feeds it.
        Tensor* wide = ctx.new_tensor(Type::F32, {18 * 5, 7});
        fill_uniform(wide);
        Tensor* heads = view(ctx, wide, {18, 3, 7}, {18 * sizeof(float), wide->nb[1]}, 18 * sizeof(float));
        check_vulkan(rope(ctx, heads, pos, p), 1e-5);
        check_vulkan(rope_back(ctx, heads, pos, p), 1e-5);
    }
}

// ---- data movement ---------------------------------------------------------------------------

TEST_CASE("Vulkan cont, cpy and type conversions", "[vulkan][ops]") {
    {
        // Encoding q8_0 (34-byte blocks sharing words with their neighbours), from f32 and f16:
        // the blocks equal the CPU's encoding byte for byte.
        Context c0 = data_ctx();
        for (Type from : {Type::F32, Type::F16}) {
            Tensor* x = c0.new_tensor(from, {96, 5, 3});
            fill_uniform(x, -4.0f, 4.0f);
            Tensor* q = cast(c0, x, Type::Q8_0);
            REQUIRE(vulkan0()->supports_op(q));
            const std::vector<float> got = run_on_vulkan(cast(c0, q, Type::F32));
            std::vector<float> values = tensor_get_f32(x), want(values.size());
            std::vector<std::byte> blocks(size_t(x->nelements() / QK8_0) * sizeof(block_q8_0));
            type_traits(Type::Q8_0).from_float(values.data(), blocks.data(), x->nelements());
            type_traits(Type::Q8_0).to_float(blocks.data(), want.data(), x->nelements());
            INFO("from " << type_name(from));
            CHECK(mismatches(got, want) == 0);
        }
    }
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {6, 5, 3, 2});
    fill_uniform(a);
    check_vulkan(cont(ctx, permute(ctx, a, 2, 0, 3, 1)), 0.0);
    check_vulkan(cont(ctx, transpose(ctx, a)), 0.0);
    Tensor* dst = ctx.new_tensor(Type::F16, {5, 6, 3, 2});
    check_vulkan(cpy(ctx, transpose(ctx, a), dst), 1e-3);
    for (Type t : {Type::F16, Type::BF16}) {
        Context c2 = data_ctx();
        Tensor* x = c2.new_tensor(Type::F32, {65, 3, 5}); // odd rows: 16-bit pairs straddle rows
        fill_uniform(x);
        // The reference rounds through the type the way the CPU does.
        check_vulkan(cast(c2, cast(c2, x, t), Type::F32), 1e-7);
    }
    for (Type t : all_quant_types()) {
        Context c2 = data_ctx();
        Tensor* q = c2.new_tensor(t, {512, 3});
        fill_uniform(q);
        INFO("type " << type_name(t));
        Tensor* as_f32 = cast(c2, q, Type::F32);
        CHECK(mismatches(run_on_vulkan(as_f32), cpu_dequantized(q)) == 0); // decoded exactly
    }
    Context c3 = data_ctx();
    Tensor* i = c3.new_tensor(Type::I32, {7, 3});
    set_i32(i, random_indices(21, 1 << 24)); // results are compared as floats: stay exact
    check_vulkan(cont(c3, transpose(c3, i)), 0.0);
}

TEST_CASE("Vulkan get_rows of every type and set_rows into f32, f16, bf16 and q8_0", "[vulkan][ops]") {
    for (Type t : {Type::F32, Type::F16, Type::BF16}) {
        Context ctx = data_ctx();
        Tensor* emb = ctx.new_tensor(t, {67, 11, 3});
        fill_uniform(emb);
        Tensor* rows = ctx.new_tensor(Type::I32, {5});
        set_i32(rows, random_indices(5, 11));
        check_vulkan(get_rows(ctx, emb, rows), 0.0);
        Tensor* rows2 = ctx.new_tensor(Type::I32, {4, 3});
        set_i32(rows2, random_indices(12, 11));
        check_vulkan(get_rows(ctx, emb, rows2), 0.0);
    }
    for (Type t : all_quant_types()) {
        Context ctx = data_ctx();
        const int64_t K = 2 * QK_K, rows_in = 11;
        Tensor* emb = ctx.new_tensor(t, {K, rows_in, 3});
        fill_uniform(emb);
        const std::vector<float> table = cpu_dequantized(emb);
        Tensor* rows = ctx.new_tensor(Type::I32, {4, 3});
        const std::vector<int32_t> idx = random_indices(12, int32_t(rows_in));
        set_i32(rows, idx);
        std::vector<float> want;
        for (int64_t p = 0; p < 3; ++p)
            for (int64_t i = 0; i < 4; ++i) {
                const int64_t r = idx[size_t(p * 4 + i)];
                want.insert(want.end(), table.begin() + (p * rows_in + r) * K,
                            table.begin() + (p * rows_in + r + 1) * K);
            }
        INFO("type " << type_name(t));
        CHECK(mismatches(run_on_vulkan(get_rows(ctx, emb, rows)), want) == 0);
    }
    for (Type t : {Type::F32, Type::F16, Type::BF16}) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(t, {63, 9, 2}); // odd rows: a 16-bit row ends mid-word
        fill_uniform(a);
        Tensor* b = ctx.new_tensor(Type::F32, {63, 4, 2});
        fill_uniform(b);
        Tensor* rows = ctx.new_tensor(Type::I32, {4});
        set_i32(rows, {7, 0, 3, 8});
        INFO("type " << type_name(t));
        // The rows not written keep a's values (compared through the reference as well).
        Tensor* written = set_rows(ctx, a, b, rows);
        REQUIRE(vulkan0()->supports_op(written));
        const std::vector<float> got = run_on_vulkan(written);
        const std::vector<double> want = ref::evaluate(build_forward(written), written);
        CHECK(rel_error(got, want) <= (t == Type::F32 ? 0.0 : 4e-3));
        // Exactly the CPU's rounding for the rows written.
        std::vector<float> rounded = tensor_get_f32(b);
        for (float& v : rounded)
            v = t == Type::F16    ? fp16_to_fp32(fp32_to_fp16(v))
                : t == Type::BF16 ? bf16_to_fp32(fp32_to_bf16(v))
                                  : v;
        const int32_t at[] = {7, 0, 3, 8};
        for (int64_t p = 0; p < 2; ++p)
            for (int64_t i = 0; i < 4; ++i)
                for (int64_t k = 0; k < 63; ++k)
                    CHECK(got[size_t((p * 9 + at[i]) * 63 + k)] == rounded[size_t((p * 4 + i) * 63 + k)]);
    }
    {
        // q8_0 rows (34-byte blocks, so blocks share words with their neighbours): each
        // written row decodes to exactly what the CPU's encoder gives.
        Context ctx = data_ctx();
        const int64_t K = 96;
        Tensor* a = ctx.new_tensor(Type::Q8_0, {K, 9, 2});
        fill_uniform(a);
        Tensor* b = ctx.new_tensor(Type::F32, {K, 4, 2});
        fill_uniform(b, -3.0f, 3.0f);
        std::vector<float> bv = tensor_get_f32(b);
        bv[5] = 0.0f; // a block with an exact zero, and one all zeros (d = 0)
        for (size_t k = 32; k < 64; ++k) bv[k] = 0.0f;
        tensor_set_f32(b, bv);
        Tensor* rows = ctx.new_tensor(Type::I32, {4});
        set_i32(rows, {2, 8, 0, 5});
        const std::vector<float> before = cpu_dequantized(a);
        Tensor* written = set_rows(ctx, a, b, rows);
        REQUIRE(vulkan0()->supports_op(written));
        const std::vector<float> got = run_on_vulkan(cast(ctx, written, Type::F32));
        std::vector<std::byte> block(size_t(K / QK8_0) * sizeof(block_q8_0));
        std::vector<float> want = before, decoded(static_cast<size_t>(K));
        const int32_t at[] = {2, 8, 0, 5};
        for (int64_t p = 0; p < 2; ++p)
            for (int64_t i = 0; i < 4; ++i) {
                type_traits(Type::Q8_0).from_float(bv.data() + (p * 4 + i) * K, block.data(), K);
                type_traits(Type::Q8_0).to_float(block.data(), decoded.data(), K);
                std::copy(decoded.begin(), decoded.end(), want.begin() + (p * 9 + at[i]) * K);
            }
        CHECK(mismatches(got, want) == 0);
    }
}

TEST_CASE("Vulkan get_rows and set_rows with an index out of range raise an error", "[vulkan][ops]") {
    Context ctx = data_ctx();
    Tensor* emb = ctx.new_tensor(Type::F32, {16, 5});
    fill_uniform(emb);
    Tensor* rows = ctx.new_tensor(Type::I32, {3});
    set_i32(rows, {1, 5, 0}); // 5 is one past the end
    CHECK_THROWS_WITH(run_on_vulkan(get_rows(ctx, emb, rows)),
                      Catch::Contains("Vulkan0") && Catch::Contains("row index out of range"));
    Tensor* b = ctx.new_tensor(Type::F32, {16, 3});
    fill_uniform(b);
    set_i32(rows, {0, -1, 2});
    CHECK_THROWS_WITH(run_on_vulkan(set_rows(ctx, emb, b, rows)), Catch::Contains("row index out of range"));
    // A cross-entropy class outside the logits, in the loss and in its backward op.
    Tensor* logits = ctx.new_tensor(Type::F32, {4, 3});
    fill_uniform(logits);
    Tensor* classes = ctx.new_tensor(Type::I32, {3});
    set_i32(classes, {0, 4, 1});
    CHECK_THROWS_WITH(run_on_vulkan(cross_entropy_loss(ctx, logits, classes)),
                      Catch::Contains("class out of range"));
    Tensor* g = ctx.new_tensor(Type::F32, {1});
    tensor_set_f32(g, {1.0f});
    CHECK_THROWS_WITH(run_on_vulkan(cross_entropy_loss_back(ctx, g, logits, classes)),
                      Catch::Contains("class out of range"));
    // The device works afterwards.
    set_i32(rows, {4, 1, 2});
    check_vulkan(get_rows(ctx, emb, rows), 0.0);
}

TEST_CASE("Vulkan fill, repeat, repeat_back, concat and diag_mask", "[vulkan][ops]") {
    for (Type t : {Type::F32, Type::F16, Type::BF16}) {
        Context ctx = data_ctx();
        check_vulkan(cast(ctx, fill(ctx, t, {17, 3, 2}, 0.375f), Type::F32), 0.0);
    }
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {3, 1, 2});
    fill_uniform(a);
    Tensor* like = ctx.new_tensor(Type::F32, {9, 5, 4, 3});
    check_vulkan(repeat(ctx, a, like), 0.0);
    Tensor* g = ctx.new_tensor(Type::F32, {9, 5, 4, 3});
    fill_uniform(g);
    check_vulkan(repeat_back(ctx, g, a), 1e-6);
    for (int dim = 0; dim < 4; ++dim) {
        std::array<int64_t, 4> na{5, 3, 2, 3}, nb = na;
        nb[dim] = 4;
        Tensor* x = ctx.new_tensor(Type::F32, na);
        Tensor* y = ctx.new_tensor(Type::F32, nb);
        fill_uniform(x);
        fill_uniform(y);
        INFO("dim " << dim);
        check_vulkan(concat(ctx, x, y, dim), 0.0);
    }
    Tensor* sq = ctx.new_tensor(Type::F32, {9, 7, 2});
    fill_uniform(sq);
    check_vulkan(diag_mask_inf(ctx, sq, 2), 0.0);
    check_vulkan(diag_mask_fill(ctx, sq, 1, 0.0f), 0.0);
    check_vulkan(soft_max(ctx, diag_mask_inf(ctx, sq, 0)), 1e-5);
}

TEST_CASE("Vulkan get_rows_back", "[vulkan][ops]") {
    Context ctx = data_ctx();
    Tensor* like = ctx.new_tensor(Type::F32, {13, 7});
    Tensor* grad = ctx.new_tensor(Type::F32, {13, 23});
    fill_uniform(grad);
    Tensor* rows = ctx.new_tensor(Type::I32, {23});
    set_i32(rows, random_indices(23, 7)); // repeats guaranteed: 23 rows into 7
    check_vulkan(get_rows_back(ctx, grad, rows, like), 1e-6);
}

TEST_CASE("Vulkan cross_entropy_loss, its backward, and AdamW steps", "[vulkan][ops]") {
    test::device_cases::loss_and_adamw(check_vulkan);
}

TEST_CASE("Vulkan computes the gradients autodiff builds (matmul, norms, activations, loss)",
          "[vulkan][ops]") {
    test::device_cases::autodiff_gradients(check_vulkan, 1e-5);
}

// ---- matrix products -------------------------------------------------------------------------

TEST_CASE("Vulkan mul_mat with f32, f16 and bf16 weights, broadcast batches and odd sizes", "[vulkan][ops]") {
    struct Batch {
        int64_t a2, a3, b2, b3;
    };
    const Batch batches[] = {{1, 1, 1, 1}, {3, 2, 3, 2}, {1, 1, 3, 2}, {2, 1, 6, 1}};
    for (Type t : {Type::F32, Type::F16, Type::BF16})
        for (int64_t n : {1, 3, 8, 9, 67})
            for (const Batch& bt : batches) {
                Context ctx = data_ctx();
                const int64_t K = 97, M = 71;
                Tensor* a = ctx.new_tensor(t, {K, M, bt.a2, bt.a3});
                Tensor* b = ctx.new_tensor(Type::F32, {K, n, bt.b2, bt.b3});
                fill_uniform(a);
                fill_uniform(b);
                INFO("weights " << type_name(t) << ", N = " << n);
                check_vulkan(mul_mat(ctx, a, b), 1e-5); // b stays f32: an f32 product
            }
    // Decoding with f16 rows that start on a word (read two weights per word) and, through a
    // view one element in, rows that do not.
    for (int64_t n : {1, 2, 5, 8}) {
        Context ctx = data_ctx();
        Tensor* w = ctx.new_tensor(Type::F16, {130, 37});
        Tensor* b = ctx.new_tensor(Type::F32, {128, n});
        fill_uniform(w);
        fill_uniform(b);
        INFO("N = " << n);
        Tensor* aligned = view(ctx, w, {128, 37}, {w->nb[1]}, 0);
        Tensor* shifted = view(ctx, w, {128, 37}, {w->nb[1]}, sizeof(uint16_t));
        check_vulkan(mul_mat(ctx, aligned, b), 1e-5);
        check_vulkan(mul_mat(ctx, shifted, b), 1e-5);
    }
    // A transposed (strided) b.
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {19, 23});
    Tensor* bt = ctx.new_tensor(Type::F32, {70, 19});
    fill_uniform(a);
    fill_uniform(bt);
    check_vulkan(mul_mat(ctx, a, transpose(ctx, bt)), 1e-5);
}

TEST_CASE("Vulkan mul_mat with every quantized weight type, decoding and prefill shapes", "[vulkan][ops]") {
    for (Type t : all_quant_types())
        for (int64_t N : {1, 5, 8, 9, 70}) {
            Context ctx = data_ctx();
            const int64_t K = type_traits(t).block_size == 32 ? 96 : 512;
            Tensor* a = ctx.new_tensor(t, {K, 37, 2, 1}); // each matrix serves 3 x 2 matrices of b
            Tensor* b = ctx.new_tensor(Type::F32, {K, N, 6, 2});
            fill_uniform(a);
            fill_uniform(b);
            INFO("weights " << type_name(t) << ", N = " << N);
            // The reference multiplies the CPU-decoded weights in double: the kernel decodes
            // the same values and sums in f32.
            check_vulkan(mul_mat(ctx, a, b), 1e-5);
        }
}

TEST_CASE("Vulkan out_prod with broadcast batches and transposed operands", "[vulkan][ops]") {
    test::device_cases::out_prod_batches(check_vulkan);
    Context ctx = data_ctx();
    Tensor* at = ctx.new_tensor(Type::F32, {29, 13});
    Tensor* bt = ctx.new_tensor(Type::F32, {29, 70}); // more than a tile of columns
    fill_uniform(at);
    fill_uniform(bt);
    check_vulkan(out_prod(ctx, transpose(ctx, at), transpose(ctx, bt)), 1e-5);
}

// ---- mixtures of experts ---------------------------------------------------------------------

TEST_CASE("Vulkan top_k gives each row's largest positions, ties by position, NaN last",
          "[vulkan][ops][moe]") {
    test::device_cases::top_k_ranks(check_vulkan);
}

// The shaders decode the same values as the CPU and sum in f32.
TEST_CASE("Vulkan mul_mat_id multiplies each token's inputs by its chosen experts", "[vulkan][ops][moe]") {
    test::device_cases::mul_mat_id_experts(check_vulkan, 1e-5);
}

TEST_CASE("Vulkan mul_mat_id with an expert id out of range raises an error naming it",
          "[vulkan][ops][moe]") {
    Context ctx = data_ctx();
    const auto [as, b, ids] = test::expert_inputs(ctx, Type::Q8_0, 32, 3, 4, 1, 2, 5, false);
    set_i32(ids, {0, 1, 2, 3, 3, 0, 1, 4, 2, 2}); // 4 is one past the last expert
    CHECK_THROWS_WITH(run_on_vulkan(mul_mat_id(ctx, as, b, ids)),
                      Catch::Contains("Vulkan0") &&
                          Catch::Contains("mul_mat_id: expert 4 of token 3 is outside [0, 4)"));
    set_i32(ids, {0, 1, 2, 3, 3, 0, 1, 2, -1, 2});
    CHECK_THROWS_WITH(run_on_vulkan(mul_mat_id(ctx, as, b, ids)),
                      Catch::Contains("mul_mat_id: expert -1 of token 4 is outside [0, 4)"));
    // The device works afterwards, and a later error is reported with its own numbers.
    set_i32(ids, {0, 1, 2, 3, 3, 0, 1, 2, 0, 2});
    check_vulkan(mul_mat_id(ctx, as, b, ids), 1e-5);
    set_i32(ids, {0, 1, 2, 3, 3, 0, 1, 2, 0, 7});
    CHECK_THROWS_WITH(run_on_vulkan(mul_mat_id(ctx, as, b, ids)),
                      Catch::Contains("mul_mat_id: expert 7 of token 4 is outside [0, 4)"));
}

// A mixture-of-experts block as a model builds it (router mul_mat, top_k, the gate / up / down
// products through mul_mat_id, swiglu), its weights in Vulkan memory, placed by a scheduler
// that prefers Vulkan: every node runs there, none falls back to the CPU, and the result is the
// reference's. The router's inputs are multiples of 1/4 whose f32 sums are exact in any
// order, so the device and the reference choose the same experts (ties included).
TEST_CASE("Vulkan runs a mixture-of-experts block, top_k and mul_mat_id placed there", "[vulkan][ops][moe]") {
    // Every type the loader may find experts in is supported on a shape-only probe, as the
    // loader asks (which keeps experts in host memory where the answer is no).
    std::vector<Type> types = {Type::F32, Type::F16, Type::BF16};
    for (Type t : all_quant_types()) types.push_back(t);
    Context probe; // shapes only
    for (Type t : types) {
        Tensor* product =
            mul_mat_id(probe, probe.new_tensor(t, {256, 1, 1}), probe.new_tensor(Type::F32, {256, 1, 1}),
                       probe.new_tensor(Type::I32, {1, 1}));
        INFO(type_name(t));
        CHECK(vulkan0()->supports_op(product));
    }
    CHECK(vulkan0()->supports_op(top_k(probe, probe.new_tensor(Type::F32, {8, 3}), 2)));

    const Type expert_type = GENERATE(Type::F32, Type::Q4_K);
    INFO("experts " << type_name(expert_type));
    const int64_t D = 256, F = 256, E = 8, k = 2, T = 7;
    Context weights;
    Tensor* router = weights.new_tensor(Type::F32, {D, E});
    Tensor* gate_exps = weights.new_tensor(expert_type, {D, F, E});
    Tensor* up_exps = weights.new_tensor(expert_type, {D, F, E});
    Tensor* down_exps = weights.new_tensor(expert_type, {F, D, E});
    auto buffer = allocate_context_tensors(weights, vulkan0()->buffer_type());
    auto quarters = [](size_t count) {
        std::vector<float> v = test::random_values(count, -1.0f, 1.0f);
        for (float& x : v) x = std::round(x * 4.0f) / 4.0f;
        return v;
    };
    tensor_set_f32(router, quarters(size_t(router->nelements())));
    for (Tensor* w : {gate_exps, up_exps, down_exps}) {
        const std::vector<float> v = test::random_values(size_t(w->nelements()), -0.1f, 0.1f);
        if (w->type == Type::F32) {
            tensor_set_f32(w, v);
            continue;
        }
        std::vector<std::byte> blocks(w->nbytes());
        type_traits(w->type).from_float(v.data(), blocks.data(), w->nelements());
        tensor_set(w, blocks.data(), 0, blocks.size());
    }

    Context ctx;
    Tensor* x = set_name(ctx.new_tensor(Type::F32, {D, T}), "x");
    set_input(x);
    Tensor* ids = top_k(ctx, mul_mat(ctx, router, x), k);
    set_output(ids); // kept for the comparison below
    Tensor* xs = reshape(ctx, x, {D, 1, T});
    Tensor* gate = mul_mat_id(ctx, gate_exps, xs, ids);
    Tensor* up = mul_mat_id(ctx, up_exps, xs, ids);
    Tensor* out = mul_mat_id(ctx, down_exps, swiglu(ctx, gate, up), ids); // [D, k, T]
    Graph g = build_forward(out);

    auto vk = vulkan0()->create_backend();
    auto cpu = make_cpu_backend(2);
    Scheduler sched({vk.get(), cpu.get()});
    std::vector<std::string> log;
    sched.set_log([&](const std::string& line) { log.push_back(line); });
    sched.allocate(g);
    tensor_set_f32(x, quarters(size_t(x->nelements())));
    test::poison_nodes(g);
    sched.compute(g);
    std::string fallbacks;
    for (const std::string& line : log) fallbacks += line + "\n";
    INFO(sched.describe() << fallbacks);
    CHECK(log.empty()); // no op fell back to the CPU
    int moe_nodes = 0;
    for (Tensor* n : g.nodes()) {
        if (n->op != Op::TopK && n->op != Op::MulMatId) continue;
        ++moe_nodes;
        INFO(op_name(n->op));
        CHECK(sched.backend_of(n) == vk.get());
    }
    CHECK(moe_nodes == 4);
    CHECK(sched.n_splits() == 1);
    const std::vector<double> want = ref::evaluate(g, out);
    const double err = rel_error(tensor_get_f32(out), want);
    INFO("relative error " << err);
    CHECK(err <= 1e-5);
    // The experts the device chose are the reference's.
    const std::vector<float> chosen = tensor_get_f32(ids);
    const std::vector<double> want_ids = ref::evaluate(g, ids);
    CHECK(rel_error(chosen, want_ids) == 0.0);
}
