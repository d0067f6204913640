// Training on CUDA against the CPU: the same model, batches and AdamW steps.
#include "op_check.h"
#include "tiny_model.h"

#include <ggml-fa/backend.h>
#include <ggml-fa/train.h>

#include <cmath>

using namespace gfa;

TEST_CASE("CUDA trains a model as the CPU does", "[cuda][train]") {
    ModelConfig c;
    c.arch = "llama";
    c.n_vocab = 61;
    c.n_embd = 96;
    c.n_layer = 2;
    c.n_ff = 136;
    c.n_head = 2;
    c.n_head_kv = 1; // grouped heads
    c.head_dim = 64; // a head size the tensor-core kernels take
    c.rope = {.n_dims = 64, .mode = RopeMode::Normal, .freq_base = 10000.0f, .freq_scale = 1.0f};
    TrainOptions o;
    o.n_ctx = 77; // not a multiple of the kernels' tiles
    o.n_seq = 3;
    o.n_threads = 2;
    o.seed = test::seed();
    o.init_std = 0.1f;
    c = test::train_config_variant(c, GENERATE(0, 1, 2, 3)); // llama, qwen2, gemma2, gemma3
    INFO("seed " << o.seed << ", " << c.arch);
    Trainer cpu(c, o);
    o.device = find_device("CUDA0");
    REQUIRE(o.device != nullptr);
    Trainer gpu(c, o);
    INFO(gpu.describe_schedule());
    CHECK(gpu.describe_schedule().find("CPU") == std::string::npos); // every node on the GPU
    for (int32_t s = 1; s <= 3; ++s) {
        const std::vector<int32_t> batch =
            test::random_indices(size_t((o.n_ctx + 1) * o.n_seq), int32_t(c.n_vocab));
        const AdamWParams p{.lr = 1e-4f, .step = s}; // small: near-zero gradients move elements by +-lr
        const float want = cpu.step(batch, p), got = gpu.step(batch, p);
        INFO("step " << s << ": loss " << got << " on CUDA, " << want << " on the CPU");
        // The attention kernels multiply in f16 (the f32 inputs rounded once).
        CHECK(std::abs(got - want) <= 1e-3f * std::abs(want));
        const auto g_cpu = cpu.gradients(), g_gpu = gpu.gradients();
        for (size_t i = 0; i < g_cpu.size(); ++i) {
            const double err = test::rel_error(
                g_gpu[i].second, std::vector<double>(g_cpu[i].second.begin(), g_cpu[i].second.end()));
            INFO(g_cpu[i].first << ": gradient relative error " << err);
            CHECK(err <= 1e-2);
        }
    }
}

// With TF32 products (TrainOptions::matmul_precision) the step stays within TensorFloat-32's
// rounding of the CPU's f32 step.
TEST_CASE("CUDA trains with TF32 products close to the CPU's f32", "[cuda][train]") {
    ModelConfig c;
    c.arch = "llama";
    c.n_vocab = 61;
    c.n_embd = 128;
    c.n_layer = 2;
    c.n_ff = 200;
    c.n_head = 2;
    c.n_head_kv = 2;
    c.head_dim = 64;
    c.rope = {.n_dims = 64, .mode = RopeMode::Normal, .freq_base = 10000.0f, .freq_scale = 1.0f};
    TrainOptions o;
    o.n_ctx = 65;
    o.n_seq = 2;
    o.n_threads = 2;
    o.seed = test::seed();
    o.init_std = 0.1f;
    INFO("seed " << o.seed);
    Trainer cpu(c, o);
    o.device = find_device("CUDA0");
    REQUIRE(o.device != nullptr);
    o.matmul_precision = MatMulPrecision::TF32;
    Trainer gpu(c, o);
    const std::vector<int32_t> batch =
        test::random_indices(size_t((o.n_ctx + 1) * o.n_seq), int32_t(c.n_vocab));
    const AdamWParams p{.lr = 1e-4f, .step = 1};
    const float want = cpu.step(batch, p), got = gpu.step(batch, p);
    INFO("loss " << got << " on CUDA (TF32), " << want << " on the CPU");
    CHECK(std::abs(got - want) <= 3e-3f * std::abs(want));
    const auto g_cpu = cpu.gradients(), g_gpu = gpu.gradients();
    for (size_t i = 0; i < g_cpu.size(); ++i) {
        const double err = test::rel_error(
            g_gpu[i].second, std::vector<double>(g_cpu[i].second.begin(), g_cpu[i].second.end()));
        INFO(g_cpu[i].first << ": gradient relative error " << err);
        CHECK(err <= 3e-2);
    }
}
