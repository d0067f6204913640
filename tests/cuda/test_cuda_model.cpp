// Models on CUDA whose weights include block formats the CUDA kernels do not decode.
#include <catch2/catch.hpp>

#include "../scoped_env.h"
#include "../tiny_model.h"

#include <ggml-fa/backend.h>
#include <ggml-fa/model.h>

#include <random>
#include <string>
#include <vector>

using namespace gfa;

namespace {

struct Run {
    std::vector<float> logits;
    std::string schedule;
    size_t kept_on_host = 0;
};

// A 13-token prompt and three decoded tokens; every block and the head offloaded when gpu.
Run run_model(const std::string& path, Device* gpu, uint32_t seed, int64_t vocab) {
    ModelLoadOptions load;
    load.gpu = gpu;
    load.gpu_layers = gpu ? 1000 : 0;
    std::unique_ptr<Model> model = Model::load(path, load);
    SessionOptions so;
    so.n_ctx = 32;
    so.kv_type = Type::F32;
    so.n_threads = 2;
    Session session(*model, so);
    std::mt19937 rng(seed);
    std::vector<int32_t> tokens(16);
    for (int32_t& t : tokens) t = int32_t(rng() % uint32_t(vocab));
    Run run;
    run.logits = session.eval(std::span(tokens.data(), 13), true);
    for (size_t i = 13; i < tokens.size(); ++i) {
        const std::vector<float> step = session.eval(std::span(&tokens[i], 1));
        run.logits.insert(run.logits.end(), step.begin(), step.end());
    }
    run.schedule = session.describe_schedule();
    run.kept_on_host = model->kept_on_host().size();
    return run;
}

// A model small enough to run in a second, with rows long enough for every block format.
test::TinyModel small_model() {
    test::TinyModel m;
    m.embd = 256;
    m.ff = 256;
    m.heads = 4;
    m.heads_kv = 2;
    m.vocab = 41;
    return m;
}

} // namespace

// q2_K, q3_K and the IQ4 formats: with their CUDA kernels on (the default) the whole model runs
// on the GPU; with GFA_CUDA_LOW_BIT=0 the loader keeps such matrices in host memory, their
// products run on the CPU and everything else on the GPU. Either way the logits
// are the CPU's (the attention on 16-bit tensor cores, and each device's own rounding of the
// activations in quantized products, which this random model's sharp attention amplifies to
// a few percent; a misplaced or misread weight costs ~100%).
TEST_CASE("CUDA runs models with low-bit weights, with their kernels or their products on the CPU",
          "[cuda][model]") {
    Device* cuda = find_device("CUDA0");
    REQUIRE(cuda != nullptr);
    const uint32_t seed = std::random_device{}();
    test::TinyModel m = small_model();
    m.matrix_type = GENERATE(Type::Q2_K, Type::Q3_K, Type::IQ4_NL, Type::IQ4_XS, Type::Q4_K);
    const bool low_bit = m.matrix_type != Type::Q4_K;
    const bool kernels_on = GENERATE(false, true);
    const test::ScopedEnv setting("GFA_CUDA_LOW_BIT", kernels_on ? nullptr : "0");
    INFO("seed " << seed << ", weights " << type_name(m.matrix_type) << ", GFA_CUDA_LOW_BIT "
                 << (kernels_on ? "unset" : "0"));
    test::TempFile file{test::write_model(m, seed)};
    const Run cpu = run_model(file.path, nullptr, seed, m.vocab);
    const Run gpu = run_model(file.path, cuda, seed, m.vocab);
    INFO("CUDA schedule:\n" << gpu.schedule);
    CHECK(gpu.schedule.find("CUDA0") != std::string::npos);
    CHECK((gpu.schedule.find("CPU") == std::string::npos) == (!low_bit || kernels_on));
    // every matrix: 4 per block (merged q/k/v and gate/up, o, down), the embeddings, the head
    CHECK(gpu.kept_on_host == (low_bit && !kernels_on ? size_t(4 * m.layers + 2) : 0));
    CHECK(test::logits_error(gpu.logits, cpu.logits) < 5e-2);
}

