// flash_attn_ext on Vulkan against the double-precision reference: forward over head dims,
// storage types, odd sizes and every feature; backward against the reference and against
// finite differences; repeated backward runs bit for bit. Graphs run through the scheduler
// (every node on Vulkan), with every node's memory poisoned with NaN before the run
// (compare::run), so an element a shader forgets to write fails.
#include "compare.h"
#include "op_check.h"
#include "vulkan_device.h"

#include <ggml-fa/backend.h>
#include <ggml-fa/ops.h>
#include <ggml-fa/scheduler.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

using namespace gfa;

namespace {

enum class MaskKind { None, Shared, PerHead, PerBatch };

struct FaCase {
    int64_t Dk = 64, Dv = 64, Sq = 17, Skv = 33, Hq = 2, Hkv = 1, B = 1;
    Type q = Type::F32, k = Type::F32, v = Type::F32, out = Type::F32;
    FlashAttnParams params;
    MaskKind mask = MaskKind::None;
    Type mask_type = Type::F16;
    bool full_rows = false; // some mask rows entirely -inf
    bool sinks = false, lse = true;

    std::string describe() const {
        return "Dk=" + std::to_string(Dk) + " Dv=" + std::to_string(Dv) + " Sq=" + std::to_string(Sq) +
               " Skv=" + std::to_string(Skv) + " Hq=" + std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) +
               " B=" + std::to_string(B) + " q/k/v/o=" + std::string(type_name(q)) + "/" +
               std::string(type_name(k)) + "/" + std::string(type_name(v)) + "/" +
               std::string(type_name(out)) + " mask=" + std::to_string(int(mask)) + "(" +
               std::string(type_name(mask_type)) + ")" + (full_rows ? " full-rows" : "") +
               (sinks ? " sinks" : "") + (params.causal ? " causal" : "") +
               " window=" + std::to_string(params.window_left) + "," + std::to_string(params.window_right) +
               " softcap=" + std::to_string(params.logit_softcap) +
               " alibi=" + std::to_string(params.max_bias);
    }
    // Relative error allowed: the shaders compute in f32, so only the output's rounding
    // separates them from the reference (which reads the same rounded inputs).
    double tolerance() const { return out == Type::F32 ? 1e-5 : out == Type::F16 ? 2e-3 : 1e-2; }
};

// A mask leaf [Skv, Sq, heads, batches]: values in [-2, 0), about 1 in 8 -inf, and with
// full_rows every fifth row -inf everywhere.
Tensor* make_mask(compare::CaseBuilder& b, const FaCase& c,
                  std::unordered_map<const Tensor*, compare::LeafInit>& inits) {
    const int64_t heads = c.mask == MaskKind::PerHead ? c.Hq : 1;
    const int64_t batches = c.mask == MaskKind::PerBatch ? c.B : 1;
    Tensor* m = b.ctx.new_tensor(c.mask_type, {c.Skv, c.Sq, heads, batches});
    set_input(m);
    const bool full_rows = c.full_rows;
    const int64_t Skv = c.Skv;
    inits[m] = [full_rows, Skv](Tensor* leaf, std::mt19937& rng) {
        std::uniform_real_distribution<float> d(-2.0f, 0.0f);
        std::vector<float> v(size_t(leaf->nelements()));
        for (size_t i = 0; i < v.size(); ++i) {
            const int64_t row = int64_t(i) / Skv;
            v[i] = (full_rows && row % 5 == 2) || rng() % 8 == 0 ? -std::numeric_limits<float>::infinity()
                                                                 : d(rng);
        }
        tensor_set_f32(leaf, v);
    };
    return m;
}

struct Built {
    Tensor* o = nullptr;
    Tensor* lse = nullptr;
    std::vector<Tensor*> params;
};

