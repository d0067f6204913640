// The CUDA backend against the double-precision reference: every op on random inputs with
// odd shapes, outputs poisoned with NaN before the run. A graph runs on the GPU by placing
// all of its tensors in one device buffer, uploading the leaves, computing on a CUDA
// backend and downloading the result. Ops whose reference semantics are not defined yet get
// a local double-precision reference written from the op's documented meaning.
#include "op_check.h"
#include "op_def.h"
#include "reference.h"

#include <ggml-fa/attention.h>
#include <ggml-fa/backend.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

using namespace gfa;
using gfa::test::fill_uniform;
using gfa::test::rel_error;

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

// Runs g on the CUDA device and returns `out`'s values. Every tensor's host placement is
// restored afterwards, so the reference can keep reading the host copies.
std::vector<float> run_on_cuda(const Graph& g, Tensor* out) {
    Device* dev = cuda0();
    struct Saved {
        Tensor* t;
        void* data;
        Buffer* buffer;
    };
    std::vector<Saved> saved;
    std::vector<Tensor*> owners, views;
    for (const auto* list : {&g.leafs(), &g.nodes()})
        for (Tensor* t : *list) {
            saved.push_back({t, t->data, t->buffer});
            (t->view_src ? views : owners).push_back(t);
            if (t->view_src && std::find(owners.begin(), owners.end(), t->view_src) == owners.end() &&
                !g.contains(t->view_src)) {
                saved.push_back({t->view_src, t->view_src->data, t->view_src->buffer});
                owners.push_back(t->view_src);
            }
        }
    const size_t align = dev->buffer_type()->alignment();
    size_t total = 0;
    std::vector<size_t> offsets;
    for (Tensor* t : owners) {
        offsets.push_back(total);
        total += (t->alloc_bytes() + align - 1) / align * align;
    }
    std::unique_ptr<Buffer> buf = dev->buffer_type()->allocate(total);
    for (size_t i = 0; i < owners.size(); ++i) {
        Tensor* t = owners[i];
        std::vector<std::byte> host;
        if (t->op == Op::None && t->data) {
            host.resize(t->alloc_bytes());
            tensor_get(t, host.data(), 0, host.size());
        }
        buf->place(t, offsets[i]);
        if (!host.empty()) tensor_set(t, host.data(), 0, host.size());
    }
    for (Tensor* v : views) place_view(v);
    gfa::test::poison_nodes(g);

    auto backend = dev->create_backend();
    backend->compute(g.nodes());
    backend->synchronize();
    std::vector<float> result = tensor_get_f32(out);

    for (const Saved& s : saved) {
        s.t->data = s.data;
        s.t->buffer = s.buffer;
    }
    return result;
}

using LocalRef = std::function<std::vector<double>()>;

// Computes out's graph on CUDA and compares it with the reference evaluator, or with
// `local` while an op of the graph has no reference semantics yet.
void check_cuda(Tensor* out, double tol, const LocalRef& local = {}) {
    INFO("seed " << gfa::test::seed() << ", output " << out->shape_str() << " made by " << op_name(out->op));
    Graph g = build_forward(out);
    bool has_reference = true;
    for (Tensor* n : g.nodes()) {
        INFO("node " << op_name(n->op) << " " << n->shape_str());
        REQUIRE(cuda0()->supports_op(n));
        if (!op_def(n->op).is_view && !op_def(n->op).reference) has_reference = false;
    }
    std::vector<double> expected;
    if (has_reference) {
        expected = ref::evaluate(g, out);
    } else {
        REQUIRE(local);
        expected = local();
    }
    const std::vector<float> got = run_on_cuda(g, out);
    const double err = rel_error(got, expected);
    INFO("relative error " << err << " (tolerance " << tol << ")");
    CHECK(err <= tol);
}

std::vector<double> host_values(const Tensor* t) {
    const std::vector<float> f = tensor_get_f32(t);
    return std::vector<double>(f.begin(), f.end());
}

