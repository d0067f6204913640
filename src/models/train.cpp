// Training llama-family models (ggml-fa/train.h): f32 weights on one device, a training
// graph (forward, backward, AdamW) and an evaluation graph built once, each run by its own
// scheduler, so every step reuses its plan and memory.
#include "models/llama.h"

#include <ggml-fa/alloc.h>
#include <ggml-fa/graph.h>
#include <ggml-fa/scheduler.h>
#include <ggml-fa/train.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <random>

namespace gfa {

namespace {

// Every product of the forward graph may run at `precision` (the gradients' products, built
// after, inherit it from theirs).
void allow_precision(const Graph& graph, MatMulPrecision precision) {
    for (Tensor* n : graph.nodes())
        if (n->op == Op::MulMat || n->op == Op::OutProd) set_matmul_precision(n, precision);
}

void check_config(const ModelConfig& c, const TrainOptions& o) {
    auto positive = [](int64_t v) { return v > 0; };
    // Experts first: a Mixtral (llama) or Qwen3-MoE file is refused for what it is.
    if (c.n_expert > 0)
        fail("train: mixtures of experts (" + std::to_string(c.n_expert) + " experts) are not trained");
    if (c.arch != "llama" && c.arch != "qwen2" && c.arch != "qwen3" && c.arch != "gemma2" &&
        c.arch != "gemma3")
        fail("train: the architecture must be llama, qwen2, qwen3, gemma2 or gemma3, not \"" + c.arch + "\"");
    // What llama::read_config makes of each file, so that a saved model reads back the same.
    const bool gemma = c.arch == "gemma2" || c.arch == "gemma3";
    const bool qk_norm = c.arch == "qwen3" || c.arch == "gemma3";
    if (c.qk_norm != qk_norm)
        fail("train: " + c.arch +
             (qk_norm ? " models norm q and k per head (qk_norm must be set)"
                      : " models have no q/k norms (qk_norm must be off)"));
    if (!gemma && (c.post_norms || c.gelu_ffn || c.attn_softcap != 0.0f || c.final_softcap != 0.0f ||
                   c.sliding_window != 0 || c.embd_scale != 1.0f || c.attn_scale != 0.0f))
        fail("train: post norms, GeGLU, soft caps, windows and scaled embeddings or queries are Gemma's; " +
             c.arch + " has none");
    if (c.arch == "gemma3") {
        // What a gemma3 file implies (llama::read_config), so that a saved model reads back.
        const float attn_scale = 1.0f / std::sqrt(float(c.n_layer == 62 ? c.n_embd / c.n_head : c.head_dim));
        const RopeParams &r = c.rope, &rs = c.rope_sliding;
        if (!(c.post_norms && c.gelu_ffn && c.qk_norm && c.attn_softcap == 0.0f && c.sliding_pattern > 0 &&
              c.embd_scale == std::sqrt(float(c.n_embd)) && c.attn_scale == attn_scale &&
              rs.n_dims == r.n_dims && rs.mode == r.mode && rs.freq_scale == 1.0f))
            fail("train: a gemma3 model has post norms, GeGLU, q/k norms, no score cap, embeddings scaled by "
                 "sqrt(n_embd), unscaled rope on its sliding layers and the query scale its files imply");
    }
    if (c.arch == "gemma2") {
        // What a gemma2 file implies (llama::read_config), so that a saved model reads back.
        const float attn_scale = 1.0f / std::sqrt(float(c.n_layer == 46 ? c.n_embd / c.n_head : c.head_dim));
        const RopeParams &r = c.rope, &rs = c.rope_sliding;
        const bool same_rope = r.n_dims == rs.n_dims && r.mode == rs.mode && r.freq_base == rs.freq_base &&
                               r.freq_scale == rs.freq_scale;
        if (!(c.post_norms && c.gelu_ffn && c.tied_embeddings && c.sliding_window > 0 && c.attn_softcap > 0 &&
              c.final_softcap > 0 && c.embd_scale == std::sqrt(float(c.n_embd)) &&
              c.attn_scale == attn_scale && c.sliding_pattern == 2 && same_rope && !c.qk_norm))
            fail("train: a gemma2 model has post norms, GeGLU, tied embeddings, a sliding window on every "
                 "other layer with the same rope, both soft caps, embeddings scaled by sqrt(n_embd) and the "
                 "query scale its files imply");
    }
    if (!positive(c.n_vocab) || !positive(c.n_embd) || !positive(c.n_layer) || !positive(c.n_ff) ||
        !positive(c.n_head) || !positive(c.n_head_kv) || !positive(c.head_dim))
        fail("train: every size must be positive (vocabulary " + std::to_string(c.n_vocab) + ", embedding " +
             std::to_string(c.n_embd) + ", layers " + std::to_string(c.n_layer) + ", feed-forward " +
             std::to_string(c.n_ff) + ", heads " + std::to_string(c.n_head) + "/" +
             std::to_string(c.n_head_kv) + ", head size " + std::to_string(c.head_dim) + ")");
    if (c.n_head % c.n_head_kv != 0)
        fail("train: " + std::to_string(c.n_head) + " query heads cannot share " +
             std::to_string(c.n_head_kv) + " key/value heads evenly");
    const RopeMode mode = c.arch == "llama" ? RopeMode::Normal : RopeMode::NeoX;
    if (c.head_dim % 2 != 0 || c.rope.n_dims != c.head_dim || c.rope.mode != mode)
        fail("train: rope must turn the whole head (n_dims = head size, even) in " +
             std::string(mode == RopeMode::NeoX ? "NeoX" : "normal") + " mode, as " + c.arch + " does");
    if (o.n_ctx <= 0 || o.n_seq <= 0 || o.n_micro <= 0)
        fail("train: n_ctx, n_seq and n_micro must be positive, got " + std::to_string(o.n_ctx) + ", " +
             std::to_string(o.n_seq) + " and " + std::to_string(o.n_micro));
}

} // namespace

struct Trainer::Impl {
    ModelConfig config;
    TrainOptions options;
    Device* device = nullptr;
    Context weights_ctx;
    llama::Weights weights;
    std::vector<Tensor*> params;            // in creation order
    std::map<std::string, Tensor*> by_name; // GGUF names
    std::unique_ptr<Buffer> weights_buffer; // weights and optimizer state, on `device`
    std::unique_ptr<Backend> cpu, gpu;

