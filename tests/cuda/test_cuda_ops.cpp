// The CUDA backend against the double-precision reference: every op on random inputs with
// odd shapes, outputs poisoned with NaN before the run. A graph runs on the GPU by placing
// all of its tensors in one device buffer, uploading the leaves, computing on a CUDA
// backend and downloading the result.
#include "../../backends/cuda/quant_matmul.h"
#include "device_op_cases.h"
#include "op_check.h"
#include "op_def.h"
#include "reference.h"
#include "scoped_env.h"

#include <ggml-fa/backend.h>
#include "quants.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <limits>

using namespace gfa;
using gfa::test::all_quant_types;
using gfa::test::cpu_dequantized;
using gfa::test::fill_uniform;
using gfa::test::random_indices;
using gfa::test::rel_error;
using gfa::test::run_on_device;
using gfa::test::set_i32;

namespace {

Device* cuda0() {
    Device* d = find_device("CUDA0");
    REQUIRE(d != nullptr);
    return d;
}

Context data_ctx() {
    return Context(ContextParams{.alloc_data = true});
}

// A node built directly (for ops whose builders live in other op families).
Tensor* make_node(Context& ctx, Op op, Type type, std::array<int64_t, 4> ne,
                  std::initializer_list<Tensor*> srcs) {
    Tensor* t = ctx.new_node(op, type, ne);
    set_sources(t, srcs);
    return t;
}

std::vector<float> run_on_cuda(const Graph& g, Tensor* out) {
    return gfa::test::run_on_device(cuda0(), g, out);
}

// Computes out's graph on the device (every node there) and compares it with the reference.
void check_cuda(Tensor* out, double tol) {
    gfa::test::check_on_device(cuda0(), out, tol);
}

} // namespace

// ---- device, buffers, errors -------------------------------------------------------------

TEST_CASE("CUDA devices are registered with memory, description and a device buffer type", "[cuda]") {
    Device* dev = cuda0();
    CHECK(dev->kind() == DeviceKind::GPU);
    CHECK(!dev->description().empty());
    const DeviceMemory mem = dev->memory();
    CHECK(mem.total > 0);
    CHECK(mem.free <= mem.total);
    CHECK_FALSE(dev->buffer_type()->is_host());
    CHECK(dev->buffer_type()->device() == dev);
    CHECK_FALSE(cpu_device().can_use(dev->buffer_type()));
}

TEST_CASE("CUDA buffers round-trip data, fill bytes and reuse pooled memory", "[cuda]") {
    Device* dev = cuda0();
    Context ctx; // metadata only
    Tensor* t = ctx.new_tensor(Type::F32, {1000, 3});
    auto buf = dev->buffer_type()->allocate(t->nbytes());
    buf->place(t, 0);
    const std::vector<float> v = gfa::test::random_values(3000);
    tensor_set_f32(t, v);
    CHECK(tensor_get_f32(t) == v);
    buf->fill(0x3f); // 0x3f3f3f3f as a float
    float expect;
    const uint32_t bits = 0x3f3f3f3fu;
    std::memcpy(&expect, &bits, 4);
    for (float x : tensor_get_f32(t)) REQUIRE(x == expect);
    buf.reset();

    // Many allocate/free cycles of one size must not grow device usage.
    const size_t before = dev->memory().free;
    for (int i = 0; i < 50; ++i) {
        auto b = dev->buffer_type()->allocate(size_t(64) << 20);
        REQUIRE(b->size() == size_t(64) << 20);
    }
    const size_t after = dev->memory().free;
    // Without reuse the loop would hold 3.2 GB; 1 GiB of slack absorbs other processes
    // sharing the GPU (ctest runs tests in parallel).
    CHECK(after + (size_t(1) << 30) >= before);
}

TEST_CASE("CUDA out-of-memory names the device and the sizes", "[cuda]") {
    Device* dev = cuda0();
    const size_t huge = size_t(1) << 50;
    try {
        auto b = dev->buffer_type()->allocate(huge);
        FAIL("allocating 1 PiB succeeded");
    } catch (const OutOfMemory& e) {
        const std::string msg = e.what();
        INFO(msg);
        CHECK(msg.find("CUDA0") != std::string::npos);
        CHECK(msg.find(std::to_string(huge)) != std::string::npos);
        CHECK(msg.find("free") != std::string::npos);
    }
    // The device still works afterwards.
    auto b = dev->buffer_type()->allocate(1024);
    CHECK(b->size() == 1024);
}

TEST_CASE("CUDA get_rows with an index out of range raises at synchronize", "[cuda]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {8, 5});
    fill_uniform(a);
    Tensor* rows = ctx.new_tensor(Type::I32, {3});
    set_i32(rows, {0, 7, 2});
    Graph g = build_forward(get_rows(ctx, a, rows));
    CHECK_THROWS_AS(run_on_cuda(g, g.nodes().back()), Error);
}

TEST_CASE("CUDA backend refuses nodes it has no kernel for", "[cuda]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {4, 3});
    Tensor* i = make_node(ctx, Op::Sqr, Type::F32, {4, 3, 1, 1}, {ctx.new_tensor(Type::I32, {4, 3})});
    CHECK_FALSE(cuda0()->supports_op(i));
    CHECK(cuda0()->supports_op(sqr(ctx, a)));
}

// ---- element-wise and reductions ----------------------------------------------------------

TEST_CASE("CUDA binary ops broadcast rows and columns", "[cuda]") {
    gfa::test::device_cases::binary_broadcast(check_cuda);
}

