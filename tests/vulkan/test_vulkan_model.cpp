// A tiny random Llama-family model run on Vulkan against the same model on the CPU: prefill
// and token-by-token decoding, f32/f16 weights and caches, quantized weights and a q8_0
// cache, and a model split between the CPU and Vulkan. With every block offloaded and a
// float cache, the whole forward pass must run on Vulkan (no split on the CPU).
#include "compare.h"
#include "op_check.h"
#include "tiny_model.h"
#include "vulkan_device.h"

#include <ggml-fa/model.h>
#include <ggml-fa/train.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <span>

using namespace gfa;

namespace {

struct Run {
    std::vector<float> logits;             // the prompt's logits at every position, then each decoded step's
    std::string schedule;                  // the last graph's splits
    std::vector<std::string> kept_on_host; // weights the loader left in host memory for the CPU
};

// The prompt in one batch, then `steps` single tokens.
Run run_model(const std::string& path, Device* gpu, int gpu_layers, Type kv_type,
              const std::vector<int32_t>& tokens, int steps) {
    ModelLoadOptions load;
    load.gpu = gpu;
    load.gpu_layers = gpu ? gpu_layers : 0;
    std::unique_ptr<Model> model = Model::load(path, load);
    SessionOptions so;
    so.n_ctx = 64;
    so.kv_type = kv_type;
    so.n_threads = 2;
    so.decode_window_step = 16;
    Session session(*model, so);
    const size_t prompt = tokens.size() - size_t(steps);
    Run run;
    run.logits = session.eval(std::span(tokens.data(), prompt), true);
    for (size_t i = prompt; i < tokens.size(); ++i) {
        const std::vector<float> step = session.eval(std::span(&tokens[i], 1));
        run.logits.insert(run.logits.end(), step.begin(), step.end());
    }
    run.schedule = session.describe_schedule();
    run.kept_on_host = model->kept_on_host();
    return run;
}

std::vector<int32_t> random_tokens(uint32_t seed, int n, int64_t vocab) {
    std::mt19937 rng(seed);
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (int32_t& x : t) x = int32_t(rng() % uint32_t(vocab));
    return t;
}

} // namespace

TEST_CASE("Vulkan runs a whole llama model as the CPU does", "[vulkan][model]") {
    const uint32_t seed = test::seed();
    INFO("seed " << seed);
    test::TinyModel m;
    Type kv = Type::F32;
    double tol = 1e-5;
    SECTION("llama, f32 weights and cache, GQA 5:1") {}
    SECTION("llama, Llama 3.1 style rope factors") {
        m.rope_factors = {1.0f, 1.5f, 4.0f, 8.0f};
    }
    SECTION("mixtral: 5 experts, 2 per token, the router and experts on Vulkan") {
        m.experts = 5;
        m.experts_used = 2;
    }
    SECTION("gemma2: sliding windows, soft caps, post norms, GeGLU") {
        m.arch = "gemma2";
        m.tied = true;
        m.layers = 3;
    }
    SECTION("gemma3: q/k norms, sliding windows on two of three layers, two rope bases") {
        m.arch = "gemma3";
        m.tied = true;
        m.layers = 4;
    }
    SECTION("qwen2, biases, tied embeddings, f16 weights and cache") {
        m.arch = "qwen2";
        m.biases = m.tied = true;
        m.heads_kv = 5;
        m.vocab = 113;
        m.f16_tensors = {"embd.weight",   "q.weight",    "k.weight",  "v.weight",
                         "output.weight", "gate.weight", "up.weight", "down.weight"};
        kv = Type::F16;
        tol = 1e-3; // the cache rounds to f16 on both sides; products differ in order
    }
    test::TempFile file{test::write_model(m, seed)};
    const std::vector<int32_t> tokens = random_tokens(seed, 21, m.vocab);
    const Run cpu = run_model(file.path, nullptr, 0, kv, tokens, 6);
    // The last N blocks on Vulkan, for every N; above n_layer the output head and the
    // embeddings too, so that every node runs there.
    for (int gpu_layers = 1; gpu_layers <= int(m.layers) + 1; ++gpu_layers) {
        const Run vk = run_model(file.path, vulkan0(), gpu_layers, kv, tokens, 6);
        INFO(gpu_layers << " blocks on Vulkan, schedule:\n" << vk.schedule);
        CHECK(vk.schedule.find("Vulkan0") != std::string::npos);
        CHECK((vk.schedule.find("CPU") == std::string::npos) == (gpu_layers > m.layers));
        // Nodes without weights stay with their data: the graph crosses between the devices
        // once into the offloaded blocks and once out to the head on the CPU.
        size_t splits = 0;
        for (size_t at = vk.schedule.find("split "); at != std::string::npos;
             at = vk.schedule.find("split ", at + 1))
            ++splits;
        CHECK(splits <= 3);
        CHECK(vk.kept_on_host.empty()); // every weight Vulkan multiplies by stays in its memory
        const double err = test::logits_error(vk.logits, cpu.logits);
        INFO("relative error " << err);
        CHECK(err <= tol);
    }
}

