// Training llama-family models: the training graph's gradients against finite differences,
// the Trainer against the reference, learning, saving and running the result, bad input.
#include "op_check.h"
#include "tiny_model.h"

#include "models/llama.h"
#include "reference.h"

#include <ggml-fa/error.h>
#include <ggml-fa/model.h>
#include <ggml-fa/tokenizer.h>
#include <ggml-fa/train.h>

#include <algorithm>
#include <cmath>
#include <numeric>

using namespace gfa;
using test::TempFile;

namespace {

Context data_ctx() {
    return Context(ContextParams{.alloc_data = true});
}

// The weights of `c` as leaves of a host context, each from values(name, n, is_norm).
template <typename Values> llama::Weights host_weights(Context& ctx, const ModelConfig& c, Values values) {
    auto weight = [&](const std::string& name, std::initializer_list<int64_t> ne) {
        Tensor* t = set_name(ctx.new_tensor(Type::F32, ne), name);
        tensor_set_f32(t, values(name, t->nelements(), ne.size() == 1 && !name.ends_with(".bias")));
        return t;
    };
    const int64_t E = c.n_embd, Dq = c.n_head * c.head_dim, Dkv = c.n_head_kv * c.head_dim;
    llama::Weights w;
    w.token_embd = weight("token_embd.weight", {E, c.n_vocab});
    for (int64_t l = 0; l < c.n_layer; ++l) {
        const std::string b = "blk." + std::to_string(l) + ".";
        llama::LayerWeights L;
        L.attn_norm = weight(b + "attn_norm.weight", {E});
        L.wq = weight(b + "attn_q.weight", {E, Dq});
        L.wk = weight(b + "attn_k.weight", {E, Dkv});
        L.wv = weight(b + "attn_v.weight", {E, Dkv});
        if (c.qkv_bias) {
            L.bq = weight(b + "attn_q.bias", {Dq});
            L.bk = weight(b + "attn_k.bias", {Dkv});
            L.bv = weight(b + "attn_v.bias", {Dkv});
        }
        L.wo = weight(b + "attn_output.weight", {Dq, E});
        L.ffn_norm = weight(b + "ffn_norm.weight", {E});
        L.ffn_gate = weight(b + "ffn_gate.weight", {E, c.n_ff});
        L.ffn_up = weight(b + "ffn_up.weight", {E, c.n_ff});
        L.ffn_down = weight(b + "ffn_down.weight", {c.n_ff, E});
        if (c.post_norms) {
            L.attn_post_norm = weight(b + "post_attention_norm.weight", {E});
            L.ffn_post_norm = weight(b + "post_ffw_norm.weight", {E});
        }
        if (c.qk_norm) {
            L.attn_q_norm = weight(b + "attn_q_norm.weight", {c.head_dim});
            L.attn_k_norm = weight(b + "attn_k_norm.weight", {c.head_dim});
        }
        w.layers.push_back(L);
    }
    w.output_norm = weight("output_norm.weight", {E});
    w.output = c.tied_embeddings ? w.token_embd : weight("output.weight", {E, c.n_vocab});
    return w;
}

ModelConfig config_variant(int variant) {
    return test::train_config_variant(test::tiny_train_config(), variant);
}

std::vector<Tensor*> weight_list(const llama::Weights& w) {
    std::vector<Tensor*> out{w.token_embd};
    for (const llama::LayerWeights& L : w.layers) {
        out.insert(out.end(),
                   {L.attn_norm, L.wq, L.wk, L.wv, L.wo, L.ffn_norm, L.ffn_gate, L.ffn_up, L.ffn_down});
        if (L.bq) out.insert(out.end(), {L.bq, L.bk, L.bv});
        if (L.attn_post_norm) out.insert(out.end(), {L.attn_post_norm, L.ffn_post_norm});
        if (L.attn_q_norm) out.insert(out.end(), {L.attn_q_norm, L.attn_k_norm});
    }
    out.push_back(w.output_norm);
    if (w.output != w.token_embd) out.push_back(w.output);
    return out;
}

// Sets a training graph's inputs from B sequences of T + 1 tokens, written here apart from
// the Trainer's own code so that the two check each other.
void set_training_inputs(const llama::TrainingIo& io, const std::vector<int32_t>& batch, int64_t T,
                         int64_t B) {
    std::vector<int32_t> tokens, positions(static_cast<size_t>(T)), labels;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
            tokens.push_back(batch[size_t(b * (T + 1) + t)]);
            labels.push_back(batch[size_t(b * (T + 1) + t + 1)]);
        }
    std::iota(positions.begin(), positions.end(), 0);
    test::set_i32(io.tokens, tokens);
    test::set_i32(io.positions, positions);
    test::set_i32(io.labels, labels);
}