TEST_CASE("CUDA unary ops and reductions", "[cuda]") {
    gfa::test::device_cases::unary_and_reductions(check_cuda);
}

// ---- data movement ------------------------------------------------------------------------

TEST_CASE("CUDA fill, cont, cpy and type conversions", "[cuda]") {
    for (Type t : {Type::F32, Type::F16, Type::BF16}) {
        Context ctx = data_ctx();
        check_cuda(cast(ctx, fill(ctx, t, {17, 3, 2}, 0.375f), Type::F32), 0.0);
    }
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {6, 5, 3, 2});
    fill_uniform(a);
    check_cuda(cont(ctx, permute(ctx, a, 2, 0, 3, 1)), 0.0);
    check_cuda(cont(ctx, transpose(ctx, a)), 0.0);
    Tensor* dst = ctx.new_tensor(Type::F16, {5, 6, 3, 2});
    check_cuda(cpy(ctx, transpose(ctx, a), dst), 1e-3);
    for (Type t : {Type::F16, Type::BF16, Type::Q8_0}) {
        Context c2 = data_ctx();
        Tensor* x = c2.new_tensor(Type::F32, {64, 3, 5});
        fill_uniform(x);
        // The reference rounds through the type the way the CPU does (q8_0: the CPU's block
        // encoding), so the GPU's rounding must agree to float precision.
        check_cuda(cast(c2, cast(c2, x, t), Type::F32), 1e-6);
    }
    for (Type t : {Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0}) {
        Context c2 = data_ctx();
        Tensor* q = c2.new_tensor(t, {96, 7});
        fill_uniform(q);
        check_cuda(cast(c2, q, Type::F32), 1e-7); // dequantize exactly
    }
    Context c3 = data_ctx();
    Tensor* i = c3.new_tensor(Type::I32, {7, 3});
    set_i32(i, random_indices(21, 1 << 24)); // results are compared as floats: stay exact
    check_cuda(cont(c3, transpose(c3, i)), 0.0);
}

TEST_CASE("CUDA get_rows, get_rows_back, set_rows, concat, repeat and repeat_back", "[cuda]") {
    for (Type t : {Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0}) {
        Context ctx = data_ctx();
        Tensor* emb = ctx.new_tensor(t, {64, 11, 3});
        fill_uniform(emb);
        Tensor* rows = ctx.new_tensor(Type::I32, {5});
        set_i32(rows, random_indices(5, 11));
        check_cuda(get_rows(ctx, emb, rows), 1e-7);
        Tensor* rows2 = ctx.new_tensor(Type::I32, {4, 3});
        set_i32(rows2, random_indices(12, 11));
        check_cuda(get_rows(ctx, emb, rows2), 1e-7);
    }
    {
        Context ctx = data_ctx();
        Tensor* like = ctx.new_tensor(Type::F32, {13, 7});
        Tensor* g = ctx.new_tensor(Type::F32, {13, 23});
        fill_uniform(g);
        Tensor* rows = ctx.new_tensor(Type::I32, {23});
        set_i32(rows, random_indices(23, 7)); // repeats guaranteed: 23 rows into 7
        check_cuda(get_rows_back(ctx, g, rows, like), 1e-6);
    }
    for (Type t : {Type::F32, Type::F16, Type::BF16, Type::Q8_0}) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(t, {64, 9, 2});
        fill_uniform(a);
        Tensor* b = ctx.new_tensor(Type::F32, {64, 4, 2});
        fill_uniform(b);
        Tensor* rows = ctx.new_tensor(Type::I32, {4});
        set_i32(rows, {7, 0, 3, 8});
        // the reference rounds through the type too
        check_cuda(cast(ctx, set_rows(ctx, a, b, rows), Type::F32), t == Type::F32 ? 0.0 : 1e-6);
    }
    for (int dim = 0; dim < 4; ++dim) {
        Context ctx = data_ctx();
        std::array<int64_t, 4> na{5, 3, 2, 3}, nb = na;
        nb[dim] = 4;
        Tensor* a = ctx.new_tensor(Type::F32, na);
        Tensor* b = ctx.new_tensor(Type::F32, nb);
        fill_uniform(a);
        fill_uniform(b);
        check_cuda(concat(ctx, a, b, dim), 0.0);
    }
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {3, 1, 2});
    fill_uniform(a);
    Tensor* like = ctx.new_tensor(Type::F32, {9, 5, 4, 3});
    check_cuda(repeat(ctx, a, like), 0.0);
    Tensor* g = ctx.new_tensor(Type::F32, {9, 5, 4, 3});
    fill_uniform(g);
    check_cuda(repeat_back(ctx, g, a), 1e-6);
    // Thousands of copies (norm-weight gradients over token rows): the copies are split into
    // ranges whose partial sums are added after; odd counts leave partial warps and tails.
    Tensor* weight = ctx.new_tensor(Type::F32, {77});
    Tensor* rows = ctx.new_tensor(Type::F32, {77, 3001});
    fill_uniform(rows);
    check_cuda(repeat_back(ctx, rows, weight), 1e-5);
    Tensor* small = ctx.new_tensor(Type::F32, {5, 1, 3, 1});
    Tensor* spread = ctx.new_tensor(Type::F32, {10, 700, 3, 2});
    fill_uniform(spread);
    check_cuda(repeat_back(ctx, spread, small), 1e-5);
    Tensor* wide = ctx.new_tensor(Type::F32, {40, 77});
    fill_uniform(wide);
    check_cuda(repeat_back(ctx, transpose(ctx, wide), weight), 1e-6); // strided source
}