// The attention node of a case; with `grad`, q/k/v (where f32) and the sinks are
// parameters and the output is a scalar loss sum(o * w) with random weights w.
Built build(compare::CaseBuilder& b, const FaCase& c, bool grad,
            std::unordered_map<const Tensor*, compare::LeafInit>& inits) {
    Built r;
    auto leaf = [&](Type t, std::initializer_list<int64_t> ne) {
        if (grad && t == Type::F32) {
            Tensor* p = b.param(ne);
            r.params.push_back(p);
            return p;
        }
        return b.input(ne, -1.0f, 1.0f, t);
    };
    Tensor* q = leaf(c.q, {c.Dk, c.Sq, c.Hq, c.B});
    Tensor* k = leaf(c.k, {c.Dk, c.Skv, c.Hkv, c.B});
    Tensor* v = leaf(c.v, {c.Dv, c.Skv, c.Hkv, c.B});
    Tensor* mask = c.mask == MaskKind::None ? nullptr : make_mask(b, c, inits);
    Tensor* sinks = c.sinks ? leaf(Type::F32, {c.Hq}) : nullptr;
    r.o = flash_attn_ext(b.ctx, q, k, v, mask, c.params, sinks,
                         {.out_type = c.out, .with_lse = c.lse && !grad});
    if (c.lse && !grad) r.lse = flash_attn_lse(b.ctx, r.o);
    for (const auto& [t, init] : b.inits()) inits.emplace(t, init);
    return r;
}

// The scalar loss sum(o * w) of a gradient case, with random weights w.
Tensor* weighted_loss(compare::CaseBuilder& b, const FaCase& c, Tensor* o,
                      std::unordered_map<const Tensor*, compare::LeafInit>& inits) {
    Tensor* w = b.input({c.Dv, c.Hq, c.Sq, c.B});
    for (const auto& [t, init] : b.inits()) inits.emplace(t, init);
    Tensor* loss = sum(b.ctx, mul(b.ctx, o, w));
    set_loss(loss);
    return loss;
}

// Runs the case's graph on Vulkan (the CPU for what Vulkan lacks) and compares every node
// with the reference. The attention nodes must have run on Vulkan.
void check_case(const FaCase& c, bool grad, Backend& vk, Backend& cpu) {
    INFO("seed " << test::seed() << (grad ? ", backward: " : ", forward: ") << c.describe());
    Context ctx;
    compare::CaseBuilder b(ctx);
    std::unordered_map<const Tensor*, compare::LeafInit> inits;
    Built built = build(b, c, grad, inits);
    Tensor* out = built.lse ? built.lse : built.o;
    if (grad) out = weighted_loss(b, c, built.o, inits);
    Graph g = build_forward(out);
    if (grad) build_backward(ctx, g, out);
    std::mt19937 rng(test::rng()());
    const compare::Report rep = compare::run(g, vk, &cpu, rng, inits);
    REQUIRE_FALSE(rep.nodes.empty());
    int attention_nodes = 0;
    for (const compare::NodeResult& n : rep.nodes) {
        INFO(n.label << " on " << n.backend << ": error " << n.error);
        if (n.node->op == Op::FlashAttnExt || n.node->op == Op::FlashAttnBack) {
            CHECK(n.backend == "Vulkan0");
            ++attention_nodes;
        }
        // Every node runs on Vulkan. The loss, one sum of thousands of terms of either sign,
        // can land near zero, where the terms' f32 rounding is a large part of it: it only has
        // to be finite here (sums are tested on their own). dSinks, a few elements each a sum
        // over a whole head, gets 1e-4 (a missing row would be off by percents); every other
        // result the case's bound.
        CHECK(n.backend == "Vulkan0");
        if (n.node->op == Op::Sum) {
            CHECK(std::isfinite(n.error));
            continue;
        }
        double tol = n.node->nelements() <= 8 ? std::max(c.tolerance(), 1e-4) : c.tolerance();
        // The backward's dS = P (dP - D) subtracts nearly equal f32 values where one key takes
        // almost all of a row's weight (seed 3605351197: one key beside a sink, dQ 1.1e-5 from
        // the double reference; other seeds ~1e-6): f32 gradients get 1e-4.
        if (n.node->op == Op::FlashAttnBack && c.out == Type::F32) tol = std::max(tol, 1e-4);
        INFO("tolerance " << tol);
        CHECK(n.error <= tol);
    }
    CHECK(attention_nodes == (grad ? 2 : 1));
}

