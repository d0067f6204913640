#include <catch2/catch.hpp>

#include "attn_fixture.h"
#include "attention/reference.h"
#include "backends/cpu/flash_attn_cpu.h"
#include "thread_pool.h"

#include <ggml-fa/error.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

using namespace gfa;
using namespace gfa::attn;
using namespace gfa::attn::testing;

namespace {

// L = sum(dO * O) evaluated in double by the reference forward.
double loss(const Problem& p, const std::vector<float>& w) {
    const std::vector<double> o = reference_forward_f64(p);
    double l = 0.0;
    // o is [B][Sq][Hq][Dv], exactly dO's dense order.
    for (size_t i = 0; i < o.size(); ++i) l += o[i] * double(w[i]);
    return l;
}

// Central differences of L with respect to every element of an f32 tensor.
std::vector<float> numeric_grad(Case& c, Tensor& t, const std::vector<float>& w) {
    std::vector<float> g(t.bytes.size() / 4);
    float* x = reinterpret_cast<float*>(t.bytes.data());
    for (size_t i = 0; i < g.size(); ++i) {
        const float x0 = x[i];
        const float xp = x0 + 1e-3f, xm = x0 - 1e-3f;
        x[i] = xp;
        const double lp = loss(c.p, w);
        x[i] = xm;
        const double lm = loss(c.p, w);
        x[i] = x0;
        g[i] = float((lp - lm) / (double(xp) - double(xm)));
    }
    return g;
}

} // namespace

TEST_CASE("reference backward matches finite differences of the reference forward", "[attn][reference]") {
    const unsigned seed = std::random_device{}();
    std::mt19937 rng(seed);
    INFO("seed " << seed);

    std::vector<CaseSpec> specs;
    CaseSpec base;
    base.Dk = 6, base.Dv = 5, base.Sq = 4, base.Skv = 6, base.Hq = 2, base.Hkv = 2;
    base.params.scale = 0.7f;
    {
        CaseSpec s = base; // plain, Dk != Dv
        specs.push_back(s);
    }
    {
        CaseSpec s = base;
        s.params.logit_softcap = 1.5f;
        s.params.scale = 2.0f; // push scores into tanh's curved part
        specs.push_back(s);
    }
    {
        CaseSpec s = base; // ALiBi over a per-head mask with -inf holes
        s.Hq = 3, s.Hkv = 1;
        s.params.max_bias = 8.0f;
        s.mask = true, s.mask_per_head = true, s.mask_neg_inf_fraction = 0.2f;
        specs.push_back(s);
    }
    {
        CaseSpec s = base; // sinks, with a fully masked row (gradient flows only to sinks)
        s.sinks = true, s.mask = true, s.mask_full_rows = true;
        specs.push_back(s);
    }
    {
        CaseSpec s = base; // windows
        s.Sq = 5, s.Skv = 7;
        s.params.window_left = 2, s.params.window_right = 1;
        specs.push_back(s);
    }
    {
        CaseSpec s = base; // causal with Sq != Skv, GQA 4:2, batch 2
        s.Sq = 3, s.Skv = 7, s.Hq = 4, s.Hkv = 2, s.B = 2;
        s.params.causal = true;
        specs.push_back(s);
    }
    {
        CaseSpec s = base; // causal with Sq > Skv: the first rows see nothing
        s.Sq = 6, s.Skv = 3;
        s.params.causal = true;
        s.sinks = true;
        specs.push_back(s);
    }

    for (const CaseSpec& s : specs) {
        INFO(s.describe());
        auto c = make_case(s, rng, /*backward=*/true);
        reference_backward(c->bp);
        const std::vector<float> w = c->dO.floats();
        const double tol = 1e-4;
        CHECK(rel_error(c->dq.floats(), numeric_grad(*c, c->q, w)) < tol);
        CHECK(rel_error(c->dk.floats(), numeric_grad(*c, c->k, w)) < tol);
        CHECK(rel_error(c->dv.floats(), numeric_grad(*c, c->v, w)) < tol);
        if (s.sinks) CHECK(rel_error(c->dsinks.floats(), numeric_grad(*c, c->sinks, w)) < tol);
    }
}

