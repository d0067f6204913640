// The Llama-family graph (internal): weights by layer, the KV cache, and the builder that
// turns a batch of tokens into logits. Prefill and decode use the same builder; only the
// number of tokens and the cache length differ.
#pragma once

#include <ggml-fa/model.h>
#include <ggml-fa/tensor.h>

#include <vector>

namespace gfa::llama {

struct LayerWeights {
    Tensor* attn_norm = nullptr;
    Tensor *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
    Tensor *bq = nullptr, *bk = nullptr, *bv = nullptr; // Qwen2 (and LLaMA with attention_bias)
    Tensor* ffn_norm = nullptr;
    Tensor *ffn_gate = nullptr, *ffn_up = nullptr, *ffn_down = nullptr;
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
};

// The inputs and output of one graph.
struct GraphIo {
    Tensor* tokens = nullptr;    // i32 [n_tokens]
    Tensor* positions = nullptr; // i32 [n_tokens]: rope positions and cache rows
    Tensor* logits = nullptr;    // f32 [n_vocab, n_out]
};

// Adds the forward pass for n_tokens tokens at positions n_past.. n_past + n_tokens - 1 to
// ctx. Keys and values of the new tokens are written into the cache; attention reads cache
// rows [0, n_past + n_tokens). all_logits: logits for every token, otherwise for the last.
GraphIo build_graph(Context& ctx, const ModelConfig& cfg, const Weights& w, const KvCache& cache,
                    int64_t n_tokens, int64_t n_past, bool all_logits);

} // namespace gfa::llama