// ---- matrix products ------------------------------------------------------------------------

TEST_CASE("CUDA mul_mat for f32, f16, bf16, q8_0 and q4_0 weights with broadcast batches", "[cuda]") {
    struct Batch {
        int64_t a2, a3, b2, b3;
    };
    const Batch batches[] = {{1, 1, 1, 1}, {3, 2, 3, 2}, {1, 1, 3, 2}, {2, 1, 6, 1}};
    for (Type t : {Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0})
        for (int64_t n : {1, 3, 8, 17})
            for (const Batch& bt : batches) {
                Context ctx = data_ctx();
                const int64_t K = 96, M = 37;
                Tensor* a = ctx.new_tensor(t, {K, M, bt.a2, bt.a3});
                Tensor* b = ctx.new_tensor(Type::F32, {K, n, bt.b2, bt.b3});
                fill_uniform(a);
                fill_uniform(b);
                // f32 GEMM is exact fp32; the half paths round b to 16 bits; quantized weights
                // at N <= 8 meet b quantized to int8 per 32 values (about 0.4% relative error
                // for uniform data, see the [quant] tests).
                const bool int8_columns = (t == Type::Q8_0 || t == Type::Q4_0) && n <= 8;
                const double tol = t == Type::F32 ? 1e-5 : (t == Type::BF16 || int8_columns) ? 2e-2 : 5e-3;
                INFO("weights " << type_name(t) << ", N = " << n);
                check_cuda(mul_mat(ctx, a, b), tol);
            }
    // A transposed (non-packed) f32 b goes through a packed copy.
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {19, 23});
    Tensor* bt = ctx.new_tensor(Type::F32, {5, 19});
    fill_uniform(a);
    fill_uniform(bt);
    check_cuda(mul_mat(ctx, a, transpose(ctx, bt)), 1e-5);
}

// TF32 products (set_matmul_precision): within TensorFloat-32's rounding (10-bit mantissas,
// about 1e-3 relative) of the reference. TF32 allows tensor cores, it does not force them:
// cuBLAS kept its f32 kernel for this out_prod (31 rows, leading dimension 31: bit for bit
// the f32 result on an H200), so only the mul_mat, which it runs on TF32 tensor cores, must
// differ from the f32 result, showing the setting reaches cuBLAS.
TEST_CASE("CUDA f32 mul_mat and out_prod on TF32 tensor cores when the node allows it", "[cuda]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {200, 67});
    Tensor* b = ctx.new_tensor(Type::F32, {200, 45, 3});
    Tensor* c = ctx.new_tensor(Type::F32, {31, 45, 3});
    fill_uniform(a);
    fill_uniform(b);
    fill_uniform(c);
    for (Tensor* product :
         {mul_mat(ctx, a, b), out_prod(ctx, c, transpose(ctx, cont(ctx, transpose(ctx, b))))}) {
        Graph g = build_forward(product);
        const std::vector<double> expected = ref::evaluate(g, product);
        const double f32_error = rel_error(run_on_device(cuda0(), g, product), expected);
        set_matmul_precision(product, MatMulPrecision::TF32);
        const double tf32_error = rel_error(run_on_device(cuda0(), g, product), expected);
        INFO(op_name(product->op) << ": f32 " << f32_error << ", tf32 " << tf32_error);
        CHECK(f32_error < 1e-5);
        CHECK(tf32_error < 3e-3);
        if (product->op == Op::MulMat) CHECK(tf32_error > 10 * f32_error);
    }
}

// Decoding with 16-bit weights: rows whose bytes are a multiple of 16 take the matrix-vector
// kernel, which keeps b in f32 (so the result is an fp32 dot product: tolerance 1e-4, where
// rounding b to 16 bits would give about 1e-3); others the cuBLAS path that rounds b.
// K = 2056 and 4104 split rows over 2 and 4 warps (matvec_rows.cuh); M = 37 leaves a block
// with a row past the end.
TEST_CASE("CUDA mul_mat decoding with f16 and bf16 weights, long and odd rows", "[cuda][matvec]") {
    for (Type t : {Type::F16, Type::BF16})
        for (int64_t K : {8, 1000, 2056, 4104})
            for (int64_t n : {1, 2, 5, 8})
                for (int64_t M : {1, 37, 300}) {
                    Context ctx = data_ctx();
                    const bool broadcast = M == 37;
                    Tensor* a = ctx.new_tensor(t, {K, M, broadcast ? 2 : 1, 1});
                    Tensor* b = ctx.new_tensor(Type::F32, {K, n, broadcast ? 6 : 1, broadcast ? 2 : 1});
                    // Positive inputs: one-output cases (M = N = 1) are single dot products,
                    // which a relative bound cannot judge when they cancel to near zero.
                    fill_uniform(a, 0.05f, 1.0f);
                    fill_uniform(b, 0.05f, 1.0f);
                    // Constant weights are fetched before the kernel waits for b (early launch).
                    if (M == 300) a->flags |= kFlagConstant;
                    const bool matvec_rows = K * 2 % 16 == 0;
                    const double tol = matvec_rows ? 1e-4 : t == Type::BF16 ? 2e-2 : 5e-3;
                    INFO("weights " << type_name(t) << ", K " << K << ", M " << M << ", N " << n);
                    check_cuda(mul_mat(ctx, a, b), tol);
                }
}

// ---- quantized weights ------------------------------------------------------------------------