TEST_CASE("reference forward: masked rows give zeros and -inf LSE, sinks only shrink", "[attn][reference]") {
    const unsigned seed = std::random_device{}();
    std::mt19937 rng(seed);
    INFO("seed " << seed);
    CaseSpec s;
    s.Dk = s.Dv = 32, s.Sq = 6, s.Skv = 3, s.Hq = 2, s.Hkv = 1;
    s.params.causal = true; // rows 0..2 see no key at all
    auto c = make_case(s, rng);
    reference_forward(c->p);
    const std::vector<float> o = c->o.floats(), lse = c->lse.floats();
    for (int64_t h = 0; h < 2; ++h)
        for (int64_t i = 0; i < 6; ++i) {
            const float l = lse[size_t(h * 6 + i)];
            if (i < 3) {
                CHECK(l == -std::numeric_limits<float>::infinity());
            } else {
                CHECK(std::isfinite(l));
            }
            for (int64_t d = 0; d < 32; ++d) {
                const float v = o[size_t((i * 2 + h) * 32 + d)];
                REQUIRE(!std::isnan(v));
                if (i < 3) REQUIRE(v == 0.0f);
            }
        }
    // One visible key: the output is that key's value row exactly.
    const std::vector<float> v = c->v.floats();
    for (int64_t d = 0; d < 32; ++d)
        CHECK(o[size_t((3 * 2 + 0) * 32 + d)] == Approx(v[size_t(d)]).epsilon(1e-6));
}

TEST_CASE("attention problems are validated with clear errors", "[attn][validate]") {
    std::mt19937 rng(1);
    CaseSpec s;
    s.Hq = 3, s.Hkv = 2; // not a multiple
    auto c = make_case(s, rng);
    CHECK_THROWS_WITH(reference_forward(c->p), Catch::Contains("multiple of kv heads"));

    s = CaseSpec{};
    c = make_case(s, rng);
    c->p.k.ne[0] = 63;
    CHECK_THROWS_WITH(reference_forward(c->p), Catch::Contains("k is f32[63"));

    s = CaseSpec{};
    s.k_type = Type::Q8_0;
    s.Dk = 32;
    c = make_case(s, rng);
    c->p.q.type = Type::Q8_0;
    CHECK_THROWS_WITH(reference_forward(c->p), Catch::Contains("q has type q8_0"));

    s = CaseSpec{};
    s.mask = true;
    c = make_case(s, rng);
    c->p.mask.ne[2] = 5;
    CHECK_THROWS_WITH(reference_forward(c->p), Catch::Contains("mask is"));

    s = CaseSpec{};
    c = make_case(s, rng, true);
    c->bp.fwd.lse = View{};
    CHECK_THROWS_WITH(reference_backward(c->bp), Catch::Contains("needs the forward's lse"));

    s = CaseSpec{};
    c = make_case(s, rng);
    c->p.params.window_left = -3;
    CHECK_THROWS_AS(reference_forward(c->p), Error);
}

// ---- FlashAttention-2 CPU kernels against the reference ----------------------------------

namespace {

// Error allowed for an output of this spec against the double reference: f32 paths are
// limited by float accumulation; 16-bit inputs/outputs add one rounding of the result.
double forward_tolerance(const CaseSpec& s) {
    if (s.o_type == Type::BF16) return 8e-3;
    if (s.o_type == Type::F16) return 2e-3;
    return 2e-5 * std::sqrt(double(std::max<int64_t>(s.Skv, 64)) / 64.0) + 1e-5;
}

// Returns the output's relative error; tol and lse_tol override the usual bounds.
double check_forward(const CaseSpec& s, std::mt19937& rng, gfa::ThreadPool& pool, double tol = 0.0,
                     double lse_tol = 1e-5) {
    INFO(s.describe());
    auto got = make_case(s, rng);
    auto want = std::make_unique<Case>();
    // Same inputs, separate outputs for the reference.
    want->o = Tensor(s.o_type, s.Dv, s.Hq, s.Sq, s.B);
    want->lse = Tensor(Type::F32, s.Sq, s.Hq, s.B);
    Problem rp = got->p;
    rp.o = want->o.view;
    rp.lse = want->lse.view;
    gfa::cpu::flash_attn_forward(got->p, pool);
    reference_forward(rp);
    const double err = rel_error(got->o.floats(), want->o.floats());
    INFO("O rel error " << err);
    CHECK(err < (tol > 0.0 ? tol : forward_tolerance(s)));
    const double lse_err = rel_error(got->lse.floats(), want->lse.floats());
    INFO("LSE rel error " << lse_err);
    CHECK(lse_err < lse_tol);
    return err;
}

} // namespace

