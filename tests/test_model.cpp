// Llama-family models: a tiny random model written as GGUF, loaded and run through the
// session. Prefill, chunked prefill and token-by-token decoding must agree, decoding must
// not allocate, and malformed files or inputs must give clear errors. (The comparison with
// the Hugging Face forward pass is the end-to-end test in tests/model/.)
#include <ggml-fa/gguf.h>
#include <ggml-fa/model.h>

#include <catch2/catch.hpp>

#include "tiny_model.h"
#include "../backends/cpu/cpu_kernels.h"
#include "../backends/cpu/flash_attn_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace gfa;

using test::TempFile;
using test::TinyModel;
using test::write_model;

namespace {

// n token ids drawn below the model's vocabulary.
std::vector<int32_t> random_tokens(std::mt19937& rng, size_t n, int64_t vocab) {
    std::vector<int32_t> tokens(n);
    for (int32_t& t : tokens) t = int32_t(rng() % uint32_t(vocab));
    return tokens;
}

// A CPU session with an exact (f32) KV cache, so differences come from the computation alone.
SessionOptions exact_cache_options(int64_t n_ctx, int n_threads = 2) {
    SessionOptions so;
    so.n_ctx = n_ctx;
    so.kv_type = Type::F32;
    so.n_threads = n_threads;
    return so;
}

// A model wide enough for the 256-value blocks of the K and IQ4 formats.
TinyModel block_sized_model(Type matrix_type) {
    TinyModel m;
    m.embd = 256;
    m.ff = 256;
    m.heads = 4;
    m.heads_kv = 2;
    m.vocab = 41;
    m.matrix_type = matrix_type;
    return m;
}

} // namespace

TEST_CASE("llama session: prefill, chunked prefill and decoding agree", "[model]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m;
    SECTION("llama, GQA 5:1") {}
    SECTION("qwen2, biases, tied embeddings, GQA 5:5") {
        m.arch = "qwen2";
        m.biases = m.tied = true;
        m.heads_kv = 5;
        m.vocab = 113;
    }
    SECTION("gemma2: windows of 4 positions on layers 0 and 2, soft caps, post norms") {
        // Prefill attends through the window parameter, decoding through a mask of its own.
        m.arch = "gemma2";
        m.tied = true;
        m.layers = 3;
    }
    SECTION("qwen3: q/k norms, heads of 16 (q wider than the embedding), GQA 4:2") {
        m.arch = "qwen3";
        m.heads = 4;
        m.heads_kv = 2;
        m.head_size = 16;
    }
    SECTION("gemma3: windows of 4 on layers 0, 1 and 3, q/k norms, a rope base per kind of layer") {
        m.arch = "gemma3";
        m.tied = true;
        m.layers = 4;
    }
    TempFile file{write_model(m, seed)};
    std::unique_ptr<Model> model = Model::load(file.path);
    REQUIRE(model->config().n_vocab == m.vocab);
    REQUIRE(model->config().tied_embeddings == m.tied);
    REQUIRE(model->config().rope.mode == (m.arch == "llama" ? RopeMode::Normal : RopeMode::NeoX));
    REQUIRE(model->config().sliding_window == (m.arch.starts_with("gemma") ? m.sliding_window : 0));

    std::mt19937 rng(seed);
    const int n = 17;
    std::vector<int32_t> tokens = random_tokens(rng, n, m.vocab);

    SessionOptions so = exact_cache_options(32);
    Session whole(*model, so);
    const std::vector<float> all = whole.eval(tokens, true);
    REQUIRE(all.size() == size_t(n * m.vocab));
    REQUIRE(whole.n_past() == n);
    // After a reset the same prompt runs the same graph again (perplexity's chunks do this).
    whole.reset();
    whole.reset_profile();
    CHECK(whole.eval(tokens, true) == all);
    CHECK(whole.profile().reused == 1);

    // The same prompt in chunks of 3 (the last one shorter). The Gemmas' sliding layers then
    // keep window + 2 = 6 cache rows, reused in turn (the 17 tokens wrap them twice), where
    // `whole`, with batches of 32, keeps all 32.
    so.n_batch = 3;
    Session chunked(*model, so);
    const std::vector<float> in_chunks = chunked.eval(tokens, true);
    CHECK(test::logits_error(in_chunks, all) < 1e-5);
    SessionOptions full_rows = so;
    full_rows.window_cache = false;
    Session unwrapped(*model, full_rows);
    CHECK(test::logits_error(unwrapped.eval(tokens, true), all) < 1e-5);
    if (m.arch.starts_with("gemma"))
        CHECK(chunked.kv_bytes() < unwrapped.kv_bytes());
    else
        CHECK(chunked.kv_bytes() == unwrapped.kv_bytes());

    // One token at a time: each step's logits are the prefill's row for that position,
    // and no step allocates.
    Session decode(*model, so);
    const int allocations = decode.n_compute_allocations();
    std::vector<float> stepwise;
    for (int i = 0; i < n; ++i) {
        const std::vector<float> step = decode.eval(std::span(&tokens[size_t(i)], 1));
        REQUIRE(step.size() == size_t(m.vocab));
        stepwise.insert(stepwise.end(), step.begin(), step.end());
    }
    CHECK(test::logits_error(stepwise, all) < 1e-5);
    CHECK(decode.n_compute_allocations() == allocations);

    // Last-token logits only, and a reset that starts over. The last layer then runs for the
    // last position alone: in chunks of 3 (its last chunk of 2 attends through a mask) and in
    // one batch of 17 (causal attention without a mask).
    decode.reset();
    const std::vector<float> last = decode.eval(tokens);
    const std::vector<float> last_row(all.end() - m.vocab, all.end());
    CHECK(test::logits_error(last, last_row) < 1e-5);
    SessionOptions one_batch = so;
    one_batch.n_batch = 32;
    Session last_whole(*model, one_batch);
    const std::vector<float> last_in_one = last_whole.eval(tokens);
    REQUIRE(last_in_one.size() == size_t(m.vocab));
    CHECK(test::logits_error(last_in_one, last_row) < 1e-5);

    // A quantized cache stays close.
    so.kv_type = Type::F16;
    Session half(*model, so);
    CHECK(test::logits_error(half.eval(tokens, true), all) < 1e-2);
}