namespace {

// Error of a quantized mul_mat result `got` against the product of the CPU's dequantized
// weights and b in double: ||got - ref|| / ||spread||, where an output's spread is
// sqrt(sum_k (w_k x_k)^2), the size a sum of K products of random sign has. Unlike ||ref||
// it does not vanish when a single output happens to land near zero, so one-output cases
// (M = N = 1) are judged like the large ones. Any non-finite output is an infinite error.
// With `against`, the error is measured from that result instead of the exact product (the
// same spread).
double quant_matmul_error(const Tensor* a, const Tensor* b, const std::vector<float>& got,
                          const std::vector<float>* against = nullptr) {
    const std::vector<float> w = cpu_dequantized(a), x = tensor_get_f32(b);
    const int64_t K = a->ne[0], M = a->ne[1], N = b->ne[1], B2 = b->ne[2], B3 = b->ne[3];
    const int64_t r2 = B2 / a->ne[2], r3 = B3 / a->ne[3];
    REQUIRE(int64_t(got.size()) == M * N * B2 * B3);
    double err = 0.0, spread = 0.0;
    for (int64_t i3 = 0; i3 < B3; ++i3)
        for (int64_t i2 = 0; i2 < B2; ++i2)
            for (int64_t n = 0; n < N; ++n)
                for (int64_t m = 0; m < M; ++m) {
                    const float* wr = w.data() + ((i3 / r3 * a->ne[2] + i2 / r2) * M + m) * K;
                    const float* xc = x.data() + ((i3 * B2 + i2) * N + n) * K;
                    double ref = 0.0, sq = 0.0;
                    for (int64_t k = 0; k < K; ++k) {
                        const double p = double(wr[k]) * double(xc[k]);
                        ref += p;
                        sq += p * p;
                    }
                    const size_t at = size_t(((i3 * B2 + i2) * N + n) * M + m);
                    const float g = got[at];
                    if (!std::isfinite(g)) return std::numeric_limits<double>::infinity();
                    if (against) ref = double((*against)[at]);
                    err += (g - ref) * (g - ref);
                    spread += sq;
                }
    return spread > 0.0 ? std::sqrt(err / spread) : std::sqrt(err);
}

// Tolerances of the two paths (errors relative to the spread above):
// - N <= 8: b is quantized to int8 per 32 values with step max|x| / 127, so each x_k moves by
//   up to half a step: for uniform x in [-1, 1] an rms of 0.0022 against an rms |x| of 0.58,
//   i.e. about 0.004; 2e-2 is five times that (and over five standard deviations for a single
//   output), while a wrong scale, nibble or bit gives errors of order 1.
// - N > 8: the weights (exact) and b are rounded to f16 for cuBLAS (f32 accumulation): about
//   2^-11 / sqrt(3) relative per factor, 4e-4 together; 3e-3 leaves room for single outputs.
double quant_matmul_tolerance(int64_t n) {
    return n <= 8 ? 2e-2 : 3e-3;
}

void check_quant_mul_mat(Context& ctx, Tensor* a, Tensor* b) {
    Tensor* out = mul_mat(ctx, a, b);
    INFO("seed " << gfa::test::seed() << ": " << type_name(a->type) << " weights " << a->shape_str() << " x "
                 << b->shape_str());
    REQUIRE(cuda0()->supports_op(out));
    const std::vector<float> got = run_on_cuda(build_forward(out), out); // output poisoned with NaN first
    const double err = quant_matmul_error(a, b, got), tol = quant_matmul_tolerance(b->ne[1]);
    INFO("error " << err << " (tolerance " << tol << ")");
    CHECK(err <= tol);
}

} // namespace

// Consecutive decoding products on the same b share its int8 form; a product on another b,
// or any node in between, must quantize afresh. In graph order the products below run as
// (A1 x), (A2 y), add, (A3 x), (A4 x): the second quantizes y, the third x again after the
// add, the fourth reuses the third's. A wrong reuse gives errors of order 1.
TEST_CASE("CUDA quantized decoding products reuse b's int8 form only right after one on the same b",
          "[cuda][quant]") {
    for (int64_t N : {1, 3}) {
        Context ctx = data_ctx();
        const int64_t K = 512, M = 300;
        Tensor* w[4];
        const Type types[4] = {Type::Q8_0, Type::Q4_K, Type::Q6_K, Type::Q5_0};
        for (int i = 0; i < 4; ++i) {
            w[i] = ctx.new_tensor(types[i], {K, M});
            fill_uniform(w[i]);
        }
        Tensor* x = ctx.new_tensor(Type::F32, {K, N});
        Tensor* y = ctx.new_tensor(Type::F32, {K, N});
        fill_uniform(x);
        fill_uniform(y);
        Tensor* first = add(ctx, mul_mat(ctx, w[0], x), mul_mat(ctx, w[1], y));
        Tensor* second = add(ctx, mul_mat(ctx, w[2], x), mul_mat(ctx, w[3], x));
        INFO("N = " << N);
        check_cuda(add(ctx, first, second), 2e-2); // b rounded to int8 per 32 values: ~0.4%
    }
}