TEST_CASE("CPU FA2 forward matches the reference", "[attn][fa2]") {
    const unsigned seed = std::random_device{}();
    std::mt19937 rng(seed);
    INFO("seed " << seed);
    gfa::ThreadPool pool(2);
    CaseSpec s;
    for (int64_t sq : {1, 3, 17, 64, 113}) {
        for (int64_t skv : {1, 17, 113, 255}) {
            s = CaseSpec{};
            s.Sq = sq, s.Skv = skv;
            s.Dk = s.Dv = 64;
            check_forward(s, rng, pool);
        }
    }
}

namespace {

double backward_tolerance(const CaseSpec& s) {
    if (s.grad_type == Type::BF16) return 1e-2;
    if (s.grad_type == Type::F16 || s.o_type != Type::F32) return 3e-3;
    return 1e-4 * std::sqrt(double(std::max<int64_t>(s.Skv, 64)) / 64.0);
}

void check_backward(const CaseSpec& s, std::mt19937& rng, gfa::ThreadPool& pool) {
    INFO(s.describe());
    auto got = make_case(s, rng, /*backward=*/true);
    gfa::cpu::flash_attn_forward(got->p, pool); // o and lse as the backward expects them
    auto want = std::make_unique<Case>();
    want->dq = Tensor(s.grad_type, s.Dk, s.Sq, s.Hq, s.B);
    want->dk = Tensor(s.grad_type, s.Dk, s.Skv, s.Hkv, s.B);
    want->dv = Tensor(s.grad_type, s.Dv, s.Skv, s.Hkv, s.B);
    BackwardProblem rb = got->bp;
    rb.fwd = got->p;
    rb.dq = want->dq.view, rb.dk = want->dk.view, rb.dv = want->dv.view;
    if (s.sinks) {
        want->dsinks = Tensor(Type::F32, s.Hq);
        rb.dsinks = want->dsinks.view;
    }
    BackwardProblem fb = got->bp;
    fb.fwd = got->p;
    gfa::cpu::flash_attn_backward(fb, pool);
    reference_backward(rb);
    const double tol = backward_tolerance(s);
    const double eq = rel_error(got->dq.floats(), want->dq.floats());
    const double ek = rel_error(got->dk.floats(), want->dk.floats());
    const double ev = rel_error(got->dv.floats(), want->dv.floats());
    INFO("dq " << eq << " dk " << ek << " dv " << ev << " tol " << tol);
    CHECK(eq < tol);
    CHECK(ek < tol);
    CHECK(ev < tol);
    if (s.sinks) {
        const double es = rel_error(got->dsinks.floats(), want->dsinks.floats());
        INFO("dsinks " << es);
        CHECK(es < tol);
    }
}

} // namespace

TEST_CASE("CPU FA2 backward matches the reference", "[attn][fa2]") {
    const unsigned seed = std::random_device{}();
    std::mt19937 rng(seed);
    INFO("seed " << seed);
    gfa::ThreadPool pool(2);
    for (int64_t sq : {1, 17, 113}) {
        for (int64_t skv : {3, 64, 255}) {
            CaseSpec s;
            s.Sq = sq, s.Skv = skv;
            s.Dk = s.Dv = 64;
            check_backward(s, rng, pool);
        }
    }
}