// A mixture of experts (5 experts, 2 per token) with f32 and q4_K experts: the router's top_k
// and the experts' mul_mat_id run on the GPU with the rest (no node on the CPU, no matrix kept
// in host memory), prompt and decoding alike, and the logits are the CPU's (q4_K: within the
// few percent that the CPU's 8-bit activations and this model's sharp attention allow).
TEST_CASE("CUDA runs a mixture of experts with its router and experts on the GPU", "[cuda][model][moe]") {
    Device* cuda = find_device("CUDA0");
    REQUIRE(cuda != nullptr);
    const uint32_t seed = std::random_device{}();
    test::TinyModel m = small_model();
    m.experts = 5;
    m.experts_used = 2;
    m.matrix_type = GENERATE(Type::F32, Type::Q4_K);
    INFO("seed " << seed << ", weights " << type_name(m.matrix_type));
    test::TempFile file{test::write_model(m, seed)};
    const Run cpu = run_model(file.path, nullptr, seed, m.vocab);
    const Run gpu = run_model(file.path, cuda, seed, m.vocab);
    INFO("CUDA schedule:\n" << gpu.schedule);
    CHECK(gpu.schedule.find("CUDA0") != std::string::npos);
    CHECK(gpu.schedule.find("CPU") == std::string::npos);
    CHECK(gpu.kept_on_host == 0);
    CHECK(test::logits_error(gpu.logits, cpu.logits) < (m.matrix_type == Type::F32 ? 1e-2 : 5e-2));
}

// Greedy decoding through Session::eval_greedy with the whole model on the GPU: each pick is
// the first largest of the logits that eval returns for the same step (a vocabulary wide
// enough for top_k's one-block-a-row kernel), decoding long enough to replay launch graphs,
// and the pick itself runs on the GPU (no node on the CPU).
TEST_CASE("CUDA session: eval_greedy picks on the GPU what the logits say", "[cuda][model]") {
    Device* cuda = find_device("CUDA0");
    REQUIRE(cuda != nullptr);
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    test::TinyModel m = small_model();
    m.vocab = 3001;
    m.matrix_type = GENERATE(Type::F32, Type::Q4_K);
    test::TempFile file{test::write_model(m, seed)};
    std::unique_ptr<Model> model = test::load_on(cuda, file.path);
    SessionOptions so;
    so.n_ctx = 64;
    so.n_threads = 2;
    std::mt19937 rng(seed);
    std::vector<int32_t> tokens(40);
    for (int32_t& t : tokens) t = int32_t(rng() % uint32_t(m.vocab));
    const std::vector<std::string> disagreements = test::greedy_disagreements(*model, so, tokens, 9, cuda);
    for (const std::string& line : disagreements) UNSCOPED_INFO(line);
    CHECK(disagreements.empty());
}

// Session::decode (greedy, and drawn by sample_token) with the whole model on the GPU: each
// step's token goes from the step before to the next on the device, through transfers queued on
// the stream, while the host lands the picks one step behind. Picks, n_past and the cache
// afterwards must be those of eval_pick token by token, also where the caller stops (returning
// false, or throwing) with a step already queued past it, and where the attention window grows
// (new graphs, whose first token goes through the host).
TEST_CASE("CUDA session: decode picks what eval_pick picks token by token", "[cuda][model]") {
    Device* cuda = find_device("CUDA0");
    REQUIRE(cuda != nullptr);
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    test::TinyModel m = small_model();
    m.vocab = 3001;
    m.matrix_type = GENERATE(Type::F32, Type::Q4_K);
    INFO("weights " << type_name(m.matrix_type));
    test::TempFile file{test::write_model(m, seed)};
    std::unique_ptr<Model> model = test::load_on(cuda, file.path);
    SessionOptions so;
    so.n_ctx = 80;
    so.n_threads = 2;
    int64_t max_steps = 40, stop_after = -1;
    bool throwing = false, windows_change = false;
    SECTION("every step fed by the one before") {}
    SECTION("windows that change every 8 positions") {
        so.decode_window_step = 8;
        windows_change = true;
    }
    SECTION("the caller stops after 23 picks") {
        stop_after = 23;
    }
    SECTION("the caller throws at the 2nd pick") {
        stop_after = 2;
        throwing = true;
    }
    Sampling sampling;
    SECTION("drawn on the GPU (sample_token), every step fed by the one before") {
        sampling = {.temperature = 0.9f, .top_k = 40, .top_p = 0.95f, .seed = seed};
    }
    SECTION("drawn on the GPU from the 128 most likely, the caller stops after 11 picks") {
        sampling = {.temperature = 1.7f, .top_k = 128, .top_p = 1.0f, .seed = seed + 1};
        stop_after = 11;
    }
    std::mt19937 rng(seed);
    std::vector<int32_t> prompt(13);
    for (int32_t& t : prompt) t = int32_t(rng() % uint32_t(m.vocab));
    int64_t fed = -1;
    const std::vector<std::string> disagreements =
        test::decode_disagreements(*model, so, prompt, max_steps, stop_after, throwing, &fed, sampling);
    for (const std::string& line : disagreements) UNSCOPED_INFO(line);
    CHECK(disagreements.empty());
    if (stop_after < 0 && !windows_change) CHECK(fed == max_steps - 1);
    if (windows_change) CHECK((fed > 0 && fed < max_steps - 1));
}
