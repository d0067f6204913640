// Neural-network ops (norms, rope, softmax, causal mask, activations, cross-entropy):
// CPU kernels against the double-precision reference on odd shapes and every mode,
// gradients against finite differences, and the errors bad inputs produce.
#include "op_check.h"

#include "op_def.h"

#include <ggml-fa/backend.h>

#include <cmath>
#include <limits>

using namespace gfa;
using gfa::test::check_forward;
using gfa::test::check_gradients;
using gfa::test::fill_uniform;
using gfa::test::random_values;

namespace {

Context data_ctx() {
    return Context(ContextParams{.alloc_data = true});
}

constexpr float kInf = std::numeric_limits<float>::infinity();

// sum(y * w) for a fresh random w: a scalar whose gradient reaches every element of y with
// a different weight (a plain sum would hide, e.g., softmax's gradient, which sums to 0).
Tensor* weighted_sum(Context& ctx, Tensor* y) {
    Tensor* w = ctx.new_tensor(Type::F32, y->ne);
    fill_uniform(w);
    return sum(ctx, mul(ctx, y, w));
}

// Values in +-[lo, hi]: keeps finite differences away from the kinks of relu and step.
void fill_away_from_zero(Tensor* t, float lo, float hi) {
    std::vector<float> v = random_values(size_t(t->nelements()), lo, hi);
    const std::vector<float> sign = random_values(v.size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = sign[i] < 0.0f ? -v[i] : v[i];
    tensor_set_f32(t, v);
}

// Rows that are probability distributions (softmax of random numbers).
void fill_probabilities(Tensor* t) {
    std::vector<float> v = random_values(size_t(t->nelements()), -2.0f, 2.0f);
    const int64_t n = t->ne[0];
    for (size_t r = 0; r < v.size(); r += size_t(n)) {
        float total = 0.0f;
        for (int64_t i = 0; i < n; ++i) total += v[r + size_t(i)] = std::exp(v[r + size_t(i)]);
        for (int64_t i = 0; i < n; ++i) v[r + size_t(i)] /= total;
    }
    tensor_set_f32(t, v);
}

Tensor* positions(Context& ctx, int64_t n_tokens, int32_t max_pos) {
    Tensor* pos = ctx.new_tensor(Type::I32, {n_tokens});
    std::vector<int32_t> p(static_cast<size_t>(n_tokens));
    std::uniform_int_distribution<int32_t> d(0, max_pos);
    for (int32_t& x : p) x = d(gfa::test::rng());
    tensor_set(pos, p.data(), 0, p.size() * sizeof(int32_t));
    return pos;
}

const int64_t kRowLengths[] = {1, 3, 17, 113};

} // namespace

// ---- forward -----------------------------------------------------------------------------

TEST_CASE("norm and rms_norm match the reference on odd rows", "[nn]") {
    for (int64_t n : kRowLengths) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {n, 5, 3, 2});
        fill_uniform(a, -2.0f, 3.0f); // a mean away from zero exercises the centering
        INFO("row length " << n);
        check_forward(norm(ctx, a, 1e-5f), 1e-5);
        check_forward(rms_norm(ctx, a, 1e-6f), 1e-5);
        check_forward(norm(ctx, a, 0.5f), 1e-5);
    }
    // A strided (transposed) input goes through the gathering path.
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {7, 19, 2});
    fill_uniform(a);
    check_forward(rms_norm(ctx, transpose(ctx, a), 1e-6f), 1e-5);
    check_forward(norm(ctx, transpose(ctx, a), 1e-6f), 1e-5, 3);
}

TEST_CASE("norm of a constant row is zero, not NaN", "[nn]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {33, 2});
    tensor_set_f32(a, std::vector<float>(66, 4.25f));
    Tensor* y = norm(ctx, a, 1e-5f);
    test::compute_cpu(build_forward(y));
    for (float v : tensor_get_f32(y)) CHECK(v == 0.0f);
}

