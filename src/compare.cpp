// Numerics comparison against the reference evaluator, and the built-in suite.
#include "compare.h"

#include <ggml-fa/ops.h>
#include <ggml-fa/scheduler.h>

#include "op_def.h"
#include "reference.h"

#include <cmath>
#include <span>
#include <cstring>
#include <limits>

namespace gfa::compare {

double normalized_error(const std::vector<float>& out, const std::vector<double>& ref) {
    constexpr double kInf = std::numeric_limits<double>::infinity();
    if (out.size() != ref.size()) return kInf;
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < out.size(); ++i) {
        const double x = out[i], r = ref[i];
        if (std::isnan(x)) return kInf; // NaN never passes
        if (!std::isfinite(r)) {
            if (x != r) return kInf; // -inf must stay -inf
            continue;
        }
        if (!std::isfinite(x)) return kInf;
        num += (x - r) * (x - r);
        den += r * r;
    }
    return den > 1e-30 ? std::sqrt(num / den) : std::sqrt(num);
}

std::vector<float> read_values(const Tensor* t) {
    std::vector<float> out(size_t(t->nelements()));
    if (out.empty()) return out;
    const TypeTraits& tt = type_traits(t->type);
    if (tt.block_size > 1) {
        std::vector<std::byte> bytes(t->nbytes());
        tensor_get(t, bytes.data(), 0, bytes.size());
        if (!t->is_contiguous()) fail("compare: cannot read a strided quantized tensor " + t->shape_str());
        tt.to_float(bytes.data(), out.data(), t->nelements());
        return out;
    }
    // Bytes up to the last element, whatever the order of the strides (a transposed view's
    // dim 0 is not its smallest stride), read through the memory owner.
    size_t span = tt.type_size;
    for (int i = 0; i < kMaxDims; ++i) span += size_t(t->ne[i] - 1) * t->nb[i];
    std::vector<std::byte> bytes(span);
    const Tensor* owner = t->view_src ? t->view_src : t;
    tensor_get(owner, bytes.data(), t->view_src ? t->view_offs : 0, span);
    size_t k = 0;
    ref::for_each_index(t, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        const std::byte* p = bytes.data() + i0 * t->nb[0] + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3];
        float v = 0.0f;
        switch (t->type) {
        case Type::I32: {
            int32_t i;
            std::memcpy(&i, p, sizeof i);
            v = float(i);
            break;
        }
        default:
            if (!tt.to_float) fail("compare: cannot read values of type " + std::string(tt.name));
            tt.to_float(p, &v, 1);
        }
        out[k++] = v;
    });
    return out;
}

namespace {

void default_init(Tensor* leaf, std::mt19937& rng) {
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    std::vector<float> v(size_t(leaf->nelements()));
    for (float& x : v) x = d(rng);
    tensor_set_f32(leaf, v);
}

} // namespace

std::string node_label(size_t index, const Tensor* n) {
    std::string s("#");
    s += std::to_string(index);
    s += ' ';
    s += op_name(n->op);
    s += ' ';
    s += n->shape_str();
    if (!n->name.empty()) s += " '" + n->name + "'";
    return s;
}

Report run(Graph& graph, Backend& backend, Backend* fallback, std::mt19937& rng,
           const std::unordered_map<const Tensor*, LeafInit>& inits) {
    Report report;
    // Keep every computed node's memory to itself for the run.
    std::vector<std::pair<Tensor*, uint32_t>> saved_flags;
    for (Tensor* n : graph.nodes()) {
        saved_flags.push_back({n, n->flags});
        if (!n->view_src) n->flags |= kFlagOutput;
    }
    struct Restore {
        std::vector<std::pair<Tensor*, uint32_t>>& saved;
        ~Restore() {
            for (auto& [t, f] : saved) t->flags = f;
        }
    } restore{saved_flags};

    std::vector<Tensor*> fresh;
    for (Tensor* l : graph.leafs())
        if (!l->data) fresh.push_back(l);

    std::vector<Backend*> order{&backend};
    if (fallback && fallback != &backend) order.push_back(fallback);
    Scheduler sched(order);
    sched.set_log([&report](const std::string& line) { report.log.push_back(line); });
    sched.allocate(graph);
    for (Tensor* l : fresh) {
        auto it = inits.find(l);
        if (it != inits.end())
            it->second(l, rng);
        else
            default_init(l, rng);
    }

    // The reference reads the leaves now, before the run can update any of them in place.
    ref::Evaluator ev(graph);
    ev.run();

    for (Tensor* n : graph.nodes()) {
        if (n->view_src || !n->data || n->alloc_bytes() == 0) continue;
        std::vector<uint8_t> nan(n->alloc_bytes(), 0xFF);
        tensor_set(n, nan.data(), 0, nan.size());
    }
    sched.compute(graph);
    report.n_splits = sched.n_splits();
    report.n_copies = sched.n_copies();

    const auto& nodes = graph.nodes();
    for (size_t i = 0; i < nodes.size(); ++i) {
        const Tensor* n = nodes[i];
        // Views of leaves only repeat their inputs; views of nodes (the LSE behind an
        // attention output, dK/dV inside the attention backward) are results of their own.
        if (op_def(n->op).is_view && n->view_src->op == Op::None) continue;
        NodeResult r{n, node_label(i, n), sched.backend_of(n) ? sched.backend_of(n)->name() : "?",
                     normalized_error(read_values(n), ev.values(n))};
        if (report.worst_index < 0 || !(r.error <= report.worst)) {
            report.worst = r.error;
            report.worst_index = int(report.nodes.size());
        }
        report.nodes.push_back(std::move(r));
    }
    return report;
}