    // One graph with its inputs and the scheduler that keeps its plan.
    struct Run {
        Context ctx;
        Graph graph;
        llama::TrainingIo io;
        std::unique_ptr<Scheduler> sched;
    };
    Run train, eval;
    // With micro-batches: the train graph adds each micro-batch's gradients / n_micro into
    // grad_acc (scaling what it held by keep: 0 for a step's first micro-batch, else 1), and
    // the update graph applies AdamW to them once per step.
    Run update;
    std::vector<Tensor*> grad_acc;
    Tensor* keep = nullptr;
    Optimizer optimizer;
    int64_t steps = 0;
    gguf::Metadata source; // metadata of the file the trainer started from

    // Writes the model (and with `moments` the optimizer state) as a GGUF file of its architecture.
    void write(const std::string& path, const gguf::Metadata& metadata, Type type, bool moments) const;

    std::vector<Backend*> backends() const {
        std::vector<Backend*> b{cpu.get()};
        if (gpu) b.insert(b.begin(), gpu.get()); // the device first, the CPU catching the rest
        return b;
    }

    Tensor* weight(const std::string& name, std::initializer_list<int64_t> ne) {
        Tensor* t = set_name(weights_ctx.new_tensor(Type::F32, ne), name);
        set_param(t);
        params.push_back(t);
        by_name[name] = t;
        return t;
    }