size_t flat(const Tensor* t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    return size_t(((i3 * t->ne[2] + i2) * t->ne[1] + i1) * t->ne[0] + i0);
}

void set_i32(Tensor* t, const std::vector<int32_t>& v) {
    REQUIRE(int64_t(v.size()) == t->nelements());
    tensor_set(t, v.data(), 0, v.size() * sizeof(int32_t));
}

std::vector<int32_t> random_indices(size_t n, int32_t limit) {
    std::uniform_int_distribution<int32_t> d(0, limit - 1);
    std::vector<int32_t> v(n);
    for (auto& x : v) x = d(gfa::test::rng());
    return v;
}

// Per-row reference helper: fn(row_in..., row_out) over rows of n elements.
template <class Fn> std::vector<double> per_row(const Tensor* like, Fn fn) {
    const int64_t n = like->ne[0], rows = like->nrows();
    std::vector<double> out(size_t(n * rows));
    for (int64_t r = 0; r < rows; ++r) fn(r, n, out.data() + r * n);
    return out;
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
    CHECK(after + (size_t(128) << 20) >= before);
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
    for (auto op : {add, sub, mul, div}) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {17, 5, 3, 2});
        Tensor* b = ctx.new_tensor(Type::F32, {17, 1, 3, 1});
        Tensor* c = ctx.new_tensor(Type::F32, {1, 5, 1, 2});
        fill_uniform(a);
        fill_uniform(b, 0.5f, 1.5f);
        fill_uniform(c, 0.5f, 1.5f);
        check_cuda(op(ctx, a, b), 1e-6);
        check_cuda(op(ctx, a, c), 1e-6);
        check_cuda(
            op(ctx, permute(ctx, a, 1, 0, 2, 3), reshape(ctx, cont(ctx, transpose(ctx, c)), {5, 1, 1, 2})),
            1e-6);
    }
}

TEST_CASE("CUDA unary ops and reductions", "[cuda]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {113, 7, 3});
    fill_uniform(a, 0.1f, 2.0f);
    check_cuda(scale(ctx, a, -1.5f, 0.25f), 1e-6);
    check_cuda(sqr(ctx, a), 1e-6);
    check_cuda(sqrt(ctx, a), 1e-6);
    check_cuda(exp(ctx, a), 1e-6);
    check_cuda(log(ctx, a), 1e-6);
    check_cuda(neg(ctx, transpose(ctx, a)), 1e-6);
    check_cuda(sum(ctx, a), 1e-6);
    check_cuda(sum_rows(ctx, a), 1e-6);
    check_cuda(mean(ctx, a), 1e-6);
    check_cuda(sum_rows(ctx, permute(ctx, a, 2, 0, 1, 3)), 1e-6);
    Context c2 = data_ctx();
    Tensor* big = c2.new_tensor(Type::F32, {3001, 1});
    fill_uniform(big);
    check_cuda(sum(c2, big), 1e-5);
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
    set_i32(i, random_indices(21, 1 << 30));
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
}

// ---- matrix products ------------------------------------------------------------------------

namespace {

std::vector<double> mul_mat_local(const Tensor* a, const Tensor* b, const Tensor* out) {
    const std::vector<double> av = host_values(a), bv = host_values(b);
    std::vector<double> o(size_t(out->nelements()));
    const int64_t r2 = b->ne[2] / a->ne[2], r3 = b->ne[3] / a->ne[3];
    for (int64_t i3 = 0; i3 < out->ne[3]; ++i3)
        for (int64_t i2 = 0; i2 < out->ne[2]; ++i2)
            for (int64_t n = 0; n < out->ne[1]; ++n)
                for (int64_t m = 0; m < out->ne[0]; ++m) {
                    double s = 0.0;
                    for (int64_t k = 0; k < a->ne[0]; ++k)
                        s += av[flat(a, k, m, i2 / r2, i3 / r3)] * bv[flat(b, k, n, i2, i3)];
                    o[flat(out, m, n, i2, i3)] = s;
                }
    return o;
}

} // namespace

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
                Tensor* out = make_node(ctx, Op::MulMat, Type::F32, {M, n, bt.b2, bt.b3}, {a, b});
                // f32 GEMM is exact fp32; the half paths round b to 16 bits.
                const double tol = t == Type::F32 ? 1e-5 : t == Type::BF16 ? 1e-2 : 5e-3;
                INFO("weights " << type_name(t) << ", N = " << n);
                check_cuda(out, tol, [&] { return mul_mat_local(a, b, out); });
            }
}