TEST_CASE("rope rotates in both modes with partial rotation and frequency scaling", "[nn]") {
    struct Case {
        int64_t head_dim;
        int32_t n_dims;
        RopeMode mode;
        float base, scale;
    };
    const Case cases[] = {
        {16, 16, RopeMode::Normal, 10000.0f, 1.0f}, {16, 16, RopeMode::NeoX, 10000.0f, 1.0f},
        {17, 10, RopeMode::Normal, 500.0f, 0.25f},  {17, 10, RopeMode::NeoX, 500.0f, 0.25f},
        {64, 32, RopeMode::NeoX, 1e6f, 0.5f},       {3, 2, RopeMode::Normal, 10000.0f, 4.0f},
    };
    for (const Case& c : cases) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {c.head_dim, 3, 5, 2});
        fill_uniform(a);
        Tensor* pos = positions(ctx, 5, 4096);
        const RopeParams p{c.n_dims, c.mode, c.base, c.scale};
        INFO("head_dim " << c.head_dim << " n_dims " << c.n_dims << " mode " << int(c.mode) << " freq_scale "
                         << c.scale);
        Tensor* y = rope(ctx, a, pos, p);
        check_forward(y, 1e-5);
        // rope_back is the inverse rotation: rope_back(rope(a)) gives a back.
        Tensor* back = rope_back(ctx, y, pos, p);
        test::compute_cpu(build_forward(back));
        const std::vector<float> got = tensor_get_f32(back);
        const std::vector<float> want = tensor_get_f32(a);
        std::vector<double> want_d(want.begin(), want.end());
        CHECK(test::rel_error(got, want_d) < 1e-5);
    }
}

TEST_CASE("rope with frequency factors (Llama 3.1 style): each pair's angle divided by its factor", "[nn]") {
    for (RopeMode mode : {RopeMode::Normal, RopeMode::NeoX}) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {24, 3, 5, 2});
        fill_uniform(a);
        Tensor* pos = positions(ctx, 5, 8192);
        const RopeParams p{20, mode, 500000.0f, 1.0f}; // 20 of 24 dims rotate: 10 factors
        Tensor* factors = ctx.new_tensor(Type::F32, {10});
        fill_uniform(factors, 1.0f, 8.0f);
        INFO("mode " << int(mode));
        Tensor* y = rope(ctx, a, pos, p, factors);
        check_forward(y, 1e-5);
        Tensor* back = rope_back(ctx, y, pos, p, factors); // the inverse rotation
        test::compute_cpu(build_forward(back));
        const std::vector<float> want = tensor_get_f32(a);
        CHECK(test::rel_error(tensor_get_f32(back), std::vector<double>(want.begin(), want.end())) < 1e-5);
        // Factors all 2 halve every angle, as freq_scale 0.5 does.
        tensor_set_f32(factors, std::vector<float>(10, 2.0f));
        Tensor* halved = rope(ctx, a, pos, p, factors);
        Tensor* scaled = rope(ctx, a, pos, RopeParams{20, mode, 500000.0f, 0.5f});
        test::compute_cpu(build_forward(halved));
        test::compute_cpu(build_forward(scaled));
        const std::vector<float> s = tensor_get_f32(scaled);
        CHECK(test::rel_error(tensor_get_f32(halved), std::vector<double>(s.begin(), s.end())) < 1e-6);
        // One factor per rotating pair, f32.
        Tensor* wrong = ctx.new_tensor(Type::F32, {12});
        CHECK_THROWS_WITH(rope(ctx, a, pos, p, wrong),
                          Catch::Contains("freq_factors must be f32 [n_dims / 2] = [10]"));
    }
}

