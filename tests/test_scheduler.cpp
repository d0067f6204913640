// The scheduler over two and three backends: the CPU and test devices whose memory the CPU
// cannot read directly and which support only a few ops, so graphs are split, copied
// between memories, and must still compute exactly what the CPU alone computes.
#include "block_graph.h"
#include "op_check.h"
#include "test_device.h"

#include <ggml-fa/alloc.h>
#include <ggml-fa/backend.h>
#include <ggml-fa/scheduler.h>

#include "op_def.h"
#include "reference.h"

#include <cstdlib>
#include <cstring>
#include <set>

using namespace gfa;
using gfa::test::TestBackend;
using gfa::test::TestDevice;

namespace {

std::vector<uint8_t> bytes_of(const Tensor* t) {
    std::vector<uint8_t> out(t->nbytes());
    tensor_get(t, out.data(), 0, out.size());
    return out;
}

struct LogCapture {
    std::vector<std::string> lines;
    LogCallback callback() {
        return [this](const std::string& l) { lines.push_back(l); };
    }
    int count(const std::string& needle) const {
        int n = 0;
        for (const auto& l : lines) n += l.find(needle) != std::string::npos;
        return n;
    }
};

} // namespace

TEST_CASE("scheduler splits a graph over three backends with copies", "[scheduler]") {
    INFO("seed " << test::seed());
    TestDevice dev0("TEST0", {Op::Add, Op::Mul, Op::Sub}), dev1("TEST1", {Op::Neg});
    auto t0 = dev0.create_backend(), t1 = dev1.create_backend();
    auto cpu = make_cpu_backend(2);

    Context ctx;
    Tensor* x = set_name(ctx.new_tensor(Type::F32, {17, 3}), "x");
    Tensor* w = set_name(ctx.new_tensor(Type::F32, {17, 1}), "w");
    set_input(x);
    set_input(w);
    Tensor* e = exp(ctx, x);      // CPU: no test device has exp
    Tensor* a = add(ctx, e, w);   // TEST0 (copy e in; w is placed there)
    Tensor* n = neg(ctx, a);      // TEST1 (copy a in, device to device)
    Tensor* m = mul(ctx, n, a);   // TEST0 (copy n in; a is still on TEST0)
    Tensor* r = sum_rows(ctx, m); // CPU (copy m in)
    Tensor* e2 = exp(ctx, r);     // CPU, logged once only
    Graph g = build_forward(e2);

    Scheduler sched({t0.get(), t1.get(), cpu.get()});
    LogCapture log;
    sched.set_log(log.callback());
    sched.allocate(g);
    CHECK(sched.backend_of(e) == cpu.get());
    CHECK(sched.backend_of(a) == t0.get());
    CHECK(sched.backend_of(n) == t1.get());
    CHECK(sched.backend_of(m) == t0.get());
    CHECK(sched.backend_of(r) == cpu.get());
    CHECK(sched.backend_of(w) == t0.get());
    CHECK(sched.backend_of(x) == cpu.get());
    CHECK(sched.n_splits() == 5); // CPU | TEST0 | TEST1 | TEST0 | CPU
    CHECK(sched.n_copies() == 4);
    INFO(sched.describe());
    CHECK(w->buffer->type() == &dev0.test_buffer_type());

    const std::vector<float> xv = test::random_values(size_t(x->nelements()));
    const std::vector<float> wv = test::random_values(size_t(w->nelements()));
    tensor_set_f32(x, xv);
    tensor_set_f32(w, wv);
    sched.compute(g);
    sched.compute(g); // the same plan runs again
    CHECK(sched.n_copies() == 4);
    // Fallbacks are visible, once per op and backend.
    CHECK(log.count("op exp on CPU: not supported by TEST0") == 1);
    CHECK(log.count("op sum_rows on CPU: not supported by TEST0") == 1);
    CHECK(log.count("op neg on TEST1: not supported by TEST0") == 1);
    // The graph reads its own sources again afterwards.
    CHECK(a->src[0] == e);
    CHECK(m->src[0] == n);

    // The same graph on the CPU alone, bit for bit.
    Context c2(ContextParams{.alloc_data = true});
    Tensor* x2 = c2.new_tensor(Type::F32, {17, 3});
    Tensor* w2 = c2.new_tensor(Type::F32, {17, 1});
    tensor_set_f32(x2, xv);
    tensor_set_f32(w2, wv);
    Tensor* a2 = add(c2, exp(c2, x2), w2);
    Tensor* out2 = exp(c2, sum_rows(c2, mul(c2, neg(c2, a2), a2)));
    test::compute_cpu(build_forward(out2));
    CHECK(bytes_of(e2) == bytes_of(out2));
    for (float v : tensor_get_f32(e2)) CHECK(std::isfinite(v));
    CHECK(static_cast<TestBackend*>(t0.get())->nodes_computed == 4);
    CHECK(static_cast<TestBackend*>(t1.get())->nodes_computed == 2);
}