// A gradient case's loss and backward graph, placed by a scheduler (Vulkan first, the CPU
// for the loss ops) with random leaf values; compute() poisons every node and runs it.
struct PlacedLoss {
    Context ctx;
    compare::CaseBuilder builder{ctx};
    std::unordered_map<const Tensor*, compare::LeafInit> inits;
    Built built;
    Tensor* loss = nullptr;
    Graph graph;
    Scheduler sched;
    Backend& vk;

    PlacedLoss(const FaCase& c, Backend& vulkan, Backend& cpu) : sched({&vulkan, &cpu}), vk(vulkan) {
        built = build(builder, c, true, inits);
        loss = weighted_loss(builder, c, built.o, inits);
        graph = build_forward(loss);
        build_backward(ctx, graph, loss);
        sched.set_log({});
        sched.allocate(graph);
        std::mt19937 rng(test::rng()());
        for (Tensor* l : graph.leafs())
            if (auto it = inits.find(l); it != inits.end()) it->second(l, rng);
    }
    void compute() {
        test::poison_nodes(graph);
        sched.compute(graph);
        for (Tensor* n : graph.nodes())
            if (n->op == Op::FlashAttnBack) CHECK(sched.backend_of(n) == &vk);
    }
};

Type pick(std::mt19937& rng, std::initializer_list<Type> types) {
    return *(types.begin() + rng() % types.size());
}
int64_t pick(std::mt19937& rng, std::initializer_list<int64_t> values) {
    return *(values.begin() + rng() % values.size());
}

// A random case: head dims (equal or not) up to 256, odd sizes, GQA, types and features.
FaCase random_case(std::mt19937& rng, bool grad) {
    FaCase c;
    c.Dk = pick(rng, {16, 40, 64, 72, 96, 128, 160, 256});
    c.Dv = rng() % 3 == 0 ? pick(rng, {32, 64, 80, 128, 200}) : c.Dk;
    c.Sq = pick(rng, {1, 3, 17, 40, 77});
    c.Skv = pick(rng, {1, 5, 33, 70, 129});
    c.Hkv = pick(rng, {1, 2});
    c.Hq = c.Hkv * pick(rng, {1, 2, 3});
    c.B = pick(rng, {1, 2});
    c.q = grad ? Type::F32 : pick(rng, {Type::F32, Type::F16, Type::BF16});
    // The forward also reads q8_0/q4_0 caches (rows of whole blocks of 32).
    auto kv_type = [&](int64_t d) {
        if (!grad && d % 32 == 0)
            return pick(rng, {Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0});
        return pick(rng, {Type::F32, Type::F16, Type::BF16});
    };
    c.k = kv_type(c.Dk);
    c.v = kv_type(c.Dv);
    c.out = grad ? Type::F32 : pick(rng, {Type::F32, Type::F16, Type::BF16});
    c.params.scale = 1.0f / std::sqrt(float(c.Dk));
    c.params.causal = rng() % 3 == 0;
    if (rng() % 4 == 0) c.params.window_left = int32_t(rng() % 20);
    if (rng() % 6 == 0) c.params.window_right = int32_t(rng() % 5);
    if (rng() % 4 == 0) c.params.logit_softcap = 3.0f + float(rng() % 30);
    c.mask = MaskKind(rng() % 4);
    c.mask_type = pick(rng, {Type::F32, Type::F16});
    c.full_rows = c.mask != MaskKind::None && rng() % 3 == 0;
    if (c.mask != MaskKind::None && rng() % 4 == 0) c.params.max_bias = 8.0f;
    c.sinks = rng() % 3 == 0;
    return c;
}

} // namespace

TEST_CASE("Vulkan flash attention forward matches the reference over head dims, types and sizes",
          "[vulkan][fa]") {
    auto vk = vulkan0()->create_backend();
    auto cpu = make_cpu_backend(2);
    for (int n = 0; n < 40; ++n) check_case(random_case(test::rng(), false), false, *vk, *cpu);
}