TEST_CASE("rope at position 0 is the identity and matches a hand-computed rotation", "[nn]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {4, 1, 2});
    tensor_set_f32(a, {1, 2, 3, 4, 1, 2, 3, 4});
    Tensor* pos = ctx.new_tensor(Type::I32, {2});
    const int32_t p[2] = {0, 1};
    tensor_set(pos, p, 0, sizeof(p));
    Tensor* y = rope(ctx, a, pos, RopeParams{4, RopeMode::NeoX, 100.0f, 1.0f});
    test::compute_cpu(build_forward(y));
    const std::vector<float> v = tensor_get_f32(y);
    // token 0: unchanged; token 1: pairs (0,2) by 1 rad, (1,3) by 100^(-1/2) = 0.1 rad
    const float expect[8] = {1,
                             2,
                             3,
                             4,
                             float(std::cos(1.0) - 3 * std::sin(1.0)),
                             float(2 * std::cos(0.1) - 4 * std::sin(0.1)),
                             float(std::sin(1.0) + 3 * std::cos(1.0)),
                             float(2 * std::sin(0.1) + 4 * std::cos(0.1))};
    for (int i = 0; i < 8; ++i) CHECK(v[size_t(i)] == Approx(expect[i]).margin(1e-6));
}

TEST_CASE("soft_max_ext: scale, f32 and f16 masks, broadcasting, ALiBi", "[nn]") {
    for (int64_t n : kRowLengths) {
        for (Type mask_type : {Type::F32, Type::F16}) {
            for (int broadcast = 0; broadcast < 3; ++broadcast) {
                Context ctx = data_ctx();
                Tensor* a = ctx.new_tensor(Type::F32, {n, 6, 4, 2});
                fill_uniform(a, -4.0f, 4.0f);
                // broadcast 0: one mask for every head and batch; 1: per head; 2: per head
                // and batch, with 2 padding rows past a's rows.
                const int64_t m1 = broadcast == 2 ? 8 : 6, m2 = broadcast == 0 ? 1 : 4,
                              m3 = broadcast == 2 ? 2 : 1;
                Tensor* mask = ctx.new_tensor(mask_type, {n, m1, m2, m3});
                std::vector<float> mv = random_values(size_t(mask->nelements()), -2.0f, 2.0f);
                for (size_t i = 0; i < mv.size(); i += 3) mv[i] = -kInf; // some masked entries
                tensor_set_f32(mask, mv);
                INFO("row length " << n << ", mask " << mask->shape_str());
                check_forward(soft_max_ext(ctx, a, mask, 0.37f, 0.0f), 1e-5);
                check_forward(soft_max_ext(ctx, a, mask, 1.0f, 8.0f), 1e-5); // ALiBi slopes per head
            }
        }
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {n, 7, 3});
        fill_uniform(a, -30.0f, 30.0f); // large logits: needs the max subtraction
        check_forward(soft_max(ctx, a), 1e-5);
        check_forward(soft_max_ext(ctx, a, nullptr, -2.0f, 0.0f), 1e-5);
    }
}

TEST_CASE("soft_max_ext: ALiBi with a non-power-of-two head count", "[nn]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {13, 5, 6});
    Tensor* mask = ctx.new_tensor(Type::F16, {13, 5});
    fill_uniform(a);
    fill_uniform(mask, -3.0f, 0.0f);
    check_forward(soft_max_ext(ctx, a, mask, 0.5f, 2.0f), 1e-5);
}

TEST_CASE("soft_max_ext: fully masked rows give zeros, never NaN", "[nn]") {
    for (Type mask_type : {Type::F32, Type::F16}) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {17, 4, 2});
        fill_uniform(a);
        Tensor* mask = ctx.new_tensor(mask_type, {17, 4});
        std::vector<float> mv = random_values(17 * 4);
        for (int i = 0; i < 17; ++i) mv[size_t(17 * 2 + i)] = -kInf; // row 2 fully masked
        tensor_set_f32(mask, mv);
        Tensor* y = soft_max_ext(ctx, a, mask, 1.0f, 0.0f);
        check_forward(y, 1e-5);
        const std::vector<float> v = tensor_get_f32(y);
        for (int64_t h = 0; h < 2; ++h)
            for (int64_t r = 0; r < 4; ++r) {
                double total = 0.0;
                for (int64_t i = 0; i < 17; ++i) {
                    const float x = v[size_t((h * 4 + r) * 17 + i)];
                    REQUIRE(!std::isnan(x));
                    total += x;
                }
                CHECK(total == Approx(r == 2 ? 0.0 : 1.0).margin(1e-5));
            }
    }
}