// Greedy decoding through Session::eval_greedy with the whole model on Vulkan: each pick is
// the first largest of the logits that eval returns for the same step, and the pick itself
// runs on Vulkan (top_k's one-pass path for k = 1 over a vocabulary of 2000).
TEST_CASE("Vulkan session: eval_greedy picks on the device what the logits say", "[vulkan][model]") {
    const uint32_t seed = test::seed();
    INFO("seed " << seed);
    test::TinyModel m;
    m.vocab = 2000;
    test::TempFile file{test::write_model(m, seed)};
    std::unique_ptr<Model> model = test::load_on(vulkan0(), file.path);
    SessionOptions so;
    so.n_ctx = 40;
    so.n_threads = 2;
    so.decode_window_step = 16;
    const std::vector<int32_t> tokens = random_tokens(seed, 17, m.vocab);
    const std::vector<std::string> disagreements =
        test::greedy_disagreements(*model, so, tokens, 7, vulkan0());
    for (const std::string& line : disagreements) UNSCOPED_INFO(line);
    CHECK(disagreements.empty());
}

// Session::decode on Vulkan, whose backend keeps the default transfers (it waits, then
// transfers): the same picks, n_past and cache as eval_pick token by token, with the whole
// model on the device (each step fed by the one before) and with one block left on the CPU
// (two splits: every token goes through the host).
TEST_CASE("Vulkan session: decode picks what eval_pick picks token by token", "[vulkan][model]") {
    const uint32_t seed = test::seed();
    INFO("seed " << seed);
    test::TinyModel m;
    m.vocab = 2000;
    test::TempFile file{test::write_model(m, seed)};
    const int gpu_layers = GENERATE(1000, 1);
    INFO("gpu layers " << gpu_layers);
    std::unique_ptr<Model> model = test::load_on(vulkan0(), file.path, gpu_layers);
    SessionOptions so;
    so.n_ctx = 40;
    so.n_threads = 2;
    so.decode_window_step = 16;
    const std::vector<int32_t> prompt = random_tokens(seed, 9, m.vocab);
    int64_t fed = -1;
    const int64_t steps = 20, stop_after = GENERATE(-1, 6);
    // Drawn tokens: Vulkan has no sample_token, so the draw runs on the CPU (two splits).
    const bool drawn = GENERATE(false, true);
    const Sampling sampling =
        drawn ? Sampling{.temperature = 0.8f, .top_k = 30, .top_p = 0.9f, .seed = seed} : Sampling{};
    const std::vector<std::string> disagreements =
        test::decode_disagreements(*model, so, prompt, steps, stop_after, false, &fed, sampling);
    for (const std::string& line : disagreements) UNSCOPED_INFO(line);
    CHECK(disagreements.empty());
    if (gpu_layers == 1 || drawn) CHECK(fed == 0);
    if (gpu_layers == 1000 && !drawn && stop_after < 0)
        CHECK((fed > 0 && fed < steps - 1)); // a window grows at 16
}

TEST_CASE("Vulkan runs quantized llama weights", "[vulkan][model]") {
    const uint32_t seed = test::seed();
    INFO("seed " << seed);
    test::TinyModel m;
    m.embd = 256;
    m.ff = 256;
    m.heads = 4;
    m.heads_kv = 2;
    m.vocab = 53;
    Type kv = Type::F16;
    SECTION("q8_0") {
        m.matrix_type = Type::Q8_0;
    }
    SECTION("q4_K") {
        m.matrix_type = Type::Q4_K;
    }
    SECTION("q6_K") {
        m.matrix_type = Type::Q6_K;
    }
    SECTION("q4_0 with a q8_0 cache") {
        m.matrix_type = Type::Q4_0;
        kv = Type::Q8_0;
    }
    SECTION("q2_K") {
        m.matrix_type = Type::Q2_K;
    }
    SECTION("q3_K") {
        m.matrix_type = Type::Q3_K;
    }
    SECTION("iq4_nl") {
        m.matrix_type = Type::IQ4_NL;
    }
    SECTION("iq4_xs") {
        m.matrix_type = Type::IQ4_XS;
    }
    SECTION("q4_K mixture of experts (4 experts, 2 per token)") {
        m.matrix_type = Type::Q4_K;
        m.experts = 4;
        m.experts_used = 2;
    }
    INFO("weights " << type_name(m.matrix_type) << ", cache " << type_name(kv));
    test::TempFile file{test::write_model(m, seed)};
    // The same weights decoded to f32: the CPU's quantized products round activations to 16
    // bits per block (differences that the random model's sharp attention amplifies to about
    // 1%), Vulkan's decode weights exactly and keep activations in f32, so the CPU running the
    // decoded weights is the comparison that can hold Vulkan to f32 accuracy.
    test::TinyModel decoded = m;
    decoded.decoded_as_f32 = true;
    test::TempFile decoded_file{test::write_model(decoded, seed)};
    const std::vector<int32_t> tokens = random_tokens(seed, 17, m.vocab);
    const Run cpu = run_model(decoded_file.path, nullptr, 0, kv, tokens, 4);
    const Run vk = run_model(file.path, vulkan0(), 1000, kv, tokens, 4);
    INFO("Vulkan schedule:\n" << vk.schedule);
    CHECK(vk.schedule.find("Vulkan0") != std::string::npos);
    CHECK(vk.schedule.find("CPU") == std::string::npos); // every node on Vulkan
    CHECK(vk.kept_on_host.empty());
    const double err = test::logits_error(vk.logits, cpu.logits);
    INFO("relative error " << err);
    // Both sides round the cache the same way from keys and values that differ in the last
    // bits (f32 sums in different orders): a q8_0 value on a rounding boundary then moves by
    // a whole step (1/127 of its block), which the sharp attention of a random model
    // amplifies (up to 9.4e-4 seen in 40 seeds, against 1e-5 without such a flip).
    CHECK(err <= (kv == Type::F16 ? 1e-3 : 5e-3));
}