// The low-bit formats take part (GFA_CUDA_LOW_BIT unset: their kernels on, whatever the caller set).
TEST_CASE("CUDA mul_mat with every quantized weight type, decoding and prefill paths", "[cuda][quant]") {
    const gfa::test::ScopedEnv low_bit("GFA_CUDA_LOW_BIT", nullptr);
    for (Type t : all_quant_types()) {
        // Long rows are split over 2 or 4 warps (matvec_rows.cuh) in the decoding path; one
        // q4_K column at K = 4352 and 8448 takes the 3-deep pass over 2 and 4 warps.
        std::vector<int64_t> depths = {256, 768, 2048, 4352, 8448};
        if (type_traits(t).block_size == 32) depths.push_back(96);
        for (int64_t K : depths)
            for (int64_t M : {1, 7, 300}) {
                Context ctx = data_ctx();
                Tensor* a = ctx.new_tensor(t, {K, M});
                fill_uniform(a); // quantized by the CPU encoder
                // Constant weights are fetched before the kernel waits for b (early launch).
                if (M == 7) a->flags |= kFlagConstant;
                for (int64_t N : {1, 2, 3, 8, 9, 33}) {
                    Tensor* b = ctx.new_tensor(Type::F32, {K, N});
                    fill_uniform(b);
                    check_quant_mul_mat(ctx, a, b);
                }
            }
    }
}

// q4_K rows of K = 2304..4096, where there are many (8192 or more), take one warp a row at 4
// items deep (quant_matmul.cu): K = 3328 (104 items, so lanes of 3 and of 4) and 4096, 8195 rows
// (the last block of 4 rows holds 3), weights constant (fetched before the kernel's wait) or
// not, against the exact product; two columns, and 4096 rows, keep two warps a row at 2 deep.
TEST_CASE("CUDA q4_K decoding over many rows takes one warp a row, 4 items deep", "[cuda][quant][matvec]") {
    for (const int64_t K : {int64_t(3328), int64_t(4096)}) {
        for (const bool constant : {false, true}) {
            Context ctx = data_ctx();
            Tensor* a = ctx.new_tensor(Type::Q4_K, {K, 8195});
            fill_uniform(a);
            if (constant) a->flags |= kFlagConstant;
            INFO("K " << K << (constant ? ", constant" : ""));
            REQUIRE(cuda::quant_matvec_depth(cuda::view_of(a), 1) == 4);
            REQUIRE(cuda::quant_matvec_split(cuda::view_of(a), 1) == 1);
            CHECK(cuda::quant_matvec_depth(cuda::view_of(a), 2) == 2);
            for (const int64_t N : {1, 2}) {
                Tensor* b = ctx.new_tensor(Type::F32, {K, N});
                fill_uniform(b);
                check_quant_mul_mat(ctx, a, b);
            }
        }
        Context ctx = data_ctx();
        Tensor* fewer = ctx.new_tensor(Type::Q4_K, {K, 4096});
        CHECK(cuda::quant_matvec_depth(cuda::view_of(fewer), 1) == 2);
        CHECK(cuda::quant_matvec_split(cuda::view_of(fewer), 1) == 2);
    }
}

TEST_CASE("CUDA mul_mat with quantized weights broadcast over dims 2 and 3", "[cuda][quant]") {
    const gfa::test::ScopedEnv low_bit("GFA_CUDA_LOW_BIT", nullptr);
    for (Type t : all_quant_types())
        for (int64_t N : {1, 3, 9}) {
            Context ctx = data_ctx();
            const int64_t K = type_traits(t).block_size == 32 ? 96 : 512;
            Tensor* a = ctx.new_tensor(t, {K, 7, 2, 1}); // each matrix serves 3 x 2 matrices of b
            Tensor* b = ctx.new_tensor(Type::F32, {K, N, 6, 2});
            fill_uniform(a);
            fill_uniform(b);
            check_quant_mul_mat(ctx, a, b);
        }
}

TEST_CASE("CUDA get_rows and cast of every quantized type match the CPU's dequantization exactly",
          "[cuda][quant]") {
    const gfa::test::ScopedEnv low_bit("GFA_CUDA_LOW_BIT", nullptr);
    for (Type t : all_quant_types()) {
        INFO("seed " << gfa::test::seed() << ", type " << type_name(t));
        Context ctx = data_ctx();
        const int64_t K = 2 * QK_K, rows_in = 11, planes = 3;
        Tensor* emb = ctx.new_tensor(t, {K, rows_in, planes});
        fill_uniform(emb);
        const std::vector<float> table = cpu_dequantized(emb);
        auto mismatches = [&](const std::vector<float>& got, const std::vector<float>& want) {
            REQUIRE(got.size() == want.size());
            int64_t bad = 0;
            for (size_t i = 0; i < got.size(); ++i) bad += got[i] == want[i] ? 0 : 1; // NaN never equals
            return bad;
        };
        // Gathers: a 1-d index list (rows of plane 0), and one list per plane.
        Tensor* rows = ctx.new_tensor(Type::I32, {5});
        const std::vector<int32_t> idx = random_indices(5, int32_t(rows_in));
        set_i32(rows, idx);
        Tensor* gathered = get_rows(ctx, emb, rows);
        std::vector<float> want;
        for (int32_t r : idx) want.insert(want.end(), table.begin() + r * K, table.begin() + (r + 1) * K);
        CHECK(mismatches(run_on_cuda(build_forward(gathered), gathered), want) == 0);

        Tensor* rows2 = ctx.new_tensor(Type::I32, {4, planes});
        const std::vector<int32_t> idx2 = random_indices(size_t(4 * planes), int32_t(rows_in));
        set_i32(rows2, idx2);
        Tensor* gathered2 = get_rows(ctx, emb, rows2);
        want.clear();
        for (int64_t p = 0; p < planes; ++p)
            for (int64_t i = 0; i < 4; ++i) {
                const int64_t r = idx2[size_t(p * 4 + i)];
                want.insert(want.end(), table.begin() + (p * rows_in + r) * K,
                            table.begin() + (p * rows_in + r + 1) * K);
            }
        CHECK(mismatches(run_on_cuda(build_forward(gathered2), gathered2), want) == 0);

        Tensor* as_f32 = cast(ctx, emb, Type::F32);
        CHECK(mismatches(run_on_cuda(build_forward(as_f32), as_f32), table) == 0);
    }
}

