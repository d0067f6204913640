// train: a Llama-shaped model trained from scratch on a text file, byte by byte, or a llama,
// qwen2, qwen3 or gemma (2, 3) GGUF model fine-tuned on one.
//
//   train --data FILE.txt [-o MODEL.gguf] [--layers 4 --embd 256 --heads 4 ...] [--steps 500]
//   train --data FILE.txt --init MODEL_OR_CHECKPOINT.gguf [--checkpoint CKPT.gguf] ...
//
// The text's bytes are the tokens (a 256-token byte-level vocabulary). Every step draws
// --batch windows of --ctx + 1 bytes from the first part of the file, runs the forward pass,
// the backward pass (attention through the FlashAttention-2 backward) and an AdamW update
// with linear warm-up and cosine decay; every --eval-every steps the loss on the held-out
// last part is printed. The result is a GGUF file of architecture llama with that
// vocabulary, which ggml-fa-run (and llama.cpp) run; --sample N generates N bytes from it.
// --checkpoint keeps the optimizer state and step count as well, and --init resumes from it.
#include "tools/cli.h"

#include <ggml-fa/backend.h>
#include <ggml-fa/error.h>
#include <ggml-fa/model.h>
#include <ggml-fa/tokenizer.h>
#include <ggml-fa/train.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <numbers>
#include <random>
#include <string>
#include <vector>

using namespace gfa;

