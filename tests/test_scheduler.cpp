// The scheduler over two and three backends: the CPU and test devices whose memory the CPU
// cannot read directly and which support only a few ops, so graphs are split, copied
// between memories, and must still compute exactly what the CPU alone computes.
#include "block_graph.h"
#include "op_check.h"

#include <ggml-fa/alloc.h>
#include <ggml-fa/backend.h>
#include <ggml-fa/scheduler.h>

#include "op_def.h"
#include "reference.h"

#include <cstdlib>
#include <cstring>
#include <set>

using namespace gfa;

namespace {

// ---- a test device: private (not host-visible) memory and four element-wise ops --------

class TestDevice;

class TestBuffer final : public Buffer {
  public:
    TestBuffer(BufferType* type, void* base, size_t size) : Buffer(type, base, size) {}
    ~TestBuffer() override { std::free(base()); }
    void set(Tensor* t, const void* src, size_t offset, size_t size) override {
        std::memcpy(static_cast<char*>(t->data) + offset, src, size);
    }
    void get(const Tensor* t, void* dst, size_t offset, size_t size) const override {
        std::memcpy(dst, static_cast<const char*>(t->data) + offset, size);
    }
    void fill(uint8_t value) override { std::memset(base(), value, size()); }
};

class TestBufferType final : public BufferType {
  public:
    explicit TestBufferType(Device* dev) : device_(dev) {}
    const char* name() const override { return "TEST"; }
    std::unique_ptr<Buffer> allocate(size_t size) override {
        ++allocations;
        const size_t rounded = (size + 31) / 32 * 32;
        void* p = std::aligned_alloc(32, rounded);
        if (!p) throw OutOfMemory("TEST: out of memory");
        std::memset(p, 0xFF, rounded); // fresh device memory holds NaN, not zeros
        return std::make_unique<TestBuffer>(this, p, size);
    }
    size_t alignment() const override { return 32; }
    bool is_host() const override { return false; } // the CPU must not read it directly
    Device* device() const override { return device_; }
    int allocations = 0;

  private:
    Device* device_;
};

class TestBackend final : public Backend {
  public:
    explicit TestBackend(TestDevice* dev);
    const char* name() const override;
    Device* device() const override;
    void compute(std::span<Tensor* const> nodes) override;
    int nodes_computed = 0;

  private:
    TestDevice* device_;
};

class TestDevice final : public Device {
  public:
    TestDevice(std::string name, std::set<Op> ops)
        : name_(std::move(name)), ops_(std::move(ops)), bt_(this) {}
    const char* name() const override { return name_.c_str(); }
    std::string description() const override { return "test device"; }
    DeviceKind kind() const override { return DeviceKind::GPU; }
    DeviceMemory memory() const override { return {}; }
    BufferType* buffer_type() override { return &bt_; }
    std::unique_ptr<Backend> create_backend() override { return std::make_unique<TestBackend>(this); }
    bool supports_op(const Tensor* n) const override {
        if (n->op == Op::None || op_def(n->op).is_view) return true;
        if (!ops_.count(n->op) || n->type != Type::F32 || !n->is_contiguous()) return false;
        for (const Tensor* s : n->src)
            if (s && s->type != Type::F32) return false;
        return true;
    }
    TestBufferType& test_buffer_type() { return bt_; }

  private:
    std::string name_;
    std::set<Op> ops_;
    TestBufferType bt_;
};

TestBackend::TestBackend(TestDevice* dev) : device_(dev) {}
const char* TestBackend::name() const {
    return device_->name();
}
Device* TestBackend::device() const {
    return device_;
}

float element(const Tensor* t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    const auto* base = static_cast<const char*>(t->data);
    float v;
    std::memcpy(&v, base + i0 * t->nb[0] + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3], sizeof v);
    return v;
}

void TestBackend::compute(std::span<Tensor* const> nodes) {
    for (Tensor* n : nodes) {
        if (n->op == Op::None || op_def(n->op).is_view) continue;
        REQUIRE(device_->supports_op(n));
        // Every tensor this backend touches must be in its own memory.
        for (const Tensor* s : n->src)
            if (s) REQUIRE(device_->can_use(s->buffer->type()));
        REQUIRE(device_->can_use(n->buffer->type()));
        const Tensor *a = n->src[0], *b = n->src[1];
        auto* out = static_cast<float*>(n->data);
        int64_t k = 0;
        gfa::ref::for_each_index(n, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
            const float x = element(a, i0, i1, i2, i3);
            const float y = b ? element(b, i0 % b->ne[0], i1 % b->ne[1], i2 % b->ne[2], i3 % b->ne[3]) : 0.0f;
            float r = 0;
            switch (n->op) {
            case Op::Add:
                r = x + y;
                break;
            case Op::Sub:
                r = x - y;
                break;
            case Op::Mul:
                r = x * y;
                break;
            case Op::Neg:
                r = -x;
                break;
            default:
                FAIL("test backend asked to run " << op_name(n->op));
            }
            out[k++] = r;
        });
        ++nodes_computed;
    }
}

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

            const bool splits_expected = test_first || weights_on_device;
            INFO(sched.describe());
            if (splits_expected) {
                CHECK(sched.n_splits() > 2);
                CHECK(sched.n_copies() > 0);
                CHECK(static_cast<TestBackend*>(test_backend.get())->nodes_computed > 0);
            } else {
                CHECK(sched.n_splits() == 1); // the CPU first and nothing pulling elsewhere
                CHECK(sched.n_copies() == 0);
            }
            if (test_first) CHECK(log.count("op exp on CPU: not supported by TEST0") == 1);
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