// ---- a model, node by node -----------------------------------------------------------------

Report compare_traces(const std::vector<TracedNode>& got, const std::vector<TracedNode>& want) {
    if (got.size() != want.size())
        fail("compare: the traced graphs differ (" + std::to_string(got.size()) + " and " +
             std::to_string(want.size()) + " nodes)");
    Report report;
    for (size_t i = 0; i < got.size(); ++i) {
        if (got[i].label != want[i].label || got[i].values.size() != want[i].values.size())
            fail("compare: the traced graphs differ at node " + got[i].label + " / " + want[i].label);
        const std::vector<double> ref(want[i].values.begin(), want[i].values.end());
        NodeResult r{nullptr, got[i].label, got[i].backend, normalized_error(got[i].values, ref)};
        if (report.worst_index < 0 || !(r.error <= report.worst)) {
            report.worst = r.error;
            report.worst_index = int(report.nodes.size());
        }
        report.nodes.push_back(std::move(r));
    }
    return report;
}

ModelComparison compare_model(const std::string& path, Device* device, const std::vector<int32_t>& prompt,
                              int decode_steps, Type kv_type, int n_threads) {
    if (prompt.empty()) fail("compare: the model comparison needs at least one prompt token");
    ModelLoadOptions on_device;
    on_device.gpu = device;
    on_device.gpu_layers = std::numeric_limits<int>::max(); // every block, the head, the embeddings
    const std::unique_ptr<Model> cpu_model = Model::load(path), dev_model = Model::load(path, on_device);
    SessionOptions so;
    so.n_ctx = int64_t(prompt.size()) + decode_steps;
    so.n_batch = so.n_ctx;
    so.kv_type = kv_type;
    so.n_threads = n_threads;
    so.trace_nodes = true;
    so.decode_window_step = 16;
    Session cpu(*cpu_model, so), dev(*dev_model, so);

    ModelComparison out;
    auto step = [&](std::span<const int32_t> tokens, std::string what) {
        cpu.eval(tokens, true);
        dev.eval(tokens, true);
        out.evals.push_back(std::move(what));
        out.reports.push_back(compare_traces(dev.traced_nodes(), cpu.traced_nodes()));
    };
    step(prompt, "prompt (" + std::to_string(prompt.size()) + " tokens)");
    // The decoding steps feed back the prompt's tokens: any ids in the vocabulary will do.
    for (int i = 0; i < decode_steps; ++i)
        step(std::span(&prompt[size_t(i) % prompt.size()], 1), "decode step " + std::to_string(i + 1));
    return out;
}

// ---- CaseBuilder --------------------------------------------------------------------------

Tensor* CaseBuilder::input(std::initializer_list<int64_t> ne, float lo, float hi, Type type) {
    Tensor* t = ctx.new_tensor(type, ne);
    set_input(t);
    inits_[t] = [lo, hi](Tensor* leaf, std::mt19937& rng) {
        std::uniform_real_distribution<float> d(lo, hi);
        std::vector<float> v(size_t(leaf->nelements()));
        for (float& x : v) x = d(rng);
        tensor_set_f32(leaf, v);
    };
    return t;
}

