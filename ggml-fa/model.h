// Llama-family language models (LLaMA 2/3, Mistral, Qwen2, Gemma 2/3) loaded from GGUF files.
//
// A Model holds the weights, placed on the CPU or, for the last `gpu_layers` blocks, on a
// GPU device. A Session holds a KV cache and runs tokens through the model: a batch of
// prompt tokens and a single decoded token go through the same graph builder. Each session
// reserves its worst-case graph once (n_batch tokens attending to a full cache), so
// decoding allocates nothing new.
#pragma once

#include <ggml-fa/backend.h>
#include <ggml-fa/gguf.h>
#include <ggml-fa/ops.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace gfa {

// Hyperparameters read from the file's metadata (keys "<arch>.*").
struct ModelConfig {
    // "llama", "granite", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "phi3", "olmo2", "gemma2" or "gemma3"
    std::string arch;
    int64_t n_vocab = 0;
    int64_t n_ctx_train = 0;
    int64_t n_embd = 0;
    int64_t n_layer = 0;
    int64_t n_ff = 0;          // of the feed-forward network, or of each expert's
    int64_t n_expert = 0;      // a mixture of experts (Mixtral, Qwen2/3-MoE): experts per block; 0: dense
    int64_t n_expert_used = 0; // experts each token runs through
    // The chosen experts' outputs weighed by the softmax of their router logits (renormalized
    // over the chosen: Mixtral, Qwen3-MoE); false: by their share of the softmax over all
    // experts (Qwen2-MoE).
    bool expert_weights_norm = true;
    int64_t n_ff_shared = 0; // > 0: a shared expert of this width runs beside the chosen ones (qwen2moe)
    int64_t n_head = 0;
    int64_t n_head_kv = 0;
    int64_t head_dim = 0; // of keys and values
    float norm_eps = 1e-6f;
    RopeParams rope{};
    bool tied_embeddings = false; // no output.weight: the token embeddings project to logits
    bool qkv_bias = false;        // the q, k and v projections add biases (Qwen2)
    // Gemma 2 and 3's differences; the defaults are the llama blocks.
    float embd_scale = 1.0f;     // token embeddings times this (gemma2: sqrt(n_embd))
    float attn_scale = 0.0f;     // attention scores times this; 0: 1 / sqrt(head_dim)
    float attn_softcap = 0.0f;   // > 0: scores s become softcap * tanh(s / softcap)
    float final_softcap = 0.0f;  // > 0: the same for the logits
    float residual_scale = 1.0f; // each block's attention and feed-forward output times this (granite)
    float logit_scale = 1.0f;    // the logits divided by this (granite)
    int64_t sliding_window = 0;  // > 0: sliding layers see only this many latest positions
    int32_t sliding_pattern = 2; // of each this many layers, all but the last slide (gemma2 2, gemma3 6);
                                 // kEveryLayerSlides: all of them (phi3)
    RopeParams rope_sliding{};   // rope of the sliding layers (gemma3: its own base, no scaling)
    bool qk_norm = false;        // RMSNorm (own weights) on each head of q and k before rope
    bool qk_norm_full = false;   // ... over all of q's (k's) heads at once instead (olmo2)
    bool pre_norms = true;       // RMSNorm on each block's attention and feed-forward input (not olmo2)
    bool post_norms = false;     // RMSNorm (own weights) on each attention and feed-forward output
    bool gelu_ffn = false;       // feed-forward gelu(gate) * up (tanh approximation), not SwiGLU
    // Phi-3's LongRoPE: the file holds short and long rope factors; sessions whose context is
    // longer than this take the long ones (0: the file has one set at most). The rotated dims
    // of q and k are multiplied by rope_attn_factor.
    int64_t rope_ctx_orig = 0;
    float rope_attn_factor = 1.0f;

    static constexpr int32_t kEveryLayerSlides = -1;
};