TEST_CASE("diag_mask_inf masks columns past row + n_past", "[nn]") {
    for (int n_past : {0, 2, 40}) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {17, 6, 3});
        fill_uniform(a);
        Tensor* y = diag_mask_inf(ctx, a, n_past);
        check_forward(y, 0.0);
        const std::vector<float> v = tensor_get_f32(y);
        const std::vector<float> x = tensor_get_f32(a);
        for (int64_t r = 0; r < 6 * 3; ++r)
            for (int64_t c = 0; c < 17; ++c) {
                const size_t k = size_t(r * 17 + c);
                if (c > r % 6 + n_past)
                    CHECK(v[k] == -kInf);
                else
                    CHECK(v[k] == x[k]);
            }
    }
}

TEST_CASE("activations match the reference", "[nn]") {
    for (int64_t n : kRowLengths) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {n, 7, 2});
        Tensor* b = ctx.new_tensor(Type::F32, {n, 7, 2});
        fill_uniform(a, -8.0f, 8.0f);
        fill_uniform(b, -2.0f, 2.0f);
        INFO("row length " << n);
        check_forward(silu(ctx, a), 1e-5);
        check_forward(gelu(ctx, a, GeluApprox::Tanh), 1e-5);
        check_forward(gelu(ctx, a, GeluApprox::Erf), 1e-5);
        check_forward(relu(ctx, a), 0.0);
        check_forward(swiglu(ctx, a, b), 1e-5);
        check_forward(swiglu(ctx, transpose(ctx, a), transpose(ctx, b)), 1e-5);
    }
    // Extreme inputs stay finite (exp overflow inside the sigmoid must not leak NaN).
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {6});
    tensor_set_f32(a, {-200.0f, -90.0f, -0.0f, 0.0f, 90.0f, 200.0f});
    check_forward(silu(ctx, a), 1e-6);
    check_forward(gelu(ctx, a, GeluApprox::Tanh), 1e-6);
    check_forward(gelu(ctx, a, GeluApprox::Erf), 1e-6);
}

TEST_CASE("the two gelu approximations are close but distinct", "[nn]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {101});
    std::vector<float> x(101);
    for (int i = 0; i < 101; ++i) x[size_t(i)] = -5.0f + 0.1f * float(i);
    tensor_set_f32(a, x);
    Tensor* t = gelu(ctx, a, GeluApprox::Tanh);
    Tensor* e = gelu(ctx, a, GeluApprox::Erf);
    Graph g = build_forward(t);
    g.expand(e);
    test::compute_cpu(g);
    const std::vector<float> vt = tensor_get_f32(t), ve = tensor_get_f32(e);
    double max_diff = 0.0;
    for (size_t i = 0; i < vt.size(); ++i) max_diff = std::max(max_diff, double(std::fabs(vt[i] - ve[i])));
    CHECK(max_diff > 1e-5); // the tanh form is an approximation...
    CHECK(max_diff < 1e-2); // ...a good one
}