namespace {

struct Options {
    std::string data, out, backend = "cpu", prompt, init, checkpoint;
    int64_t layers = 4, embd = 256, heads = 4, kv_heads = 0, head_dim = 0, ff = 0;
    int64_t ctx = 128, batch = 8, accumulate = 1, steps = 500, warmup = 20, eval_every = 50, eval_batches = 4,
            sample = 0;
    float lr = 1e-3f, min_lr = 1e-4f, weight_decay = 0.1f, beta2 = 0.99f, val_fraction = 0.1f,
          grad_clip = 1.0f;
    uint64_t seed = 1;
    int threads = 0;
    Type save_type = Type::F32;
    bool profile = false;
    bool tf32 = false;
};

void usage() {
    std::fprintf(
        stderr,
        "usage: train --data FILE [-o MODEL.gguf] [options]\n"
        "model:\n"
        "  --init FILE                     start from FILE instead of random weights: a checkpoint\n"
        "                                  (--checkpoint) goes on from its step; a llama, qwen2, qwen3,\n"
        "                                  gemma2 or gemma3 GGUF model is fine-tuned, the text read\n"
        "                                  with its own vocabulary\n"
        "                                  (the shape options below are then the file's)\n"
        "  --layers N --embd N --heads N   blocks, embedding width, query heads (4, 256, 4)\n"
        "  --kv-heads N --head-dim N       key/value heads (default: --heads), head size\n"
        "                                  (default: embd / heads)\n"
        "  --ff N                          feed-forward width (default: 8/3 embd, a multiple of 32)\n"
        "training:\n"
        "  --ctx N --batch N               bytes per sequence, sequences per pass (128, 8)\n"
        "  --accumulate N                  passes per step, gradients averaged (1): a step sees\n"
        "                                  N * batch sequences in the memory of one batch\n"
        "  --steps N --warmup N            steps, warm-up steps of the learning rate (500, 20)\n"
        "  --lr X --min-lr X               peak and final learning rate (1e-3, 1e-4; cosine)\n"
        "  --weight-decay X --beta2 X      AdamW (0.1, 0.99)\n"
        "  --grad-clip X                   the gradients' global norm at most X (1; 0: off)\n"
        "  --val-fraction X                the file's tail held out for evaluation (0.1)\n"
        "  --eval-every N --eval-batches N (50, 4)\n"
        "  --seed S                        initial weights and batches (1)\n"
        "  --backend cpu|cuda|vulkan       where the weights and the work live (cpu)\n"
        "  --tf32                          products may round f32 operands to TensorFloat-32\n"
        "                                  on a GPU's tensor cores (PyTorch's allow_tf32)\n"
        "  -t, --threads N                 CPU threads (default: all cores)\n"
        "  --profile                       print a step's schedule and the backends' counters\n"
        "                                  (GFA_CPU_OP_TIMES=1: time per op on the CPU)\n"
        "output:\n"
        "  -o FILE                         the trained model as GGUF\n"
        "  --checkpoint FILE               model + optimizer state + step count, written at every\n"
        "                                  evaluation (--init FILE resumes from it)\n"
        "  --save-type f32|f16|bf16|q8_0   its matrices' type (f32)\n"
        "  --sample N [--prompt TEXT]      generate N bytes greedily from the saved model\n");
}

Options parse(int argc, char** argv) {
    Options o;
    cli::Args args(argc, argv);
    while (args.next()) {
        const std::string a = args.option();
        if (a == "--data")
            o.data = args.value();
        else if (a == "-o" || a == "--out")
            o.out = args.value();
        else if (a == "--layers")
            o.layers = args.integer();
        else if (a == "--embd")
            o.embd = args.integer();
        else if (a == "--heads")
            o.heads = args.integer();
        else if (a == "--kv-heads")
            o.kv_heads = args.integer();
        else if (a == "--head-dim")
            o.head_dim = args.integer();
        else if (a == "--ff")
            o.ff = args.integer();
        else if (a == "--ctx")
            o.ctx = args.integer();
        else if (a == "--batch")
            o.batch = args.integer();
        else if (a == "--accumulate")
            o.accumulate = args.integer();
        else if (a == "--steps")
            o.steps = args.integer();
        else if (a == "--warmup")
            o.warmup = args.integer();
        else if (a == "--eval-every")
            o.eval_every = args.integer();
        else if (a == "--eval-batches")
            o.eval_batches = args.integer();
        else if (a == "--sample")
            o.sample = args.integer();
        else if (a == "--prompt")
            o.prompt = args.value();
        else if (a == "--lr")
            o.lr = args.real();
        else if (a == "--min-lr")
            o.min_lr = args.real();
        else if (a == "--weight-decay")
            o.weight_decay = args.real();
        else if (a == "--grad-clip")
            o.grad_clip = args.real();
        else if (a == "--beta2")
            o.beta2 = args.real();
        else if (a == "--val-fraction")
            o.val_fraction = args.real();
        else if (a == "--seed")
            o.seed = uint64_t(args.integer(0, INT64_MAX));
        else if (a == "--backend")
            o.backend = args.value();
        else if (a == "--init")
            o.init = args.value();
        else if (a == "--checkpoint")
            o.checkpoint = args.value();
        else if (a == "--profile")
            o.profile = true;
        else if (a == "--tf32")
            o.tf32 = true;
        else if (a == "-t" || a == "--threads")
            o.threads = int(args.integer(0, 4096)); // 0: all cores
        else if (a == "--save-type") {
            const std::string t = args.value();
            if (t == "f32")
                o.save_type = Type::F32;
            else if (t == "f16")
                o.save_type = Type::F16;
            else if (t == "bf16")
                o.save_type = Type::BF16;
            else if (t == "q8_0")
                o.save_type = Type::Q8_0;
            else
                fail("--save-type " + t + ": expected f32, f16, bf16 or q8_0");
        } else if (a == "-h" || a == "--help") {
            usage();
            std::exit(0);
        } else {
            fail("unknown argument " + a + " (--help lists them)");
        }
    }
    if (o.data.empty()) fail("--data FILE is required (--help lists the options)");
    if (o.steps < 0 || o.warmup < 0 || o.eval_every <= 0 || o.eval_batches <= 0 || o.sample < 0)
        fail("--steps, --warmup and --sample must not be negative, --eval-every and --eval-batches positive");
    if (!(o.val_fraction > 0.0f && o.val_fraction < 1.0f)) fail("--val-fraction must lie in (0, 1)");
    if (!(o.lr > 0.0f) || o.min_lr < 0.0f || o.min_lr > o.lr)
        fail("--lr must be positive and --min-lr in [0, lr]");
    if (o.heads <= 0 || o.embd <= 0) fail("--heads and --embd must be positive");
    if (!o.kv_heads) o.kv_heads = o.heads;
    if (!o.head_dim) {
        if (o.embd % o.heads != 0) fail("--embd must be a multiple of --heads, or give --head-dim");
        o.head_dim = o.embd / o.heads;
    }
    if (!o.ff) o.ff = (o.embd * 8 / 3 + 31) / 32 * 32;
    return o;
}

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("--data " + path + ": cannot open the file");
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// The byte-level vocabulary's tokens: byte i is token i.
std::vector<int32_t> bytes_of(const std::string& text) {
    std::vector<int32_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) ids[i] = int32_t(uint8_t(text[i]));
    return ids;
}