struct ModelLoadOptions {
    Device* gpu = nullptr; // where offloaded blocks live; nullptr keeps everything on the CPU
    int gpu_layers =
        0; // the last N blocks go to `gpu`; N > n_layer also moves the output head and the embeddings
};

class Model {
  public:
    // Reads a GGUF file of a llama-family architecture (ModelConfig::arch), or the first shard of
    // a split one (gguf::File::open_model). Throws gfa::Error naming the file and what is
    // missing or malformed.
    static std::unique_ptr<Model> load(const std::string& path, const ModelLoadOptions& options = {});
    ~Model();

    const ModelConfig& config() const;
    const gguf::File& file() const; // metadata such as the vocabulary
    size_t weight_bytes() const;
    // How many groups of projections reading one input (q/k/v or q/k alone, gate/up of a
    // layer) were loaded as one matrix, which takes one product instead of several; groups
    // whose tensors differ in type stay separate (q and k merge without a v of another type).
    int merged_projections() const;
    // The devices holding weights, the CPU first (when every block, the head and the
    // embeddings are on a GPU, the CPU holds none).
    std::vector<Device*> devices() const;
    // Matrices that were to go to the GPU but stay in host memory because the GPU cannot
    // multiply by their type (their products run on the CPU): the tensor names.
    const std::vector<std::string>& kept_on_host() const;

    struct Impl;
    const Impl& impl() const { return *impl_; }

  private:
    Model() = default;
    std::unique_ptr<Impl> impl_;
};

struct SessionOptions {
    int64_t n_ctx = 0;          // KV cache length; 0: min(the training context, 4096)
    int64_t n_batch = 256;      // most tokens one graph takes (longer inputs run in chunks)
    Type kv_type = Type::F16;   // f32, f16 or q8_0
    int n_threads = 0;          // CPU threads; <= 0: all cores
    bool log_fallbacks = false; // let the scheduler report ops a GPU cannot run
    // Evals of at most 8 tokens (decoding) attend over a window of cache
    // rows that grows in steps of this many, the rows past the newest token hidden by a
    // mask. Their graphs then keep one shape for this many consecutive tokens, so the
    // session reuses the last graph as it is (no building, no planning) and a GPU backend
    // can replay it. 0: every eval attends over exactly the rows written so far.
    int64_t decode_window_step = 256;
    // Keep every node of each graph to itself and record its values (Session::traced_nodes),
    // for comparing backends node by node (compare --model). Costs memory and time.
    bool trace_nodes = false;
    // Layers with a sliding window (Gemma 2 and 3) keep only window + n_batch - 1 cache rows,
    // reused in turn, instead of n_ctx: most of a long context's KV memory. false: n_ctx rows
    // for every layer.
    bool window_cache = true;
    // What the graphs' products may give up for speed (set_matmul_precision): Q8 lets the CPU
    // round the columns that meet quantized weights to 8 bits in prompts too, as decoding
    // does: prompts about 1.5x faster, logits about 1e-2 further from exact.
    MatMulPrecision matmul_precision = MatMulPrecision::F32;
    // The same for attention (set_attention_precision): BF16 lets the CPU multiply bf16 pairs
    // in a prompt's attention where it has AVX512-BF16 (about 1.8x the f32 rate, outputs about
    // 3e-3 from exact); GPUs already multiply 16-bit values.
    FlashAttnPrecision attention_precision = FlashAttnPrecision::F32;
};

// One node of a traced graph: "#index op type[shape] 'name'", where it ran, its values.
struct TracedNode {
    std::string label;
    std::string backend;
    std::vector<float> values;
};