// A model's weights of the formats with one scale per block (q8_0, q4_0, q5_0, iq4_nl, q6_K) sit in
// a weights buffer with each row's scales last (cuda_common.h).
// The bytes on the device must be that layout (read raw), get must give back the file's bytes
// (whole rows and ranges that start and end inside rows), the products must match the
// reference and, on the cuBLAS path, the file layout's bits; get_rows must decode exactly;
// other readers must be refused, so that the scheduler hands them the file's bytes.
TEST_CASE("CUDA weights kept with the scales last: bytes, products, gathers, refusals",
          "[cuda][quant][matvec]") {
    const gfa::test::ScopedEnv low_bit("GFA_CUDA_LOW_BIT", nullptr);
    for (Type t : {Type::Q8_0, Type::Q4_0, Type::Q5_0, Type::IQ4_NL, Type::Q6_K}) {
        const int64_t block = type_traits(t).block_size;
        // Three blocks make rows 2-byte aligned; the others 16-, 4- or 2-byte aligned by type.
        for (int64_t K : {3 * block, int64_t(2048), int64_t(5632), int64_t(8448)})
            for (int64_t M : {1, 7, 300}) {
                INFO("seed " << gfa::test::seed() << ", " << type_name(t) << ", K " << K << ", M " << M);
                Context ctx = data_ctx();
                Tensor* a = ctx.new_tensor(t, {K, M});
                fill_uniform(a);
                a->flags |= kFlagConstant;
                const size_t bytes = a->nbytes(), row = a->nb[1];
                std::vector<uint8_t> file(bytes);
                tensor_get(a, file.data(), 0, bytes);

                // Bytes: the device holds the scales-last rows; get gives the file's back.
                {
                    Context dev_ctx(ContextParams{});
                    Tensor* w = dev_ctx.new_tensor(t, {K, M});
                    std::unique_ptr<Buffer> buf = cuda0()->buffer_type()->allocate(bytes);
                    buf->set_usage(BufferUsage::Weights);
                    buf->place(w, 0);
                    // Written as a merged projection is: whole rows in two parts.
                    const size_t half = size_t(M / 2) * row;
                    tensor_set(w, file.data(), 0, half);
                    tensor_set(w, file.data() + half, half, bytes - half);
                    std::vector<uint8_t> raw(bytes), want(bytes), back(bytes);
                    REQUIRE(cudaMemcpy(raw.data(), w->data, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
                    quant::rows_to_scales_last(t, file.data(), want.data(), K, M);
                    CHECK(raw == want);
                    tensor_get(w, back.data(), 0, bytes);
                    CHECK(back == file);
                    // A range from inside one row to inside another (a scale's byte, values).
                    const size_t from = row / 2 + 1, size = std::min(bytes - from, row + 7);
                    std::vector<uint8_t> patch(size);
                    for (size_t i = 0; i < size; ++i) patch[i] = uint8_t(i * 37 + 11);
                    tensor_set(w, patch.data(), from, size);
                    std::memcpy(file.data() + from, patch.data(), size);
                    tensor_get(w, back.data(), 0, bytes);
                    CHECK(back == file);
                    std::vector<uint8_t> part(size);
                    tensor_get(w, part.data(), from, size);
                    CHECK(part == patch);
                    CHECK_THROWS_WITH(buf->set_usage(BufferUsage::Compute),
                                      Catch::Matchers::Contains("after tensors were written"));

                    // Readers other than the weight kernels are refused, as are views inside rows.
                    Tensor* as_f32 = cast(dev_ctx, w, Type::F32);
                    CHECK_FALSE(cuda0()->supports_op(as_f32));
                    if (K > block) {
                        Tensor* part_rows = view(dev_ctx, w, {block, M}, {w->nb[1]}, 0);
                        place_view(part_rows);
                        Tensor* b = dev_ctx.new_tensor(Type::F32, {block, 1});
                        CHECK_FALSE(cuda0()->supports_op(mul_mat(dev_ctx, part_rows, b)));
                    }
                    Tensor* b = dev_ctx.new_tensor(Type::F32, {K, 1});
                    CHECK(cuda0()->supports_op(mul_mat(dev_ctx, w, b)));
                }

                // Products: decoding (int8 columns) against the reference and close to the file
                // layout's result (the same integer sums, added in other groups); prefill (dequantize
                // + cuBLAS) bit for bit the file layout's.
                for (int64_t N : {1, 2, 3, 8, 9}) {
                    Tensor* b = ctx.new_tensor(Type::F32, {K, N});
                    fill_uniform(b);
                    Tensor* out = mul_mat(ctx, a, b);
                    const Graph g = build_forward(out);
                    const std::vector<float> laid_out = gfa::test::run_on_device(cuda0(), g, out, true);
                    const std::vector<float> file_layout = gfa::test::run_on_device(cuda0(), g, out, false);
                    INFO("N " << N);
                    CHECK(quant_matmul_error(a, b, laid_out) <= quant_matmul_tolerance(N));
                    if (N > 8)
                        CHECK(laid_out == file_layout);
                    else
                        CHECK(quant_matmul_error(a, b, laid_out, &file_layout) <= 1e-5);
                }
                // Gathers decode exactly.
                Tensor* rows = ctx.new_tensor(Type::I32, {5});
                const std::vector<int32_t> idx = random_indices(5, int32_t(M));
                set_i32(rows, idx);
                Tensor* gathered = get_rows(ctx, a, rows);
                const std::vector<float> table = cpu_dequantized(a);
                std::vector<float> want;
                for (int32_t r : idx)
                    want.insert(want.end(), table.begin() + r * K, table.begin() + (r + 1) * K);
                CHECK(gfa::test::run_on_device(cuda0(), build_forward(gathered), gathered, true) == want);
            }
    }
}

TEST_CASE("CUDA out_prod with broadcast batches and transposed operands", "[cuda]") {
    gfa::test::device_cases::out_prod_batches(check_cuda);
}

// ---- normalization, rope, softmax -----------------------------------------------------------

TEST_CASE("CUDA norm and rms_norm with their backward ops", "[cuda]") {
    gfa::test::device_cases::norms_with_backward(check_cuda);
}

TEST_CASE("CUDA rope (normal and NeoX) and rope_back", "[cuda]") {
    gfa::test::device_cases::rope_and_back(check_cuda);
}

TEST_CASE("CUDA soft_max_ext with f32/f16 masks, ALiBi and scale, and its backward", "[cuda]") {
    gfa::test::device_cases::softmax_and_backward(check_cuda);
}

// ---- activations and training -----------------------------------------------------------------

TEST_CASE("CUDA activations and their backward ops", "[cuda]") {
    gfa::test::device_cases::activations_and_backward(check_cuda);
}

TEST_CASE("CUDA cross_entropy_loss, its backward, and AdamW", "[cuda]") {
    gfa::test::device_cases::loss_and_adamw(check_cuda);
}

// ---- autodiff graphs ---------------------------------------------------------------------------

TEST_CASE("CUDA computes the gradients autodiff builds (matmul, norms, activations, loss)", "[cuda]") {
    gfa::test::device_cases::autodiff_gradients(check_cuda, 1e-4);
}

TEST_CASE("CUDA flash_attn_ext as a graph node, forward and autodiff backward", "[cuda][attn]") {
    struct Case {
        int64_t D, Sq, Skv, Hq, Hkv;
        Type kv;
        bool causal, mask, sinks;
        float softcap;
    };
    const Case cases[] = {
        {64, 17, 33, 4, 2, Type::F16, true, false, true, 0.0f},
        {128, 1, 300, 8, 2, Type::BF16, false, true, false, 0.0f},
        {80, 113, 113, 2, 1, Type::F16, true, true, true, 20.0f},
        {128, 5, 64, 4, 1, Type::Q8_0, false, false, false, 0.0f},
    };
    for (const Case& c : cases) {
        INFO("D " << c.D << " Sq " << c.Sq << " Skv " << c.Skv << " kv " << type_name(c.kv));
        Context ctx = data_ctx();
        Tensor* q = ctx.new_tensor(Type::F32, {c.D, c.Sq, c.Hq, 1});
        Tensor* k = ctx.new_tensor(Type::F32, {c.D, c.Skv, c.Hkv, 1});
        Tensor* v = ctx.new_tensor(Type::F32, {c.D, c.Skv, c.Hkv, 1});
        Tensor* w = ctx.new_tensor(Type::F32, {c.D, c.Hq, c.Sq, 1});
        for (Tensor* t : {q, k, v, w}) fill_uniform(t);
        Tensor* mask = nullptr;
        if (c.mask) {
            mask = ctx.new_tensor(Type::F16, {c.Skv, c.Sq});
            std::vector<float> m = gfa::test::random_values(size_t(mask->nelements()), -3.0f, 0.0f);
            for (size_t i = 0; i < m.size(); i += 7) m[i] = -INFINITY;
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
        Tensor* kc = cast(ctx, k, c.kv);
        Tensor* vc = cast(ctx, v, c.kv);
        Tensor* o = flash_attn_ext(ctx, cast(ctx, q, c.kv == Type::BF16 ? Type::BF16 : Type::F16), kc, vc,
                                   mask, p, sinks);
        check_cuda(o, 1e-2);
        check_cuda(flash_attn_lse(ctx, o), 1e-2);
        if (c.kv == Type::Q8_0) continue; // quantized caches are for inference
        std::vector<Tensor*> params{q, k, v};
        if (sinks) params.push_back(sinks);
        for (Tensor* t : params) set_param(t);
        Tensor* loss = sum(ctx, mul(ctx, o, w));
        set_loss(loss);
        Graph g = build_forward(loss);
        build_backward(ctx, g, loss);
        for (Tensor* t : params) {
            INFO("gradient of " << t->shape_str());
            check_cuda(g.grad(t), 2e-2);
        }
    }
}

// ---- mixtures of experts -----------------------------------------------------------------------

TEST_CASE("CUDA top_k gives each row's largest positions, ties by position, NaN last", "[cuda][ops][moe]") {
    test::device_cases::top_k_ranks(check_cuda);
}

// The radix-select kernel (candidates of vocabulary-sized columns found digit by digit, ties at
// the k-th value taken at the lowest positions) against the reference's draw, exactly.
TEST_CASE("CUDA sample_token draws the reference's token", "[cuda][ops][sampling]") {
    test::device_cases::sample_token_draws(check_cuda);
}

// The kernel decodes the same weight values as the CPU and sums in f32 against the f32 inputs
// (no 8-bit rounding of b, unlike the quantized mul_mat path).
TEST_CASE("CUDA mul_mat_id multiplies each token's inputs by its chosen experts", "[cuda][ops][moe]") {
    test::device_cases::mul_mat_id_experts(check_cuda, 1e-5);
}

TEST_CASE("CUDA mul_mat_id with an expert id out of range raises an error naming it", "[cuda][ops][moe]") {
    Context ctx = data_ctx();
    const auto [as, b, ids] = test::expert_inputs(ctx, Type::Q8_0, 32, 3, 4, 1, 2, 5, false);
    Tensor* out = mul_mat_id(ctx, as, b, ids);
    const Graph g = build_forward(out);
    set_i32(ids, {0, 1, 2, 3, 3, 0, 1, 4, 2, 2}); // 4 is one past the last expert
    CHECK_THROWS_WITH(run_on_cuda(g, out),
                      Catch::Contains("CUDA0") &&
                          Catch::Contains("mul_mat_id: expert 4 of token 3 is outside [0, 4)"));
    set_i32(ids, {0, 1, 2, 3, 3, 0, 1, 2, -1, 2});
    CHECK_THROWS_WITH(run_on_cuda(g, out),
                      Catch::Contains("mul_mat_id: expert -1 of token 4 is outside [0, 4)"));
    // The device works afterwards.
    set_i32(ids, {0, 1, 2, 3, 3, 0, 1, 2, 0, 2});
    check_cuda(out, 1e-5);
}

// A prompt's pairs are grouped by expert (a warp decodes each piece of an expert's row once for
// up to 8 of them); a single token's are taken as they come. Each output is one warp's sum in
// the same order either way, so a prompt's outputs must equal, bit for bit, those of its tokens
// run one at a time.
TEST_CASE("CUDA mul_mat_id gives a prompt the bits of its tokens run one at a time", "[cuda][ops][moe]") {
    for (Type type : {Type::Q4_K, Type::Q8_0, Type::F16, Type::F32}) {
        for (int64_t Nb : {1, 2}) {
            INFO(type_name(type) << " Nb=" << Nb);
            const int64_t K = 256, M = 37, E = 6, k = 2, T = 29;
            Context ctx = data_ctx();
            const auto [as, b, ids] = test::expert_inputs(ctx, type, K, M, E, Nb, k, T, true);
            Tensor* prompt = mul_mat_id(ctx, as, b, ids);
            const std::vector<float> all = run_on_cuda(build_forward(prompt), prompt);
            for (int64_t t = 0; t < T; ++t) {
                Tensor* bt = view(ctx, b, {K, Nb, 1}, {b->nb[1], b->nb[2]}, size_t(t) * b->nb[2]);
                Tensor* it = view(ctx, ids, {k, 1}, {ids->nb[1]}, size_t(t) * ids->nb[1]);
                Tensor* one = mul_mat_id(ctx, as, bt, it);
                const std::vector<float> got = run_on_cuda(build_forward(one), one);
                REQUIRE(got.size() == size_t(M * k));
                for (size_t i = 0; i < got.size(); ++i) {
                    INFO("token " << t << " value " << i);
                    REQUIRE(std::memcmp(&got[i], &all[size_t(t * M * k) + i], sizeof(float)) == 0);
                }
            }
        }
    }
}

// Prompts with at least 32 pairs per expert take the tensor cores: pairs sorted into chunks of
// 64 columns per expert, one batched cuBLAS product. f32 experts stay f32; f16 and bf16 experts
// multiply inputs rounded to their type, block types are decoded to f16 first (mul_mat's prefill
// rounding), hence the looser tolerances. Crowded prompts give expert 0 several chunks.
TEST_CASE("CUDA mul_mat_id runs a prompt's experts on the tensor cores", "[cuda][ops][moe]") {
    struct Case {
        Type type;
        double tol;
    };
    for (const Case& c : {Case{Type::F32, 1e-5}, Case{Type::F16, 2e-3}, Case{Type::BF16, 1e-2},
                          Case{Type::Q8_0, 2e-3}, Case{Type::Q4_K, 2e-3}, Case{Type::Q6_K, 2e-3}}) {
        for (int64_t Nb : {1, 2})
            for (bool crowded : {false, true}) {
                const int64_t K = 256, M = 75, E = 4, k = 2, T = 203;
                INFO(type_name(c.type) << " Nb=" << Nb << " crowded=" << crowded);
                Context ctx = data_ctx();
                const auto in = test::expert_inputs(ctx, c.type, K, M, E, Nb, k, T, crowded);
                check_cuda(mul_mat_id(ctx, in.as, in.b, in.ids), c.tol);
            }
    }
    // An expert id out of range in a prompt: reported like the others, the device fine after.
    Context ctx = data_ctx();
    const auto [as, b, ids] = test::expert_inputs(ctx, Type::Q8_0, 64, 9, 3, 1, 1, 200, false);
    std::vector<int32_t> choice = test::expert_choices(3, 1, 200, false);
    choice[117] = 3;
    set_i32(ids, choice);
    Tensor* out = mul_mat_id(ctx, as, b, ids);
    CHECK_THROWS_WITH(run_on_cuda(build_forward(out), out),
                      Catch::Contains("mul_mat_id: expert 3 of token 117 is outside [0, 3)"));
    choice[117] = 2;
    set_i32(ids, choice);
    check_cuda(out, 2e-3);
}