TrainOptions tiny_options(int64_t T = 7, int64_t B = 3) {
    TrainOptions o;
    o.n_ctx = T;
    o.n_seq = B;
    o.n_threads = 2;
    o.seed = test::seed();
    o.init_std = 0.3f; // large enough that every path carries signal in a two-layer model
    return o;
}

} // namespace

TEST_CASE("training graph: gradients of every weight match finite differences", "[train]") {
    const ModelConfig c = config_variant(GENERATE(0, 1, 2, 3, 4)); // llama, qwen2, gemma2, gemma3, qwen3
    INFO(c.arch);
    const int64_t T = 5, B = 2; // odd sizes; two sequences share the rope positions
    Context ctx = data_ctx();
    std::normal_distribution<float> normal(0.0f, 0.4f);
    const llama::Weights w = host_weights(ctx, c, [&](const std::string&, int64_t n, bool norm) {
        std::vector<float> v(static_cast<size_t>(n));
        for (float& x : v) x = (norm ? 1.0f : 0.0f) + normal(test::rng());
        return v;
    });
    const llama::TrainingIo io = llama::build_training_graph(ctx, c, w, T, B);
    set_training_inputs(io, test::random_indices(size_t((T + 1) * B), int32_t(c.n_vocab)), T, B);
    // The graph's gradients are f32 sums on the CPU, the finite differences double: over 40
    // seeds the worst parameter was 3e-4..1.4e-3 off, and seed 486226055 put gemma3's third
    // weight (24 sampled elements, a few of them carrying most of the gradient) at 2.8e-3. A
    // wrong gradient is off by O(1).
    test::check_gradients(ctx, io.loss, weight_list(w), 5e-3, 1e-3, 24);
}

TEST_CASE("Trainer: a step's gradients are the derivatives of its loss", "[train]") {
    const ModelConfig c = config_variant(GENERATE(0, 1, 2, 3, 4)); // llama, qwen2, gemma2, gemma3, qwen3
    INFO(c.arch);
    const TrainOptions o = tiny_options();
    Trainer trainer(c, o);
    const std::vector<int32_t> batch =
        test::random_indices(size_t((o.n_ctx + 1) * o.n_seq), int32_t(c.n_vocab));

    // The same model and batch as a host graph for the double-precision reference.
    Context ctx = data_ctx();
    const llama::Weights w =
        host_weights(ctx, c, [&](const std::string& name, int64_t, bool) { return trainer.weight(name); });
    const llama::TrainingIo io = llama::build_training_graph(ctx, c, w, o.n_ctx, o.n_seq);
    set_training_inputs(io, batch, o.n_ctx, o.n_seq);

    const float loss = trainer.step(batch, {.lr = 1e-3f, .step = 1});
    Graph forward = build_forward(io.loss);
    const double reference_loss = ref::evaluate(forward, io.loss)[0];
    CHECK(std::abs(loss - reference_loss) <= 1e-5 * std::abs(reference_loss));

    for (const auto& [name, grad] : trainer.gradients()) {
        Tensor* param = nullptr;
        for (Tensor* t : weight_list(w))
            if (t->name == name) param = t;
        REQUIRE(param != nullptr);
        std::vector<size_t> picked(grad.size());
        std::iota(picked.begin(), picked.end(), size_t(0));
        std::shuffle(picked.begin(), picked.end(), test::rng());
        picked.resize(std::min<size_t>(picked.size(), 12));
        const std::vector<double> numeric = test::reference_gradient(io.loss, param, picked);
        std::vector<float> analytic;
        for (size_t i : picked) analytic.push_back(grad[i]);
        const double err = test::rel_error(analytic, numeric);
        INFO(name << ": gradient relative error " << err << " (seed " << test::seed() << ")");
        CHECK(err <= 2e-3);
    }
    // The global gradient norm the step computed (what grad_clip bounds).
    double norm_sq = 0.0;
    for (const auto& [name, grad] : trainer.gradients())
        for (float g : grad) norm_sq += double(g) * double(g);
    CHECK(std::abs(trainer.grad_norm() - std::sqrt(norm_sq)) <= 1e-5 * std::sqrt(norm_sq));
    // The update moved every weight (AdamW's first step moves each by about lr).
    for (Tensor* t : weight_list(w)) {
        const std::vector<float> before = tensor_get_f32(t), after = trainer.weight(t->name);
        double moved = 0.0;
        for (size_t i = 0; i < before.size(); ++i)
            moved = std::max(moved, double(std::abs(after[i] - before[i])));
        INFO(t->name);
        CHECK(moved > 5e-4);
        CHECK(moved < 2e-3);
    }
}

