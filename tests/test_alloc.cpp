// The graph allocator: planned memory reuses freed ranges and sources in place, never
// touches outputs, and computes exactly what a graph with private memory per node computes.
#include "block_graph.h"
#include "op_check.h"

#include <ggml-fa/alloc.h>
#include <ggml-fa/backend.h>

#include "op_def.h"

#include <cstring>
#include <map>

using namespace gfa;
using gfa::test::BlockGraph;
using gfa::test::build_block;

namespace {

constexpr int64_t kD = 16, kT = 7, kF = 24;

// Random values for every weight and input, the same for two copies of the block.
struct BlockValues {
    std::vector<std::vector<float>> weights;
    std::vector<float> x, mask, target;
    BlockValues(const BlockGraph& b) {
        for (Tensor* w : b.w.all())
            weights.push_back(test::random_values(size_t(w->nelements()), -0.5f, 0.5f));
        for (size_t i = 6; i < 8; ++i) // gains near 1
            for (float& g : weights[i]) g += 1.0f;
        x = test::random_values(size_t(b.x->nelements()));
        mask = test::causal_mask(b.mask->ne[0]);
        target = test::random_values(size_t(b.target->nelements()));
    }
    void set(const BlockGraph& b) const {
        const std::vector<Tensor*> ws = b.w.all();
        for (size_t i = 0; i < ws.size(); ++i) tensor_set_f32(ws[i], weights[i]);
        tensor_set_f32(b.x, x);
        tensor_set_f32(b.mask, mask);
        tensor_set_f32(b.target, target);
    }
};

std::vector<uint8_t> bytes_of(const Tensor* t) {
    std::vector<uint8_t> out(t->nbytes());
    tensor_get(t, out.data(), 0, out.size());
    return out;
}

// Everything a user reads after compute: outputs, the loss and every gradient.
std::vector<const Tensor*> results(const BlockGraph& b) {
    std::vector<const Tensor*> out{b.y, b.probs, b.loss};
    for (Tensor* w : b.w.all())
        if (Tensor* g = b.graph.grad(w)) out.push_back(g);
    return out;
}

void require_bitwise_equal(const BlockGraph& got, const BlockGraph& want) {
    const auto a = results(got), b = results(want);
    REQUIRE(a.size() == b.size());
    for (size_t i = 0; i < a.size(); ++i) {
        INFO("result " << i << " '" << b[i]->name << "' " << b[i]->shape_str());
        const auto va = bytes_of(a[i]), vb = bytes_of(b[i]);
        // A NaN anywhere means a value was overwritten or never written.
        for (float v : tensor_get_f32(a[i])) REQUIRE(std::isfinite(v));
        CHECK(va == vb);
    }
}

// The block computed with private memory for every tensor.
struct Unplanned {
    Context ctx{ContextParams{.alloc_data = true}};
    BlockGraph b;
    Unplanned(int64_t d, int64_t t, int64_t f, bool backward) : b(build_block(ctx, ctx, d, t, f, backward)) {}
};

} // namespace

TEST_CASE("planned transformer block: small peak, in-place reuse, identical results", "[alloc]") {
    INFO("seed " << test::seed());
    for (bool backward : {false, true}) {
        Unplanned ref(kD, kT, kF, backward);
        const BlockValues values(ref.b);
        values.set(ref.b);
        test::compute_cpu(ref.b.graph);

        Context wctx, gctx;
        BlockGraph b = build_block(wctx, gctx, kD, kT, kF, backward);
        auto weights = allocate_context_tensors(wctx, cpu_device().buffer_type());
        GraphAllocator alloc(cpu_device().buffer_type());
        alloc.allocate(b.graph);
        const size_t peak = alloc.peak_bytes(), sum = alloc.sum_of_intermediates(b.graph);
        WARN((backward ? "forward+backward" : "forward")
             << " block d=" << kD << " t=" << kT << " f=" << kF << ": " << b.graph.nodes().size()
             << " nodes, planned peak " << peak << " bytes, sum of intermediates " << sum << " bytes ("
             << alloc.n_inplace() << " in place)");
        CHECK(peak > 0);
        CHECK(peak * 3 < sum); // liveness must buy a lot on a graph like this
        CHECK(alloc.buffer_size() >= peak);
        CHECK(alloc.n_inplace() > 0);

        // In-place reuse is visible: some node sits at its first source's offset.
        int shared = 0;
        for (Tensor* n : b.graph.nodes())
            if (!n->is_view() && op_def(n->op).inplace_ok && alloc.placed(n->src[0]) &&
                n->src[0]->data == n->data)
                ++shared;
        CHECK(size_t(shared) == alloc.n_inplace());

        // Poison the whole buffer so any read of memory nobody wrote shows up as NaN.
        alloc.buffer()->fill(0xFF);
        values.set(b);
        auto cpu = make_cpu_backend(2);
        cpu->compute(b.graph.nodes());
        require_bitwise_equal(b, ref.b);
        // Weights were left where they were put.
        for (Tensor* w : b.w.all()) CHECK(w->buffer == weights.get());
    }
}