Tensor* CaseBuilder::causal_mask(int64_t Skv, int64_t Sq, int64_t band, Type type) {
    Tensor* t = ctx.new_tensor(type, {Skv, Sq});
    set_input(t);
    inits_[t] = [Skv, Sq, band](Tensor* leaf, std::mt19937& rng) {
        std::uniform_real_distribution<float> d(-2.0f, 0.0f);
        std::vector<float> v(size_t(Skv * Sq));
        for (int64_t i = 0; i < Sq; ++i)
            for (int64_t j = 0; j < Skv; ++j) {
                const int64_t ahead = j - (i + Skv - Sq); // > 0: after the diagonal
                v[size_t(i * Skv + j)] = ahead > 0       ? -std::numeric_limits<float>::infinity()
                                         : ahead > -band ? d(rng)
                                                         : 0.0f;
            }
        tensor_set_f32(leaf, v);
    };
    return t;
}

Tensor* CaseBuilder::param(std::initializer_list<int64_t> ne, float lo, float hi) {
    Tensor* t = input(ne, lo, hi);
    set_param(t);
    has_params_ = true;
    return t;
}

Tensor* CaseBuilder::constant(std::vector<float> values) {
    Tensor* t = ctx.new_tensor(Type::F32, {int64_t(values.size())});
    set_input(t);
    inits_[t] = [values = std::move(values)](Tensor* leaf, std::mt19937&) { tensor_set_f32(leaf, values); };
    return t;
}

Tensor* CaseBuilder::indices(std::initializer_list<int64_t> ne, int32_t limit) {
    Tensor* t = ctx.new_tensor(Type::I32, ne);
    set_input(t);
    inits_[t] = [limit](Tensor* leaf, std::mt19937& rng) {
        std::uniform_int_distribution<int32_t> d(0, limit - 1);
        std::vector<int32_t> v(size_t(leaf->nelements()));
        for (int32_t& x : v) x = d(rng);
        tensor_set(leaf, v.data(), 0, v.size() * sizeof(int32_t));
    };
    return t;
}

Tensor* CaseBuilder::shape(std::initializer_list<int64_t> ne) {
    return ctx.new_tensor(Type::F32, ne);
}

CaseResult run_case(const Case& c, Backend& backend, Backend* fallback, uint32_t seed) {
    CaseResult result;
    result.name = c.name;
    result.tol = c.gpu_tol > 0.0 && backend.device()->kind() == DeviceKind::GPU ? c.gpu_tol : c.tol;
    try {
        Context ctx;
        CaseBuilder b(ctx);
        Tensor* out = c.build(b);
        Graph graph = build_forward(out);
        if (b.has_params()) {
            set_loss(out);
            build_backward(ctx, graph, out);
        }
        std::mt19937 rng(seed);
        result.report = run(graph, backend, fallback, rng, b.inits());
    } catch (const std::exception& e) {
        result.error = e.what();
    }
    return result;
}

// ---- the suite: one line per graph --------------------------------------------------------

namespace {

// A scalar loss from any f32 tensor (so a case can run its backward pass).
Tensor* loss_of(Context& ctx, Tensor* t) {
    return sum(ctx, sqr(ctx, t));
}

} // namespace