TEST_CASE("Trainer: learns a repeating sequence", "[train]") {
    const ModelConfig c = test::tiny_train_config();
    TrainOptions o = tiny_options(16, 4);
    o.init_std = 0.02f; // the default: the first predictions are near uniform
    Trainer trainer(c, o);
    // A random cycle of 11 tokens: every token is determined by the ones before it.
    const std::vector<int32_t> cycle = test::random_indices(11, int32_t(c.n_vocab));
    std::uniform_int_distribution<size_t> phase(0, cycle.size() - 1);
    auto draw = [&] {
        std::vector<int32_t> batch;
        for (int64_t b = 0; b < o.n_seq; ++b) {
            const size_t p = phase(test::rng());
            for (int64_t t = 0; t <= o.n_ctx; ++t) batch.push_back(cycle[(p + size_t(t)) % cycle.size()]);
        }
        return batch;
    };
    const Trainer::Memory mem = trainer.memory();
    CHECK(mem.weights == size_t(trainer.n_params()) * sizeof(float));
    CHECK(mem.optimizer == 2 * mem.weights);
    CHECK(mem.train_graph > mem.eval_graph); // gradients and what the backward pass keeps
    CHECK(mem.eval_graph > 0);
    const float first = trainer.loss(draw());
    INFO("seed " << test::seed() << ", loss before training " << first);
    CHECK(std::abs(first - std::log(float(c.n_vocab))) < 0.2f); // near uniform at the start
    float last = 0.0f;
    for (int32_t s = 1; s <= 80; ++s) last = trainer.step(draw(), {.lr = 1e-2f, .step = s});
    const float after = trainer.loss(draw());
    INFO("training loss at the last step " << last << ", evaluation loss after " << after);
    CHECK(std::isfinite(after));
    CHECK(after < 0.15f * first);
}

TEST_CASE("Trainer: the saved model runs through Model and Session with the training graph's logits",
          "[train]") {
    const ModelConfig c = test::tiny_train_config();
    const TrainOptions o = tiny_options(9, 2);
    Trainer trainer(c, o);
    for (int32_t s = 1; s <= 3; ++s) // weights away from their initial values
        trainer.step(test::random_indices(size_t((o.n_ctx + 1) * o.n_seq), int32_t(c.n_vocab)),
                     {.lr = 1e-2f, .step = s});
    const std::vector<int32_t> tokens = test::random_indices(size_t(o.n_ctx * o.n_seq), int32_t(c.n_vocab));
    const std::vector<float> expected = trainer.logits(tokens);
    REQUIRE(expected.size() == size_t(o.n_ctx * o.n_seq * c.n_vocab));

    gguf::Metadata vocab;
    Tokenizer::write_byte_vocabulary(vocab);
    vocab.set("general.name", "tiny");
    for (const auto& [type, tol] : {std::pair{Type::F32, 1e-5}, {Type::F16, 1e-2}}) {
        TempFile file{
            (std::filesystem::temp_directory_path() / ("gfa_train_" + std::to_string(test::seed()) + ".gguf"))
                .string()};
        trainer.save(file.path, vocab, type);
        const gguf::File f = gguf::File::open(file.path);
        CHECK(f.metadata().at("general.name").as_string() == "tiny");
        CHECK(f.tensor("blk.1.ffn_up.weight").type == type);
        CHECK(f.tensor("output_norm.weight").type == Type::F32);

        std::unique_ptr<Model> model = Model::load(file.path);
        CHECK(model->config().n_ctx_train == o.n_ctx);
        SessionOptions so;
        so.n_ctx = o.n_ctx;
        so.kv_type = Type::F32;
        so.n_threads = 2;
        Session session(*model, so);
        for (int64_t b = 0; b < o.n_seq; ++b) {
            session.reset();
            const std::span<const int32_t> seq(tokens.data() + b * o.n_ctx, size_t(o.n_ctx));
            const std::vector<float> got = session.eval(seq, true);
            const size_t per = size_t(o.n_ctx * c.n_vocab);
            const std::vector<double> want(expected.begin() + ptrdiff_t(b * per),
                                           expected.begin() + ptrdiff_t((b + 1) * per));
            const double err = test::rel_error(got, want);
            INFO(type_name(type) << " file, sequence " << b << ": logits relative error " << err);
            CHECK(err <= tol);
        }
    }
}