TEST_CASE("the allocator never reuses memory of outputs, inputs or leaves", "[alloc]") {
    Context wctx, gctx;
    BlockGraph b = build_block(wctx, gctx, kD, 5, kF, true);
    auto weights = allocate_context_tensors(wctx, cpu_device().buffer_type());
    GraphAllocator alloc(cpu_device().buffer_type());
    alloc.allocate(b.graph);
    // Memory that must survive: every leaf and every flagged tensor. No node computed after
    // it may own memory that overlaps it.
    const auto& nodes = b.graph.nodes();
    std::vector<const Tensor*> kept(b.graph.leafs().begin(), b.graph.leafs().end());
    for (const Tensor* n : nodes)
        if (!n->is_view() && (n->flags & (kFlagOutput | kFlagInput | kFlagParam))) kept.push_back(n);
    REQUIRE(kept.size() > 10);
    auto pos = [&](const Tensor* t) {
        for (size_t i = 0; i < nodes.size(); ++i)
            if (nodes[i] == t) return int64_t(i);
        return int64_t(-1); // a leaf: before every node
    };
    for (const Tensor* k : kept) {
        const char* k0 = static_cast<const char*>(k->data);
        const char* k1 = k0 + k->alloc_bytes();
        for (int64_t i = pos(k) + 1; i < int64_t(nodes.size()); ++i) {
            const Tensor* n = nodes[size_t(i)];
            if (n->is_view() || n->alloc_bytes() == 0) continue;
            const char* n0 = static_cast<const char*>(n->data);
            const char* n1 = n0 + n->alloc_bytes();
            INFO("kept '" << k->name << "' " << k->shape_str() << " vs node " << i << " " << op_name(n->op));
            CHECK((n1 <= k0 || k1 <= n0));
        }
    }
}

TEST_CASE("reserve measures the worst case; smaller graphs then allocate nothing", "[alloc]") {
    INFO("seed " << test::seed());
    GraphAllocator alloc(cpu_device().buffer_type());
    size_t reserved = 0;
    {
        Context wctx, gctx;
        BlockGraph big = build_block(wctx, gctx, kD, 17, kF, true);
        reserved = alloc.reserve(big.graph);
        CHECK(reserved == alloc.peak_bytes());
        // Nothing was placed by reserve.
        for (Tensor* n : big.graph.nodes()) CHECK(n->data == nullptr);
    }
    REQUIRE(alloc.n_buffer_allocations() == 1);
    REQUIRE(alloc.buffer_size() >= reserved);

    for (int64_t t : {1, 3, 17}) {
        Unplanned ref(kD, t, kF, true);
        const BlockValues values(ref.b);
        values.set(ref.b);
        test::compute_cpu(ref.b.graph);

        Context wctx, gctx;
        BlockGraph b = build_block(wctx, gctx, kD, t, kF, true);
        auto weights = allocate_context_tensors(wctx, cpu_device().buffer_type());
        alloc.allocate(b.graph);
        INFO("t = " << t << ": peak " << alloc.peak_bytes() << " of " << reserved << " reserved");
        CHECK(alloc.peak_bytes() <= reserved);
        CHECK(alloc.n_buffer_allocations() == 1);
        alloc.buffer()->fill(0xFF);
        values.set(b);
        make_cpu_backend(2)->compute(b.graph.nodes());
        require_bitwise_equal(b, ref.b);
    }

    // A graph larger than the reservation grows the buffer once.
    Context wctx, gctx;
    BlockGraph huge = build_block(wctx, gctx, kD, 40, kF, false);
    auto weights = allocate_context_tensors(wctx, cpu_device().buffer_type());
    alloc.allocate(huge.graph);
    CHECK(alloc.n_buffer_allocations() == 2);
    CHECK(alloc.buffer_size() >= alloc.peak_bytes());
}