TEST_CASE("cross_entropy_loss is stable and matches the reference", "[nn]") {
    for (int64_t n : kRowLengths) {
        Context ctx = data_ctx();
        Tensor* logits = ctx.new_tensor(Type::F32, {n, 9, 2});
        Tensor* labels = ctx.new_tensor(Type::F32, {n, 9, 2});
        fill_uniform(logits, -60.0f, 60.0f); // exp would overflow without the max shift
        fill_probabilities(labels);
        INFO("classes " << n);
        check_forward(cross_entropy_loss(ctx, logits, labels), 1e-5);
        check_forward(cross_entropy_loss(ctx, logits, labels), 1e-5, 3);
    }
    // Hand check: uniform logits over 4 classes, one-hot labels: loss = log 4.
    Context ctx = data_ctx();
    Tensor* logits = ctx.new_tensor(Type::F32, {4, 2});
    Tensor* labels = ctx.new_tensor(Type::F32, {4, 2});
    tensor_set_f32(logits, std::vector<float>(8, 3.0f));
    tensor_set_f32(labels, {0, 1, 0, 0, 0, 0, 0, 1});
    Tensor* loss = cross_entropy_loss(ctx, logits, labels);
    test::compute_cpu(build_forward(loss));
    CHECK(tensor_get_f32(loss)[0] == Approx(std::log(4.0)).epsilon(1e-6));
    // The same as classes, and classes against one-hot rows on random logits.
    Tensor* classes = ctx.new_tensor(Type::I32, {2});
    test::set_i32(classes, {1, 3});
    Tensor* by_class = cross_entropy_loss(ctx, logits, classes);
    test::compute_cpu(build_forward(by_class));
    CHECK(tensor_get_f32(by_class)[0] == Approx(std::log(4.0)).epsilon(1e-6));
    for (int64_t n : kRowLengths) {
        Context c2 = data_ctx();
        Tensor* x = c2.new_tensor(Type::F32, {n, 5, 3});
        fill_uniform(x, -20.0f, 20.0f);
        const std::vector<int32_t> ids = test::random_indices(15, int32_t(n));
        Tensor* t = c2.new_tensor(Type::I32, {5, 3});
        test::set_i32(t, ids);
        std::vector<float> one_hot(size_t(n * 15), 0.0f);
        for (size_t r = 0; r < ids.size(); ++r) one_hot[r * size_t(n) + size_t(ids[r])] = 1.0f;
        Tensor* l = c2.new_tensor(Type::F32, {n, 5, 3});
        tensor_set_f32(l, one_hot);
        Tensor* a = cross_entropy_loss(c2, x, t);
        Tensor* b = cross_entropy_loss(c2, x, l);
        check_forward(a, 1e-5);
        test::compute_cpu(build_forward(b));
        INFO("classes " << n);
        CHECK(tensor_get_f32(a)[0] == Approx(tensor_get_f32(b)[0]).epsilon(1e-6));
    }
    // Bad labels: refused when built (shape, type) or run (a class out of range).
    Tensor* wrong = ctx.new_tensor(Type::I32, {3});
    CHECK_THROWS_WITH(cross_entropy_loss(ctx, logits, wrong), Catch::Contains("one class per row"));
    CHECK_THROWS_WITH(cross_entropy_loss(ctx, logits, ctx.new_tensor(Type::F16, {4, 2})),
                      Catch::Contains("f32 of the logits' shape, or i32 classes"));
    test::set_i32(classes, {1, 4});
    CHECK_THROWS_WITH(test::compute_cpu(build_forward(cross_entropy_loss(ctx, logits, classes))),
                      Catch::Contains("class 4 is out of range [0, 4)"));
}

// ---- gradients ---------------------------------------------------------------------------

TEST_CASE("norm and rms_norm gradients", "[nn][grad]") {
    for (int64_t n : {int64_t(1), int64_t(3), int64_t(17)}) {
        for (bool rms : {false, true}) {
            Context ctx = data_ctx();
            Tensor* a = ctx.new_tensor(Type::F32, {n, 3, 2});
            // Keeps the row statistics away from 0, where the norms bend too sharply for
            // finite differences: RMS norm of a 1-element row is x / sqrt(x^2 + eps).
            fill_away_from_zero(a, 0.3f, 2.0f);
            INFO("row length " << n << (rms ? " rms_norm" : " norm"));
            // A 1-element row's gradient, eps / (x^2 + eps)^1.5, is the difference of two
            // terms (x^2 + eps) / eps times larger than itself; in f32 with eps = 1e-3 that
            // lost the 1e-4 tolerance about once in a thousand draws. eps = 1e-2 keeps the
            // ratio under 400.
            const float eps = n == 1 ? 1e-2f : 1e-3f;
            Tensor* y = rms ? rms_norm(ctx, a, eps) : norm(ctx, a, eps);
            check_gradients(ctx, weighted_sum(ctx, y), {a}, 1e-4, 1e-4);
        }
    }
}