// Layers whose weights live on different backends: a node without weights stays with the
// newest data it reads that weights placed, so the graph crosses between backends once per
// boundary (not at every norm or add), and after a node that fell back to the CPU the
// preferred backend takes over again.
TEST_CASE("scheduler keeps nodes without weights with the data weights placed", "[scheduler]") {
    INFO("seed " << test::seed());
    TestDevice dev("TEST0", {Op::Add, Op::Mul, Op::Sub, Op::Neg});
    auto t0 = dev.create_backend();
    auto cpu = make_cpu_backend(2);
    Context host_w, dev_w, ctx;
    Tensor* w0 = host_w.new_tensor(Type::F32, {13, 4});
    Tensor* w1 = dev_w.new_tensor(Type::F32, {13, 4});
    auto host_buf = allocate_context_tensors(host_w, cpu_device().buffer_type());
    auto dev_buf = allocate_context_tensors(dev_w, dev.buffer_type());
    Tensor* x = ctx.new_tensor(Type::F32, {13, 4});
    set_input(x);
    Tensor* h1 = mul(ctx, x, w0);  // CPU: its weights
    Tensor* h2 = neg(ctx, h1);     // CPU: follows h1
    Tensor* h3 = mul(ctx, h2, w0); // CPU
    Tensor* h4 = add(ctx, h3, h1); // CPU
    Tensor* h5 = mul(ctx, h4, w1); // TEST0: its weights
    Tensor* h6 = neg(ctx, h5);     // TEST0: follows h5
    Tensor* h7 = add(ctx, h6, h4); // TEST0: h6 is newer than the residual h4
    Tensor* h8 = exp(ctx, h7);     // CPU: TEST0 has no exp
    Tensor* h9 = neg(ctx, h8);     // TEST0 again: a fallback is not followed
    Graph g = build_forward(h9);
    Scheduler sched({t0.get(), cpu.get()});
    sched.set_log({});
    sched.allocate(g);
    INFO(sched.describe());
    for (Tensor* t : {h1, h2, h3, h4, h8}) CHECK(sched.backend_of(t) == cpu.get());
    for (Tensor* t : {h5, h6, h7, h9}) CHECK(sched.backend_of(t) == t0.get());
    CHECK(sched.n_splits() == 4); // CPU | TEST0 | CPU | TEST0

    const std::vector<float> xv = test::random_values(size_t(x->nelements()));
    const std::vector<float> w0v = test::random_values(size_t(w0->nelements()));
    const std::vector<float> w1v = test::random_values(size_t(w1->nelements()));
    tensor_set_f32(x, xv);
    tensor_set_f32(w0, w0v);
    tensor_set_f32(w1, w1v);
    sched.compute(g);
    const std::vector<float> got = tensor_get_f32(h9);
    for (size_t i = 0; i < got.size(); ++i) {
        const float a1 = xv[i] * w0v[i], a4 = -a1 * w0v[i] + a1, a5 = a4 * w1v[i];
        const float want = -std::exp(-a5 + a4); // the CPU's exp is a vector polynomial
        CHECK(std::abs(got[i] - want) <= 1e-6f * std::abs(want));
    }
}