TEST_CASE("Vulkan flash attention forward features one at a time", "[vulkan][fa]") {
    auto vk = vulkan0()->create_backend();
    auto cpu = make_cpu_backend(2);
    FaCase base;
    base.Dk = base.Dv = 64;
    base.Sq = 37;
    base.Skv = 53;
    base.Hq = 4;
    base.Hkv = 2;
    base.B = 2;
    base.params.scale = 0.125f;
    std::vector<FaCase> cases(16, base);
    cases[0].params.causal = true;
    cases[1].params.window_left = 7;
    cases[2].params.window_right = 3;
    cases[2].params.window_left = 5;
    cases[3].params.logit_softcap = 2.0f; // sharp: most scores saturate
    cases[4].mask = MaskKind::Shared;
    cases[5].mask = MaskKind::PerHead, cases[5].mask_type = Type::F32;
    cases[6].mask = MaskKind::PerBatch, cases[6].full_rows = true;
    cases[7].mask = MaskKind::Shared, cases[7].params.max_bias = 8.0f, cases[7].Hq = 6, cases[7].Hkv = 3;
    cases[8].sinks = true;
    cases[9].sinks = true, cases[9].mask = MaskKind::Shared, cases[9].full_rows = true; // sink only
    cases[10].params.causal = true, cases[10].Sq = 70, cases[10].Skv = 20;              // rows before any key
    cases[11].out = Type::F16, cases[11].q = Type::F16, cases[11].k = Type::F16, cases[11].v = Type::F16;
    cases[12].out = Type::BF16, cases[12].q = Type::BF16, cases[12].k = Type::BF16, cases[12].v = Type::BF16;
    cases[13].Dk = 256, cases[13].Dv = 256, cases[13].params.causal = true, cases[13].Sq = 1,
    cases[13].Skv = 300;
    cases[14].k = Type::Q8_0, cases[14].v = Type::Q4_0, cases[14].params.causal = true; // quantized caches
    cases[15].k = Type::Q4_0, cases[15].v = Type::Q8_0, cases[15].Sq = 1, cases[15].mask = MaskKind::Shared;
    for (const FaCase& c : cases) check_case(c, false, *vk, *cpu);
}

TEST_CASE("Vulkan flash attention backward matches the reference", "[vulkan][fa][backward]") {
    auto vk = vulkan0()->create_backend();
    auto cpu = make_cpu_backend(2);
    for (int n = 0; n < 24; ++n) check_case(random_case(test::rng(), true), true, *vk, *cpu);
    // Each feature at least once.
    FaCase base;
    base.Dk = base.Dv = 32;
    base.Sq = 29;
    base.Skv = 41;
    base.Hq = 4;
    base.Hkv = 2;
    base.params.scale = 0.2f;
    std::vector<FaCase> cases(7, base);
    cases[0].params.causal = true;
    cases[1].params.window_left = 6, cases[1].params.window_right = 2;
    cases[2].params.logit_softcap = 4.0f;
    cases[3].mask = MaskKind::PerHead, cases[3].full_rows = true, cases[3].params.max_bias = 8.0f;
    cases[4].sinks = true, cases[4].mask = MaskKind::Shared, cases[4].full_rows = true;
    cases[5].k = Type::F16, cases[5].v = Type::BF16; // gradients for q only, K/V stored in 16 bits
    cases[6].Dk = 128, cases[6].Dv = 80, cases[6].params.causal = true, cases[6].Sq = 50, cases[6].Skv = 20;
    for (const FaCase& c : cases) check_case(c, true, *vk, *cpu);
}

TEST_CASE("Vulkan flash attention gradients match finite differences in double precision",
          "[vulkan][fa][backward]") {
    auto vk = vulkan0()->create_backend();
    auto cpu = make_cpu_backend(2);
    FaCase c;
    c.Dk = 24;
    c.Dv = 16;
    c.Sq = 9;
    c.Skv = 13;
    c.Hq = 4;
    c.Hkv = 2;
    c.params.scale = 0.4f;
    c.params.causal = true;
    c.params.logit_softcap = 5.0f;
    c.sinks = true;
    c.mask = MaskKind::Shared;
    for (int variant = 0; variant < 2; ++variant) {
        c.params.max_bias = variant == 1 ? 8.0f : 0.0f;
        INFO("seed " << test::seed() << ": " << c.describe());
        PlacedLoss run(c, *vk, *cpu);
        run.compute();
        for (Tensor* p : run.built.params) {
            const std::vector<float> all = tensor_get_f32(run.graph.grad(p));
            std::vector<size_t> picked;
            std::vector<float> analytic;
            for (int s = 0; s < 24; ++s) {
                picked.push_back(test::rng()() % all.size());
                analytic.push_back(all[picked.back()]);
            }
            const double err = test::rel_error(analytic, test::reference_gradient(run.loss, p, picked));
            INFO("parameter " << p->shape_str() << ": relative error " << err);
            CHECK(err < 1e-4);
        }
    }
}

