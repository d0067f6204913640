// The Llama-family graph (internal): weights by layer, the KV cache, and the builder that
// turns a batch of tokens into logits. Prefill and decode use the same builder; only the
// number of tokens and the cache length differ.
#pragma once

#include <ggml-fa/graph.h>
#include <ggml-fa/model.h>
#include <ggml-fa/tensor.h>

#include <vector>

namespace gfa::llama {

// Projections that read the same input are loaded as one matrix when their types agree:
// wqkv holds the rows of wq, wk and wv one after another (and bqkv their biases), and
// ffn_gate_up those of ffn_gate and ffn_up. One product then does the work of three (two),
// with the same dot products; the separate tensors are null. Otherwise the merged ones are,
// except that when only wv's type differs (a Q4_K_M file's attn_v is q6_K in some layers)
// wqk holds the rows of wq and wk (bqk their biases) and wv stays apart.
struct LayerWeights {
    Tensor* attn_norm = nullptr;
    Tensor *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
    Tensor *bq = nullptr, *bk = nullptr, *bv = nullptr; // Qwen2 (and LLaMA with attention_bias)
    Tensor *wqkv = nullptr, *bqkv = nullptr;
    Tensor *wqk = nullptr, *bqk = nullptr;
    Tensor* ffn_norm = nullptr;
    Tensor *ffn_gate = nullptr, *ffn_up = nullptr, *ffn_down = nullptr;
    Tensor* ffn_gate_up = nullptr;
    // A mixture of experts: the router [n_embd, n_expert] and the experts' matrices stacked,
    // [n_embd, n_ff, n_expert] (gate, up) and [n_ff, n_embd, n_expert] (down).
    Tensor* ffn_gate_inp = nullptr;
    Tensor *ffn_gate_exps = nullptr, *ffn_up_exps = nullptr, *ffn_down_exps = nullptr;
    // Qwen2-MoE's shared expert, a SwiGLU network every token runs ([n_embd, n_ff_shared] gate
    // and up, [n_ff_shared, n_embd] down), its output scaled by sigmoid(ffn_gate_inp_shexp . x).
    Tensor *ffn_gate_shexp = nullptr, *ffn_up_shexp = nullptr, *ffn_down_shexp = nullptr;
    Tensor* ffn_gate_inp_shexp = nullptr; // [n_embd]
    Tensor* rope_factors = nullptr; // rope_freqs.weight (Llama 3.1 style), the copy on this block's device
    // Phi-3 LongRoPE: rope_factors holds rope_factors_short.weight, this rope_factors_long.weight,
    // used in sessions longer than ModelConfig::rope_ctx_orig.
    Tensor* rope_factors_long = nullptr;
    // With a rope attention factor m (ModelConfig::rope_attn_factor): q times m^2 on its rotated
    // dims and 1 on the rest, [head_dim], made by the loader. m on both rotated q and k (as the
    // format defines it) changes only their rotated dims' products, by m^2, so scaling q's
    // alone gives the same scores and leaves the cached keys as rope made them.
    Tensor* rope_q_scale = nullptr;
    Tensor *attn_post_norm = nullptr, *ffn_post_norm = nullptr; // Gemma 2, 3
    Tensor *attn_q_norm = nullptr, *attn_k_norm = nullptr;      // Gemma 3: per head of q and k
};

struct Weights {
    Tensor* token_embd = nullptr;
    std::vector<LayerWeights> layers;
    Tensor* output_norm = nullptr;
    Tensor* output = nullptr; // token_embd when the embeddings are tied
};

// Per layer: keys and values of every cached position, [head_dim, n_ctx, n_head_kv].
struct KvCache {
    std::vector<Tensor*> k, v;
    int64_t n_ctx = 0;
    // Rows of the sliding layers' caches when they keep only what their window needs (0: all
    // n_ctx). Position p lives in row p % ring_rows; with ring_rows >= window + n_batch - 1 no
    // chunk overwrites a row one of its queries still reads.
    int64_t ring_rows = 0;
};

// The inputs and output of one graph.
struct GraphIo {
    Tensor* tokens = nullptr;      // i32 [n_tokens]
    Tensor* positions = nullptr;   // i32 [n_tokens]: rope positions and cache rows
    Tensor* kq_mask = nullptr;     // f16 [n_window, n_tokens] when the attention reads a window
    Tensor* kq_mask_swa = nullptr; // the same for sliding-window layers (ModelConfig::sliding_window)
    // Sliding layers with a ring cache (KvCache::ring_rows): their rows (i32 [n_tokens],
    // positions % ring_rows) and, once the ring has wrapped or in windowed graphs, the mask
    // over all ring_rows rows (f16 [ring_rows, n_tokens], ring_mask()).
    Tensor* ring_rows = nullptr;
    Tensor* kq_mask_ring = nullptr;
    Tensor* logits = nullptr; // f32 [n_vocab, n_out]
    Tensor* pick =
        nullptr; // i32 [1, n_out]: the next token picked from logits (pick_node), when the caller adds it
    // Nodes to compute as soon as their inputs are ready, in this order (forward_graph
    // expands them before the logits): a v projection apart from a merged q/k one goes right
    // after the pre-norm, beside the q/k product, and the rope and both cache writes follow
    // each other (backends fuse such runs).
    std::vector<Tensor*> early;
};

// The graph of io's logits (and io.pick, when set), io.early first.
Graph forward_graph(const GraphIo& io);

// The next token after each column of io.logits: greedy (temperature 0) as top_k(logits, 1),
// else drawn by sample_token at the column's position.
Tensor* pick_node(Context& ctx, const GraphIo& io, const Sampling& sampling);

// The ring rows' mask: row s holds the newest position p = s (mod ring) with p < n_past +
// n_tokens (none when s >= n_past + n_tokens); query i (position n_past + i) sees it when
// n_past + i - window < p <= n_past + i.
std::vector<uint16_t> ring_mask(int64_t n_tokens, int64_t n_past, int64_t ring, int64_t window);
// Whether the sliding layers of a graph attend through the ring mask (else as without a ring:
// the ring has not wrapped, so its rows are the positions).
bool ring_masked(const KvCache& cache, int64_t n_tokens, int64_t n_past, int64_t n_window);

// The pieces of a block that inference and training graphs share (one definition of the
// model's math). attention_inputs: from the normed input h [n_embd, T * B] of B sequences of
// T tokens, q [head_dim, n_head, T, B], k and v [head_dim, n_head_kv, T, B], q and k normed
// per head where the model does and rotated by layer l's rope at `positions` (i32 [T]); views
// when the projections are merged.
struct Qkv {
    Tensor *q, *k, *v;
};
Qkv attention_inputs(Context& ctx, const ModelConfig& cfg, const LayerWeights& L, size_t l, Tensor* h,
                     Tensor* positions, int64_t T, int64_t B);
// x + the SwiGLU feed-forward of rms_norm(x) * ffn_norm, x: [n_embd, rows].
Tensor* feed_forward(Context& ctx, const ModelConfig& cfg, const LayerWeights& L, Tensor* x);
// The token embeddings of `tokens` (scaled as the model wants).
Tensor* embeddings(Context& ctx, const ModelConfig& cfg, const Weights& w, Tensor* tokens);
// Layer l's attention parameters under causal attention (scale, soft cap, and the window of a
// sliding layer). Graphs that attend through masks leave causal and the window to the mask.
FlashAttnParams attention_params(const ModelConfig& cfg, size_t l);
// x + the attention output o ([head_dim * n_head, rows]) projected by wo (and normed).
Tensor* attention_residual(Context& ctx, const ModelConfig& cfg, const LayerWeights& L, Tensor* x, Tensor* o);
// Logits of the final hidden states x: norm, output head, soft cap.
Tensor* logits_of(Context& ctx, const ModelConfig& cfg, const Weights& w, Tensor* x);

// Adds the forward pass for n_tokens tokens at positions n_past.. n_past + n_tokens - 1 to
// ctx. Keys and values of the new tokens are written into the cache. all_logits: logits for
// every token, otherwise for the last.
// n_window == 0: attention reads cache rows [0, n_past + n_tokens) under the causal flag,
// and the graph depends on n_past. n_window > 0: it reads rows [0, n_window) (at least
// n_past + n_tokens) and the kq_mask input hides what each token must not see (fill it with
// fill_window_mask); then only the inputs depend on n_past, and one graph serves every
// n_past whose tokens fit the window.
GraphIo build_graph(Context& ctx, const ModelConfig& cfg, const Weights& w, const KvCache& cache,
                    int64_t n_tokens, int64_t n_past, bool all_logits, int64_t n_window = 0);

// The inputs and outputs of a training graph.
struct TrainingIo {
    Tensor* tokens = nullptr;    // i32 [T * B]: B sequences of T tokens, one after another
    Tensor* positions = nullptr; // i32 [T]: 0 .. T - 1
    Tensor* labels = nullptr;    // i32 [T * B]: the next token of each position (its class)
    Tensor* logits = nullptr;    // f32 [n_vocab, T * B]
    Tensor* loss = nullptr;      // f32 [1]: mean cross-entropy per position
};

// The forward pass of B independent sequences of T tokens (causal attention within each,
// no cache) and its loss: what training differentiates.
TrainingIo build_training_graph(Context& ctx, const ModelConfig& cfg, const Weights& w, int64_t T, int64_t B);

// The mask for a windowed graph: row i (the token at position n_past + i) sees cache rows
// [0, n_past + i], or with sliding > 0 only the last `sliding` of them; f16 values, 0 or
// -inf, n_window per row.
std::vector<uint16_t> window_mask(int64_t n_tokens, int64_t n_past, int64_t n_window, int64_t sliding = 0);
// Whether layer l attends through a sliding window: of each sliding_pattern layers all but
// the last (Gemma 2: the even-numbered layers; Gemma 3: five of every six).
inline bool sliding_layer(const ModelConfig& cfg, size_t l) {
    if (cfg.sliding_window <= 0) return false;
    if (cfg.sliding_pattern == ModelConfig::kEveryLayerSlides) return true;
    return cfg.sliding_pattern > 0 && int64_t(l % size_t(cfg.sliding_pattern)) < cfg.sliding_pattern - 1;
}

// The hyperparameters of a GGUF file of architecture llama or qwen2; a gfa::Error names a
// missing or inconsistent key.
ModelConfig read_config(const gguf::File& f);

// Evals of at most this many tokens use a window (SessionOptions::decode_window_step).
constexpr int64_t kMaxWindowedTokens = 8;

// The window for n_tokens after n_past cached ones: n_past + n_tokens rounded up to a
// multiple of step, at most n_ctx; 0 (no window) for longer batches or step 0.
int64_t window_for(int64_t n_tokens, int64_t n_past, int64_t n_ctx, int64_t step);

} // namespace gfa::llama