TEST_CASE("llama session: eval_greedy picks the first largest logit", "[model]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m;
    m.vocab = 2049; // a vocabulary longer than the GPU kernels' one-block-a-row threshold
    SessionOptions so = exact_cache_options(40);
    SECTION("prompt in one batch, exact causal graphs") {
        so.decode_window_step = 0;
    }
    SECTION("prompt in chunks of 4, windowed decoding") {
        so.n_batch = 4;
    }
    SECTION("qwen2, tied embeddings") {
        m.arch = "qwen2";
        m.biases = m.tied = true;
    }
    TempFile file{write_model(m, seed)};
    std::unique_ptr<Model> model = Model::load(file.path);
    std::mt19937 rng(seed);
    const std::vector<int32_t> tokens = random_tokens(rng, 21, m.vocab);
    const std::vector<std::string> disagreements = test::greedy_disagreements(*model, so, tokens, 11);
    for (const std::string& line : disagreements) UNSCOPED_INFO(line);
    CHECK(disagreements.empty());
    Session s(*model, so);
    const std::vector<int32_t> outside{1, int32_t(m.vocab)};
    CHECK_THROWS_WITH(s.eval_greedy(outside), Catch::Contains("outside the vocabulary"));
    CHECK_THROWS_AS(s.eval_greedy({}), Error);
}