TEST_CASE("Vulkan flash attention backward is bit-identical across runs", "[vulkan][fa][backward]") {
    auto vk = vulkan0()->create_backend();
    auto cpu = make_cpu_backend(2);
    FaCase c;
    c.Dk = c.Dv = 64;
    c.Sq = 45;
    c.Skv = 61;
    c.Hq = 6;
    c.Hkv = 2;
    c.params.scale = 0.125f;
    c.params.causal = true;
    c.sinks = true;
    PlacedLoss run(c, *vk, *cpu);
    std::vector<std::vector<float>> first;
    for (int n = 0; n < 3; ++n) {
        run.compute();
        for (size_t i = 0; i < run.built.params.size(); ++i) {
            const std::vector<float> grad = tensor_get_f32(run.graph.grad(run.built.params[i]));
            if (n == 0) {
                for (float x : grad) REQUIRE(std::isfinite(x));
                first.push_back(grad);
            } else {
                CHECK(std::memcmp(grad.data(), first[i].data(), grad.size() * sizeof(float)) == 0);
            }
        }
    }
}

TEST_CASE("Vulkan flash attention leaves what it does not support to the CPU", "[vulkan][fa]") {
    Device* d = vulkan0();
    Context ctx;
    Tensor* q = ctx.new_tensor(Type::F32, {64, 5, 2, 1});
    Tensor* k = ctx.new_tensor(Type::F32, {64, 9, 2, 1});
    Tensor* v = ctx.new_tensor(Type::F32, {64, 9, 2, 1});
    FlashAttnParams p;
    CHECK(d->supports_op(flash_attn_ext(ctx, q, k, v, nullptr, p)));
    Tensor* kq = ctx.new_tensor(Type::Q8_0, {64, 9, 2, 1});
    CHECK(d->supports_op(flash_attn_ext(ctx, q, kq, v, nullptr, p)));
    // The backward through a quantized cache is the CPU's: there the node runs on the CPU
    // through the scheduler, and the scheduler says so.
    auto vk = d->create_backend();
    auto cpu = make_cpu_backend(2);
    Context ctx2;
    compare::CaseBuilder b(ctx2);
    Tensor* q2 = b.param({64, 5, 2, 1});
    Tensor* k2 = b.input({64, 9, 2, 1}, -1.0f, 1.0f, Type::Q8_0);
    Tensor* v2 = b.param({64, 9, 2, 1});
    Tensor* o = flash_attn_ext(ctx2, q2, k2, v2, nullptr, p);
    Tensor* loss = sum(ctx2, sqr(ctx2, o)); // terms of one sign: no cancellation in the loss
    set_loss(loss);
    Graph g = build_forward(loss);
    build_backward(ctx2, g, loss);
    Tensor* back = nullptr;
    for (Tensor* n : g.nodes())
        if (n->op == Op::FlashAttnBack) back = n;
    REQUIRE(back != nullptr);
    CHECK_FALSE(d->supports_op(back));
    std::mt19937 rng(test::rng()());
    const compare::Report rep = compare::run(g, *vk, cpu.get(), rng, b.inits());
    CHECK(rep.ok(1e-5));
    for (const compare::NodeResult& n : rep.nodes)
        if (n.node->op == Op::FlashAttnBack)
            CHECK(n.backend == "CPU");
        else if (n.node->op == Op::FlashAttnExt)
            CHECK(n.backend == "Vulkan0");
    CHECK_FALSE(rep.log.empty());
}