// Linear warm-up to the peak rate, then a cosine down to min_lr at the last step.
float learning_rate(const Options& o, int64_t step) { // step: 1-based
    if (step <= o.warmup) return o.lr * float(step) / float(o.warmup + 1);
    const double span = double(std::max<int64_t>(o.steps - o.warmup, 1));
    const double progress = std::min(1.0, double(step - o.warmup) / span);
    return float(o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + std::cos(std::numbers::pi * progress)));
}

// Generates n bytes greedily after the prompt with the saved model, through the inference
// path (Model, Session and the KV cache).
void sample(const Options& o, Device* device) {
    ModelLoadOptions load;
    if (device != &cpu_device()) {
        load.gpu = device;
        load.gpu_layers = INT32_MAX;
    }
    std::unique_ptr<Model> model = Model::load(o.out, load);
    const Tokenizer tokenizer = Tokenizer::from_gguf(model->file().metadata());
    SessionOptions so;
    so.n_threads = o.threads;
    so.n_ctx = model->config().n_ctx_train;
    Session session(*model, so);
    std::vector<int32_t> tokens = tokenizer.encode(o.prompt.empty() ? "\n" : o.prompt);
    if (int64_t(tokens.size()) >= so.n_ctx) fail("--prompt is longer than the model's context");
    int32_t next = session.eval_greedy(tokens); // picked where the logits are
    std::vector<int32_t> generated;
    for (int64_t i = 0; i < o.sample && session.n_past() < so.n_ctx; ++i) {
        generated.push_back(next);
        if (session.n_past() + 1 >= so.n_ctx) break;
        const int32_t one[1] = {next};
        next = session.eval_greedy(one);
    }
    std::printf("--- sample (greedy, %zu bytes) ---\n%s%s\n---\n", generated.size(),
                tokenizer.decode(tokens).c_str(), tokenizer.decode(generated).c_str());
}