TEST_CASE("CUDA out_prod with broadcast batches", "[cuda]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {13, 29, 1, 2});
    Tensor* b = ctx.new_tensor(Type::F32, {7, 29, 3, 2});
    fill_uniform(a);
    fill_uniform(b);
    Tensor* out = make_node(ctx, Op::OutProd, Type::F32, {13, 7, 3, 2}, {a, b});
    check_cuda(out, 1e-5, [&] {
        const std::vector<double> av = host_values(a), bv = host_values(b);
        std::vector<double> o(size_t(out->nelements()));
        for (int64_t i3 = 0; i3 < 2; ++i3)
            for (int64_t i2 = 0; i2 < 3; ++i2)
                for (int64_t n = 0; n < 7; ++n)
                    for (int64_t m = 0; m < 13; ++m) {
                        double s = 0.0;
                        for (int64_t k = 0; k < 29; ++k)
                            s += av[flat(a, m, k, 0, i3)] * bv[flat(b, n, k, i2, i3)];
                        o[flat(out, m, n, i2, i3)] = s;
                    }
        return o;
    });
}

// ---- normalization, rope, softmax -----------------------------------------------------------

TEST_CASE("CUDA norm and rms_norm with their backward ops", "[cuda]") {
    for (bool rms : {false, true}) {
        Context ctx = data_ctx();
        const float eps = 1e-5f;
        Tensor* x = ctx.new_tensor(Type::F32, {113, 5, 3});
        Tensor* dy = ctx.new_tensor(Type::F32, {113, 5, 3});
        fill_uniform(x, -2.0f, 2.0f);
        fill_uniform(dy);
        Tensor* y = make_node(ctx, rms ? Op::RmsNorm : Op::Norm, Type::F32, x->ne, {x});
        y->set_params(NormParams{eps});
        const std::vector<double> xv = host_values(x), dyv = host_values(dy);
        check_cuda(y, 1e-5, [&] {
            return per_row(x, [&](int64_t r, int64_t n, double* o) {
                const double* xr = xv.data() + r * n;
                double mu = 0.0, var = 0.0;
                if (!rms) {
                    for (int64_t i = 0; i < n; ++i) mu += xr[i];
                    mu /= double(n);
                }
                for (int64_t i = 0; i < n; ++i) var += (xr[i] - mu) * (xr[i] - mu);
                const double inv = 1.0 / std::sqrt(var / double(n) + eps);
                for (int64_t i = 0; i < n; ++i) o[i] = (xr[i] - mu) * inv;
            });
        });
        Tensor* dx = make_node(ctx, rms ? Op::RmsNormBack : Op::NormBack, Type::F32, x->ne, {dy, x});
        dx->set_params(NormParams{eps});
        check_cuda(dx, 1e-5, [&] {
            // The gradient of sum(dy * y) by central differences would be slow here; the
            // closed form in double is the definition used by every backend.
            return per_row(x, [&](int64_t r, int64_t n, double* o) {
                const double *xr = xv.data() + r * n, *gr = dyv.data() + r * n;
                double mu = 0.0, var = 0.0;
                if (!rms) {
                    for (int64_t i = 0; i < n; ++i) mu += xr[i];
                    mu /= double(n);
                }
                for (int64_t i = 0; i < n; ++i) var += (xr[i] - mu) * (xr[i] - mu);
                const double inv = 1.0 / std::sqrt(var / double(n) + eps);
                double g_mean = 0.0, gx_mean = 0.0;
                for (int64_t i = 0; i < n; ++i) {
                    if (!rms) g_mean += gr[i] / double(n);
                    gx_mean += gr[i] * (xr[i] - mu) * inv / double(n);
                }
                for (int64_t i = 0; i < n; ++i) o[i] = inv * (gr[i] - g_mean - (xr[i] - mu) * inv * gx_mean);
            });
        });
    }
}

