#include "op_check.h"

#include "op_def.h"
#include "reference.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>

namespace gfa::test {

uint32_t seed() {
    // GFA_TEST_SEED=N repeats the run a failure printed its seed for.
    static const uint32_t s = [] {
        const char* v = std::getenv("GFA_TEST_SEED");
        return v ? uint32_t(std::strtoul(v, nullptr, 10)) : std::random_device{}();
    }();
    return s;
}

std::mt19937& rng() {
    static std::mt19937 g(seed());
    return g;
}

std::vector<float> random_values(size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (float& x : v) x = d(rng());
    return v;
}

void fill_uniform(Tensor* t, float lo, float hi) {
    tensor_set_f32(t, random_values(size_t(t->nelements()), lo, hi));
}

void set_i32(Tensor* t, const std::vector<int32_t>& v) {
    REQUIRE(int64_t(v.size()) == t->nelements());
    tensor_set(t, v.data(), 0, v.size() * sizeof(int32_t));
}

std::vector<int32_t> random_indices(size_t n, int32_t limit) {
    std::uniform_int_distribution<int32_t> d(0, limit - 1);
    std::vector<int32_t> v(n);
    for (auto& x : v) x = d(rng());
    return v;
}

std::vector<int32_t> expert_choices(int64_t E, int64_t k, int64_t T, bool crowded) {
    std::vector<int32_t> ids, all(static_cast<size_t>(E));
    for (int64_t t = 0; t < T; ++t) {
        std::iota(all.begin(), all.end(), 0);
        std::shuffle(all.begin(), all.end(), rng());
        if (crowded) std::iter_swap(all.begin(), std::find(all.begin(), all.end(), 0));
        ids.insert(ids.end(), all.begin(), all.begin() + k);
    }
    return ids;
}

ExpertInputs expert_inputs(Context& ctx, Type type, int64_t K, int64_t M, int64_t E, int64_t Nb, int64_t k,
                           int64_t T, bool crowded) {
    ExpertInputs in{ctx.new_tensor(type, {K, M, E}), ctx.new_tensor(Type::F32, {K, Nb, T}),
                    ctx.new_tensor(Type::I32, {k, T})};
    fill_uniform(in.as);
    fill_uniform(in.b);
    set_i32(in.ids, expert_choices(E, k, T, crowded));
    return in;
}

std::vector<float> cpu_dequantized(const Tensor* a) {
    const int64_t K = a->ne[0], rows = a->ne[1] * a->ne[2] * a->ne[3];
    std::vector<float> out(size_t(K * rows));
    for (int64_t r = 0; r < rows; ++r)
        type_traits(a->type).to_float(static_cast<const char*>(a->data) + r * a->nb[1], out.data() + r * K,
                                      K);
    return out;
}

void poison_nodes(const Graph& g) {
    for (Tensor* n : g.nodes()) {
        if (!n->data || n->is_view() || op_def(n->op).is_view) continue;
        std::vector<uint8_t> nan(n->alloc_bytes(), 0xFF);
        tensor_set(n, nan.data(), 0, nan.size());
    }
}

void compute_cpu(const Graph& g, int n_threads) {
    poison_nodes(g);
    auto backend = make_cpu_backend(n_threads);
    backend->compute(g.nodes());
}

double rel_error(const std::vector<float>& out, const std::vector<double>& ref) {
    REQUIRE(out.size() == ref.size());
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < out.size(); ++i) {
        if (!std::isfinite(out[i]) && std::isfinite(ref[i])) return std::numeric_limits<double>::infinity();
        if (std::isnan(ref[i]) && !std::isnan(out[i])) return std::numeric_limits<double>::infinity();
        if (!std::isfinite(ref[i])) {
            if (out[i] != ref[i] && !(std::isnan(out[i]) && std::isnan(ref[i])))
                return std::numeric_limits<double>::infinity();
            continue;
        }
        const double d = double(out[i]) - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    return den > 1e-30 ? std::sqrt(num / den) : std::sqrt(num);
}

double check_forward(Tensor* out, double tol, int n_threads) {
    INFO("seed " << seed() << ", output " << out->shape_str() << " made by " << op_name(out->op));
    Graph g = build_forward(out);
    const std::vector<double> ref = ref::evaluate(g, out);
    compute_cpu(g, n_threads);
    const double err = rel_error(tensor_get_f32(out), ref);
    INFO("relative error " << err << " (tolerance " << tol << ")");
    CHECK(err <= tol);
    return err;
}

std::vector<double> reference_gradient(Tensor* loss, Tensor* param, const std::vector<size_t>& elements,
                                       double eps) {
    Graph forward = build_forward(loss);
    ref::Evaluator ev(forward);
    const std::vector<double> base = ev.values(param);
    std::vector<double> numeric;
    auto loss_at = [&](size_t i, double offset) {
        std::vector<double> v = base;
        v[i] = base[i] + offset;
        ev.set_values(param, v);
        ev.run();
        return ev.values(loss)[0];
    };
    for (size_t i : elements) {
        // Fourth-order central differences: the two-point formula's error (eps^2 times the third
        // derivative / 6) reached 1% where a small embedding row meets an RMS norm (a training
        // test, one seed in a few hundred); this one's grows with eps^4.
        const double up1 = loss_at(i, eps), down1 = loss_at(i, -eps);
        const double up2 = loss_at(i, 2 * eps), down2 = loss_at(i, -2 * eps);
        numeric.push_back((8 * (up1 - down1) - (up2 - down2)) / (12 * eps));
    }
    return numeric;
}

void check_gradients(Context& ctx, Tensor* loss, const std::vector<Tensor*>& params, double tol, double eps,
                     int max_elements) {
    INFO("seed " << seed() << ", loss made by " << op_name(loss->op));
    for (Tensor* p : params) set_param(p);
    set_loss(loss);

    // Finite differences of the reference, in double precision.
    std::vector<std::vector<double>> numeric(params.size());
    std::vector<std::vector<size_t>> picked(params.size());
    for (size_t pi = 0; pi < params.size(); ++pi) {
        std::vector<size_t> idx(size_t(params[pi]->nelements()));
        for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
        std::shuffle(idx.begin(), idx.end(), rng());
        if (idx.size() > size_t(max_elements)) idx.resize(size_t(max_elements));
        numeric[pi] = reference_gradient(loss, params[pi], idx, eps);
        picked[pi] = idx;
    }

    // Analytic gradients from the graph, computed by the CPU backend.
    Graph g = build_forward(loss);
    build_backward(ctx, g, loss);
    compute_cpu(g);
    for (size_t pi = 0; pi < params.size(); ++pi) {
        Tensor* grad = g.grad(params[pi]);
        REQUIRE(grad != nullptr);
        const std::vector<float> all = tensor_get_f32(grad);
        std::vector<float> analytic;
        for (size_t i : picked[pi]) analytic.push_back(all[i]);
        const double err = rel_error(analytic, numeric[pi]);
        INFO("parameter " << pi << " " << params[pi]->shape_str() << ": gradient relative error " << err
                          << " (tolerance " << tol << ")");
        CHECK(err <= tol);
    }
}

std::vector<float> run_on_device(Device* dev, const Graph& g, Tensor* out, bool constants_as_weights) {
    struct Saved {
        Tensor* t;
        void* data;
        Buffer* buffer;
    };
    // Host placements come back however the run ends (a failed run throws).
    struct Restore {
        std::vector<Saved> list;
        ~Restore() {
            for (const Saved& s : list) {
                s.t->data = s.data;
                s.t->buffer = s.buffer;
            }
        }
    } restore;
    std::vector<Saved>& saved = restore.list;
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
    auto is_weight = [&](const Tensor* t) {
        return constants_as_weights && t->op == Op::None && t->has_flag(kFlagConstant);
    };
    size_t total[2] = {0, 0}; // [0]: everything else, [1]: the weights
    std::vector<size_t> offsets;
    for (Tensor* t : owners) {
        size_t& end = total[is_weight(t) ? 1 : 0];
        offsets.push_back(end);
        end += (t->alloc_bytes() + align - 1) / align * align;
    }
    std::unique_ptr<Buffer> buf = dev->buffer_type()->allocate(total[0]);
    std::unique_ptr<Buffer> weights = total[1] ? dev->buffer_type()->allocate(total[1]) : nullptr;
    if (weights) weights->set_usage(BufferUsage::Weights);
    for (size_t i = 0; i < owners.size(); ++i) {
        Tensor* t = owners[i];
        std::vector<std::byte> host;
        if (t->op == Op::None && t->data) {
            host.resize(t->alloc_bytes());
            tensor_get(t, host.data(), 0, host.size());
        }
        (is_weight(t) ? weights : buf)->place(t, offsets[i]);
        if (!host.empty()) tensor_set(t, host.data(), 0, host.size());
    }
    for (Tensor* v : views) place_view(v);
    poison_nodes(g);

    auto backend = dev->create_backend();
    backend->compute(g.nodes());
    backend->synchronize();
    return tensor_get_f32(out);
}

void check_on_device(Device* dev, Tensor* out, double tol) {
    INFO("seed " << seed() << ", output " << out->shape_str() << " made by " << op_name(out->op) << " on "
                 << dev->name());
    Graph g = build_forward(out);
    for (Tensor* n : g.nodes()) {
        INFO("node " << op_name(n->op) << " " << n->shape_str());
        REQUIRE(dev->supports_op(n));
    }
    const std::vector<double> expected = ref::evaluate(g, out);
    const std::vector<float> got = run_on_device(dev, g, out);
    const double err = rel_error(got, expected);
    INFO("relative error " << err << " (tolerance " << tol << ")");
    CHECK(err <= tol);
}

} // namespace gfa::test