TEST_CASE("rope gradients in both modes", "[nn][grad]") {
    for (RopeMode mode : {RopeMode::Normal, RopeMode::NeoX}) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {11, 2, 3, 2});
        fill_uniform(a);
        Tensor* pos = positions(ctx, 3, 100);
        Tensor* y = rope(ctx, a, pos, RopeParams{6, mode, 10000.0f, 0.75f});
        check_gradients(ctx, weighted_sum(ctx, y), {a}, 1e-4);
        Tensor* factors = ctx.new_tensor(Type::F32, {3});
        fill_uniform(factors, 1.0f, 4.0f);
        Tensor* y2 = rope(ctx, a, pos, RopeParams{6, mode, 10000.0f, 0.75f}, factors);
        check_gradients(ctx, weighted_sum(ctx, y2), {a}, 1e-4);
    }
}

TEST_CASE("soft_max_ext gradients with masks, ALiBi and a fully masked row", "[nn][grad]") {
    for (float max_bias : {0.0f, 4.0f}) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {7, 3, 2});
        fill_uniform(a, -2.0f, 2.0f);
        Tensor* mask = ctx.new_tensor(Type::F16, {7, 3});
        std::vector<float> mv = random_values(21, -1.0f, 1.0f);
        mv[1] = -kInf;
        for (int i = 14; i < 21; ++i) mv[size_t(i)] = -kInf; // row 2 fully masked
        tensor_set_f32(mask, mv);
        Tensor* y = soft_max_ext(ctx, a, mask, 0.8f, max_bias);
        INFO("max_bias " << max_bias);
        check_gradients(ctx, weighted_sum(ctx, y), {a}, 1e-4);
    }
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {13, 4});
    fill_uniform(a, -2.0f, 2.0f);
    check_gradients(ctx, weighted_sum(ctx, soft_max(ctx, a)), {a}, 1e-4);
}

TEST_CASE("diag_mask_inf gradient flows only through kept entries", "[nn][grad]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {9, 5, 2});
    fill_uniform(a);
    Tensor* y = soft_max(ctx, diag_mask_inf(ctx, a, 1));
    Tensor* loss = weighted_sum(ctx, y);
    check_gradients(ctx, loss, {a}, 1e-4, 1e-3, 90);
}

TEST_CASE("activation gradients", "[nn][grad]") {
    for (int which = 0; which < 5; ++which) {
        Context ctx = data_ctx();
        Tensor* a = ctx.new_tensor(Type::F32, {17, 3});
        fill_away_from_zero(a, 0.05f, 4.0f);
        Tensor* y = which == 0   ? silu(ctx, a)
                    : which == 1 ? gelu(ctx, a, GeluApprox::Tanh)
                    : which == 2 ? gelu(ctx, a, GeluApprox::Erf)
                    : which == 3 ? relu(ctx, a)
                                 : mul(ctx, relu(ctx, a), silu(ctx, a));
        INFO("case " << which);
        check_gradients(ctx, weighted_sum(ctx, y), {a}, 1e-4);
    }
    Context ctx = data_ctx();
    Tensor* gate = ctx.new_tensor(Type::F32, {17, 3});
    Tensor* up = ctx.new_tensor(Type::F32, {17, 3});
    fill_uniform(gate, -4.0f, 4.0f);
    fill_uniform(up);
    check_gradients(ctx, weighted_sum(ctx, swiglu(ctx, gate, up)), {gate, up}, 1e-4);
}