TEST_CASE("scheduler runs a transformer block forward and backward like the CPU alone", "[scheduler]") {
    INFO("seed " << test::seed());
    constexpr int64_t d = 12, f = 20;
    TestDevice dev("TEST0", {Op::Add, Op::Mul, Op::Sub, Op::Neg});
    auto test_backend = dev.create_backend();
    auto cpu = make_cpu_backend(2);

    for (bool weights_on_device : {false, true}) {
        for (bool test_first : {true, false}) {
            INFO("weights on device " << weights_on_device << ", test backend first " << test_first);
            // Reference: every tensor in its own host memory, CPU only.
            Context rctx(ContextParams{.alloc_data = true});
            test::BlockGraph ref = test::build_block(rctx, rctx, d, 5, f, true);
            // Scheduled: weights in the test device's memory (or host memory), the rest planned.
            Context wctx, gctx;
            test::BlockGraph b = test::build_block(wctx, gctx, d, 5, f, true);
            auto weights = allocate_context_tensors(wctx, weights_on_device ? dev.buffer_type()
                                                                            : cpu_device().buffer_type());

            std::vector<Backend*> order{test_backend.get(), cpu.get()};
            if (!test_first) std::swap(order[0], order[1]);
            Scheduler sched(order);
            LogCapture log;
            sched.set_log(log.callback());
            // Reserve for a longer sequence first: the real graph then allocates nothing.
            {
                Context w2, g2;
                test::BlockGraph big = test::build_block(w2, g2, d, 9, f, true);
                auto wb = allocate_context_tensors(w2, weights_on_device ? dev.buffer_type()
                                                                         : cpu_device().buffer_type());
                sched.reserve(big.graph);
            }
            const int test_allocs = dev.test_buffer_type().allocations;
            sched.allocate(b.graph);
            CHECK(dev.test_buffer_type().allocations == test_allocs);

            const std::vector<Tensor*> rw = ref.w.all(), bw = b.w.all();
            for (size_t i = 0; i < rw.size(); ++i) {
                std::vector<float> v = test::random_values(size_t(rw[i]->nelements()), -0.5f, 0.5f);
                if (i >= 6)
                    for (float& g : v) g += 1.0f;
                tensor_set_f32(rw[i], v);
                tensor_set_f32(bw[i], v);
            }
            const std::vector<float> xv = test::random_values(size_t(ref.x->nelements()));
            const std::vector<float> tv = test::random_values(size_t(ref.x->nelements()));
            for (auto [bt, rt, v] : {std::tuple{b.x, ref.x, xv}, std::tuple{b.target, ref.target, tv},
                                     std::tuple{b.mask, ref.mask, test::causal_mask(5)}}) {
                tensor_set_f32(bt, v);
                tensor_set_f32(rt, v);
            }
            test::compute_cpu(ref.graph);
            sched.compute(b.graph);

            // Weights in host memory hold the block on the CPU whichever backend comes first:
            // every node follows the data the weights placed there.
            INFO(sched.describe());
            if (weights_on_device) {
                CHECK(sched.n_splits() > 2);
                CHECK(sched.n_copies() > 0);
                CHECK(static_cast<TestBackend*>(test_backend.get())->nodes_computed > 0);
            } else {
                CHECK(sched.n_splits() == 1);
                CHECK(sched.n_copies() == 0);
            }
            if (test_first && weights_on_device)
                CHECK(log.count("op exp on CPU: not supported by TEST0") == 1);
            CHECK(sched.backend_of(b.loss) == cpu.get());

            std::vector<const Tensor*> got{b.y, b.probs, b.loss}, want{ref.y, ref.probs, ref.loss};
            for (size_t i = 0; i < bw.size(); ++i) {
                got.push_back(b.graph.grad(bw[i]));
                want.push_back(ref.graph.grad(rw[i]));
            }
            for (size_t i = 0; i < got.size(); ++i) {
                INFO("result '" << want[i]->name << "' " << want[i]->shape_str() << " on "
                                << (sched.backend_of(got[i]) ? sched.backend_of(got[i])->name() : "?"));
                for (float v : tensor_get_f32(got[i])) REQUIRE(std::isfinite(v));
                CHECK(bytes_of(got[i]) == bytes_of(want[i]));
            }
        }
    }
}

TEST_CASE("scheduler errors and the default log", "[scheduler]") {
    CHECK_THROWS_AS(Scheduler({}), Error);
    TestDevice dev("TEST0", {Op::Add});
    auto only_test = dev.create_backend();
    Scheduler sched({only_test.get()});
    sched.set_log({}); // silenced
    Context ctx;
    Tensor* x = ctx.new_tensor(Type::F32, {4});
    Graph g = build_forward(exp(ctx, add(ctx, x, x)));
    CHECK_THROWS_WITH(sched.allocate(g), Catch::Contains("no backend supports exp"));
    // A graph that fits runs on the test device alone.
    Tensor* twice = add(ctx, x, x);
    Graph g2 = build_forward(twice);
    sched.allocate(g2);
    tensor_set_f32(x, {1.5f, -2.0f, 0.25f, 3.0f});
    sched.compute(g2);
    CHECK(sched.n_splits() == 1);
    CHECK(sched.n_copies() == 0);
    CHECK(tensor_get_f32(twice) == std::vector<float>{3.0f, -4.0f, 0.5f, 6.0f});
}

TEST_CASE("scheduler copies strided views between backends", "[scheduler]") {
    INFO("seed " << test::seed());
    TestDevice dev("TEST0", {Op::Add});
    auto tb = dev.create_backend();
    auto cpu = make_cpu_backend(1);
    Context ctx;
    Tensor* x = ctx.new_tensor(Type::F32, {5, 3, 2});
    Tensor* y = ctx.new_tensor(Type::F32, {3, 5, 2});
    set_input(x);
    set_input(y);
    // The test device reads a transposed view of a CPU result: the copy must carry every
    // byte the view's strides reach, not just nelements * 4 from its start.
    Tensor* ex = exp(ctx, x);
    Tensor* s = add(ctx, transpose(ctx, ex), y);
    Tensor* out = exp(ctx, s);
    Graph g = build_forward(out);
    Scheduler sched({tb.get(), cpu.get()});
    sched.set_log({});
    sched.allocate(g);
    const std::vector<float> xv = test::random_values(30), yv = test::random_values(30);
    tensor_set_f32(x, xv);
    tensor_set_f32(y, yv);
    sched.compute(g);
    CHECK(sched.backend_of(s) == tb.get());
    CHECK(sched.n_copies() == 2); // exp(x) to the device (y is placed there), the sum back
    const std::vector<float> got = tensor_get_f32(out);
    for (int64_t b = 0; b < 2; ++b)
        for (int64_t i = 0; i < 5; ++i)
            for (int64_t j = 0; j < 3; ++j) {
                const size_t at = size_t(b * 15 + i * 3 + j); // out[j, i, b]
                const float want = std::exp(std::exp(xv[size_t(b * 15 + j * 5 + i)]) + yv[at]); // x[i, j, b]
                REQUIRE(got[at] == Approx(want).epsilon(1e-6));
            }
}