TEST_CASE("CUDA rope (normal and NeoX) and rope_back", "[cuda]") {
    for (RopeMode mode : {RopeMode::Normal, RopeMode::NeoX})
        for (bool back : {false, true}) {
            Context ctx = data_ctx();
            const int64_t head_dim = 18, n_head = 3, n_tok = 7, batch = 2;
            Tensor* x = ctx.new_tensor(Type::F32, {head_dim, n_head, n_tok, batch});
            fill_uniform(x);
            Tensor* pos = ctx.new_tensor(Type::I32, {n_tok});
            set_i32(pos, random_indices(size_t(n_tok), 3000));
            const RopeParams p{14, mode, 10000.0f, 0.5f};
            Tensor* y = make_node(ctx, back ? Op::RopeBack : Op::Rope, Type::F32, x->ne, {x, pos});
            y->set_params(p);
            const std::vector<double> xv = host_values(x), pv = host_values(pos);
            INFO("mode " << int(mode) << (back ? ", backward" : ""));
            check_cuda(y, 1e-5, [&] {
                std::vector<double> o = xv;
                for (int64_t i3 = 0; i3 < batch; ++i3)
                    for (int64_t i2 = 0; i2 < n_tok; ++i2)
                        for (int64_t i1 = 0; i1 < n_head; ++i1)
                            for (int64_t j = 0; j < p.n_dims / 2; ++j) {
                                const int64_t f = mode == RopeMode::NeoX ? j : 2 * j;
                                const int64_t s = mode == RopeMode::NeoX ? j + p.n_dims / 2 : 2 * j + 1;
                                const double theta =
                                    pv[size_t(i2)] * p.freq_scale *
                                    std::pow(double(p.freq_base), -2.0 * double(j) / p.n_dims);
                                const double sn = (back ? -1.0 : 1.0) * std::sin(theta), cs = std::cos(theta);
                                const double x0 = xv[flat(x, f, i1, i2, i3)], x1 = xv[flat(x, s, i1, i2, i3)];
                                o[flat(x, f, i1, i2, i3)] = x0 * cs - x1 * sn;
                                o[flat(x, s, i1, i2, i3)] = x0 * sn + x1 * cs;
                            }
                return o;
            });
        }
}