int run(int argc, char** argv) {
    const Options o = parse(argc, argv);
    Device* device = cli::device_for_backend(o.backend);

    TrainOptions to;
    to.n_ctx = o.ctx;
    to.n_seq = o.batch;
    to.n_micro = o.accumulate;
    to.device = device;
    to.n_threads = o.threads;
    to.seed = o.seed;
    to.matmul_precision = o.tf32 ? MatMulPrecision::TF32 : MatMulPrecision::F32;
    std::unique_ptr<Trainer> trainer;
    if (o.init.empty()) {
        ModelConfig cfg;
        cfg.arch = "llama";
        cfg.n_vocab = 256;
        cfg.n_embd = o.embd;
        cfg.n_layer = o.layers;
        cfg.n_ff = o.ff;
        cfg.n_head = o.heads;
        cfg.n_head_kv = o.kv_heads;
        cfg.head_dim = o.head_dim;
        cfg.norm_eps = 1e-5f;
        cfg.rope = {.n_dims = int32_t(o.head_dim),
                    .mode = RopeMode::Normal,
                    .freq_base = 10000.0f,
                    .freq_scale = 1.0f};
        trainer = std::make_unique<Trainer>(cfg, to);
    } else {
        trainer = Trainer::from_file(o.init, to);
    }
    const ModelConfig& c = trainer->config();

    // The vocabulary: bytes for a new model; a file's own (its tokenizer.* keys) otherwise.
    gguf::Metadata vocab;
    const gguf::Value* model_kind = trainer->source_metadata().find("tokenizer.ggml.model");
    const bool file_vocab =
        model_kind && model_kind->as_string() != "no_vocab" && model_kind->as_string() != "none";
    if (file_vocab) {
        for (const gguf::KeyValue& kv : trainer->source_metadata().entries())
            if (kv.key.starts_with("tokenizer.") || kv.key == "general.name") vocab.set(kv.key, kv.value);
    } else {
        if (c.n_vocab != 256)
            fail("--init " + o.init + ": the file has no vocabulary and " + std::to_string(c.n_vocab) +
                 " tokens, so its text cannot be read as bytes");
        Tokenizer::write_byte_vocabulary(vocab);
    }
    const std::vector<int32_t> data =
        file_vocab ? Tokenizer::from_gguf(vocab).encode(read_text(o.data)) : bytes_of(read_text(o.data));
    const size_t n_val = size_t(double(data.size()) * o.val_fraction);
    const size_t n_train = data.size() - n_val;
    const size_t window = size_t(o.ctx + 1);
    if (n_train < window || n_val < window)
        fail("--data " + o.data + ": " + std::to_string(data.size()) +
             " tokens leave fewer than --ctx + 1 = " + std::to_string(window) +
             " for training or for evaluation");

    std::printf(
        "model: %lld layers, embedding %lld, %lld/%lld heads of %lld, feed-forward %lld, vocabulary %lld: "
        "%.2fM parameters on %s\n",
        (long long)c.n_layer, (long long)c.n_embd, (long long)c.n_head, (long long)c.n_head_kv,
        (long long)c.head_dim, (long long)c.n_ff, (long long)c.n_vocab, double(trainer->n_params()) / 1e6,
        device->name());
    if (!o.init.empty())
        std::printf("from %s: %s\n", o.init.c_str(),
                    trainer->steps() ? ("a checkpoint at step " + std::to_string(trainer->steps())).c_str()
                                     : "a model's weights (fine-tuning; fresh optimizer state)");
    const Trainer::Memory mem = trainer->memory();
    std::printf("memory: weights %.1f MiB, optimizer %.1f MiB, training step %.1f MiB, evaluation %.1f MiB\n",
                double(mem.weights) / 1048576.0, double(mem.optimizer) / 1048576.0,
                double(mem.train_graph) / 1048576.0, double(mem.eval_graph) / 1048576.0);
    std::printf("data: %zu tokens for training, %zu held out; %lld sequences of %lld tokens per step (%lld "
                "per pass)\n",
                n_train, n_val, (long long)(o.batch * o.accumulate), (long long)o.ctx, (long long)o.batch);

    const int64_t first = trainer->steps() + 1; // a checkpoint's run goes on where it stopped
    std::uniform_int_distribution<size_t> start(0, n_train - window);
    std::vector<int32_t> batch(window * size_t(o.batch));                     // an evaluation's
    std::vector<int32_t> step_batch(window * size_t(o.batch * o.accumulate)); // a step's
    auto evaluate = [&] { // evenly spaced windows of the held-out part
        double total = 0.0;
        for (int64_t e = 0; e < o.eval_batches; ++e) {
            for (int64_t b = 0; b < o.batch; ++b) {
                const int64_t k = e * o.batch + b, n = o.eval_batches * o.batch;
                const size_t at = n_train + size_t(double(n_val - window) * double(k) /
                                                   double(std::max<int64_t>(n - 1, 1)));
                std::copy_n(data.begin() + ptrdiff_t(at), window,
                            batch.begin() + ptrdiff_t(size_t(b) * window));
            }
            total += trainer->loss(batch);
        }
        return total / double(o.eval_batches);
    };

    std::printf("step %lld: held-out loss %.4f (nats per token; uniform: %.4f)\n", (long long)(first - 1),
                evaluate(), std::log(double(c.n_vocab)));
    auto checkpoint = [&] {
        if (o.checkpoint.empty()) return;
        trainer->save_checkpoint(o.checkpoint, vocab);
        std::printf("checkpoint %s (step %lld)\n", o.checkpoint.c_str(), (long long)trainer->steps());
    };
    const auto t0 = std::chrono::steady_clock::now();
    double train_seconds = 0.0, recent_loss = 0.0;
    double steady_seconds = 0.0; // steps after the first three (which set up memory and kernels)
    int64_t recent = 0;
    for (int64_t s = first; s <= o.steps; ++s) {
        // Step s's windows depend on the seed and s alone, so a run resumed from a checkpoint
        // sees the batches the uninterrupted run would have.
        std::mt19937_64 rng(o.seed * 0x9e3779b97f4a7c15ull + uint64_t(s));
        for (int64_t b = 0; b < o.batch * o.accumulate; ++b)
            std::copy_n(data.begin() + ptrdiff_t(start(rng)), window,
                        step_batch.begin() + ptrdiff_t(size_t(b) * window));
        AdamWParams p;
        p.lr = learning_rate(o, s);
        p.beta2 = o.beta2;
        p.weight_decay = o.weight_decay;
        p.grad_clip = o.grad_clip;
        p.step = int32_t(s);
        const auto ts = std::chrono::steady_clock::now();
        const float loss = trainer->step(step_batch, p);
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count();
        train_seconds += seconds;
        if (s >= first + 3) steady_seconds += seconds;
        if (!std::isfinite(loss)) fail("step " + std::to_string(s) + ": the loss is " + std::to_string(loss));
        recent_loss += loss;
        ++recent;
        if (s % o.eval_every == 0 || s == o.steps) {
            const double tokens_per_s =
                double((s - first + 1) * o.batch * o.accumulate * o.ctx) / train_seconds;
            std::printf(
                "step %lld: training loss %.4f, held-out %.4f, lr %.2e, gradient norm %.3f, %.0f tokens/s\n",
                (long long)s, recent_loss / double(recent), evaluate(), double(p.lr),
                double(trainer->grad_norm()), tokens_per_s);
            std::fflush(stdout);
            recent_loss = 0.0;
            recent = 0;
            checkpoint();
        }
    }
    const int64_t ran = std::max<int64_t>(o.steps - first + 1, 0);
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("trained %lld steps in %.1f s (%.1f ms per step", (long long)ran, wall,
                ran ? 1e3 * train_seconds / double(ran) : 0.0);
    if (ran > 3) {
        const double per_step = steady_seconds / double(ran - 3);
        std::printf("; after the first 3: %.2f ms per step, %.0f tokens/s", 1e3 * per_step,
                    double(o.batch * o.accumulate * o.ctx) / per_step);
    }
    std::printf(")\n");
    if (o.profile) {
        std::printf("schedule of a step:\n%s", trainer->describe_schedule().c_str());
        const std::string counters = trainer->describe_backend_counters();
        std::printf("backend counters:\n%s", counters.empty()
                                                 ? "  (none; GFA_CPU_OP_TIMES=1 times each op on the CPU)\n"
                                                 : counters.c_str());
    }

    if (!o.out.empty()) {
        trainer->save(o.out, vocab, o.save_type);
        std::printf("saved %s\n", o.out.c_str());
        if (o.sample > 0) sample(o, device);
    } else if (o.sample > 0) {
        fail("--sample needs -o FILE (it runs the saved model)");
    }
    return 0;
}

} // namespace

int main(int argc, char** argv) {
    return gfa::cli::main_of("train", run, argc, argv);
}