TEST_CASE("byte vocabulary: every byte is its own token, both ways", "[train][tokenizer]") {
    gguf::Metadata md;
    Tokenizer::write_byte_vocabulary(md);
    const Tokenizer tok = Tokenizer::from_gguf(md);
    REQUIRE(tok.vocab_size() == 256);
    std::string text = "Hello,  world!\n\ttabs \xE2\x96\x81 and UTF-8: \xC3\xA9\xE2\x82\xAC";
    for (int b = 1; b < 256; b += 7) text.push_back(char(b));
    const std::vector<int32_t> ids = tok.encode(text);
    REQUIRE(ids.size() == text.size());
    for (size_t i = 0; i < text.size(); ++i) CHECK(ids[i] == int32_t(uint8_t(text[i])));
    CHECK(tok.decode(ids) == text);
}

TEST_CASE("Trainer: bad shapes, batches and tokens are refused by name", "[train]") {
    ModelConfig c = test::tiny_train_config();
    c.n_head_kv = 3;
    CHECK_THROWS_WITH(Trainer(c, tiny_options()), Catch::Contains("cannot share 3 key/value heads"));
    c = test::tiny_train_config();
    c.n_expert = 4;
    c.n_expert_used = 2;
    CHECK_THROWS_WITH(Trainer(c, tiny_options()),
                      Catch::Contains("mixtures of experts (4 experts) are not trained"));
    c = test::tiny_train_config();
    c.rope.n_dims = 4;
    CHECK_THROWS_WITH(Trainer(c, tiny_options()), Catch::Contains("rope must turn the whole head"));
    c = test::tiny_train_config();
    c.arch = "gemma";
    CHECK_THROWS_WITH(Trainer(c, tiny_options()),
                      Catch::Contains("architecture must be llama, qwen2, qwen3, gemma2 or gemma3"));
    c = config_variant(4);
    c.qk_norm = false;
    CHECK_THROWS_WITH(Trainer(c, tiny_options()), Catch::Contains("qwen3 models norm q and k per head"));
    c = test::tiny_train_config();
    c.qk_norm = true;
    CHECK_THROWS_WITH(Trainer(c, tiny_options()), Catch::Contains("llama models have no q/k norms"));
    c = config_variant(1);
    c.final_softcap = 10.0f;
    CHECK_THROWS_WITH(Trainer(c, tiny_options()), Catch::Contains("qwen2 has none"));
    c = config_variant(2);
    c.embd_scale = 1.0f;
    CHECK_THROWS_WITH(Trainer(c, tiny_options()), Catch::Contains("a gemma2 model has post norms"));
    c = config_variant(1);
    c.rope.mode = RopeMode::Normal;
    CHECK_THROWS_WITH(Trainer(c, tiny_options()), Catch::Contains("in NeoX mode, as qwen2 does"));
    c = test::tiny_train_config();
    TrainOptions o = tiny_options();
    o.n_ctx = 0;
    CHECK_THROWS_WITH(Trainer(c, o), Catch::Contains("n_ctx, n_seq and n_micro must be positive"));

    Trainer trainer(test::tiny_train_config(), tiny_options(4, 2));
    const std::vector<float> before = trainer.weight("blk.0.attn_q.weight");
    CHECK_THROWS_WITH(trainer.step(std::vector<int32_t>(9, 1), {}),
                      Catch::Contains("2 sequences of 5 tokens (10)"));
    std::vector<int32_t> batch(10, 1);
    batch[7] = 13;
    CHECK_THROWS_WITH(trainer.step(batch, {}),
                      Catch::Contains("token id 13 is outside the vocabulary of 13"));
    batch[7] = 1;
    CHECK_THROWS_WITH(trainer.step(batch, {.step = 0}), Catch::Contains("1-based"));
    CHECK(trainer.weight("blk.0.attn_q.weight") == before); // nothing ran
    CHECK_THROWS_WITH(trainer.weight("blk.9.attn_q.weight"),
                      Catch::Contains("no weight blk.9.attn_q.weight"));
    CHECK_THROWS_WITH(trainer.save("/nonexistent-dir/x.gguf", {}, Type::Q8_0),
                      Catch::Contains("not whole blocks"));
}