TEST_CASE("CUDA soft_max_ext with f32/f16 masks, ALiBi and scale, and its backward", "[cuda]") {
    for (Type mask_type : {Type::F32, Type::F16})
        for (float max_bias : {0.0f, 8.0f}) {
            Context ctx = data_ctx();
            Tensor* x = ctx.new_tensor(Type::F32, {37, 5, 6, 2});
            Tensor* mask = ctx.new_tensor(mask_type, {37, 5, 1, 2});
            fill_uniform(x, -3.0f, 3.0f);
            fill_uniform(mask, -2.0f, 0.0f);
            const float sc = 0.7f;
            Tensor* y = make_node(ctx, Op::SoftMax, Type::F32, x->ne, {x, mask});
            y->set_params(SoftMaxParams{sc, max_bias});
            const std::vector<double> xv = host_values(x), mv = host_values(mask);
            INFO("mask " << type_name(mask_type) << ", max_bias " << max_bias);
            check_cuda(y, 1e-5, [&] {
                return per_row(x, [&](int64_t r, int64_t n, double* o) {
                    const int64_t i1 = r % 5, i2 = (r / 5) % 6, i3 = r / 30;
                    const double slope = attn::alibi_slope(max_bias, i2, 6);
                    double mx = -1e300, s = 0.0;
                    for (int64_t i = 0; i < n; ++i)
                        o[i] = xv[size_t(r * n + i)] * sc + slope * mv[flat(mask, i, i1, 0, i3)],
                        mx = std::max(mx, o[i]);
                    for (int64_t i = 0; i < n; ++i) s += (o[i] = std::exp(o[i] - mx));
                    for (int64_t i = 0; i < n; ++i) o[i] /= s;
                });
            });
        }
    Context ctx = data_ctx();
    Tensor* dy = ctx.new_tensor(Type::F32, {37, 5, 3});
    Tensor* yv = ctx.new_tensor(Type::F32, {37, 5, 3});
    fill_uniform(dy);
    fill_uniform(yv, 0.0f, 0.1f);
    Tensor* dx = make_node(ctx, Op::SoftMaxBack, Type::F32, dy->ne, {dy, yv});
    dx->set_params(SoftMaxParams{0.7f, 0.0f});
    const std::vector<double> g = host_values(dy), y = host_values(yv);
    check_cuda(dx, 1e-5, [&] {
        return per_row(dy, [&](int64_t r, int64_t n, double* o) {
            double dot = 0.0;
            for (int64_t i = 0; i < n; ++i) dot += g[size_t(r * n + i)] * y[size_t(r * n + i)];
            for (int64_t i = 0; i < n; ++i) o[i] = 0.7 * y[size_t(r * n + i)] * (g[size_t(r * n + i)] - dot);
        });
    });
    Tensor* x = ctx.new_tensor(Type::F32, {9, 7, 2});
    fill_uniform(x);
    check_cuda(diag_mask_inf(ctx, x, 2), 0.0);
    check_cuda(diag_mask_fill(ctx, x, 1, 0.0f), 0.0);
}

// ---- activations and training -----------------------------------------------------------------

TEST_CASE("CUDA activations and their backward ops", "[cuda]") {
    Context ctx = data_ctx();
    Tensor* x = ctx.new_tensor(Type::F32, {33, 7, 3});
    Tensor* u = ctx.new_tensor(Type::F32, {33, 7, 3});
    fill_uniform(x, -4.0f, 4.0f);
    fill_uniform(u);
    const std::vector<double> xv = host_values(x), uv = host_values(u);
    auto map = [&](auto f) {
        std::vector<double> o(xv.size());
        for (size_t i = 0; i < o.size(); ++i) o[i] = f(xv[i], uv[i]);
        return o;
    };
    auto sig = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
    const double c = std::sqrt(2.0 / M_PI);
    auto gelu_tanh = [&](double v) { return 0.5 * v * (1.0 + std::tanh(c * (v + 0.044715 * v * v * v))); };
    auto gelu_erf = [](double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); };

    check_cuda(make_node(ctx, Op::Silu, Type::F32, x->ne, {x}), 1e-6,
               [&] { return map([&](double v, double) { return v * sig(v); }); });
    check_cuda(make_node(ctx, Op::Relu, Type::F32, x->ne, {x}), 0.0,
               [&] { return map([](double v, double) { return v > 0 ? v : 0.0; }); });
    check_cuda(make_node(ctx, Op::Step, Type::F32, x->ne, {x}), 0.0,
               [&] { return map([](double v, double) { return v > 0 ? 1.0 : 0.0; }); });
    check_cuda(make_node(ctx, Op::Swiglu, Type::F32, x->ne, {x, u}), 1e-6,
               [&] { return map([&](double v, double w) { return v * sig(v) * w; }); });
    check_cuda(make_node(ctx, Op::SiluBack, Type::F32, x->ne, {u, x}), 1e-6, [&] {
        return map([&](double v, double g) { return g * (sig(v) * (1.0 + v * (1.0 - sig(v)))); });
    });
    for (GeluApprox approx : {GeluApprox::Tanh, GeluApprox::Erf}) {
        auto f = [&](double v) { return approx == GeluApprox::Tanh ? gelu_tanh(v) : gelu_erf(v); };
        Tensor* y = make_node(ctx, Op::Gelu, Type::F32, x->ne, {x});
        y->set_params(GeluParams{approx});
        check_cuda(y, 1e-6, [&] { return map([&](double v, double) { return f(v); }); });
        Tensor* d = make_node(ctx, Op::GeluBack, Type::F32, x->ne, {u, x});
        d->set_params(GeluParams{approx});
        // derivative by central differences of the double-precision activation
        check_cuda(d, 1e-5, [&] {
            return map([&](double v, double g) { return g * (f(v + 1e-5) - f(v - 1e-5)) / 2e-5; });
        });
    }
}