// Where the time of Session::eval went, summed over the graphs it ran (a long prompt runs
// one graph per n_batch tokens) since the last reset_profile(). Seconds of host time.
struct EvalProfile {
    int64_t graphs = 0;        // graphs run
    int64_t nodes = 0;         // their nodes, summed
    int64_t reused = 0;        // graphs that were the previous eval's, run again unchanged
    int64_t fed_on_device = 0; // decode steps whose token the device passed on itself
    double build = 0;          // building the graph
    double allocate = 0;       // the scheduler: backends, splits, memory plan and placement
    double upload = 0;         // setting the token and position inputs
    double submit = 0;         // handing the work to the backends (a CPU backend computes here)
    double wait = 0;           // waiting for the backends to finish
    double readback = 0;       // copying the logits (or eval_greedy's id) out
};

// How Session::eval_pick and Session::decode choose a next token, where the logits are:
// greedy (temperature 0: the first largest logit, top_k(logits, 1)), or drawn by sample_token
// (ggml-fa/ops.h) with these parameters, whose draw for the logits at position p depends on
// the seed and p alone (every backend draws the same token from the same logits).
struct Sampling {
    float temperature = 0.0f; // 0: greedy
    int32_t top_k = 40;       // 0: every token (a GPU draws from at most 128 itself)
    float top_p = 0.95f;      // in (0, 1]
    uint64_t seed = 0;
    bool operator==(const Sampling&) const = default;
};

class Session {
  public:
    Session(const Model& model, const SessionOptions& options = {});
    ~Session();
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

    // Runs tokens at positions n_past(), n_past() + 1, ... and appends them to the cache.
    // Returns the logits of every token ([n_tokens][n_vocab], row-major) when all_logits,
    // otherwise those of the last token only. Token ids must be in [0, n_vocab).
    std::vector<float> eval(std::span<const int32_t> tokens, bool all_logits = false);
    // Like eval, but returns only the last token's most likely next token: the position of
    // its first largest logit (NaN ranked with -inf), as top_k(logits, 1) gives it. The pick is
    // made where the logits are, so a GPU sends back one id instead of n_vocab floats.
    int32_t eval_greedy(std::span<const int32_t> tokens);
    // eval_greedy with any Sampling: the last token's next token, chosen where the logits are.
    int32_t eval_pick(std::span<const int32_t> tokens, const Sampling& sampling);
    // Generation without a wait between tokens: evaluates `first` (a token not yet in the
    // cache), then each token it picks by `sampling`, max_steps evaluations at most, handing
    // every pick to on_token in order; on_token returns false to stop. Where the whole step runs
    // on one backend, the device feeds each pick to the next step itself and the host queues a
    // step while the one before still runs, so the device never waits for the host between
    // tokens. Returns the picks handed over; the cache then holds `first` and every pick but
    // the last, exactly as eval_pick called token by token would leave it (same picks too).
    // on_token must not call into the session (a step may be in flight); if it throws, the
    // cache is left as if it had returned false.
    int64_t decode(int32_t first, int64_t max_steps, const Sampling& sampling,
                   const std::function<bool(int32_t)>& on_token);
    // decode with greedy picks.
    int64_t decode_greedy(int32_t first, int64_t max_steps, const std::function<bool(int32_t)>& on_token);

    int64_t n_past() const;
    int64_t n_ctx() const;
    void reset(); // forget the cache contents (positions restart at 0)

    // Bytes of the KV cache and of the reserved compute buffers.
    size_t kv_bytes() const;
    size_t compute_bytes() const;
    // How often the compute buffers had to be (re)allocated; stays at its value after the
    // first eval when the reserve covered every later graph.
    int n_compute_allocations() const;
    std::string describe_schedule() const;
    // With SessionOptions::trace_nodes: the nodes of the last graph the last eval ran, in
    // graph order (views of inputs and weights left out); empty otherwise.
    const std::vector<TracedNode>& traced_nodes() const;

    const EvalProfile& profile() const;
    void reset_profile();
    // One line per backend with the counters it keeps (Backend::counters()), e.g. how many
    // calls a CUDA backend ran as graphs; empty when none keeps any.
    std::string describe_backend_counters() const;

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

} // namespace gfa