    // Sets the token, position and label inputs of `run` from n_seq sequences of `stride`
    // tokens (n_ctx + 1 with targets, n_ctx without).
    void set_inputs(Run& run, std::span<const int32_t> batch, bool with_targets) {
        const int64_t T = options.n_ctx, B = options.n_seq, V = config.n_vocab;
        const int64_t stride = with_targets ? T + 1 : T;
        if (int64_t(batch.size()) != stride * B)
            fail("train: a batch holds " + std::to_string(B) + " sequences of " + std::to_string(stride) +
                 " tokens (" + std::to_string(stride * B) + "), got " + std::to_string(batch.size()));
        for (int32_t id : batch)
            if (id < 0 || id >= V)
                fail("train: token id " + std::to_string(id) + " is outside the vocabulary of " +
                     std::to_string(V));
        std::vector<int32_t> tokens(static_cast<size_t>(T * B)), positions(static_cast<size_t>(T));
        std::vector<int32_t> labels(static_cast<size_t>(T * B), 0); // classes: the next tokens
        for (int64_t b = 0; b < B; ++b)
            for (int64_t t = 0; t < T; ++t) {
                tokens[size_t(b * T + t)] = batch[size_t(b * stride + t)];
                if (with_targets) labels[size_t(b * T + t)] = batch[size_t(b * stride + t + 1)];
            }
        for (int64_t t = 0; t < T; ++t) positions[size_t(t)] = int32_t(t);
        tensor_set(run.io.tokens, tokens.data(), 0, tokens.size() * sizeof(int32_t));
        tensor_set(run.io.positions, positions.data(), 0, positions.size() * sizeof(int32_t));
        tensor_set(run.io.labels, labels.data(), 0, labels.size() * sizeof(int32_t));
    }
};

Trainer::Trainer(const ModelConfig& config, const TrainOptions& options) : impl_(std::make_unique<Impl>()) {
    Impl& m = *impl_;
    check_config(config, options);
    m.config = config;
    m.config.n_ctx_train = options.n_ctx;
    m.options = options;
    m.device = options.device ? options.device : &cpu_device();
    const ModelConfig& c = m.config;
    const int64_t E = c.n_embd, Dq = c.n_head * c.head_dim, Dkv = c.n_head_kv * c.head_dim;

    // The weights, named and shaped as in a GGUF file of the architecture. Tied embeddings are
    // one tensor in both places; autodiff adds the two gradients.
    llama::Weights& w = m.weights;
    w.token_embd = m.weight("token_embd.weight", {E, c.n_vocab});
    for (int64_t l = 0; l < c.n_layer; ++l) {
        const std::string b = "blk." + std::to_string(l) + ".";
        llama::LayerWeights L;
        L.attn_norm = m.weight(b + "attn_norm.weight", {E});
        L.wq = m.weight(b + "attn_q.weight", {E, Dq});
        L.wk = m.weight(b + "attn_k.weight", {E, Dkv});
        L.wv = m.weight(b + "attn_v.weight", {E, Dkv});
        if (c.qkv_bias) {
            L.bq = m.weight(b + "attn_q.bias", {Dq});
            L.bk = m.weight(b + "attn_k.bias", {Dkv});
            L.bv = m.weight(b + "attn_v.bias", {Dkv});
        }
        L.wo = m.weight(b + "attn_output.weight", {Dq, E});
        L.ffn_norm = m.weight(b + "ffn_norm.weight", {E});
        L.ffn_gate = m.weight(b + "ffn_gate.weight", {E, c.n_ff});
        L.ffn_up = m.weight(b + "ffn_up.weight", {E, c.n_ff});
        L.ffn_down = m.weight(b + "ffn_down.weight", {c.n_ff, E});
        if (c.post_norms) {
            L.attn_post_norm = m.weight(b + "post_attention_norm.weight", {E});
            L.ffn_post_norm = m.weight(b + "post_ffw_norm.weight", {E});
        }
        if (c.qk_norm) {
            L.attn_q_norm = m.weight(b + "attn_q_norm.weight", {c.head_dim});
            L.attn_k_norm = m.weight(b + "attn_k_norm.weight", {c.head_dim});
        }
        w.layers.push_back(L);
    }
    w.output_norm = m.weight("output_norm.weight", {E});
    w.output = c.tied_embeddings ? w.token_embd : m.weight("output.weight", {E, c.n_vocab});

    // The training step: forward, backward, AdamW; the optimizer's state joins the weights.
    m.train.io = llama::build_training_graph(m.train.ctx, c, w, options.n_ctx, options.n_seq);
    set_output(m.train.io.loss);
    m.train.graph = build_forward(m.train.io.loss);
    allow_precision(m.train.graph, options.matmul_precision); // before the gradients inherit it
    build_backward(m.train.ctx, m.train.graph, m.train.io.loss);
    if (options.n_micro == 1) {
        m.optimizer = build_optimizer_step(m.weights_ctx, m.train.ctx, m.train.graph);
    } else {
        Context& g = m.train.ctx;
        m.keep = set_name(m.weights_ctx.new_tensor(Type::F32, {1}), "grad_acc.keep");
        set_input(m.keep);
        std::vector<std::pair<Tensor*, Tensor*>> param_grads;
        for (Tensor* p : m.params) {
            Tensor* acc = set_name(m.weights_ctx.new_tensor(Type::F32, p->ne), p->name + ".grad_acc");
            m.grad_acc.push_back(acc);
            param_grads.emplace_back(p, acc);
            Tensor* sum =
                add(g, mul(g, acc, m.keep), scale(g, m.train.graph.grad(p), 1.0f / float(options.n_micro)));
            m.train.graph.expand(cpy(g, sum, acc));
        }
        m.optimizer = build_optimizer_step(m.weights_ctx, m.update.ctx, m.update.graph, param_grads);
    }
    // Evaluation: the same forward pass and loss, apart (its own inputs and memory plan).
    m.eval.io = llama::build_training_graph(m.eval.ctx, c, w, options.n_ctx, options.n_seq);
    set_output(m.eval.io.loss);
    m.eval.graph = build_forward(m.eval.io.loss);
    allow_precision(m.eval.graph, options.matmul_precision);

    m.weights_buffer = allocate_context_tensors(m.weights_ctx, m.device->buffer_type());
    m.cpu = make_cpu_backend(options.n_threads);
    if (m.device != &cpu_device()) m.gpu = m.device->create_backend();
    for (Impl::Run* run : {&m.train, &m.eval, &m.update}) {
        if (run->graph.nodes().empty()) continue; // no update graph without micro-batches
        run->sched = std::make_unique<Scheduler>(m.backends());
        run->sched->set_log({});
        run->sched->allocate(run->graph);
    }

    // Initial weights: norms 1, biases 0, matrices normal(0, init_std), the projections that write
    // into the residual stream scaled down by sqrt(2 n_layer) so its variance does not grow
    // with depth.
    std::mt19937_64 rng(options.seed);
    const float residual_std = options.init_std / std::sqrt(2.0f * float(c.n_layer));
    for (Tensor* t : m.params) {
        std::vector<float> v(size_t(t->nelements()));
        if (t->ne[1] == 1) {
            std::fill(v.begin(), v.end(), t->name.ends_with(".bias") ? 0.0f : 1.0f);
        } else {
            const bool residual =
                t->name.ends_with("attn_output.weight") || t->name.ends_with("ffn_down.weight");
            std::normal_distribution<float> normal(0.0f, residual ? residual_std : options.init_std);
            for (float& x : v) x = normal(rng);
        }
        tensor_set_f32(t, v);
    }
    m.optimizer.reset();
    // Finite values to start from (keep multiplies them by 0 at a step's first micro-batch).
    for (Tensor* acc : m.grad_acc) tensor_set_f32(acc, std::vector<float>(size_t(acc->nelements()), 0.0f));
}

Trainer::~Trainer() = default;

float Trainer::step(std::span<const int32_t> batch, const AdamWParams& p) {
    Impl& m = *impl_;
    const int64_t k = m.options.n_micro, per_micro = m.options.n_seq * (m.options.n_ctx + 1);
    if (k > 1 && int64_t(batch.size()) != k * per_micro)
        fail("train: a step takes " + std::to_string(k) + " micro-batches of " +
             std::to_string(m.options.n_seq) + " sequences of " + std::to_string(m.options.n_ctx + 1) +
             " tokens (" + std::to_string(k * per_micro) + "), got " + std::to_string(batch.size()));
    adamw_values(p); // bad values fail before any work is done
    if (p.step == 1) m.optimizer.reset();
    m.optimizer.set(p);
    double loss = 0.0;
    for (int64_t i = 0; i < k; ++i) {
        m.set_inputs(m.train, k > 1 ? batch.subspan(size_t(i * per_micro), size_t(per_micro)) : batch, true);
        if (m.keep) tensor_set_f32(m.keep, {i == 0 ? 0.0f : 1.0f});
        m.train.sched->compute(m.train.graph);
        loss += tensor_get_f32(m.train.io.loss)[0];
    }
    if (m.update.sched) m.update.sched->compute(m.update.graph);
    m.steps = p.step;
    return float(loss / double(k));
}

std::unique_ptr<Trainer> Trainer::from_file(const std::string& path, const TrainOptions& options) {
    const gguf::File f = gguf::File::open(path);
    ModelConfig c = llama::read_config(f);
    if (f.find_tensor("rope_freqs.weight"))
        fail(path + ": the model scales rope by rope_freqs.weight, which training does not take");
    std::unique_ptr<Trainer> t(new Trainer(c, options));
    Impl& m = *t->impl_;
    m.source = f.metadata();
    m.config.n_ctx_train = std::max(c.n_ctx_train, options.n_ctx); // the file's context, unless shorter
    // Weights decoded to f32.
    auto decoded = [&](const std::string& name, const Tensor* like) {
        const gguf::TensorInfo& info = f.tensor(name);
        if (info.ne != like->ne)
            fail(path + ": tensor " + name + " has shape " + std::to_string(info.ne[0]) + "x" +
                 std::to_string(info.ne[1]) + ", the model needs " + like->shape_str());
        const TypeTraits& tt = type_traits(info.type);
        if (!tt.to_float) fail(path + ": tensor " + name + " is of a type that cannot be decoded");
        std::vector<float> v(size_t(info.n_elements()));
        tt.to_float(info.data, v.data(), info.n_elements());
        return v;
    };
    for (Tensor* p : m.params) tensor_set_f32(p, decoded(p->name, p));
    // A checkpoint's optimizer state, all or nothing.
    const gguf::Value* step = f.metadata().find("training.step");
    if (step) {
        for (Tensor* moment : m.optimizer.moments) tensor_set_f32(moment, decoded(moment->name, moment));
        m.steps = step->as_int();
        if (m.steps < 0) fail(path + ": training.step is negative");
    }
    return t;
}

float Trainer::loss(std::span<const int32_t> batch) {
    Impl& m = *impl_;
    m.set_inputs(m.eval, batch, true);
    m.eval.sched->compute(m.eval.graph);
    return tensor_get_f32(m.eval.io.loss)[0];
}

std::vector<float> Trainer::logits(std::span<const int32_t> tokens) {
    Impl& m = *impl_;
    m.set_inputs(m.eval, tokens, false);
    m.eval.sched->compute(m.eval.graph);
    return tensor_get_f32(m.eval.io.logits);
}

void Trainer::save(const std::string& path, const gguf::Metadata& metadata, Type type) const {
    impl_->write(path, metadata, type, false);
}

void Trainer::save_checkpoint(const std::string& path, const gguf::Metadata& metadata) const {
    impl_->write(path, metadata, Type::F32, true);
}

void Trainer::Impl::write(const std::string& path, const gguf::Metadata& metadata, Type type,
                          bool moments) const {
    const ModelConfig& c = config;
    gguf::Writer out;
    out.set("general.architecture", c.arch);
    out.set("general.name", "ggml-fa trained");
    out.set("general.file_type", gguf::file_type_of(type));
    const std::string A = c.arch + ".";
    out.set(A + "vocab_size", uint32_t(c.n_vocab));
    out.set(A + "context_length", uint32_t(c.n_ctx_train));
    out.set(A + "embedding_length", uint32_t(c.n_embd));
    out.set(A + "block_count", uint32_t(c.n_layer));
    out.set(A + "feed_forward_length", uint32_t(c.n_ff));
    out.set(A + "attention.head_count", uint32_t(c.n_head));
    out.set(A + "attention.head_count_kv", uint32_t(c.n_head_kv));
    out.set(A + "attention.key_length", uint32_t(c.head_dim));
    out.set(A + "attention.value_length", uint32_t(c.head_dim));
    out.set(A + "attention.layer_norm_rms_epsilon", c.norm_eps);
    out.set(A + "rope.freq_base", c.rope.freq_base);
    out.set(A + "rope.dimension_count", uint32_t(c.rope.n_dims));
    if (c.rope.freq_scale != 1.0f) {
        out.set(A + "rope.scaling.type", "linear");
        out.set(A + "rope.scaling.factor", 1.0f / c.rope.freq_scale);
    }
    if (c.arch == "gemma2") {
        out.set(A + "attention.sliding_window", uint32_t(c.sliding_window));
        out.set(A + "attn_logit_softcapping", c.attn_softcap);
        out.set(A + "final_logit_softcapping", c.final_softcap);
    }
    if (c.arch == "gemma3") {
        out.set(A + "attention.sliding_window", uint32_t(c.sliding_window));
        out.set(A + "attention.sliding_window_pattern", uint32_t(c.sliding_pattern));
        out.set(A + "rope.freq_base_swa", c.rope_sliding.freq_base);
        if (c.final_softcap > 0.0f) out.set(A + "final_logit_softcapping", c.final_softcap);
    }
    for (const gguf::KeyValue& kv : metadata.entries()) out.set(kv.key, kv.value);
    if (moments) out.set("training.step", uint32_t(steps));

    for (const Tensor* t : params) {
        // Norms stay f32 as llama.cpp keeps them; matrices take `type`.
        const Type stored = t->ne[1] == 1 ? Type::F32 : type;
        if (t->ne[0] % type_traits(stored).block_size != 0)
            fail("train: cannot save " + t->name + " as " + std::string(type_name(stored)) +
                 ": its rows of " + std::to_string(t->ne[0]) + " are not whole blocks");
        const std::vector<uint8_t> bytes = encode_rows(tensor_get_f32(t), stored, t->ne[0]);
        std::vector<int64_t> dims{t->ne[0]};
        if (t->ne[1] > 1) dims.push_back(t->ne[1]);
        out.add_tensor(t->name, stored, dims, bytes.data(), bytes.size());
    }
    if (moments) // named "<weight>.adam_m" / ".adam_v" by build_optimizer_step
        for (const Tensor* t : optimizer.moments) {
            const std::vector<float> v = tensor_get_f32(t);
            std::vector<int64_t> dims{t->ne[0]};
            if (t->ne[1] > 1) dims.push_back(t->ne[1]);
            out.add_tensor(t->name, Type::F32, dims, v.data(), v.size() * sizeof(float));
        }
    out.write(path);
}

Trainer::Memory Trainer::memory() const {
    const Impl& m = *impl_;
    Memory out;
    for (const Tensor* t : m.params) out.weights += t->nbytes();
    for (const Tensor* t : m.optimizer.moments) out.optimizer += t->nbytes();
    for (const Tensor* t : m.grad_acc) out.optimizer += t->nbytes();
    for (size_t b = 0; b < m.backends().size(); ++b) {
        out.train_graph += m.train.sched->allocator(b).peak_bytes();
        if (m.update.sched) out.train_graph += m.update.sched->allocator(b).peak_bytes();
        out.eval_graph += m.eval.sched->allocator(b).peak_bytes();
    }
    return out;
}

const ModelConfig& Trainer::config() const {
    return impl_->config;
}
const TrainOptions& Trainer::options() const {
    return impl_->options;
}
float Trainer::grad_norm() const {
    return impl_->optimizer.grad_norm();
}

int64_t Trainer::steps() const {
    return impl_->steps;
}
const gguf::Metadata& Trainer::source_metadata() const {
    return impl_->source;
}
int64_t Trainer::n_params() const {
    int64_t n = 0;
    for (const Tensor* t : impl_->params) n += t->nelements();
    return n;
}

std::vector<std::pair<std::string, std::vector<float>>> Trainer::gradients() const {
    std::vector<std::pair<std::string, std::vector<float>>> out;
    for (size_t i = 0; i < impl_->params.size(); ++i) {
        const Tensor* t = impl_->params[i];
        out.emplace_back(t->name, tensor_get_f32(impl_->grad_acc.empty() ? impl_->train.graph.grad(t)
                                                                         : impl_->grad_acc[i]));
    }
    return out;
}

std::vector<float> Trainer::weight(const std::string& name) const {
    auto it = impl_->by_name.find(name);
    if (it == impl_->by_name.end()) fail("train: the model has no weight " + name);
    return tensor_get_f32(it->second);
}

void Trainer::set_weight(const std::string& name, const std::vector<float>& values) {
    auto it = impl_->by_name.find(name);
    if (it == impl_->by_name.end()) fail("train: the model has no weight " + name);
    if (int64_t(values.size()) != it->second->nelements())
        fail("train: " + name + " holds " + std::to_string(it->second->nelements()) + " values, got " +
             std::to_string(values.size()));
    tensor_set_f32(it->second, values);
}

std::string Trainer::describe_schedule() const {
    return impl_->train.sched->describe();
}

std::string Trainer::describe_backend_counters() const {
    return impl_->train.sched->describe_counters();
}

} // namespace gfa