// The CPU backend queues nothing (Backend's defaults transfer at once), so this checks the
// loop itself: which step's token comes from where, stopping, and the cache afterwards. The
// CUDA test of the same name runs it with queued transfers.
TEST_CASE("llama session: decode picks what eval_pick picks token by token", "[model]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m;
    m.vocab = 301;
    SessionOptions so = exact_cache_options(48);
    int64_t max_steps = 19, stop_after = -1;
    bool throwing = false, windows_change = false;
    SECTION("every step fed by the one before") {}
    SECTION("windows that change every 4 positions: new graphs, tokens through the host") {
        so.decode_window_step = 4;
        windows_change = true;
    }
    SECTION("exact causal graphs (a new graph every step)") {
        so.decode_window_step = 0;
        windows_change = true;
    }
    SECTION("the caller stops after 7 picks") {
        stop_after = 7;
    }
    SECTION("the caller stops after the first pick") {
        stop_after = 1;
    }
    SECTION("the caller throws at the 5th pick") {
        stop_after = 5;
        throwing = true;
    }
    SECTION("qwen2 with biases, chunked prompt") {
        m.arch = "qwen2";
        m.biases = m.tied = true;
        so.n_batch = 4;
    }
    SECTION("more steps than the context holds: an error before any work") {
        max_steps = 48;
    }
    Sampling sampling;
    SECTION("drawn (sample_token), every step fed by the one before") {
        sampling = {.temperature = 0.9f, .top_k = 20, .top_p = 0.9f, .seed = seed};
    }
    SECTION("drawn from every token, the caller stops after 9 picks") {
        sampling = {.temperature = 1.5f, .top_k = 0, .top_p = 1.0f, .seed = seed + 1};
        stop_after = 9;
    }
    TempFile file{write_model(m, seed)};
    std::unique_ptr<Model> model = Model::load(file.path);
    std::mt19937 rng(seed);
    const std::vector<int32_t> prompt = random_tokens(rng, 11, m.vocab);
    int64_t fed = -1;
    const std::vector<std::string> disagreements =
        test::decode_disagreements(*model, so, prompt, max_steps, stop_after, throwing, &fed, sampling);
    for (const std::string& line : disagreements) UNSCOPED_INFO(line);
    CHECK(disagreements.empty());
    if (max_steps == 19 && stop_after < 0 && !windows_change) CHECK(fed == max_steps - 1);
    if (windows_change) CHECK(fed < max_steps - 1);

    Session s(*model, so);
    CHECK_THROWS_WITH(s.decode_greedy(int32_t(m.vocab), 3, [](int32_t) { return true; }),
                      Catch::Contains("outside the vocabulary"));
    CHECK_THROWS_WITH(s.decode_greedy(0, -1, [](int32_t) { return true; }), Catch::Contains("max_steps"));
    int calls = 0;
    CHECK(s.decode_greedy(0, 0, [&](int32_t) { return ++calls > 0; }) == 0);
    CHECK(calls == 0);
    CHECK(s.n_past() == 0);
}

TEST_CASE("llama session: decoding through growing attention windows reuses graphs", "[model]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m;
    TempFile file{write_model(m, seed)};
    std::unique_ptr<Model> model = Model::load(file.path);
    std::mt19937 rng(seed);
    const int n = 23;
    std::vector<int32_t> tokens = random_tokens(rng, n, m.vocab);

    SessionOptions so = exact_cache_options(29); // the last window is cut short by the cache
    so.decode_window_step = 0;
    Session exact(*model, so);
    const std::vector<float> all = exact.eval(tokens, true);

    // Windows of 5, 10, ... rows, the rows beyond the newest token masked: one token at a
    // time, then two, then three, so each kind of graph is kept and run again.
    for (const int64_t per_eval : {1, 2, 3}) {
        INFO(per_eval << " tokens per eval");
        so.decode_window_step = 5;
        Session windowed(*model, so);
        const int allocations = windowed.n_compute_allocations();
        std::vector<float> stepwise;
        for (int i = 0; i < n; i += int(per_eval)) {
            const size_t count = std::min<size_t>(size_t(per_eval), size_t(n - i));
            const std::vector<float> step = windowed.eval(std::span(&tokens[size_t(i)], count), true);
            stepwise.insert(stepwise.end(), step.begin(), step.end());
        }
        CHECK(test::logits_error(stepwise, all) < 1e-5);
        CHECK(windowed.n_compute_allocations() == allocations);
        // A graph is rebuilt when the window grows (every 5 rows) or the token count
        // changes; the other evals reuse it.
        const EvalProfile& p = windowed.profile();
        INFO("graphs " << p.graphs << ", reused " << p.reused);
        CHECK(p.reused >= p.graphs - (n + 4) / 5 - 2);
        CHECK(p.reused > 0);

        // After a reset the kept graph serves new positions: stale rows stay hidden.
        windowed.reset();
        const std::vector<float> again = windowed.eval(std::span(tokens.data(), 1), true);
        CHECK(test::logits_error(again, std::vector<float>(all.begin(), all.begin() + m.vocab)) < 1e-5);
    }
}

