// Training on CUDA against the CPU: the same model, batches and AdamW steps.
#include "op_check.h"
#include "tiny_model.h"

#include <ggml-fa/backend.h>
#include <ggml-fa/train.h>

#include <cmath>

using namespace gfa;

namespace {

// A small Llama with head size 64 (a size the tensor-core attention kernels take).
ModelConfig cuda_train_config(int64_t n_embd, int64_t n_ff, int64_t n_head_kv) {
    ModelConfig c;
    c.arch = "llama";
    c.n_vocab = 61;
    c.n_embd = n_embd;
    c.n_layer = 2;
    c.n_ff = n_ff;
    c.n_head = 2;
    c.n_head_kv = n_head_kv;
    c.head_dim = 64;
    c.rope = {.n_dims = 64, .mode = RopeMode::Normal, .freq_base = 10000.0f, .freq_scale = 1.0f};
    return c;
}

// One step on each trainer with the same batch: losses within loss_tol (relative), every
// parameter's gradient within grad_tol.
void check_step(Trainer& cpu, Trainer& gpu, const ModelConfig& c, const TrainOptions& o, int32_t step,
                double loss_tol, double grad_tol) {
    const std::vector<int32_t> batch =
        test::random_indices(size_t((o.n_ctx + 1) * o.n_seq), int32_t(c.n_vocab));
    const AdamWParams p{.lr = 1e-4f, .step = step}; // small: near-zero gradients move elements by +-lr
    const float want = cpu.step(batch, p), got = gpu.step(batch, p);
    INFO("step " << step << ": loss " << got << " on CUDA, " << want << " on the CPU");
    CHECK(std::abs(got - want) <= loss_tol * std::abs(want));
    const auto g_cpu = cpu.gradients(), g_gpu = gpu.gradients();
    for (size_t i = 0; i < g_cpu.size(); ++i) {
        const double err = test::rel_error(
            g_gpu[i].second, std::vector<double>(g_cpu[i].second.begin(), g_cpu[i].second.end()));
        INFO(g_cpu[i].first << ": gradient relative error " << err);
        CHECK(err <= grad_tol);
    }
}

} // namespace

TEST_CASE("CUDA trains a model as the CPU does", "[cuda][train]") {
    TrainOptions o;
    o.n_ctx = 77; // not a multiple of the kernels' tiles
    o.n_seq = 3;
    o.n_threads = 2;
    o.seed = test::seed();
    o.init_std = 0.1f;
    // llama (grouped heads), qwen2, gemma2, gemma3, qwen3
    const ModelConfig c = test::train_config_variant(cuda_train_config(96, 136, 1), GENERATE(0, 1, 2, 3, 4));
    INFO("seed " << o.seed << ", " << c.arch);
    Trainer cpu(c, o);
    o.device = find_device("CUDA0");
    REQUIRE(o.device != nullptr);
    Trainer gpu(c, o);
    INFO(gpu.describe_schedule());
    CHECK(gpu.describe_schedule().find("CPU") == std::string::npos); // every node on the GPU
    // The attention kernels multiply in f16 (the f32 inputs rounded once).
    for (int32_t s = 1; s <= 3; ++s) check_step(cpu, gpu, c, o, s, 1e-3, 1e-2);
}

// With TF32 products (TrainOptions::matmul_precision) the step stays within TensorFloat-32's
// rounding of the CPU's f32 step.
TEST_CASE("CUDA trains with TF32 products close to the CPU's f32", "[cuda][train]") {
    const ModelConfig c = cuda_train_config(128, 200, 2);
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
    check_step(cpu, gpu, c, o, 1, 3e-3, 3e-2);
}