TEST_CASE("cross_entropy_loss gradient, including labels that are not normalized", "[nn][grad]") {
    for (bool normalized : {true, false}) {
        Context ctx = data_ctx();
        Tensor* logits = ctx.new_tensor(Type::F32, {11, 3, 2});
        Tensor* labels = ctx.new_tensor(Type::F32, {11, 3, 2});
        fill_uniform(logits, -3.0f, 3.0f);
        if (normalized)
            fill_probabilities(labels);
        else
            fill_uniform(labels, 0.0f, 0.5f);
        INFO((normalized ? "probability labels" : "unnormalized labels"));
        // Scaling the loss checks that the upstream gradient is used.
        check_gradients(ctx, scale(ctx, cross_entropy_loss(ctx, logits, labels), 2.5f), {logits}, 1e-4);
    }
}

TEST_CASE("a small transformer block trains end to end", "[nn][grad]") {
    // rms_norm -> mul (learned gain) -> softmax -> silu -> cross_entropy_loss, plus a rope
    // and swiglu branch, differentiated with respect to the input and both weights.
    Context ctx = data_ctx();
    Tensor* x = ctx.new_tensor(Type::F32, {12, 2, 3});
    Tensor* gain = ctx.new_tensor(Type::F32, {12});
    Tensor* up = ctx.new_tensor(Type::F32, {12, 2, 3});
    Tensor* labels = ctx.new_tensor(Type::F32, {12, 2, 3});
    fill_uniform(x);
    fill_uniform(gain, 0.5f, 1.5f);
    fill_uniform(up);
    fill_probabilities(labels);
    Tensor* pos = positions(ctx, 3, 50);
    Tensor* h = mul(ctx, rms_norm(ctx, x, 1e-5f), gain);
    h = rope(ctx, h, pos, RopeParams{8, RopeMode::NeoX, 10000.0f, 1.0f});
    h = swiglu(ctx, h, up);
    Tensor* s = silu(ctx, soft_max_ext(ctx, h, nullptr, 3.0f, 0.0f));
    Tensor* loss = cross_entropy_loss(ctx, s, labels);
    check_gradients(ctx, loss, {x, gain, up}, 1e-4);
}

// ---- validation --------------------------------------------------------------------------