TEST_CASE("llama model: projections of mixed types stay separate and agree with merged ones", "[model]") {
    // q/k/v and gate/up are loaded as one matrix each when their types agree, and q/k alone
    // when only v differs. Here ffn_up and attn_v (as a Q4_K_M file's attn_v is q6_K) or
    // attn_k are f16: gate/up do not merge, q/k do or do not. The same values stored as f32
    // merge; both models must give the same logits (decoding one token, to the f16 rounding
    // of the column that f16 weights meet there: about 2e-4).
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m;
    SECTION("llama") {}
    SECTION("qwen2 with biases") {
        m.arch = "qwen2";
        m.biases = true;
    }
    for (const char* odd : {"attn_v.weight", "attn_k.weight"}) {
        INFO("f16: " << odd << " and ffn_up.weight");
        m.f16_tensors = {odd, "ffn_up.weight"};
        m.rounded_as_f32 = false;
        TempFile separate_file{write_model(m, seed)};
        m.rounded_as_f32 = true;
        TempFile merged_file{write_model(m, seed)};
        std::unique_ptr<Model> separate = Model::load(separate_file.path);
        std::unique_ptr<Model> merged = Model::load(merged_file.path);

        std::mt19937 rng(seed);
        std::vector<int32_t> tokens = random_tokens(rng, 11, m.vocab);
        SessionOptions so = exact_cache_options(16);
        Session a(*separate, so), b(*merged, so);
        const std::vector<float> la = a.eval(tokens, true), lb = b.eval(tokens, true);
        CHECK(test::logits_error(la, lb) < 1e-5);
        // q and k merge in every layer when only v differs.
        CHECK(separate->merged_projections() == (std::string(odd) == "attn_v.weight" ? m.layers : 0));
        CHECK(merged->merged_projections() == 2 * m.layers);
        CHECK(test::logits_error(a.eval(std::span(tokens.data(), 1)), b.eval(std::span(tokens.data(), 1))) <
              1e-3);
        if (std::string(odd) != "attn_v.weight") continue;
        // With v apart, the graph computes v's product right after the pre-norm, so that the
        // q/k product follows it (one rounding of their column on GPUs) and the rope and both
        // cache writes come one after another (one fused launch): in every layer, two
        // products in a row, then rope, set_rows, set_rows.
        so.trace_nodes = true;
        Session traced(*separate, so);
        traced.eval(tokens, true);
        traced.eval(std::span(tokens.data(), 1));
        std::string ops; // the ops in graph order, views left out
        for (const TracedNode& n : traced.traced_nodes()) {
            const size_t op_at = n.label.find(' ') + 1;
            const std::string op = n.label.substr(op_at, n.label.find(' ', op_at) - op_at);
            if (op != "view" && op != "reshape" && op != "permute" && op != "transpose") ops += op + " ";
        }
        const std::string run = m.biases ? "mul_mat add mul_mat add rope set_rows set_rows "
                                         : "mul_mat mul_mat rope set_rows set_rows ";
        int64_t runs = 0;
        for (size_t at = ops.find(run); at != std::string::npos; at = ops.find(run, at + 1)) ++runs;
        INFO(ops);
        CHECK(runs == m.layers);
    }
}

// Files in the low-bit formats of llama.cpp's Q2_K, Q3_K and IQ4 presets: with AVX-512 VNNI the
// prompt's products multiply integer codes by columns rounded to 16 bits per 32 values, per 256
// for q2_K and q3_K (integer GEMM: 5e-5 to 2e-4 seen in the logits, q2_K the most; q2_K's mins
// are then subtracted in f32), against
// the same weights stored decoded as f32;
// decoding multiplies the codes by a column rounded to 8 bits per 256
// values (integer dot products, about 1% in a product), which the random model's sharp
// attention amplifies: 1.2-3.5% seen over the four types, against ~1 for a wrong layout.
TEST_CASE("llama model: q2_K, q3_K, iq4_nl and iq4_xs weights run as their decoded values", "[model]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m = block_sized_model(GENERATE(Type::Q2_K, Type::Q3_K, Type::IQ4_NL, Type::IQ4_XS));
    INFO("weights " << type_name(m.matrix_type));
    TempFile file{write_model(m, seed)};
    TinyModel decoded = m;
    decoded.decoded_as_f32 = true;
    TempFile decoded_file{write_model(decoded, seed)};
    std::unique_ptr<Model> quantized = Model::load(file.path), reference = Model::load(decoded_file.path);

    std::mt19937 rng(seed);
    std::vector<int32_t> tokens = random_tokens(rng, 13, m.vocab);
    SessionOptions so = exact_cache_options(32);
    Session a(*quantized, so), b(*reference, so);
    CHECK(test::logits_error(a.eval(tokens, true), b.eval(tokens, true)) < 1e-3);
    for (int i = 0; i < 3; ++i) {
        const int32_t next = int32_t(rng() % uint32_t(m.vocab));
        const double err = test::logits_error(a.eval(std::span(&next, 1)), b.eval(std::span(&next, 1)));
        INFO("decoding step " << i << ": relative error " << err);
        CHECK(err < 8e-2);
    }
}