const std::vector<Case>& builtin_suite() {
    using B = CaseBuilder;
    static const std::vector<Case> suite = {
        // element-wise (b broadcast over a)
        {"add", 1e-6,
         [](B& b) {
             return add(b.ctx, b.input({17, 5, 3}), b.input({17, 1, 3}));
         }},
        {"sub", 1e-6,
         [](B& b) {
             return sub(b.ctx, b.input({17, 5, 3}), b.input({1, 5, 3}));
         }},
        {"mul", 1e-6,
         [](B& b) {
             return mul(b.ctx, b.input({33, 3, 2, 2}), b.input({33, 3, 1, 2}));
         }},
        {"div", 1e-6,
         [](B& b) {
             return div(b.ctx, b.input({113, 3}), b.input({113, 1}, 0.5f, 2.0f));
         }},
        {"scale", 1e-6,
         [](B& b) {
             return scale(b.ctx, b.input({17, 3}), -1.5f, 0.25f);
         }},
        {"sqr", 1e-6,
         [](B& b) {
             return sqr(b.ctx, b.input({17, 3}));
         }},
        {"sqrt", 1e-6,
         [](B& b) {
             return sqrt(b.ctx, b.input({17, 3}, 0.01f, 4.0f));
         }},
        {"exp", 1e-6,
         [](B& b) {
             return exp(b.ctx, b.input({17, 3}, -4.0f, 4.0f));
         }},
        {"log", 1e-6,
         [](B& b) {
             return log(b.ctx, b.input({17, 3}, 0.01f, 4.0f));
         }},
        {"neg", 0.0,
         [](B& b) {
             return neg(b.ctx, b.input({1, 3}));
         }},
        {"tanh", 1e-6,
         [](B& b) {
             return tanh(b.ctx, b.input({17, 3}, -30.0f, 30.0f)); // saturated ends included
         }},
        // reductions
        {"sum", 1e-6,
         [](B& b) {
             return sum(b.ctx, b.input({113, 17}));
         }},
        {"sum_rows", 1e-6,
         [](B& b) {
             return sum_rows(b.ctx, b.input({113, 5, 3}));
         }},
        {"mean", 1e-6,
         [](B& b) {
             return mean(b.ctx, b.input({3, 17, 2}));
         }},
        // data movement
        {"fill", 0.0,
         [](B& b) {
             return add(b.ctx, fill(b.ctx, Type::F32, {17, 3}, 0.5f), b.input({17, 3}));
         }},
        {"cont.permute", 0.0,
         [](B& b) {
             return cont(b.ctx, permute(b.ctx, b.input({6, 5, 3, 2}), 2, 0, 3, 1));
         }},
        {"cont.transpose", 0.0,
         [](B& b) {
             return cont(b.ctx, transpose(b.ctx, b.input({17, 3})));
         }},
        {"cast.f16", 1e-3,
         [](B& b) {
             return cast(b.ctx, cast(b.ctx, b.input({64, 3}), Type::F16), Type::F32);
         }},
        {"cast.bf16", 1e-2,
         [](B& b) {
             return cast(b.ctx, cast(b.ctx, b.input({64, 3}), Type::BF16), Type::F32);
         }},
        {"cast.q8_0", 1e-2,
         [](B& b) {
             return cast(b.ctx, cast(b.ctx, b.input({64, 3}), Type::Q8_0), Type::F32);
         }},
        {"cpy", 0.0,
         [](B& b) {
             return cpy(b.ctx, b.input({17, 3}), b.input({51}));
         }},
        {"get_rows", 0.0,
         [](B& b) {
             return get_rows(b.ctx, b.input({7, 11}), b.indices({5}, 11));
         }},
        {"set_rows", 1e-3,
         [](B& b) {
             return set_rows(b.ctx, b.input({7, 12}, -1, 1, Type::F16), b.input({7, 1}), b.indices({1}, 12));
         }},
        {"concat", 0.0,
         [](B& b) {
             return concat(b.ctx, b.input({3, 4, 2}), b.input({3, 5, 2}), 1);
         }},
        {"repeat", 0.0,
         [](B& b) {
             return repeat(b.ctx, b.input({3, 1, 2}), b.shape({6, 4, 2}));
         }},
        // training
        {"adamw", 1e-6,
         [](B& b) {
             const auto values = adamw_values({.lr = 0.01f, .weight_decay = 0.1f, .step = 3});
             return adamw_step(b.ctx, b.input({17, 3}), b.input({17, 3}), b.input({17, 3}),
                               b.input({17, 3}, 0.0f, 1.0f), b.constant({values.begin(), values.end()}));
         }},
        {"adamw_clipped", 1e-6,
         [](B& b) {
             const auto values = adamw_values({.lr = 0.01f, .step = 2, .grad_clip = 0.5f});
             return adamw_step(b.ctx, b.input({17, 3}), b.input({17, 3}), b.input({17, 3}),
                               b.input({17, 3}, 0.0f, 1.0f), b.constant({values.begin(), values.end()}),
                               b.constant({4.0f}));
         }},
        // attention: q [D, Sq, Hq], k/v [D, Skv, Hkv] (GQA), optional mask [Skv, Sq], LSE
        {"flash_attn", 1e-5,
         [](B& b) {
             return flash_attn_ext(b.ctx, b.input({64, 17, 4}), b.input({64, 33, 2}), b.input({64, 33, 2}),
                                   nullptr, {.scale = 0.125f, .causal = true});
         },
         1e-2},
        {"flash_attn.mask.f16", 1e-3,
         [](B& b) {
             Tensor* k = cast(b.ctx, b.input({64, 33, 2}), Type::F16);
             Tensor* v = cast(b.ctx, b.input({64, 33, 2}), Type::F16);
             Tensor* mask = b.input({33, 3}, -2.0f, 0.0f, Type::F16);
             return flash_attn_ext(b.ctx, b.input({64, 3, 2}), k, v, mask,
                                   {.scale = 0.125f, .logit_softcap = 2.0f});
         },
         1e-2},
        // causal attention given as a mask, over several tiles of the GPU kernels (which then
        // skip the hidden tiles and read no values in the zero ones)
        {"flash_attn.mask.causal", 1e-3,
         [](B& b) {
             Tensor* k = cast(b.ctx, b.input({64, 300, 2}), Type::F16);
             Tensor* v = cast(b.ctx, b.input({64, 300, 2}), Type::F16);
             return flash_attn_ext(b.ctx, b.input({64, 200, 4}), k, v, b.causal_mask(300, 200, 24, Type::F16),
                                   {.scale = 0.125f});
         },
         1e-2},
        {"flash_attn.lse", 1e-5,
         [](B& b) {
             Tensor* o = flash_attn_ext(b.ctx, b.input({32, 5, 2}), b.input({32, 7, 1}), b.input({32, 7, 1}),
                                        nullptr, {.scale = 0.2f}, nullptr, {.with_lse = true});
             return flash_attn_lse(b.ctx, o);
         },
         1e-2},
        // gradients (forward + backward graphs)
        {"grad.flash_attn", 1e-5,
         [](B& b) {
             Tensor *q = b.param({16, 5, 4}), *k = b.param({16, 7, 2}), *v = b.param({16, 7, 2});
             Tensor* o =
                 flash_attn_ext(b.ctx, q, k, v, nullptr, {.scale = 0.4f, .causal = true}, b.input({4}));
             return loss_of(b.ctx, o); // a sum of squares: no cancellation to amplify rounding
         },
         1e-2},
        {"grad.flash_attn.mask.causal", 1e-5,
         [](B& b) {
             Tensor *q = b.param({32, 150, 2}), *k = b.param({32, 230, 1}), *v = b.param({32, 230, 1});
             Tensor* o =
                 flash_attn_ext(b.ctx, q, k, v, b.causal_mask(230, 150, 16, Type::F16), {.scale = 0.3f});
             return loss_of(b.ctx, o);
         },
         1e-2},
        {"grad.elementwise", 1e-5,
         [](B& b) {
             Tensor *x = b.param({5, 3, 2}, 0.5f, 1.5f), *y = b.param({5, 1, 2}, 0.5f, 1.5f);
             Tensor* t = div(b.ctx, mul(b.ctx, add(b.ctx, x, y), sub(b.ctx, x, y)), y);
             return loss_of(b.ctx, log(b.ctx, sqrt(b.ctx, exp(b.ctx, scale(b.ctx, t, 0.7f, 0.1f)))));
         }},
        {"grad.movement", 1e-5,
         [](B& b) {
             Tensor *emb = b.param({7, 11}), *x = b.param({3, 4, 2});
             Tensor* rows = get_rows(b.ctx, emb, b.indices({5}, 11));
             Tensor* cat = concat(b.ctx, x, x, 1);
             Tensor* rep = repeat(b.ctx, cat, b.shape({6, 8, 2}));
             return add(b.ctx, loss_of(b.ctx, rows),
                        mean(b.ctx, reshape(b.ctx, cont(b.ctx, transpose(b.ctx, rep)), {96})));
         }},
        // matrix products: weights of every type against f32 activations (odd M and N)
        {"mul_mat.f32", 1e-5,
         [](B& b) {
             return mul_mat(b.ctx, b.input({96, 17, 2}), b.input({96, 5, 4}));
         }},
        {"mul_mat.f16", 1e-5,
         [](B& b) {
             return mul_mat(b.ctx, b.input({64, 17}, -1.0f, 1.0f, Type::F16), b.input({64, 9}));
         },
         1e-3},
        // (three columns: decoding, whose CPU product rounds them to f16 for 16-bit weights)
        {"mul_mat.bf16", 1e-3,
         [](B& b) {
             return mul_mat(b.ctx, b.input({64, 17}, -1.0f, 1.0f, Type::BF16), b.input({64, 3}));
         },
         1e-2},
        // the CPU quantizes a few activation columns to 8 bits for integer dot products
        {"mul_mat.q8_0", 1e-2,
         [](B& b) {
             return mul_mat(b.ctx, b.input({128, 33}, -1.0f, 1.0f, Type::Q8_0), b.input({128, 2}));
         }},
        {"mul_mat.q4_0", 1e-2,
         [](B& b) {
             return mul_mat(b.ctx, b.input({128, 33}, -1.0f, 1.0f, Type::Q4_0), b.input({128, 19}));
         }},
        {"out_prod", 1e-5,
         [](B& b) {
             return out_prod(b.ctx, b.input({7, 13}), b.input({5, 13}));
         }},
        // normalization, position encoding, softmax, activations, loss
        {"norm", 1e-5,
         [](B& b) {
             return norm(b.ctx, b.input({113, 3}), 1e-5f);
         }},
        {"rms_norm", 1e-5,
         [](B& b) {
             return rms_norm(b.ctx, b.input({17, 5, 2}), 1e-6f);
         }},
        {"rope.normal", 1e-5,
         [](B& b) {
             return rope(b.ctx, b.input({32, 3, 7}), b.indices({7}, 4096),
                         RopeParams{24, RopeMode::Normal, 10000.0f, 1.0f});
         }},
        {"rope.neox", 1e-5,
         [](B& b) {
             return rope(b.ctx, b.input({64, 2, 5}), b.indices({5}, 4096),
                         RopeParams{64, RopeMode::NeoX, 500000.0f, 0.5f});
         }},
        {"soft_max_ext.alibi", 1e-5,
         [](B& b) {
             return soft_max_ext(b.ctx, b.input({33, 5, 6}), b.input({33, 5}, -4.0f, 0.0f, Type::F16), 0.3f,
                                 8.0f);
         }},
        {"diag_mask_inf", 0.0,
         [](B& b) {
             return diag_mask_inf(b.ctx, b.input({9, 9, 2}), 0);
         }},
        {"silu", 1e-5,
         [](B& b) {
             return silu(b.ctx, b.input({113, 3}, -6.0f, 6.0f));
         }},
        {"gelu.tanh", 1e-5,
         [](B& b) {
             return gelu(b.ctx, b.input({113, 3}, -6.0f, 6.0f), GeluApprox::Tanh);
         }},
        {"gelu.erf", 1e-5,
         [](B& b) {
             return gelu(b.ctx, b.input({113, 3}, -6.0f, 6.0f), GeluApprox::Erf);
         }},
        {"relu", 0.0,
         [](B& b) {
             return relu(b.ctx, b.input({17, 3}));
         }},
        {"swiglu", 1e-5,
         [](B& b) {
             return swiglu(b.ctx, b.input({17, 3}), b.input({17, 3}));
         }},
        {"cross_entropy_loss", 1e-5,
         [](B& b) {
             return cross_entropy_loss(b.ctx, b.input({31, 7}, -5.0f, 5.0f), b.input({31, 7}, 0.0f, 1.0f));
         }},
        {"cross_entropy_loss.classes", 1e-5, // a class per row; trained through its gradient
         [](B& b) {
             return cross_entropy_loss(b.ctx, b.param({31, 7}, -5.0f, 5.0f), b.indices({7}, 31));
         }},
        {"grad.mlp", 1e-5,
         [](B& b) {
             Tensor *w1 = b.param({16, 24}), *w2 = b.param({24, 7}), *g = b.param({16});
             Tensor* x = mul(b.ctx, rms_norm(b.ctx, b.input({16, 5}), 1e-5f), g);
             Tensor* h = gelu(b.ctx, mul_mat(b.ctx, w1, x));
             return cross_entropy_loss(b.ctx, mul_mat(b.ctx, w2, silu(b.ctx, h)),
                                       b.input({7, 5}, 0.0f, 1.0f));
         }},
        {"grad.attention_block", 1e-5,
         [](B& b) {
             // weights kept small so the causal softmax stays smooth and f32 error stays small
             Tensor *wq = b.param({32, 32}, -0.3f, 0.3f), *x = b.param({32, 6});
             Tensor* q = reshape(b.ctx, mul_mat(b.ctx, wq, x), {16, 2, 6});
             Tensor* pos = b.indices({6}, 64);
             q = rope(b.ctx, q, pos, RopeParams{16, RopeMode::NeoX, 10000.0f, 1.0f});
             Tensor* qh = cont(b.ctx, permute(b.ctx, q, 0, 2, 1, 3)); // [16, 6, 2]
             Tensor* o = flash_attn_ext(b.ctx, qh, qh, qh, nullptr, {.scale = 0.25f, .causal = true});
             return loss_of(b.ctx, soft_max(b.ctx, reshape(b.ctx, o, {32, 6})));
         },
         1e-2},
    };
    return suite;
}

} // namespace gfa::compare