TEST_CASE("Trainer: a checkpoint resumes the run exactly", "[train]") {
    const ModelConfig c = test::tiny_train_config();
    const TrainOptions o = tiny_options(6, 2);
    Trainer a(c, o);
    auto batch_of = [&](int32_t step) { // the same batches for both runs
        std::mt19937 rng(uint32_t(test::seed()) + uint32_t(step));
        std::uniform_int_distribution<int32_t> id(0, int32_t(c.n_vocab) - 1);
        std::vector<int32_t> b(size_t((o.n_ctx + 1) * o.n_seq));
        for (int32_t& x : b) x = id(rng);
        return b;
    };
    const AdamWParams p{.lr = 1e-2f, .weight_decay = 0.1f};
    auto at = [&](int32_t s) {
        AdamWParams q = p;
        q.step = s;
        return q;
    };
    for (int32_t s = 1; s <= 3; ++s) a.step(batch_of(s), at(s));
    gguf::Metadata vocab;
    Tokenizer::write_byte_vocabulary(vocab);
    TempFile file{
        (std::filesystem::temp_directory_path() / ("gfa_ckpt_" + std::to_string(test::seed()) + ".gguf"))
            .string()};
    a.save_checkpoint(file.path, vocab);
    std::unique_ptr<Trainer> b = Trainer::from_file(file.path, o);
    CHECK(b->steps() == 3);
    CHECK(b->source_metadata().at("tokenizer.ggml.model").as_string() == "gpt2");
    for (int32_t s = 4; s <= 5; ++s) {
        const float la = a.step(batch_of(s), at(s)), lb = b->step(batch_of(s), at(s));
        CHECK(la == lb); // same weights, moments and inputs: the same arithmetic
    }
    for (const auto& [name, grad] : a.gradients()) {
        INFO(name);
        CHECK(a.weight(name) == b->weight(name));
    }
    // A plain model file (no moments, no step count) starts a new run from the same weights.
    TempFile plain{file.path + ".model.gguf"};
    a.save(plain.path, vocab);
    std::unique_ptr<Trainer> fresh = Trainer::from_file(plain.path, o);
    CHECK(fresh->steps() == 0);
    CHECK(fresh->weight("output.weight") == a.weight("output.weight"));
}