namespace {

// The feature grid of the forward and backward tests: causal with Sq != Skv both ways, masks,
// ALiBi, softcap, sinks, windows, GQA ratios, head sizes (Dk != Dv too) and every K/V, Q and
// output type.
std::vector<CaseSpec> feature_specs() {
    std::vector<CaseSpec> specs;
    auto add = [&](auto&& edit) {
        CaseSpec s;
        s.Dk = s.Dv = 64, s.Sq = 17, s.Skv = 113;
        edit(s);
        specs.push_back(s);
    };
    // Causal with Sq != Skv in both directions (Sq > Skv leaves rows that see nothing).
    add([](CaseSpec& s) { s.Sq = 113, s.Skv = 255, s.params.causal = true; });
    add([](CaseSpec& s) { s.Sq = 255, s.Skv = 64, s.params.causal = true; });
    add([](CaseSpec& s) {
        s.Sq = 1024, s.Skv = 1024, s.Dk = s.Dv = 32, s.Hq = s.Hkv = 1, s.params.causal = true;
    });
    add([](CaseSpec& s) { s.Sq = 1, s.Skv = 1024, s.Hq = 8, s.Hkv = 1; }); // decode, split-KV
    // Masks: per head/batch broadcast, f16 masks, fully masked rows.
    add([](CaseSpec& s) { s.mask = true, s.mask_full_rows = true, s.B = 2, s.mask_per_batch = true; });
    add([](CaseSpec& s) {
        s.mask = true, s.mask_type = Type::F16, s.mask_per_head = true, s.Hq = 4, s.Hkv = 2;
    });
    add([](CaseSpec& s) { s.Sq = 3, s.mask = true, s.mask_full_rows = true, s.sinks = true; });
    // ALiBi, softcap, sinks, windows.
    add([](CaseSpec& s) {
        s.mask = true, s.params.max_bias = 8.0f, s.Hq = 8, s.Hkv = 4, s.mask_neg_inf_fraction = 0;
    });
    add([](CaseSpec& s) { s.params.logit_softcap = 2.0f, s.params.scale = 0.5f; });
    add([](CaseSpec& s) { s.sinks = true, s.params.causal = true, s.Sq = 64; });
    add([](CaseSpec& s) { s.Sq = 255, s.Skv = 255, s.params.window_left = 40, s.params.window_right = 7; });
    add([](CaseSpec& s) { s.Sq = 113, s.Skv = 255, s.params.causal = true, s.params.window_left = 50; });
    // GQA ratios.
    for (int64_t ratio : {2, 4, 8})
        add([&](CaseSpec& s) { s.Hkv = 1, s.Hq = ratio, s.Sq = ratio == 8 ? 3 : 17; });
    // Head sizes, Dk != Dv.
    for (int64_t d : {32, 80, 96, 128, 256})
        add([&](CaseSpec& s) { s.Dk = s.Dv = d, s.Sq = 17, s.Skv = 64; });
    add([](CaseSpec& s) { s.Dk = 96, s.Dv = 64; });
    add([](CaseSpec& s) { s.Dk = 20, s.Dv = 12, s.Skv = 17; }); // not a multiple of 8
    // K/V, Q and output types.
    for (Type t : {Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0})
        add([&](CaseSpec& s) { s.k_type = s.v_type = t, s.Sq = 17, s.Skv = 255; });
    add([](CaseSpec& s) {
        s.q_type = Type::F16, s.o_type = Type::F16, s.k_type = Type::F16, s.v_type = Type::F16;
    });
    add([](CaseSpec& s) { s.q_type = Type::BF16, s.o_type = Type::BF16, s.grad_type = Type::BF16; });
    add([](CaseSpec& s) { s.grad_type = Type::F16, s.k_type = Type::Q8_0, s.v_type = Type::F16; });

    return specs;
}

} // namespace

TEST_CASE("CPU FA2 over features, head sizes, GQA ratios and K/V types", "[attn][fa2]") {
    const unsigned seed = std::random_device{}();
    std::mt19937 rng(seed);
    INFO("seed " << seed);
    gfa::ThreadPool pool(2);
    for (const CaseSpec& s : feature_specs()) {
        check_forward(s, rng, pool);
        check_backward(s, rng, pool);
    }
}