TEST_CASE("allocating the same graph again keeps its plan; views of results survive", "[alloc]") {
    Context ctx;
    Tensor* a = ctx.new_tensor(Type::F32, {13, 3});
    set_input(a);
    Tensor* s = exp(ctx, a);
    Tensor* r = reshape(ctx, neg(ctx, s), {39}); // the result is a view: its owner must be kept
    Graph g = build_forward(r);
    GraphAllocator alloc(cpu_device().buffer_type());
    alloc.allocate(g);
    const size_t off = alloc.offset_of(r);
    alloc.allocate(g);
    CHECK(alloc.offset_of(r) == off);
    CHECK(alloc.n_buffer_allocations() == 1);
    alloc.buffer()->fill(0xFF);
    const std::vector<float> in = test::random_values(39);
    tensor_set_f32(a, in);
    make_cpu_backend(1)->compute(g.nodes());
    const std::vector<float> out = tensor_get_f32(r);
    for (size_t i = 0; i < in.size(); ++i) REQUIRE(out[i] == -std::exp(in[i]));
}

TEST_CASE("allocate_context_tensors places every tensor without data", "[alloc]") {
    Context ctx;
    Tensor* w = ctx.new_tensor(Type::F32, {17, 3});
    Tensor* q = ctx.new_tensor(Type::Q8_0, {64, 2});
    Tensor* v = reshape(ctx, w, {51});
    auto buf = allocate_context_tensors(ctx, cpu_device().buffer_type());
    REQUIRE(w->data);
    REQUIRE(q->data);
    REQUIRE(v->data == w->data);
    CHECK(w->buffer == buf.get());
    const size_t align = cpu_device().buffer_type()->alignment();
    CHECK(size_t(static_cast<char*>(q->data) - static_cast<char*>(buf->base())) % align == 0);
    CHECK(static_cast<char*>(q->data) >= static_cast<char*>(w->data) + w->nbytes());
    CHECK_THROWS_AS(GraphAllocator(nullptr), Error);
}

TEST_CASE("host buffers of every size come zero-filled, aligned, and hold what is written", "[alloc]") {
    // Small buffers come from the heap; large ones (8 MiB and up) are anonymous mappings
    // aligned to 2 MiB huge pages. Both must read as zeros before any write.
    BufferType* type = cpu_device().buffer_type();
    for (size_t size : {size_t(1), size_t(4097), size_t(8) << 20, (size_t(21) << 20) + 13}) {
        INFO("size " << size);
        std::unique_ptr<Buffer> buf = type->allocate(size);
        REQUIRE(buf->size() == size);
        REQUIRE(reinterpret_cast<uintptr_t>(buf->base()) % type->alignment() == 0);
        const auto* bytes = static_cast<const unsigned char*>(buf->base());
        size_t nonzero = 0;
        for (size_t i = 0; i < size; ++i) nonzero += bytes[i] != 0;
        CHECK(nonzero == 0);
        buf->fill(0xA5);
        size_t wrong = 0;
        for (size_t i = 0; i < size; ++i) wrong += bytes[i] != 0xA5;
        CHECK(wrong == 0);
    }
    // A freed large buffer does not poison the next one: its memory is the OS's again.
    for (int round = 0; round < 2; ++round) {
        std::unique_ptr<Buffer> buf = type->allocate(size_t(16) << 20);
        const auto* words = static_cast<const uint64_t*>(buf->base());
        size_t nonzero = 0;
        for (size_t i = 0; i < (size_t(16) << 20) / 8; ++i) nonzero += words[i] != 0;
        CHECK(nonzero == 0);
        buf->fill(0xFF);
    }
}