TEST_CASE("Trainer: fine-tunes a llama, qwen2, qwen3 or gemma GGUF model, starting from its exact logits",
          "[train]") {
    test::TinyModel m; // 5 query heads on 1 key/value head, head size 8
    const int variant = GENERATE(0, 1, 2, 3, 4, 5, 6);
    m.tied = variant >= 1;
    if (variant == 2) {
        m.arch = "qwen2";
        m.biases = true;
    }
    if (variant == 3 || variant == 4) { // windows of 4 of the 10 positions, post norms (and caps, q/k norms)
        m.arch = variant == 3 ? "gemma2" : "gemma3";
        m.layers = 4;
    }
    if (variant == 5) m.rope_linear_scale = 2.0f;
    if (variant == 6) { // q/k norms, heads of 16
        m.arch = "qwen3";
        m.head_size = 16;
    }
    INFO(m.arch << ", tied embeddings " << m.tied << ", biases " << m.biases << ", seed " << test::seed());
    TempFile file{test::write_model(m, test::seed())};
    TrainOptions o = tiny_options(10, 1);
    std::unique_ptr<Trainer> t = Trainer::from_file(file.path, o);
    CHECK(t->steps() == 0);
    CHECK(t->config().n_vocab == m.vocab);
    const std::vector<int32_t> tokens = test::random_indices(size_t(o.n_ctx), int32_t(m.vocab));

    std::unique_ptr<Model> model = Model::load(file.path);
    SessionOptions so;
    so.n_ctx = o.n_ctx;
    so.kv_type = Type::F32;
    so.n_threads = 2;
    Session session(*model, so);
    const std::vector<float> want = session.eval(tokens, true);
    const double err = test::logits_error(t->logits(tokens), want);
    INFO("logits relative error " << err);
    CHECK(err <= 1e-5);
    CHECK(t->config().tied_embeddings == m.tied);
    CHECK(t->config().qkv_bias == m.biases);
    std::vector<int32_t> batch = tokens;
    batch.push_back(tokens[0]);
    const float loss = t->step(batch, {.lr = 1e-3f, .step = 1});
    CHECK(std::isfinite(loss));
    // Saved and loaded again, the file holds what was trained, in the same layout.
    TempFile saved{file.path + ".trained.gguf"};
    t->save(saved.path, {});
    const gguf::File f = gguf::File::open(saved.path);
    CHECK(f.metadata().at("general.architecture").as_string() == m.arch);
    CHECK((f.find_tensor("output.weight") == nullptr) == m.tied);
    CHECK((f.find_tensor("blk.1.attn_v.bias") != nullptr) == m.biases);
    std::unique_ptr<Trainer> again = Trainer::from_file(saved.path, o);
    CHECK(again->logits(tokens) == t->logits(tokens));
}

TEST_CASE("Trainer: model files that training does not take are refused by name", "[train]") {
    test::TinyModel m;
    std::string expected;
    SECTION("rope frequency factors") {
        m.rope_factors = {1.0f, 2.0f, 4.0f, 8.0f};
        expected = "rope_freqs.weight";
    }
    SECTION("a mixture of experts (Qwen3-MoE)") {
        m.arch = "qwen3moe";
        m.experts = 5;
        m.experts_used = 2;
        m.dense_ff = 3 * m.ff;
        expected = "mixtures of experts (5 experts) are not trained";
    }
    TempFile file{test::write_model(m, test::seed())};
    CHECK_THROWS_WITH(Trainer::from_file(file.path, tiny_options()), Catch::Contains(expected));
}

TEST_CASE("Trainer: micro-batches average their gradients as one batch would", "[train]") {
    const ModelConfig c = config_variant(GENERATE(0, 3)); // llama, gemma3
    TrainOptions whole = tiny_options(6, 4), parts = tiny_options(6, 2);
    parts.n_micro = 2;
    INFO(c.arch << ", seed " << test::seed());
    Trainer a(c, whole), b(c, parts);                      // the same initial weights (one seed)
    CHECK(b.memory().optimizer == 3 * b.memory().weights); // moments and accumulated gradients
    for (int32_t s = 1; s <= 2; ++s) {
        const std::vector<int32_t> batch = test::random_indices(size_t(7 * 4), int32_t(c.n_vocab));
        // A small rate: near-zero gradients move elements by +-lr whatever their rounding.
        const AdamWParams p{.lr = 1e-4f, .step = s, .grad_clip = 1.0f};
        const float la = a.step(batch, p), lb = b.step(batch, p);
        INFO("step " << s << ": loss " << la << " in one batch, " << lb << " in two");
        CHECK(std::abs(la - lb) <= 1e-5f * std::abs(la));
        CHECK(std::abs(a.grad_norm() - b.grad_norm()) <= 1e-4f * a.grad_norm());
        const auto ga = a.gradients(), gb = b.gradients();
        for (size_t i = 0; i < ga.size(); ++i) {
            const double err =
                test::rel_error(gb[i].second, std::vector<double>(ga[i].second.begin(), ga[i].second.end()));
            INFO(ga[i].first << ": gradient relative error " << err);
            CHECK(err <= 1e-4);
        }
    }
    CHECK_THROWS_WITH(b.step(std::vector<int32_t>(7 * 2, 1), {}),
                      Catch::Contains("2 micro-batches of 2 sequences"));
}