// precision = BF16: the products on bf16 pairs where the build has them (AVX512-BF16), over
// the feature grid (the cases the pairs take: head dims of whole 16-lane rows, more rows than
// decoding's 8) and odd lengths (partial key tiles, an odd last key, several query tiles of 192
// rows), a GQA group in one tile and a key split; the error must be that of bf16 operands
// (under 1e-2, and above what the f32 products give, which shows the pairs ran), or the f32
// products' where the build has no pairs.
TEST_CASE("CPU FA2 forward with bf16 products", "[attn][fa2][bf16]") {
    const unsigned seed = std::random_device{}();
    std::mt19937 rng(seed);
    INFO("seed " << seed);
    gfa::ThreadPool pool(2);
    std::vector<CaseSpec> specs;
    for (const CaseSpec& s : feature_specs())
        if (s.Dk % 16 == 0 && s.Dv % 16 == 0 && s.Sq * (s.Hq / s.Hkv) > 8) specs.push_back(s);
    auto add = [&](auto&& edit) {
        CaseSpec s;
        s.Dk = s.Dv = 64, s.Sq = 17, s.Skv = 113;
        edit(s);
        specs.push_back(s);
    };
    for (int64_t sq : {9, 113, 400})
        for (int64_t skv : {1, 17, 255, 1000}) add([&](CaseSpec& s) { s.Sq = sq, s.Skv = skv; });
    add([](CaseSpec& s) { s.Hkv = 1, s.Hq = 8, s.Sq = 5; });             // a GQA group shares a tile
    add([](CaseSpec& s) { s.Hq = s.Hkv = 1, s.Sq = 17, s.Skv = 1000; }); // one tile: a key split
    add([](CaseSpec& s) { s.Dk = s.Dv = 16, s.Skv = 129; });

    const bool pairs = gfa::cpu::flash_attn_has_pair_products();
    for (CaseSpec s : specs) {
        s.params.precision = gfa::attn::Precision::BF16;
        const double err = check_forward(s, rng, pool, pairs ? 1e-2 : 0.0, pairs ? 1e-2 : 1e-5);
        if (pairs && s.Skv > 1) CHECK(err > 5e-5);
    }
}