TEST_CASE("nn ops reject bad inputs with errors naming the op and shapes", "[nn][errors]") {
    Context ctx; // metadata only
    Tensor* a = ctx.new_tensor(Type::F32, {16, 4, 5, 2});
    Tensor* h = ctx.new_tensor(Type::F16, {16, 4});
    Tensor* pos5 = ctx.new_tensor(Type::I32, {5});
    Tensor* pos3 = ctx.new_tensor(Type::I32, {3});
    Tensor* posf = ctx.new_tensor(Type::F32, {5});

    CHECK_THROWS_WITH(norm(ctx, h, 1e-5f), Catch::Contains("norm") && Catch::Contains("f16[16,4,1,1]"));
    CHECK_THROWS_WITH(rms_norm(ctx, a, -1.0f), Catch::Contains("rms_norm") && Catch::Contains("eps"));

    const RopeParams ok{8, RopeMode::Normal, 10000.0f, 1.0f};
    CHECK_NOTHROW(rope(ctx, a, pos5, ok));
    CHECK_THROWS_WITH(rope(ctx, a, pos3, ok), Catch::Contains("rope") && Catch::Contains("i32[3,1,1,1]") &&
                                                  Catch::Contains("f32[16,4,5,2]"));
    CHECK_THROWS_WITH(rope(ctx, a, posf, ok), Catch::Contains("rope") && Catch::Contains("i32"));
    CHECK_THROWS_WITH(rope(ctx, a, pos5, RopeParams{7, RopeMode::Normal, 10000.0f, 1.0f}),
                      Catch::Contains("rope") && Catch::Contains("n_dims"));
    CHECK_THROWS_WITH(rope(ctx, a, pos5, RopeParams{18, RopeMode::NeoX, 10000.0f, 1.0f}),
                      Catch::Contains("n_dims"));
    CHECK_THROWS_WITH(rope(ctx, a, pos5, RopeParams{8, RopeMode(1), 10000.0f, 1.0f}),
                      Catch::Contains("mode"));
    CHECK_THROWS_WITH(rope(ctx, a, pos5, RopeParams{8, RopeMode::NeoX, 0.0f, 1.0f}),
                      Catch::Contains("freq_base"));

    Tensor* bad_mask = ctx.new_tensor(Type::F32, {15, 4});
    Tensor* short_mask = ctx.new_tensor(Type::F32, {16, 3});
    Tensor* head_mask = ctx.new_tensor(Type::F32, {16, 4, 3});
    Tensor* int_mask = ctx.new_tensor(Type::I32, {16, 4});
    CHECK_THROWS_WITH(soft_max_ext(ctx, a, bad_mask, 1.0f, 0.0f), Catch::Contains("soft_max") &&
                                                                      Catch::Contains("f32[15,4,1,1]") &&
                                                                      Catch::Contains("f32[16,4,5,2]"));
    CHECK_THROWS_WITH(soft_max_ext(ctx, a, short_mask, 1.0f, 0.0f), Catch::Contains("f32[16,3,1,1]"));
    CHECK_THROWS_WITH(soft_max_ext(ctx, a, head_mask, 1.0f, 0.0f), Catch::Contains("f32[16,4,3,1]"));
    CHECK_THROWS_WITH(soft_max_ext(ctx, a, int_mask, 1.0f, 0.0f), Catch::Contains("f32 or f16"));
    CHECK_THROWS_WITH(soft_max_ext(ctx, a, nullptr, 1.0f, 8.0f),
                      Catch::Contains("soft_max") && Catch::Contains("mask"));
    CHECK_THROWS_WITH(soft_max_ext(ctx, a, nullptr, 1.0f, -1.0f), Catch::Contains("max_bias"));
    CHECK_THROWS_WITH(soft_max(ctx, h), Catch::Contains("soft_max") && Catch::Contains("f16[16,4,1,1]"));
    CHECK_THROWS_WITH(diag_mask_inf(ctx, a, -1),
                      Catch::Contains("diag_mask_inf") && Catch::Contains("n_past"));

    Tensor* b = ctx.new_tensor(Type::F32, {16, 4});
    CHECK_THROWS_WITH(swiglu(ctx, a, b), Catch::Contains("swiglu") && Catch::Contains("f32[16,4,5,2]") &&
                                             Catch::Contains("f32[16,4,1,1]"));
    CHECK_THROWS_WITH(silu(ctx, h), Catch::Contains("silu") && Catch::Contains("f16"));
    CHECK_THROWS_WITH(gelu(ctx, a, GeluApprox(7)),
                      Catch::Contains("gelu") && Catch::Contains("approximation"));
    CHECK_THROWS_WITH(relu(ctx, nullptr), Catch::Contains("relu"));
    CHECK_THROWS_WITH(cross_entropy_loss(ctx, a, b), Catch::Contains("cross_entropy_loss") &&
                                                         Catch::Contains("f32[16,4,5,2]") &&
                                                         Catch::Contains("f32[16,4,1,1]"));
}

TEST_CASE("nn ops run unchanged on more threads than rows", "[nn]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {33});
    Tensor* l = ctx.new_tensor(Type::F32, {33});
    fill_uniform(a);
    fill_probabilities(l);
    check_forward(soft_max(ctx, a), 1e-5, 4);
    check_forward(cross_entropy_loss(ctx, a, l), 1e-5, 4);
    check_forward(rms_norm(ctx, a, 1e-6f), 1e-5, 4);
}

TEST_CASE("the zero-filling causal mask (diag_mask_inf's gradient) and its own gradient", "[nn][grad]") {
    Context ctx = data_ctx();
    Tensor* a = ctx.new_tensor(Type::F32, {9, 5, 2});
    fill_uniform(a);
    check_forward(diag_mask_fill(ctx, a, 2, 0.0f), 0.0);
    check_gradients(ctx, weighted_sum(ctx, diag_mask_fill(ctx, a, 1, 0.0f)), {a}, 1e-5, 1e-3, 90);
}