namespace {

// The prompt's logits from a session with `exact` options and one with `fast` options; every
// fast logit must be finite. Returns how far they are apart (relative).
double prompt_logits_shift(const Model& model, const std::vector<int32_t>& tokens,
                           const SessionOptions& exact, const SessionOptions& fast) {
    Session a(model, exact), b(model, fast);
    const std::vector<float> e = a.eval(tokens, true), f = b.eval(tokens, true);
    REQUIRE(f.size() == e.size());
    for (float v : f) REQUIRE(std::isfinite(v));
    const double err = test::logits_error(f, e);
    INFO("relative error " << err);
    return err;
}

} // namespace

// SessionOptions::matmul_precision = Q8: the prompt's products with quantized weights round
// their columns to 8 bits as decoding does (where the CPU has the 8-bit GEMM), so the logits
// move from the F32 session's, by about what decoding's rounding costs, and no further.
TEST_CASE("llama session: Q8 products move a quantized model's prompt logits by the 8-bit rounding only",
          "[model]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m = block_sized_model(GENERATE(Type::Q4_K, Type::Q8_0, Type::IQ4_NL));
    INFO("weights " << type_name(m.matrix_type));
    TempFile file{write_model(m, seed)};
    std::unique_ptr<Model> model = Model::load(file.path);
    std::mt19937 rng(seed);
    std::vector<int32_t> tokens = random_tokens(rng, 13, m.vocab);
    SessionOptions fast = exact_cache_options(32);
    fast.matmul_precision = MatMulPrecision::Q8;
    const double err = prompt_logits_shift(*model, tokens, exact_cache_options(32), fast);
    CHECK(err < 8e-2);
    if (gfa::cpu::integer_quantized_prompts()) CHECK(err > 1e-4); // the columns were rounded
}

// SessionOptions::attention_precision = BF16: a prompt's attention multiplies bf16 pairs
// (where the CPU has them; heads of 16 and more query rows per KV head than decoding's 8), so
// the logits move from the F32 session's by bf16 rounding and no further; decoding keeps its own
// f32 path.
TEST_CASE("llama session: bf16 attention products move the prompt logits by bf16 rounding only", "[model]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m;
    m.embd = 128, m.heads = 4, m.heads_kv = 2; // head size 32
    TempFile file{write_model(m, seed)};
    std::unique_ptr<Model> model = Model::load(file.path);
    std::mt19937 rng(seed);
    const std::vector<int32_t> tokens = random_tokens(rng, 40, m.vocab);
    SessionOptions fast = exact_cache_options(64);
    fast.attention_precision = FlashAttnPrecision::BF16;
    const double err = prompt_logits_shift(*model, tokens, exact_cache_options(64), fast);
    CHECK(err < 5e-2);
    if (gfa::cpu::flash_attn_has_pair_products()) CHECK(err > 1e-5); // the products were rounded
}