TEST_CASE("CPU FA2 decode path: K/V types, GQA ratios, odd lengths, features", "[attn][fa2][decode]") {
    const unsigned seed = std::random_device{}();
    std::mt19937 rng(seed);
    INFO("seed " << seed);
    gfa::ThreadPool pool(2);
    std::vector<CaseSpec> specs;
    auto add = [&](auto&& edit) {
        CaseSpec s;
        s.Dk = s.Dv = 64, s.Sq = 1, s.Skv = 113, s.Hq = 4, s.Hkv = 1;
        edit(s);
        specs.push_back(s);
    };
    // Every K/V storage type (K and V mixed too) at odd lengths, with 1 and 3 kv heads
    // (3 heads on 2 threads splits the keys; 1 head always does).
    for (Type t : {Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0})
        for (int64_t skv : {1, 3, 17, 113, 1000})
            for (int64_t hkv : {1, 3})
                add([&](CaseSpec& s) { s.k_type = s.v_type = t, s.Skv = skv, s.Hkv = hkv, s.Hq = 4 * hkv; });
    add([](CaseSpec& s) { s.k_type = Type::Q4_0, s.v_type = Type::F16, s.Dk = s.Dv = 128, s.Skv = 777; });
    add([](CaseSpec& s) { s.k_type = Type::F16, s.v_type = Type::Q8_0, s.Dk = s.Dv = 128, s.Skv = 777; });
    // GQA ratios 1..8 and Sq > 1 (rows = Sq * ratio <= 8), several batches.
    for (int64_t ratio : {1, 2, 3, 5, 8})
        add([&](CaseSpec& s) { s.Hkv = 2, s.Hq = 2 * ratio, s.B = 2, s.k_type = s.v_type = Type::F16; });
    add([](CaseSpec& s) { s.Sq = 2, s.Hq = 8, s.Hkv = 2, s.params.causal = true, s.Skv = 255; });
    add([](CaseSpec& s) {
        s.Sq = 3, s.Hq = 2, s.Hkv = 1, s.params.causal = true, s.Skv = 2;
    }); // a row sees nothing
    // Head sizes that are multiples of 8 but not of 32 (float types only), Dk != Dv.
    add([](CaseSpec& s) { s.Dk = s.Dv = 40, s.k_type = s.v_type = Type::F16; });
    // Eight rows per kv head take the one-block score kernel: with a row tail and quantized.
    add([](CaseSpec& s) { s.Dk = s.Dv = 40, s.Hq = 8, s.Skv = 17, s.k_type = s.v_type = Type::F32; });
    add([](CaseSpec& s) {
        s.Hq = 16, s.Hkv = 2, s.Skv = 1001, s.k_type = Type::Q4_0, s.v_type = Type::Q8_0;
    });
    add([](CaseSpec& s) { s.Dk = 72, s.Dv = 24, s.k_type = Type::BF16, s.v_type = Type::F32; });
    add([](CaseSpec& s) { s.Dk = 256, s.Dv = 256, s.k_type = s.v_type = Type::Q8_0, s.Skv = 300; });
    // Masks, ALiBi, softcap, sinks, windows.
    add([](CaseSpec& s) { s.mask = true, s.mask_per_head = true, s.mask_type = Type::F16, s.Skv = 257; });
    add([](CaseSpec& s) { s.mask = true, s.mask_full_rows = true, s.Sq = 2, s.Hq = 2, s.sinks = true; });
    add([](CaseSpec& s) {
        s.mask = true, s.params.max_bias = 8.0f, s.Hq = 8, s.Hkv = 2, s.mask_neg_inf_fraction = 0.0f;
    });
    add([](CaseSpec& s) { s.params.logit_softcap = 2.0f, s.params.scale = 0.5f, s.k_type = Type::Q4_0; });
    add([](CaseSpec& s) { s.sinks = true, s.Skv = 1000, s.k_type = s.v_type = Type::Q8_0; });
    add([](CaseSpec& s) { s.Sq = 2, s.Hq = 4, s.Hkv = 2, s.params.window_left = 30, s.Skv = 200; });
    add([](CaseSpec& s) { s.q_type = Type::F16, s.o_type = Type::F16, s.k_type = s.v_type = Type::F16; });

    for (const CaseSpec& s : specs) {
        INFO(s.describe());
        auto c = make_case(s, rng);
        REQUIRE(gfa::cpu::flash_attn_uses_decode_path(c->p));
        check_forward(s, rng, pool);
    }
    // One thread (no split) and three threads (a split that does not divide the tiles).
    for (int nth : {1, 3}) {
        gfa::ThreadPool other(nth);
        CaseSpec s;
        s.Dk = s.Dv = 128, s.Sq = 1, s.Skv = 1001, s.Hq = 8, s.Hkv = 2, s.k_type = s.v_type = Type::Q8_0;
        check_forward(s, rng, other);
    }
}

TEST_CASE("CPU FA2: fully masked rows give zeros, -inf LSE and zero gradients", "[attn][fa2]") {
    const unsigned seed = std::random_device{}();
    std::mt19937 rng(seed);
    INFO("seed " << seed);
    gfa::ThreadPool pool(2);
    CaseSpec s;
    s.Dk = s.Dv = 32, s.Sq = 9, s.Skv = 4, s.Hq = 2, s.Hkv = 1;
    s.params.causal = true; // rows 0..4 see nothing
    auto c = make_case(s, rng, true);
    gfa::cpu::flash_attn_forward(c->p, pool);
    c->bp.fwd = c->p;
    gfa::cpu::flash_attn_backward(c->bp, pool);
    const std::vector<float> o = c->o.floats(), lse = c->lse.floats(), dq = c->dq.floats();
    for (int64_t h = 0; h < 2; ++h)
        for (int64_t i = 0; i < 9; ++i) {
            if (i < 5) CHECK(lse[size_t(h * 9 + i)] == -std::numeric_limits<float>::infinity());
            for (int64_t d = 0; d < 32; ++d) {
                REQUIRE(!std::isnan(o[size_t((i * 2 + h) * 32 + d)]));
                REQUIRE(!std::isnan(dq[size_t((h * 9 + i) * 32 + d)]));
                if (i < 5) {
                    REQUIRE(o[size_t((i * 2 + h) * 32 + d)] == 0.0f);
                    REQUIRE(dq[size_t((h * 9 + i) * 32 + d)] == 0.0f);
                }
            }
        }
}