TEST_CASE("compare --model: every node of a model on Vulkan against the CPU", "[vulkan][model]") {
    const uint32_t seed = test::seed();
    INFO("seed " << seed);
    test::TinyModel m;
    test::TempFile file{test::write_model(m, seed)};
    const std::vector<int32_t> prompt = random_tokens(seed, 9, m.vocab);
    const compare::ModelComparison c = compare::compare_model(file.path, vulkan0(), prompt, 2, Type::F32, 2);
    REQUIRE(c.reports.size() == 3); // the prompt and two decoding steps
    for (size_t e = 0; e < c.reports.size(); ++e) {
        const compare::Report& r = c.reports[e];
        INFO(c.evals[e] << ": worst " << (r.worst_index >= 0 ? r.nodes[size_t(r.worst_index)].label : "-")
                        << " " << r.worst);
        CHECK(r.nodes.size() > size_t(15 * m.layers)); // every node of every block, not just the logits
        for (const compare::NodeResult& n : r.nodes) CHECK(n.backend == "Vulkan0");
        CHECK(r.worst <= 1e-5);
    }
}
TEST_CASE("Vulkan trains a model as the CPU does", "[vulkan][model][train]") {
    // llama, qwen2, gemma2 (soft caps and a window through the attention backward)
    const ModelConfig c = test::train_config_variant(test::tiny_train_config(), GENERATE(0, 1, 2, 3));
    INFO(c.arch);
    TrainOptions o;
    o.n_ctx = 11;
    o.n_seq = 3;
    o.n_threads = 2;
    o.seed = test::seed();
    o.init_std = 0.3f;
    INFO("seed " << o.seed);
    Trainer cpu(c, o);
    o.device = vulkan0();
    Trainer vk(c, o);
    CHECK(vk.describe_schedule().find("CPU") == std::string::npos); // every node on Vulkan
    for (int32_t s = 1; s <= 3; ++s) {
        const std::vector<int32_t> batch =
            test::random_indices(size_t((o.n_ctx + 1) * o.n_seq), int32_t(c.n_vocab));
        // A small rate: an element whose gradient is near zero moves by +-lr (see below)
        const AdamWParams p{.lr = 1e-4f, .weight_decay = 0.1f, .step = s};
        const float want = cpu.step(batch, p), got = vk.step(batch, p);
        INFO("step " << s << ": loss " << got << " on Vulkan, " << want << " on the CPU");
        CHECK(std::abs(got - want) <= 1e-5f * std::abs(want));
        const auto g_cpu = cpu.gradients(), g_vk = vk.gradients();
        for (size_t i = 0; i < g_cpu.size(); ++i) {
            const double err = test::rel_error(
                g_vk[i].second, std::vector<double>(g_cpu[i].second.begin(), g_cpu[i].second.end()));
            INFO(g_cpu[i].first << ": gradient relative error " << err);
            // f32 on both sides, sums in other orders: ~1e-5 typically, 1.2e-4 seen on tensors
            // whose gradients nearly cancel; a wrong kernel is off by O(1).
            CHECK(err <= 5e-4);
        }
    }
    // The weights themselves are not compared: AdamW's first steps move every element by
    // about lr * sign(gradient), so an element whose gradient is near zero moves by +lr on one
    // device and -lr on the other. The losses and gradients of the later steps, computed from
    // the updated weights, are the comparison; the update itself is exact on every device
    // (tests/device_op_cases.cpp).
}