// A mixture of experts (5 experts, 2 per token; Mixtral's llama files, Qwen2-MoE's and Qwen3-MoE's): the
// whole prompt at once (where one expert gets several tokens' columns), in chunks, and token by
// token (one column per expert) must give the same logits; the file's expert counts, widths
// and tensors are checked.
TEST_CASE("llama session: a mixture of experts agrees in prefill, chunks and decoding", "[model]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m;
    m.experts = 5;
    m.experts_used = 2;
    SECTION("Mixtral (llama)") {}
    SECTION("qwen3moe: q/k norms, heads of 16 (q wider than the embedding), the dense width apart") {
        m.arch = "qwen3moe";
        m.heads = 4;
        m.heads_kv = 2;
        m.head_size = 16;
        m.dense_ff = 3 * m.ff + 4; // read by no block
    }
    SECTION("qwen2moe: q/k/v biases, a gated shared expert, weights from the softmax over all experts") {
        m.arch = "qwen2moe";
        m.biases = true;
        m.shared_ff = 2 * m.ff + 3;
        m.dense_ff = 3 * m.ff + 4; // read by no block
    }
    TempFile file{write_model(m, seed)};
    std::unique_ptr<Model> model = Model::load(file.path);
    CHECK(model->config().n_expert == 5);
    CHECK(model->config().n_expert_used == 2);
    CHECK(model->config().n_ff == m.ff);
    CHECK(model->config().qk_norm == (m.arch == "qwen3moe"));
    CHECK(model->config().expert_weights_norm == (m.arch != "qwen2moe"));
    CHECK(model->config().n_ff_shared == m.shared_ff);
    CHECK(model->config().rope.mode == (m.arch == "llama" ? RopeMode::Normal : RopeMode::NeoX));
    std::mt19937 rng(seed);
    std::vector<int32_t> tokens = random_tokens(rng, 13, m.vocab);
    SessionOptions so = exact_cache_options(32, 3);
    Session whole(*model, so);
    const std::vector<float> all = whole.eval(tokens, true);
    for (float v : all) REQUIRE(std::isfinite(v));
    so.n_batch = 4;
    Session chunked(*model, so);
    CHECK(test::logits_error(chunked.eval(tokens, true), all) < 1e-5);
    Session stepwise(*model, so);
    const size_t V = size_t(m.vocab);
    for (size_t i = 0; i < tokens.size(); ++i) {
        const std::vector<float> step = stepwise.eval(std::span(&tokens[i], 1));
        const std::vector<float> want(all.begin() + long(i * V), all.begin() + long((i + 1) * V));
        INFO("token " << i);
        CHECK(test::logits_error(step, want) < 1e-5);
    }

    TinyModel bad = m;
    bad.experts_used = 6;
    TempFile too_many{write_model(bad, seed)};
    CHECK_THROWS_WITH(Model::load(too_many.path), Catch::Contains("expert_used_count = 6 must be in [1, "));
    if (m.arch == "qwen2moe") {
        TempFile missing_shared{write_model(m, seed, "blk.1.ffn_down_shexp.weight")};
        CHECK_THROWS_WITH(Model::load(missing_shared.path),
                          Catch::Contains("blk.1.ffn_down_shexp.weight is missing"));
        TempFile misshapen_gate{write_model(m, seed, "", "blk.0.ffn_gate_inp_shexp.weight")};
        CHECK_THROWS_WITH(Model::load(misshapen_gate.path),
                          Catch::Contains("blk.0.ffn_gate_inp_shexp.weight has shape"));
    }
    if (m.arch == "qwen3moe") {
        // Without expert_feed_forward_length the experts share the dense width, as llama.cpp
        // reads such files.
        TinyModel shared = m;
        shared.expert_ff_key = false;
        shared.dense_ff = m.ff * m.experts_used;
        TempFile no_key{write_model(shared, seed)};
        CHECK(Model::load(no_key.path)->config().n_ff == m.ff);
        // A qwen3moe file is a mixture in every block: its expert count is required.
        TinyModel dense = m;
        dense.experts = 0;
        TempFile no_experts{write_model(dense, seed)};
        CHECK_THROWS_WITH(Model::load(no_experts.path),
                          Catch::Contains("no metadata key qwen3moe.expert_count"));
    }
    TempFile missing{write_model(m, seed, "blk.1.ffn_up_exps.weight")};
    CHECK_THROWS_WITH(Model::load(missing.path), Catch::Contains("blk.1.ffn_up_exps.weight is missing"));
    TempFile misshapen{write_model(m, seed, "", "blk.0.ffn_down_exps.weight")};
    CHECK_THROWS_WITH(Model::load(misshapen.path), Catch::Contains("blk.0.ffn_down_exps.weight has shape"));
}

