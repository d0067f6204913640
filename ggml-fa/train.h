// Training llama-family models: the same blocks as model.h's inference graph, trained with
// a cross-entropy loss, automatic differentiation (attention through the FlashAttention-2
// backward) and AdamW, on the CPU or a GPU. A trained model saves as a GGUF file that
// Model::load, ggml-fa-run and llama.cpp read.
#pragma once

#include <ggml-fa/backend.h>
#include <ggml-fa/gguf.h>
#include <ggml-fa/model.h>
#include <ggml-fa/ops.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace gfa {

struct TrainOptions {
    int64_t n_ctx = 128;      // tokens per sequence: the context the model learns
    int64_t n_seq = 8;        // sequences per micro-batch (one forward and backward pass)
    int64_t n_micro = 1;      // micro-batches per step: their gradients are averaged before the
                              // update, so a step sees n_micro * n_seq sequences for the memory
                              // of n_seq
    Device* device = nullptr; // where weights, gradients and the optimizer live; nullptr: the CPU
    int n_threads = 0;        // CPU threads; <= 0: all cores
    uint64_t seed = 1;        // of the initial weights
    float init_std = 0.02f;   // of the initial matrices (normal); the output projections of
                              // each block get init_std / sqrt(2 n_layer)
    // The products' precision, forward and backward: TF32 lets a GPU round f32 operands to
    // TensorFloat-32 on its tensor cores (PyTorch's allow_tf32); the CPU stays f32.
    MatMulPrecision matmul_precision = MatMulPrecision::F32;
};

class Trainer {
  public:
    // A new model of this shape with random weights. config: arch "llama" (rope in normal
    // mode), "qwen2", "gemma2" or "gemma3" (NeoX mode; the Gemmas with the fields their files
    // imply, see llama::read_config); n_vocab, n_embd, n_layer, n_ff, n_head, n_head_kv and
    // head_dim set; rope n_dims = head_dim; optionally q/k/v biases (qkv_bias) and tied
    // embeddings (one tensor, trained by both its uses). Throws gfa::Error naming what does
    // not fit.
    Trainer(const ModelConfig& config, const TrainOptions& options);
    // Continues from a GGUF file: a checkpoint save_checkpoint wrote (weights, AdamW moments
    // and the step count: the next step continues the run), or any llama, qwen2, gemma2 or gemma3 model file,
    // whose weights of any type are decoded to f32 to train on (fine-tuning; the steps start
    // at 0). Throws naming what the file has that training does not take (rope frequency
    // factors, other architectures).
    static std::unique_ptr<Trainer> from_file(const std::string& path, const TrainOptions& options);
    ~Trainer();
    Trainer(const Trainer&) = delete;
    Trainer& operator=(const Trainer&) = delete;

    // One step on n_micro * n_seq sequences of n_ctx + 1 tokens each, one after another in
    // `batch`: each sequence's tokens 1.. are the targets of its tokens 0.. Runs the forward
    // and backward pass of each micro-batch and one AdamW update with p (p.step counting 1,
    // 2, ...; the first step also zeroes the moments). Returns the loss before the update: the
    // mean cross-entropy per predicted token, in nats.
    float step(std::span<const int32_t> batch, const AdamWParams& p);
    // The loss on such a batch, without updating anything.
    float loss(std::span<const int32_t> batch);
    // The logits of every position of n_seq sequences of n_ctx tokens ([n_seq * n_ctx][n_vocab],
    // row-major).
    std::vector<float> logits(std::span<const int32_t> tokens);

    // Writes a GGUF file of the model's architecture: the weights in `type` (f32, f16, bf16 or a
    // block type whose block divides n_embd and n_ff), the hyperparameters, and `metadata`
    // (the vocabulary: tokenizer.ggml.*; general.name).
    void save(const std::string& path, const gguf::Metadata& metadata, Type type = Type::F32) const;
    // save() in f32 plus what resuming needs: the AdamW moments (tensors "<weight>.adam_m",
    // "<weight>.adam_v") and the step count (training.step). ggml-fa reads it as a model too;
    // llama.cpp does not (it refuses tensors it does not expect), so finish with save().
    void save_checkpoint(const std::string& path, const gguf::Metadata& metadata) const;
    // Steps taken: by step(), counted on from a checkpoint's.
    int64_t steps() const;
    // The metadata of the file from_file read (empty for a new model): its vocabulary, to
    // tokenize text for it and to save with it.
    const gguf::Metadata& source_metadata() const;

    // Bytes of memory the trainer holds: the weights, the optimizer's moments, and the
    // graphs' planned buffers (activations, gradients; the training step and evaluation
    // graphs each have their own), summed over devices.
    struct Memory {
        size_t weights = 0, optimizer = 0, train_graph = 0, eval_graph = 0;
    };
    Memory memory() const;

    const ModelConfig& config() const;
    const TrainOptions& options() const;
    int64_t n_params() const;
    // The global L2 norm of the last step's gradients (before AdamWParams::grad_clip).
    float grad_norm() const;
    // Gradient of each weight after the last step (averaged over its micro-batches), by GGUF
    // tensor name (for checks).
    std::vector<std::pair<std::string, std::vector<float>>> gradients() const;
    // The weights by GGUF tensor name, and setting one (for checks and for starting points).
    std::vector<float> weight(const std::string& name) const;
    void set_weight(const std::string& name, const std::vector<float>& values);
    std::string describe_schedule() const; // of the training step's graph
    // The backends' counters (Scheduler::describe_counters), e.g. each op's time on the CPU
    // with GFA_CPU_OP_TIMES=1.
    std::string describe_backend_counters() const;

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

} // namespace gfa