TEST_CASE("CUDA cross_entropy_loss, its backward, and AdamW", "[cuda]") {
    Context ctx = data_ctx();
    Tensor* logits = ctx.new_tensor(Type::F32, {41, 6, 2});
    Tensor* labels = ctx.new_tensor(Type::F32, {41, 6, 2});
    fill_uniform(logits, -3.0f, 3.0f);
    fill_uniform(labels, 0.0f, 1.0f);
    const std::vector<double> lv = host_values(logits), tv = host_values(labels);
    const int64_t n = 41, rows = 12;
    auto log_softmax_row = [&](int64_t r) {
        std::vector<double> o(static_cast<size_t>(n));
        double mx = -1e300, s = 0.0;
        for (int64_t i = 0; i < n; ++i) mx = std::max(mx, lv[size_t(r * n + i)]);
        for (int64_t i = 0; i < n; ++i) s += std::exp(lv[size_t(r * n + i)] - mx);
        for (int64_t i = 0; i < n; ++i) o[size_t(i)] = lv[size_t(r * n + i)] - mx - std::log(s);
        return o;
    };
    Tensor* loss = make_node(ctx, Op::CrossEntropyLoss, Type::F32, {1, 1, 1, 1}, {logits, labels});
    check_cuda(loss, 1e-5, [&] {
        double total = 0.0;
        for (int64_t r = 0; r < rows; ++r) {
            const auto ls = log_softmax_row(r);
            for (int64_t i = 0; i < n; ++i) total -= tv[size_t(r * n + i)] * ls[size_t(i)];
        }
        return std::vector<double>{total / double(rows)};
    });
    Tensor* g = ctx.new_tensor(Type::F32, {1});
    tensor_set_f32(g, {1.7f});
    Tensor* dlogits = make_node(ctx, Op::CrossEntropyLossBack, Type::F32, logits->ne, {g, logits, labels});
    check_cuda(dlogits, 1e-5, [&] {
        std::vector<double> o(lv.size());
        for (int64_t r = 0; r < rows; ++r) {
            const auto ls = log_softmax_row(r);
            for (int64_t i = 0; i < n; ++i)
                o[size_t(r * n + i)] = 1.7 / double(rows) * (std::exp(ls[size_t(i)]) - tv[size_t(r * n + i)]);
        }
        return o;
    });

    Tensor* w = ctx.new_tensor(Type::F32, {37, 3});
    Tensor* gw = ctx.new_tensor(Type::F32, {37, 3});
    Tensor* m = ctx.new_tensor(Type::F32, {37, 3});
    Tensor* v = ctx.new_tensor(Type::F32, {37, 3});
    fill_uniform(w);
    fill_uniform(gw);
    fill_uniform(m, -0.1f, 0.1f);
    fill_uniform(v, 0.0f, 0.1f);
    AdamWParams p;
    p.lr = 0.01f;
    p.weight_decay = 0.1f;
    p.step = 3;
    check_cuda(adamw_step(ctx, w, gw, m, v, p), 1e-6);
}

// ---- autodiff graphs ---------------------------------------------------------------------------

TEST_CASE("CUDA computes the gradients autodiff builds (matmul, norms, activations, loss)", "[cuda]") {
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
        check_cuda(grad, 1e-4);
    }
}