// A model split by llama.cpp's gguf-split into PREFIX-0000i-of-00003.gguf: the first shard's
// metadata describes the model, every shard carries split.no / split.count, the tensors are
// spread over the three. Loading the first shard must give the whole file's logits bit for
// bit; a missing shard, a shard with the wrong number, a tensor in two shards and opening a
// later shard are errors naming what is wrong.
TEST_CASE("llama model: a model split into shards loads as the whole file", "[model][gguf]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m;
    TempFile whole{write_model(m, seed)};
    const gguf::File file = gguf::File::open(whole.path);
    const std::string prefix = whole.path + ".split";
    auto shard_path = [&](int i) { return prefix + "-0000" + std::to_string(i) + "-of-00003.gguf"; };
    // shard i (0-based) gets tensors t with t % 3 == i; `tweak` may change a shard's writer
    auto write_shards = [&](const std::function<void(int, gguf::Writer&)>& tweak) {
        for (int i = 0; i < 3; ++i) {
            gguf::Writer w;
            if (i == 0)
                for (const gguf::KeyValue& kv : file.metadata().entries()) w.set(kv.key, kv.value);
            w.set("split.no", uint16_t(i));
            w.set("split.count", uint16_t(3));
            w.set("split.tensors.count", int32_t(file.tensors().size()));
            for (size_t t = 0; t < file.tensors().size(); ++t) {
                if (int(t % 3) != i) continue;
                const gguf::TensorInfo& info = file.tensors()[t];
                w.add_tensor_view(info.name, info.type,
                                  std::vector<int64_t>(info.ne.begin(), info.ne.begin() + info.n_dims),
                                  info.data, info.nbytes);
            }
            tweak(i, w);
            w.write(shard_path(i + 1));
        }
    };
    struct Cleanup {
        std::function<void()> f;
        ~Cleanup() { f(); }
    } cleanup{[&] {
        for (int i = 1; i <= 3; ++i) std::remove(shard_path(i).c_str());
    }};
    write_shards([](int, gguf::Writer&) {});
    REQUIRE(gguf::File::open_model(shard_path(1)).shards() == 3);

    std::mt19937 rng(seed);
    std::vector<int32_t> tokens = random_tokens(rng, 9, m.vocab);
    SessionOptions so = exact_cache_options(16);
    std::unique_ptr<Model> a = Model::load(whole.path), b = Model::load(shard_path(1));
    Session sa(*a, so), sb(*b, so);
    CHECK(sa.eval(tokens, true) == sb.eval(tokens, true));

    CHECK_THROWS_WITH(Model::load(shard_path(2)), Catch::Contains("the first shard"));
    std::remove(shard_path(3).c_str());
    CHECK_THROWS_WITH(Model::load(shard_path(1)),
                      Catch::Contains("shard 3 of 3") && Catch::Contains("missing"));
    write_shards([](int i, gguf::Writer& w) {
        if (i == 2) w.set("split.no", uint16_t(1));
    });
    CHECK_THROWS_WITH(Model::load(shard_path(1)), Catch::Contains("not shard 3 of 3"));
    write_shards([&](int i, gguf::Writer& w) {
        if (i == 2) {
            const gguf::TensorInfo& info = file.tensors()[0];
            w.add_tensor_view(info.name, info.type,
                              std::vector<int64_t>(info.ne.begin(), info.ne.begin() + info.n_dims), info.data,
                              info.nbytes);
        }
    });
    CHECK_THROWS_WITH(Model::load(shard_path(1)), Catch::Contains("is in an earlier shard too"));
}

TEST_CASE("llama session: traced nodes hold every node's values and change no result", "[model]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m;
    TempFile file{write_model(m, seed)};
    std::unique_ptr<Model> model = Model::load(file.path);
    std::vector<int32_t> tokens = {3, 1, 4, 1, 5, 9, 2};
    SessionOptions so = exact_cache_options(16);
    Session plain(*model, so);
    so.trace_nodes = true;
    Session traced(*model, so);
    CHECK(plain.traced_nodes().empty());
    const std::vector<float> a = plain.eval(tokens, true), b = traced.eval(tokens, true);
    CHECK(a == b);
    const std::vector<TracedNode>& nodes = traced.traced_nodes();
    REQUIRE(nodes.size() > size_t(15 * m.layers));
    // The last node is the logits, with the values the eval returned.
    CHECK(nodes.back().label.find("'logits'") != std::string::npos);
    CHECK(nodes.back().values == b);
    CHECK(nodes.back().backend == "CPU");
    for (const TracedNode& n : nodes)
        for (float v : n.values) REQUIRE(std::isfinite(v)); // every node kept its own values
    // A decoding step traces its own graph.
    const std::vector<float> step = traced.eval(std::span(tokens.data(), 1));
    CHECK(traced.traced_nodes().back().values == step);
    CHECK(plain.eval(std::span(tokens.data(), 1)) == step);
}