TEST_CASE("CPU FA2 backward is deterministic", "[attn][fa2]") {
    const unsigned seed = std::random_device{}();
    std::mt19937 rng(seed);
    INFO("seed " << seed);
    gfa::ThreadPool pool(2);
    CaseSpec s;
    s.Dk = s.Dv = 64, s.Sq = 200, s.Skv = 300, s.Hq = 4, s.Hkv = 2, s.sinks = true;
    s.params.causal = true;
    auto c = make_case(s, rng, true);
    gfa::cpu::flash_attn_forward(c->p, pool);
    c->bp.fwd = c->p;
    gfa::cpu::flash_attn_backward(c->bp, pool);
    const auto dq = c->dq.bytes, dk = c->dk.bytes, dv = c->dv.bytes, ds = c->dsinks.bytes;
    for (int rep = 0; rep < 3; ++rep) {
        c->dq.poison(), c->dk.poison(), c->dv.poison(), c->dsinks.poison();
        gfa::cpu::flash_attn_backward(c->bp, pool);
        REQUIRE(c->dq.bytes == dq);
        REQUIRE(c->dk.bytes == dk);
        REQUIRE(c->dv.bytes == dv);
        REQUIRE(c->dsinks.bytes == ds);
    }
}

namespace {

// Forward and backward at Sq = Skv = n with one head and small D: the scratch is below
// max_scratch and grows linearly with n. The full reference would be O(n^2) in double,
// so the output check takes the last query row, which sees every key, as a 1-row problem.
void long_sequence(int64_t n, int64_t max_scratch) {
    const unsigned seed = std::random_device{}();
    std::mt19937 rng(seed);
    INFO("seed " << seed << " n " << n);
    gfa::ThreadPool pool(2);
    CaseSpec s;
    s.Dk = s.Dv = 16, s.Sq = s.Skv = n, s.Hq = s.Hkv = 1;
    s.params.causal = true;
    auto c = make_case(s, rng, true);
    CHECK(gfa::cpu::flash_attn_scratch_bytes(c->p, 2) < size_t(max_scratch));
    CHECK(gfa::cpu::flash_attn_backward_scratch_bytes(c->bp, 2) < size_t(max_scratch));
    // Linear growth: doubling the sequence at most doubles the scratch (plus tile buffers).
    {
        Problem p2 = c->p;
        p2.Sq *= 2, p2.Skv *= 2;
        BackwardProblem b2 = c->bp;
        b2.fwd = p2;
        const double f1 = double(gfa::cpu::flash_attn_scratch_bytes(c->p, 2));
        const double b1 = double(gfa::cpu::flash_attn_backward_scratch_bytes(c->bp, 2));
        CHECK(double(gfa::cpu::flash_attn_scratch_bytes(p2, 2)) <= 2.0 * f1 + 1e6);
        CHECK(double(gfa::cpu::flash_attn_backward_scratch_bytes(b2, 2)) <= 2.0 * b1 + 1e6);
    }
    gfa::cpu::flash_attn_forward(c->p, pool);
    c->bp.fwd = c->p;
    gfa::cpu::flash_attn_backward(c->bp, pool);
    for (const Tensor* t : {&c->o, &c->lse, &c->dq, &c->dk, &c->dv})
        for (float v : t->floats()) REQUIRE(std::isfinite(v));

    // The last query row sees every key: compare it with the reference on a 1-row problem.
    Tensor q1(Type::F32, 16, 1, 1, 1), o1(Type::F32, 16, 1, 1, 1), l1(Type::F32, 1, 1, 1, 1);
    std::memcpy(q1.bytes.data(), c->q.row(n - 1), 64);
    Problem p1 = c->p;
    p1.Sq = 1;
    p1.q = q1.view, p1.o = o1.view, p1.lse = l1.view;
    reference_forward(p1);
    std::vector<float> got(16);
    std::memcpy(got.data(), c->o.row(n - 1), 64);
    CHECK(rel_error(got, o1.floats()) < 1e-4);
}

} // namespace

// About 2 s on 2 cores (causal halves the work), so it always runs.
TEST_CASE("CPU FA2 memory is O(N): 32768 tokens, forward and backward", "[attn][fa2]") {
    long_sequence(32768, 64 << 20);
}