TEST_CASE("llama model: rope_freqs.weight divides each pair's angle (Llama 3.1 style)", "[model]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m; // head_dim 8: four factors
    const std::vector<int32_t> tokens = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3};
    SessionOptions so = exact_cache_options(16);
    auto logits = [&](const TinyModel& model_shape) {
        TempFile file{write_model(model_shape, seed)};
        std::unique_ptr<Model> model = Model::load(file.path);
        Session s(*model, so);
        std::vector<float> out = s.eval(tokens, true);
        const std::vector<float> step = s.eval(std::span(tokens.data(), 1)); // a decoding graph too
        out.insert(out.end(), step.begin(), step.end());
        return out;
    };
    // Factors of 2 halve every angle, as linear scaling by 2 does; factors of 1 change nothing.
    TinyModel halved = m, linear = m, ones = m, mixed = m;
    halved.rope_factors.assign(size_t(m.head_dim() / 2), 2.0f);
    linear.rope_linear_scale = 2.0f;
    ones.rope_factors.assign(size_t(m.head_dim() / 2), 1.0f);
    mixed.rope_factors = {1.0f, 1.5f, 4.0f, 8.0f};
    const std::vector<float> plain = logits(m), by_factors = logits(halved), by_scale = logits(linear);
    CHECK(test::logits_error(by_factors, by_scale) < 1e-6);
    CHECK(test::logits_error(by_factors, plain) > 1e-3);
    CHECK(test::logits_error(logits(ones), plain) < 1e-6);
    CHECK(test::logits_error(logits(mixed), plain) > 1e-3);
    // A wrong shape or type is refused with the tensor named.
    TinyModel wrong = m;
    wrong.rope_factors.assign(5, 1.0f);
    TempFile bad{write_model(wrong, seed)};
    CHECK_THROWS_WITH(Model::load(bad.path), Catch::Contains("rope_freqs.weight"));
}

TEST_CASE("llama session: clear errors for bad inputs", "[model]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m;
    TempFile file{write_model(m, seed)};
    std::unique_ptr<Model> model = Model::load(file.path);
    SessionOptions so;
    so.n_ctx = 8;
    so.n_threads = 1;
    Session s(*model, so);
    const std::vector<int32_t> outside{1, int32_t(m.vocab)};
    CHECK_THROWS_WITH(s.eval(outside), Catch::Contains("outside the vocabulary"));
    const std::vector<int32_t> too_long(9, 1);
    CHECK_THROWS_WITH(s.eval(too_long), Catch::Contains("exceed the context"));
    CHECK_THROWS_AS(s.eval({}), Error);
    so.kv_type = Type::Q8_0; // head size 8 is not a multiple of 32
    CHECK_THROWS_WITH(Session(*model, so), Catch::Contains("block size"));
    so.kv_type = Type::F16;
    so.decode_window_step = -1;
    CHECK_THROWS_WITH(Session(*model, so), Catch::Contains("decode_window_step"));
    so.decode_window_step = 0;
    so.matmul_precision = MatMulPrecision(9);
    CHECK_THROWS_WITH(Session(*model, so), Catch::Contains("unknown matmul_precision 9"));
    so.matmul_precision = MatMulPrecision::F32;
    so.attention_precision = FlashAttnPrecision(5);
    CHECK_THROWS_WITH(Session(*model, so), Catch::Contains("unknown attention_precision 5"));
}

TEST_CASE("llama model: malformed files are rejected with the tensor named", "[model]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    TinyModel m;
    {
        TempFile file{write_model(m, seed, "blk.1.ffn_up.weight")};
        CHECK_THROWS_WITH(Model::load(file.path), Catch::Contains("blk.1.ffn_up.weight is missing"));
    }
    {
        TempFile file{write_model(m, seed, "", "blk.0.attn_k.weight")};
        CHECK_THROWS_WITH(Model::load(file.path), Catch::Contains("blk.0.attn_k.weight has shape"));
    }
    {
        // A bias that would be merged with the others is checked like any tensor.
        TinyModel q = m;
        q.arch = "qwen2";
        q.biases = true;
        TempFile file{write_model(q, seed, "", "blk.1.attn_v.bias")};
        CHECK_THROWS_WITH(Model::load(file.path), Catch::Contains("blk.1.attn_v.bias has shape"));
    }
    {
        m.arch = "gpt2";
        TempFile file{write_model(m, seed)};
        CHECK_THROWS_WITH(Model::load(file.path), Catch::Contains("not supported"));
    }
}
