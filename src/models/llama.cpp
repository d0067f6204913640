// Llama-family models: metadata, weight loading and placement, the forward graph, and the
// session that owns the KV cache and the scheduler.
#include "models/llama.h"

#include "compare.h"
#include "op_def.h"

#include <ggml-fa/alloc.h>
#include <ggml-fa/graph.h>
#include <ggml-fa/ops.h>
#include <ggml-fa/scheduler.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <functional>
#include <map>
#include <optional>

namespace gfa {

// ---- the graph ------------------------------------------------------------------------

namespace llama {

constexpr uint16_t kZero = 0x0000, kMinusInf = 0xFC00; // f16 bit patterns of the masks

std::vector<uint16_t> window_mask(int64_t n_tokens, int64_t n_past, int64_t n_window, int64_t sliding) {
    std::vector<uint16_t> mask(size_t(n_tokens * n_window), kMinusInf);
    for (int64_t i = 0; i < n_tokens; ++i) {
        const int64_t end = std::min(n_past + i + 1, n_window);
        const int64_t begin = sliding > 0 ? std::max<int64_t>(0, n_past + i + 1 - sliding) : 0;
        if (begin < end)
            std::fill(mask.begin() + i * n_window + begin, mask.begin() + i * n_window + end, kZero);
    }
    return mask;
}

std::vector<uint16_t> ring_mask(int64_t n_tokens, int64_t n_past, int64_t ring, int64_t window) {
    std::vector<uint16_t> mask(size_t(n_tokens * ring), kMinusInf);
    const int64_t newest = n_past + n_tokens - 1;
    for (int64_t s = 0; s < std::min(ring, newest + 1); ++s) {
        const int64_t p = s + (newest - s) / ring * ring; // the newest position in row s
        for (int64_t i = 0; i < n_tokens; ++i) {
            const int64_t q = n_past + i;
            if (p <= q && q - p < window) mask[size_t(i * ring + s)] = kZero;
        }
    }
    return mask;
}

bool ring_masked(const KvCache& cache, int64_t n_tokens, int64_t n_past, int64_t n_window) {
    return cache.ring_rows > 0 && (n_window > 0 || n_past + n_tokens > cache.ring_rows);
}

int64_t window_for(int64_t n_tokens, int64_t n_past, int64_t n_ctx, int64_t step) {
    if (step <= 0 || n_tokens > kMaxWindowedTokens) return 0;
    const int64_t n_kv = n_past + n_tokens;
    return std::min(n_ctx, (n_kv + step - 1) / step * step);
}

// n_ctx: the session's context (0 in training graphs), which picks Phi-3's LongRoPE factors.
Qkv attention_inputs(Context& ctx, const ModelConfig& cfg, const LayerWeights& L, size_t l, Tensor* h,
                     Tensor* positions, int64_t T, int64_t B, int64_t n_ctx) {
    const int64_t D = cfg.head_dim, Hq = cfg.n_head, Hkv = cfg.n_head_kv;
    const RopeParams& rope_p = sliding_layer(cfg, l) ? cfg.rope_sliding : cfg.rope;
    Tensor* factors = L.rope_factors_long && n_ctx > cfg.rope_ctx_orig ? L.rope_factors_long : L.rope_factors;
    // q or k [D, heads, T, B] (a view, with merged projections) normed per head, then rotated.
    auto rotated = [&](Tensor* t, Tensor* norm) {
        if (norm && !cfg.qk_norm_full) t = mul(ctx, rms_norm(ctx, t, cfg.norm_eps), norm);
        return rope(ctx, t, positions, rope_p, factors);
    };
    auto scaled_q = [&](Tensor* q) { return L.rope_q_scale ? mul(ctx, q, L.rope_q_scale) : q; };
    // (OLMo 2 norms q and k over all their heads, before they are split into heads)
    auto project = [&](Tensor* weight, Tensor* bias, int64_t heads, Tensor* full_norm = nullptr) {
        Tensor* t = mul_mat(ctx, weight, h);
        if (bias) t = add(ctx, t, bias);
        if (full_norm && cfg.qk_norm_full) t = mul(ctx, rms_norm(ctx, t, cfg.norm_eps), full_norm);
        return reshape(ctx, t, {D, heads, T, B});
    };
    if (!L.wqkv && !L.wqk)
        return {scaled_q(rotated(project(L.wq, L.bq, Hq, L.attn_q_norm), L.attn_q_norm)),
                rotated(project(L.wk, L.bk, Hkv, L.attn_k_norm), L.attn_k_norm), project(L.wv, L.bv, Hkv)};
    // One product for q, k and v ([D * (Hq + 2 Hkv), T * B]), or for q and k with v apart; q
    // and k lie side by side in each row, so one rope turns both.
    Tensor* qkv = mul_mat(ctx, L.wqkv ? L.wqkv : L.wqk, h);
    if (Tensor* bias = L.wqkv ? L.bqkv : L.bqk) qkv = add(ctx, qkv, bias);
    const size_t f = sizeof(float), row = qkv->nb[1];
    auto part = [&](int64_t heads, int64_t first_head) {
        return view(ctx, qkv, {D, heads, T, B}, {D * f, row, row * size_t(T)}, size_t(D * first_head) * f);
    };
    Tensor* v = L.wqkv ? part(Hkv, Hq + Hkv) : project(L.wv, L.bv, Hkv);
    if (L.attn_q_norm) // q and k normed apart, so rotated apart
        return {scaled_q(rotated(part(Hq, 0), L.attn_q_norm)), rotated(part(Hkv, Hq), L.attn_k_norm), v};
    Tensor* qk = rotated(part(Hq + Hkv, 0), nullptr);
    return {scaled_q(view(ctx, qk, {D, Hq, T, B}, {qk->nb[1], qk->nb[2], qk->nb[3]}, 0)),
            view(ctx, qk, {D, Hkv, T, B}, {qk->nb[1], qk->nb[2], qk->nb[3]}, size_t(Hq) * qk->nb[1]), v};
}

// A mixture of experts on h [n_embd, rows]: the router's logits pick each token's
// n_expert_used experts (top_k), whose SwiGLU networks run through mul_mat_id; their outputs
// are summed with the softmax of the chosen logits (the router's softmax renormalized over the
// chosen experts, as Mixtral, and Qwen3-MoE with norm_topk_prob, weigh them), or without
// expert_weights_norm with the chosen experts' entries of the softmax over all (Qwen2-MoE).
Tensor* experts(Context& ctx, const ModelConfig& cfg, const LayerWeights& L, Tensor* h) {
    const int64_t rows = h->ne[1], k = cfg.n_expert_used, E = h->ne[0];
    Tensor* logits = mul_mat(ctx, L.ffn_gate_inp, h); // [n_expert, rows]
    Tensor* ids = top_k(ctx, logits, k);              // [k, rows]
    Tensor* scores = cfg.expert_weights_norm ? logits : soft_max(ctx, logits);
    Tensor* chosen = get_rows(ctx, reshape(ctx, scores, {1, cfg.n_expert, rows}), ids); // [1, k, rows]
    Tensor* weights = reshape(ctx, chosen, {k, rows});
    if (cfg.expert_weights_norm) weights = soft_max(ctx, weights);
    Tensor* x = reshape(ctx, h, {E, 1, rows});
    Tensor* gate = mul_mat_id(ctx, L.ffn_gate_exps, x, ids); // [n_ff, k, rows]
    Tensor* up = mul_mat_id(ctx, L.ffn_up_exps, x, ids);
    Tensor* down = mul_mat_id(ctx, L.ffn_down_exps, swiglu(ctx, gate, up), ids); // [n_embd, k, rows]
    Tensor* weighted = mul(ctx, down, reshape(ctx, weights, {1, k, rows}));
    Tensor* out = nullptr;
    for (int64_t i = 0; i < k; ++i) {
        Tensor* slot = view(ctx, weighted, {E, rows}, {weighted->nb[2]}, size_t(i) * weighted->nb[1]);
        out = out ? add(ctx, out, slot) : cont(ctx, slot);
    }
    return out;
}

Tensor* feed_forward(Context& ctx, const ModelConfig& cfg, const LayerWeights& L, Tensor* x) {
    const int64_t rows = x->ne[1];
    Tensor* h = L.ffn_norm ? mul(ctx, rms_norm(ctx, x, cfg.norm_eps), L.ffn_norm) : x;
    Tensor *gate = nullptr, *up = nullptr;
    if (L.ffn_gate_inp) {
        Tensor* out = experts(ctx, cfg, L, h);
        if (L.ffn_down_shexp) { // Qwen2-MoE's shared expert, gated per token
            Tensor* shared =
                mul_mat(ctx, L.ffn_down_shexp,
                        swiglu(ctx, mul_mat(ctx, L.ffn_gate_shexp, h), mul_mat(ctx, L.ffn_up_shexp, h)));
            // sigmoid(g) as (1 + tanh(g / 2)) / 2: no op of its own for one value per token
            Tensor* g = mul_mat(ctx, L.ffn_gate_inp_shexp, h); // [1, rows]
            g = scale(ctx, tanh(ctx, scale(ctx, g, 0.5f)), 0.5f, 0.5f);
            out = add(ctx, out, mul(ctx, shared, g));
        }
        if (cfg.residual_scale != 1.0f) out = scale(ctx, out, cfg.residual_scale);
        return add(ctx, x, out);
    }
    if (L.ffn_gate_up) {
        Tensor* gu = mul_mat(ctx, L.ffn_gate_up, h); // [2 n_ff, rows]: gate rows, then up
        const size_t half = size_t(cfg.n_ff) * sizeof(float);
        gate = view(ctx, gu, {cfg.n_ff, rows}, {gu->nb[1]}, 0);
        up = view(ctx, gu, {cfg.n_ff, rows}, {gu->nb[1]}, half);
    } else {
        gate = mul_mat(ctx, L.ffn_gate, h);
        up = mul_mat(ctx, L.ffn_up, h);
    }
    Tensor* f = cfg.gelu_ffn ? mul(ctx, gelu(ctx, gate, GeluApprox::Tanh), up) : swiglu(ctx, gate, up);
    Tensor* out = mul_mat(ctx, L.ffn_down, f);
    if (L.ffn_post_norm) out = mul(ctx, rms_norm(ctx, out, cfg.norm_eps), L.ffn_post_norm);
    if (cfg.residual_scale != 1.0f) out = scale(ctx, out, cfg.residual_scale);
    return add(ctx, x, out);
}

Tensor* embeddings(Context& ctx, const ModelConfig& cfg, const Weights& w, Tensor* tokens) {
    Tensor* x = get_rows(ctx, w.token_embd, tokens); // [n_embd, n_tokens]
    return cfg.embd_scale != 1.0f ? scale(ctx, x, cfg.embd_scale) : x;
}

FlashAttnParams attention_params(const ModelConfig& cfg, size_t l) {
    FlashAttnParams p{};
    p.scale = cfg.attn_scale > 0.0f ? cfg.attn_scale : 1.0f / std::sqrt(float(cfg.head_dim));
    p.logit_softcap = cfg.attn_softcap;
    p.causal = true; // bottom-right aligned: the last query row is the newest position
    if (sliding_layer(cfg, l)) p.window_left = int32_t(cfg.sliding_window - 1);
    return p;
}

Tensor* attention_residual(Context& ctx, const ModelConfig& cfg, const LayerWeights& L, Tensor* x,
                           Tensor* o) {
    o = mul_mat(ctx, L.wo, o);
    if (L.attn_post_norm) o = mul(ctx, rms_norm(ctx, o, cfg.norm_eps), L.attn_post_norm);
    if (cfg.residual_scale != 1.0f) o = scale(ctx, o, cfg.residual_scale);
    return add(ctx, x, o);
}

Tensor* logits_of(Context& ctx, const ModelConfig& cfg, const Weights& w, Tensor* x) {
    x = mul(ctx, rms_norm(ctx, x, cfg.norm_eps), w.output_norm);
    Tensor* logits = mul_mat(ctx, w.output, x);
    if (cfg.final_softcap > 0.0f)
        logits = scale(ctx, tanh(ctx, scale(ctx, logits, 1.0f / cfg.final_softcap)), cfg.final_softcap);
    if (cfg.logit_scale != 1.0f) logits = scale(ctx, logits, 1.0f / cfg.logit_scale);
    return logits;
}

Tensor* pick_node(Context& ctx, const GraphIo& io, const Sampling& sampling) {
    if (!(sampling.temperature >= 0.0f) || !std::isfinite(sampling.temperature))
        fail("session: sampling temperature " + std::to_string(sampling.temperature) +
             " must be 0 (greedy) or positive");
    if (sampling.temperature == 0.0f) return top_k(ctx, io.logits, 1);
    // The logits' positions: the last token's, or every token's (graphs with all logits).
    const int64_t n = io.positions->ne[0];
    Tensor* positions = io.logits->ne[1] == n
                            ? io.positions
                            : view(ctx, io.positions, {1}, {}, size_t(n - 1) * io.positions->nb[0]);
    return sample_token(ctx, io.logits, positions,
                        SampleParams{.temperature = sampling.temperature,
                                     .top_k = sampling.top_k,
                                     .top_p = sampling.top_p,
                                     .seed = sampling.seed});
}

Graph forward_graph(const GraphIo& io) {
    Graph g;
    for (Tensor* t : io.early) g.expand(t);
    g.expand(io.logits);
    if (io.pick) g.expand(io.pick);
    return g;
}

GraphIo build_graph(Context& ctx, const ModelConfig& cfg, const Weights& w, const KvCache& cache,
                    int64_t n_tokens, int64_t n_past, bool all_logits, int64_t n_window) {
    const int64_t D = cfg.head_dim;
    if (n_tokens <= 0 || n_past < 0 || n_past + n_tokens > cache.n_ctx)
        fail("llama: " + std::to_string(n_tokens) + " tokens after " + std::to_string(n_past) +
             " cached ones do not fit a cache of " + std::to_string(cache.n_ctx));
    if (n_window != 0 && (n_window < n_past + n_tokens || n_window > cache.n_ctx))
        fail("llama: an attention window of " + std::to_string(n_window) + " rows cannot hold " +
             std::to_string(n_past + n_tokens) + " tokens in a cache of " + std::to_string(cache.n_ctx));
    if (cache.ring_rows > 0 && n_tokens + cfg.sliding_window - 1 > cache.ring_rows)
        fail("llama: " + std::to_string(n_tokens) +
             " tokens at once do not fit the sliding layers' cache of " + std::to_string(cache.ring_rows) +
             " rows (window " + std::to_string(cfg.sliding_window) + ")");
    const int64_t n_kv = n_window ? n_window : n_past + n_tokens; // cache rows attention reads
    GraphIo io;
    io.tokens = set_name(ctx.new_tensor(Type::I32, {n_tokens}), "tokens");
    io.positions = set_name(ctx.new_tensor(Type::I32, {n_tokens}), "positions");
    set_input(io.tokens);
    set_input(io.positions);

    // The global layers' mask (a model whose every layer slides, Phi-3, has none).
    bool any_global = false;
    for (size_t l = 0; l < w.layers.size(); ++l) any_global |= !sliding_layer(cfg, l);
    if (n_window && any_global) {
        io.kq_mask = set_name(ctx.new_tensor(Type::F16, {n_window, n_tokens}), "kq_mask");
        set_input(io.kq_mask);
    }

    Tensor* x = embeddings(ctx, cfg, w, io.tokens); // [n_embd, n_tokens]
    // Without all_logits only the last position's logits are wanted: the last layer then
    // writes every position's keys and values to the cache but attends, projects and runs
    // its feed-forward for the last position alone (one layer's FFN of a prompt: ~4% of it).
    const bool last_only = !all_logits && n_tokens > 1;
    for (size_t l = 0; l < w.layers.size(); ++l) {
        const LayerWeights& L = w.layers[l];
        const std::string layer = std::to_string(l);
        const bool trim = last_only && l + 1 == w.layers.size();

        // ---- attention
        Tensor* h = L.attn_norm ? mul(ctx, rms_norm(ctx, x, cfg.norm_eps), L.attn_norm) : x;
        auto [q, k, v] = attention_inputs(ctx, cfg, L, l, h, io.positions, n_tokens, 1,
                                          cache.n_ctx); // [D, heads, n_tokens]
        if (L.wqk) io.early.push_back(v);               // v's own product

        // Store the new keys and values at their positions, then attend over rows
        // [0, n_kv) of the cache. The views read the set_rows results, so the writes
        // come first. Sliding layers with a ring cache store at position % ring rows and,
        // once it has wrapped (or in windowed graphs), read all its rows through the ring mask.
        const bool ring = cache.ring_rows > 0 && sliding_layer(cfg, l);
        const bool ring_mask_here = ring && ring_masked(cache, n_tokens, n_past, n_window);
        if (ring && !io.ring_rows) {
            io.ring_rows = set_name(ctx.new_tensor(Type::I32, {n_tokens}), "ring_rows");
            set_input(io.ring_rows);
        }
        Tensor* rows_at = ring ? io.ring_rows : io.positions;
        Tensor* k_all = set_rows(ctx, cache.k[l], permute(ctx, k, 0, 2, 1, 3), rows_at);
        Tensor* v_all = set_rows(ctx, cache.v[l], permute(ctx, v, 0, 2, 1, 3), rows_at);
        const int64_t layer_kv = ring_mask_here ? cache.ring_rows : n_kv;
        auto cached = [&](Tensor* c) {
            return view(ctx, c, {D, layer_kv, cfg.n_head_kv}, {c->nb[1], c->nb[2]}, 0);
        };
        // Causal attention over rows [0, n_past + n_tokens) takes the parameters as they are
        // (query i sees cache rows up to n_past + i, sliding layers a window of them);
        // windowed graphs attend through masks, sliding layers through one of their own
        // (made by the first such layer).
        FlashAttnParams layer_attn = attention_params(cfg, l);
        Tensor* mask = io.kq_mask;
        if (n_window) {
            layer_attn.causal = false;
            layer_attn.window_left = -1;
        }
        if (ring_mask_here) {
            if (!io.kq_mask_ring) {
                io.kq_mask_ring =
                    set_name(ctx.new_tensor(Type::F16, {cache.ring_rows, n_tokens}), "kq_mask_ring");
                set_input(io.kq_mask_ring);
            }
            mask = io.kq_mask_ring;
            layer_attn.causal = false;
            layer_attn.window_left = -1;
        } else if (sliding_layer(cfg, l) && n_window) {
            if (!io.kq_mask_swa) {
                io.kq_mask_swa = set_name(ctx.new_tensor(Type::F16, {n_window, n_tokens}), "kq_mask_swa");
                set_input(io.kq_mask_swa);
            }
            mask = io.kq_mask_swa;
        }
        int64_t rows = n_tokens; // positions this layer carries on
        if (trim) {
            const int64_t last = n_tokens - 1;
            q = view(ctx, q, {D, cfg.n_head, 1}, {q->nb[1], q->nb[2]}, size_t(last) * q->nb[2]);
            if (mask) mask = view(ctx, mask, {mask->ne[0], 1}, {mask->nb[1]}, size_t(last) * mask->nb[1]);
            x = view(ctx, x, {cfg.n_embd, 1}, {x->nb[1]}, size_t(last) * x->nb[1]);
            rows = 1;
        }
        Tensor* o =
            flash_attn_ext(ctx, permute(ctx, q, 0, 2, 1, 3), cached(k_all), cached(v_all), mask, layer_attn);
        set_name(o, std::string("attn.") + layer);
        x = attention_residual(ctx, cfg, L, x, reshape(ctx, o, {D * cfg.n_head, rows}));

        x = feed_forward(ctx, cfg, L, x);
        set_name(x, std::string("residual.") + layer);
    }
    io.logits = set_name(logits_of(ctx, cfg, w, x), "logits");
    set_output(io.logits);
    return io;
}

TrainingIo build_training_graph(Context& ctx, const ModelConfig& cfg, const Weights& w, int64_t T,
                                int64_t B) {
    const int64_t D = cfg.head_dim, rows = T * B;
    if (T <= 0 || B <= 0) fail("llama: a training graph needs at least one sequence of one token");
    TrainingIo io;
    io.tokens = set_name(ctx.new_tensor(Type::I32, {rows}), "tokens");
    io.positions = set_name(ctx.new_tensor(Type::I32, {T}), "positions");
    io.labels = set_name(ctx.new_tensor(Type::I32, {rows}), "labels");
    for (Tensor* t : {io.tokens, io.positions, io.labels}) set_input(t);

    Tensor* x = embeddings(ctx, cfg, w, io.tokens); // [n_embd, T * B]
    for (size_t l = 0; l < w.layers.size(); ++l) {
        const LayerWeights& L = w.layers[l];
        Tensor* h = L.attn_norm ? mul(ctx, rms_norm(ctx, x, cfg.norm_eps), L.attn_norm) : x;
        auto [q, k, v] = attention_inputs(ctx, cfg, L, l, h, io.positions, T, B, 0); // [D, heads, T, B]
        Tensor* o = flash_attn_ext(ctx, permute(ctx, q, 0, 2, 1, 3), permute(ctx, k, 0, 2, 1, 3),
                                   permute(ctx, v, 0, 2, 1, 3), nullptr, attention_params(cfg, l));
        set_name(o, "attn." + std::to_string(l)); // [D, n_head, T, B]
        x = attention_residual(ctx, cfg, L, x, reshape(ctx, o, {D * cfg.n_head, rows}));
        x = feed_forward(ctx, cfg, L, x);
        set_name(x, "residual." + std::to_string(l));
    }
    io.logits = set_name(logits_of(ctx, cfg, w, x), "logits");
    io.loss = set_name(cross_entropy_loss(ctx, io.logits, io.labels), "loss");
    set_output(io.logits);
    set_loss(io.loss);
    return io;
}

} // namespace llama

// ---- metadata -------------------------------------------------------------------------

namespace {

int64_t meta_int(const gguf::File& f, const std::string& key, std::optional<int64_t> fallback = {}) {
    if (const gguf::Value* v = f.metadata().find(key)) return v->as_int();
    if (fallback) return *fallback;
    fail("model: the file has no metadata key " + key);
}

double meta_float(const gguf::File& f, const std::string& key, std::optional<double> fallback = {}) {
    if (const gguf::Value* v = f.metadata().find(key)) return v->as_float();
    if (fallback) return *fallback;
    fail("model: the file has no metadata key " + key);
}

} // namespace

ModelConfig llama::read_config(const gguf::File& f) {
    ModelConfig c;
    const gguf::Value* arch = f.metadata().find("general.architecture");
    if (!arch) fail("model: the file has no general.architecture");
    c.arch = arch->as_string();
    if (c.arch != "llama" && c.arch != "granite" && c.arch != "qwen2" && c.arch != "qwen2moe" &&
        c.arch != "qwen3" && c.arch != "qwen3moe" && c.arch != "phi3" && c.arch != "olmo2" &&
        c.arch != "gemma2" && c.arch != "gemma3")
        fail("model: architecture \"" + c.arch +
             "\" is not supported (llama, granite, qwen2, qwen2moe, qwen3, qwen3moe, phi3, olmo2, gemma2 and "
             "gemma3 are)");
    const std::string p = c.arch + ".";
    c.n_embd = meta_int(f, p + "embedding_length");
    c.n_layer = meta_int(f, p + "block_count");
    // qwen2moe and qwen3moe files hold the checkpoint's dense width there, which no block uses
    // (their experts' width is read below).
    const bool moe_arch = c.arch == "qwen2moe" || c.arch == "qwen3moe";
    c.n_ff = moe_arch ? 0 : meta_int(f, p + "feed_forward_length");
    // Every block of a qwen2moe or qwen3moe file is a mixture, so its expert counts are required.
    if (f.metadata().find(p + "expert_count") || moe_arch) {
        c.n_expert = meta_int(f, p + "expert_count");
        c.n_expert_used = meta_int(f, p + "expert_used_count");
        if (c.arch != "llama" && !moe_arch)
            fail("model: experts (" + p +
                 "expert_count) are supported in llama (Mixtral), qwen2moe and qwen3moe files, not " +
                 c.arch);
        if (c.n_expert < 1 || c.n_expert_used < 1 || c.n_expert_used > c.n_expert)
            fail("model: " + p + "expert_used_count = " + std::to_string(c.n_expert_used) +
                 " must be in [1, " + p + "expert_count = " + std::to_string(c.n_expert) + "]");
    }
    if (moe_arch) {
        // The experts' width is expert_feed_forward_length; files without that key are read as
        // llama.cpp reads them, the dense width shared among the experts a token runs.
        const std::string key = p + "expert_feed_forward_length";
        c.n_ff = f.metadata().find(key) ? meta_int(f, key)
                                        : meta_int(f, p + "feed_forward_length") / c.n_expert_used;
    }
    if (c.arch == "qwen2moe") {
        // Qwen2-MoE weighs the chosen experts by their share of the softmax over all of them and
        // adds a shared expert, whose width defaults (as llama.cpp reads such files) to the
        // dense width.
        c.expert_weights_norm = false;
        const std::string key = p + "expert_shared_feed_forward_length";
        c.n_ff_shared = meta_int(f, f.metadata().find(key) ? key : p + "feed_forward_length");
        if (c.n_ff_shared <= 0) fail("model: " + key + " must be positive");
    }
    c.n_head = meta_int(f, p + "attention.head_count");
    c.n_head_kv = meta_int(f, p + "attention.head_count_kv", c.n_head);
    c.n_ctx_train = meta_int(f, p + "context_length", 2048);
    if (c.n_embd <= 0 || c.n_layer <= 0 || c.n_ff <= 0 || c.n_head <= 0 || c.n_head_kv <= 0 ||
        c.n_head % c.n_head_kv != 0)
        fail("model: inconsistent sizes (embedding " + std::to_string(c.n_embd) + ", heads " +
             std::to_string(c.n_head) + "/" + std::to_string(c.n_head_kv) + ", layers " +
             std::to_string(c.n_layer) + ")");
    c.head_dim = meta_int(f, p + "attention.key_length", c.n_embd / c.n_head);
    if (meta_int(f, p + "attention.value_length", c.head_dim) != c.head_dim)
        fail("model: key and value head sizes differ, which llama-family models do not do");
    c.norm_eps = float(meta_float(f, p + "attention.layer_norm_rms_epsilon", 1e-5));
    c.rope.n_dims = int32_t(meta_int(f, p + "rope.dimension_count", c.head_dim));
    // llama and granite files hold q and k rows in rope's pair order (the converters permute them)
    c.rope.mode = c.arch == "llama" || c.arch == "granite" ? RopeMode::Normal : RopeMode::NeoX;
    c.rope.freq_base = float(meta_float(f, p + "rope.freq_base", 10000.0));
    c.rope.freq_scale = 1.0f;
    if (const gguf::Value* type = f.metadata().find(p + "rope.scaling.type")) {
        const std::string& t = type->as_string();
        if (t == "linear")
            c.rope.freq_scale = float(1.0 / meta_float(f, p + "rope.scaling.factor"));
        else if (t != "none")
            fail("model: rope scaling \"" + t + "\" is not supported (linear is)");
    }
    c.rope_sliding = c.rope;
    const gguf::TensorInfo& embd = f.tensor("token_embd.weight");
    c.n_vocab = embd.ne[1];
    c.tied_embeddings = f.find_tensor("output.weight") == nullptr;
    c.qkv_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
    // Qwen3: Qwen2's blocks with each head of q and k RMS-normed before rope (and usually
    // without the q/k/v biases, which the file's tensors say); Qwen3-MoE has the same attention.
    c.qk_norm = c.arch == "qwen3" || c.arch == "qwen3moe";
    if (c.arch ==
        "olmo2") { // norms after each block's attention and feed-forward, not before; q/k normed whole
        c.qk_norm = c.qk_norm_full = c.post_norms = true;
        c.pre_norms = false;
    }
    if (c.arch == "granite") { // LLaMA's blocks with four multipliers
        c.embd_scale = float(meta_float(f, p + "embedding_scale", 1.0));
        c.residual_scale = float(meta_float(f, p + "residual_scale", 1.0));
        c.attn_scale = float(meta_float(f, p + "attention.scale", 0.0));
        c.logit_scale = float(meta_float(f, p + "logit_scale", 1.0));
        if (!(c.embd_scale > 0) || !(c.residual_scale > 0) || !(c.attn_scale >= 0) || !(c.logit_scale > 0))
            fail("model: granite's embedding, residual, attention and logit scales must be positive");
    }
    if (c.arch == "phi3") {
        // Phi-3: a window on every layer (when the file gives one); LongRoPE files hold short
        // and long rope factors and an attention factor on the rotated dims of q and k.
        c.sliding_window = meta_int(f, p + "attention.sliding_window", 0);
        c.sliding_pattern = ModelConfig::kEveryLayerSlides;
        if (f.find_tensor("rope_factors_long.weight")) {
            c.rope_ctx_orig = meta_int(f, p + "rope.scaling.original_context_length");
            c.rope_attn_factor = float(meta_float(f, p + "rope.scaling.attn_factor", 1.0));
            if (c.rope_ctx_orig <= 0 || !(c.rope_attn_factor > 0))
                fail("model: phi3 LongRoPE needs a positive original context length and attention factor");
        }
    }
    if (c.arch == "gemma2" || c.arch == "gemma3") {
        // Defaults as llama.cpp has them for files that lack the keys.
        const bool g2 = c.arch == "gemma2";
        c.embd_scale = std::sqrt(float(c.n_embd));
        c.attn_softcap = g2 ? float(meta_float(f, p + "attn_logit_softcapping", 50.0)) : 0.0f;
        c.final_softcap = float(meta_float(f, p + "final_logit_softcapping", g2 ? 30.0 : 0.0));
        c.sliding_window = meta_int(f, p + "attention.sliding_window", g2 ? 4096 : 0);
        c.sliding_pattern = int32_t(meta_int(f, p + "attention.sliding_window_pattern", g2 ? 2 : 6));
        c.post_norms = c.gelu_ffn = true;
        c.qk_norm = !g2;
        // GGUF has no key for the query scale (Hugging Face's query_pre_attn_scalar); as
        // llama.cpp: the 27B models (Gemma 2: 46 layers, Gemma 3: 62) scale by n_embd /
        // n_head, the others by the head size.
        const bool large = c.n_layer == (g2 ? 46 : 62);
        c.attn_scale = 1.0f / std::sqrt(float(large ? c.n_embd / c.n_head : c.head_dim));
        if (g2 && c.sliding_window <= 0) fail("model: gemma2.attention.sliding_window must be positive");
        if (c.sliding_window < 0 || c.sliding_pattern <= 0)
            fail("model: " + p + "attention.sliding_window and its pattern must be positive");
        // Gemma 3's sliding layers rotate with their own base and no position scaling.
        if (!g2) {
            c.rope_sliding.freq_base = float(meta_float(f, p + "rope.freq_base_swa", 10000.0));
            c.rope_sliding.freq_scale = 1.0f;
        }
    }
    return c;
}

// ---- the model ------------------------------------------------------------------------

struct Model::Impl {
    gguf::File file;
    ModelConfig config;
    llama::Weights weights;
    // One metadata context and one buffer per device holding weights (the CPU first).
    struct Placement {
        Device* device;
        std::unique_ptr<Context> ctx;
        std::unique_ptr<Buffer> buffer;
    };
    std::vector<Placement> placements;
    size_t bytes = 0;
    std::vector<std::string> kept_on_host; // see Model::kept_on_host
};

std::unique_ptr<Model> Model::load(const std::string& path, const ModelLoadOptions& options) {
    std::unique_ptr<Model> model(new Model());
    model->impl_ = std::make_unique<Impl>();
    Impl& m = *model->impl_;
    m.file = gguf::File::open_model(path); // the shards of a split model joined
    m.config = llama::read_config(m.file);
    const ModelConfig& c = m.config;

    const int gpu_layers = options.gpu ? std::max(0, options.gpu_layers) : 0;
    m.placements.push_back({&cpu_device(), std::make_unique<Context>(), nullptr});
    if (gpu_layers > 0) m.placements.push_back({options.gpu, std::make_unique<Context>(), nullptr});
    Context& cpu_ctx = *m.placements[0].ctx;
    Context& gpu_ctx = *m.placements.back().ctx;

    // The file's tensor `name`, checked to have the shape the model needs; null when it is
    // missing and optional.
    auto checked = [&](const std::string& name, std::initializer_list<int64_t> ne,
                       bool optional = false) -> const gguf::TensorInfo* {
        const gguf::TensorInfo* info = m.file.find_tensor(name);
        if (!info) {
            if (optional) return nullptr;
            fail(path + ": tensor " + name + " is missing");
        }
        std::array<int64_t, 4> want{1, 1, 1, 1};
        std::copy(ne.begin(), ne.end(), want.begin());
        if (info->ne != want) {
            auto str = [](const std::array<int64_t, 4>& a) {
                std::string out = "[";
                for (int d = 0; d < 4; ++d) out.append(std::to_string(a[d])).append(d < 3 ? "," : "]");
                return out;
            };
            fail(path + ": tensor " + name + " has shape " + str(info->ne) + ", the model needs " +
                 str(want));
        }
        return info;
    };
    // Where a matrix of `type` with rows of `cols` values goes: a GPU that cannot multiply by
    // it (a block format its kernels do not decode) leaves it in host memory, where its
    // products run on the CPU, rather than holding it and having it copied back for each use.
    auto usable_where = [&](Type type, int64_t cols, Context& where, const std::string& name) -> Context& {
        if (&where == &cpu_ctx) return where;
        Context probe; // shapes only
        Tensor* product =
            mul_mat(probe, probe.new_tensor(type, {cols, 1}), probe.new_tensor(Type::F32, {cols, 1}));
        if (options.gpu->supports_op(product)) return where;
        m.kept_on_host.push_back(name);
        return cpu_ctx;
    };
    // A weight tensor with the shape the model needs, in the context of its device.
    auto weight = [&](const std::string& name, std::initializer_list<int64_t> ne, Context& where,
                      bool optional = false) -> Tensor* {
        const gguf::TensorInfo* info = checked(name, ne, optional);
        if (!info) return nullptr;
        Context& ctx = ne.size() == 2 ? usable_where(info->type, info->ne[0], where, name) : where;
        return set_name(ctx.new_tensor(info->type, info->ne), name);
    };
    // A mixture's stacked experts [cols, rows, n_expert], kept in host memory when the GPU
    // cannot run mul_mat_id with their type.
    auto expert_weights = [&](const std::string& name, int64_t cols, int64_t rows,
                              Context& where) -> Tensor* {
        const gguf::TensorInfo* info = checked(name, {cols, rows, c.n_expert});
        Context* ctx = &where;
        if (&where != &cpu_ctx) {
            Context probe; // shapes only
            Tensor* ids = probe.new_tensor(Type::I32, {1, 1});
            Tensor* product = mul_mat_id(probe, probe.new_tensor(info->type, {cols, 1, 1}),
                                         probe.new_tensor(Type::F32, {cols, 1, 1}), ids);
            if (!options.gpu->supports_op(product)) {
                m.kept_on_host.push_back(name);
                ctx = &cpu_ctx;
            }
        }
        return set_name(ctx->new_tensor(info->type, info->ne), name);
    };
    // One tensor holding the parts one after another (`name`): matrices [cols, rows_i] give
    // [cols, sum rows_i], vectors (cols 0) [rows_i] give [sum rows_i]. Null when a part is
    // missing or the parts' types differ.
    using Parts = std::vector<std::pair<std::string, int64_t>>;
    auto mergeable = [&](const Parts& parts, int64_t cols) {
        std::vector<const gguf::TensorInfo*> infos;
        for (const auto& [part, rows] : parts) {
            const gguf::TensorInfo* info =
                cols ? checked(part, {cols, rows}, true) : checked(part, {rows}, true);
            if (!info || (!infos.empty() && info->type != infos[0]->type))
                return std::vector<const gguf::TensorInfo*>{};
            infos.push_back(info);
        }
        return infos;
    };
    std::map<const Tensor*, std::vector<const gguf::TensorInfo*>> merged_parts;
    auto merged = [&](const std::string& name, const std::vector<const gguf::TensorInfo*>& infos,
                      int64_t cols, Context& where) {
        int64_t rows = 0;
        for (const gguf::TensorInfo* info : infos) rows += cols ? info->ne[1] : info->ne[0];
        Tensor* t = where.new_tensor(infos[0]->type, cols ? std::array<int64_t, 4>{cols, rows, 1, 1}
                                                          : std::array<int64_t, 4>{rows, 1, 1, 1});
        merged_parts[t] = infos;
        return set_name(t, name);
    };

    const int64_t E = c.n_embd, Dq = c.n_head * c.head_dim, Dkv = c.n_head_kv * c.head_dim;
    llama::Weights& w = m.weights;
    const bool head_on_gpu = gpu_layers > c.n_layer;
    // With every block and the head on the GPU the embeddings go there too: a decoding step
    // is then one GPU split (no CPU work, copy or synchronization in front of it), and a
    // tied output head runs on the GPU. Otherwise they stay with the first blocks, on the CPU.
    w.token_embd = weight("token_embd.weight", {E, c.n_vocab}, head_on_gpu ? gpu_ctx : cpu_ctx);
    w.output_norm = weight("output_norm.weight", {E}, head_on_gpu ? gpu_ctx : cpu_ctx);
    w.output = c.tied_embeddings ? w.token_embd
                                 : weight("output.weight", {E, c.n_vocab}, head_on_gpu ? gpu_ctx : cpu_ctx);
    const int64_t first_gpu_layer = c.n_layer - std::min<int64_t>(gpu_layers, c.n_layer);
    // Llama 3.1 style rope scaling: one divisor per rotating pair (rope_freqs.weight, f32),
    // shared by every block. Each device holding blocks gets its own copy, so that no block's
    // rope reads across devices.
    // Rope frequency divisors, one per rotating pair: rope_freqs.weight (Llama 3.1 style), or
    // Phi-3's LongRoPE pair rope_factors_short.weight / rope_factors_long.weight.
    const bool long_rope = c.rope_ctx_orig > 0;
    const std::string factors_name = long_rope ? "rope_factors_short.weight" : "rope_freqs.weight";
    const gguf::TensorInfo* rope_freqs = checked(factors_name, {c.rope.n_dims / 2}, !long_rope);
    for (const char* name : {"rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight"}) {
        const gguf::TensorInfo* info = checked(name, {c.rope.n_dims / 2}, true);
        if (info && info->type != Type::F32)
            fail(path + ": tensor " + name + " must be f32, not " + std::string(type_name(info->type)));
    }
    std::map<const Context*, Tensor*> rope_factors, rope_factors_long, rope_q_scale;
    // Tensors the loader makes rather than reads from the file, with their values.
    std::map<const Tensor*, std::vector<float>> made;
    for (int64_t l = 0; l < c.n_layer; ++l) {
        Context& where = l >= first_gpu_layer ? gpu_ctx : cpu_ctx;
        const std::string b = "blk." + std::to_string(l) + ".";
        llama::LayerWeights L;
        if (rope_freqs) {
            Tensor*& factors = rope_factors[&where];
            if (!factors) factors = weight(factors_name, {c.rope.n_dims / 2}, where);
            L.rope_factors = factors;
        }
        if (long_rope) {
            Tensor*& factors = rope_factors_long[&where];
            if (!factors) factors = weight("rope_factors_long.weight", {c.rope.n_dims / 2}, where);
            L.rope_factors_long = factors;
        }
        if (c.rope_attn_factor != 1.0f) {
            Tensor*& scale = rope_q_scale[&where];
            if (!scale) {
                scale = set_name(where.new_tensor(Type::F32, {c.head_dim}), "rope_q_scale");
                std::vector<float> values(size_t(c.head_dim), 1.0f);
                std::fill_n(values.begin(), c.rope.n_dims, c.rope_attn_factor * c.rope_attn_factor);
                made[scale] = std::move(values);
            }
            L.rope_q_scale = scale;
        }
        if (c.pre_norms) L.attn_norm = weight(b + "attn_norm.weight", {E}, where);
        if (c.arch == "phi3") { // the files hold q/k/v and gate/up merged already
            L.wqkv = weight(b + "attn_qkv.weight", {E, Dq + 2 * Dkv}, where);
            L.wo = weight(b + "attn_output.weight", {Dq, E}, where);
            L.ffn_norm = weight(b + "ffn_norm.weight", {E}, where);
            L.ffn_gate_up = weight(b + "ffn_up.weight", {E, 2 * c.n_ff}, where);
            L.ffn_down = weight(b + "ffn_down.weight", {c.n_ff, E}, where);
            w.layers.push_back(L);
            continue;
        }
        // Every projection must be there with its shape, merged or not.
        for (const auto& [name, rows] : {std::pair{"attn_q", Dq}, {"attn_k", Dkv}, {"attn_v", Dkv}})
            checked(b + name + ".weight", {E, rows});
        // The first n of q, k, v as one matrix (and one bias) named `name`, if their types agree
        // and their biases are all there or all absent; false: nothing was merged. (q and k
        // normed over all their heads stay apart: the norms need them whole.)
        const std::pair<const char*, int64_t> projections[] = {
            {"attn_q", Dq}, {"attn_k", Dkv}, {"attn_v", Dkv}};
        auto merge_first = [&](size_t n, const std::string& name, Tensor*& w_out, Tensor*& b_out) {
            if (c.qk_norm_full) return false;
            Parts matrices, biases;
            bool any_bias = false;
            for (size_t i = 0; i < n; ++i) {
                matrices.emplace_back(b + projections[i].first + ".weight", projections[i].second);
                biases.emplace_back(b + projections[i].first + ".bias", projections[i].second);
                any_bias = any_bias || m.file.find_tensor(biases.back().first);
            }
            const auto parts = mergeable(matrices, E);
            const auto bias_parts = any_bias ? mergeable(biases, 0) : std::vector<const gguf::TensorInfo*>{};
            if (parts.empty() || (any_bias && bias_parts.empty())) return false;
            Context& at = usable_where(parts[0]->type, E, where, b + name + ".weight"); // the bias beside it
            w_out = merged(b + name + ".weight", parts, E, at);
            if (any_bias) b_out = merged(b + name + ".bias", bias_parts, 0, at);
            return true;
        };
        // All three; else q and k alone, when only v differs (a Q4_K_M file's attn_v is q6_K in
        // some layers); else each apart.
        if (!merge_first(3, "attn_qkv", L.wqkv, L.bqkv)) {
            if (!merge_first(2, "attn_qk", L.wqk, L.bqk)) {
                L.wq = weight(b + "attn_q.weight", {E, Dq}, where);
                L.wk = weight(b + "attn_k.weight", {E, Dkv}, where);
                L.bq = weight(b + "attn_q.bias", {Dq}, where, true);
                L.bk = weight(b + "attn_k.bias", {Dkv}, where, true);
            }
            L.wv = weight(b + "attn_v.weight", {E, Dkv}, where);
            L.bv = weight(b + "attn_v.bias", {Dkv}, where, true);
        }
        L.wo = weight(b + "attn_output.weight", {Dq, E}, where);
        if (c.pre_norms) L.ffn_norm = weight(b + "ffn_norm.weight", {E}, where);
        if (c.n_expert > 0) { // a mixture of experts: the router, the stacked experts
            L.ffn_gate_inp = weight(b + "ffn_gate_inp.weight", {E, c.n_expert}, where);
            L.ffn_gate_exps = expert_weights(b + "ffn_gate_exps.weight", E, c.n_ff, where);
            L.ffn_up_exps = expert_weights(b + "ffn_up_exps.weight", E, c.n_ff, where);
            L.ffn_down_exps = expert_weights(b + "ffn_down_exps.weight", c.n_ff, E, where);
            if (c.n_ff_shared > 0) {
                L.ffn_gate_inp_shexp = weight(b + "ffn_gate_inp_shexp.weight", {E}, where);
                L.ffn_gate_shexp = weight(b + "ffn_gate_shexp.weight", {E, c.n_ff_shared}, where);
                L.ffn_up_shexp = weight(b + "ffn_up_shexp.weight", {E, c.n_ff_shared}, where);
                L.ffn_down_shexp = weight(b + "ffn_down_shexp.weight", {c.n_ff_shared, E}, where);
            }
        } else {
            checked(b + "ffn_gate.weight", {E, c.n_ff});
            checked(b + "ffn_up.weight", {E, c.n_ff});
            const auto gate_up =
                mergeable({{b + "ffn_gate.weight", c.n_ff}, {b + "ffn_up.weight", c.n_ff}}, E);
            if (!gate_up.empty()) {
                L.ffn_gate_up = merged(b + "ffn_gate_up.weight", gate_up, E,
                                       usable_where(gate_up[0]->type, E, where, b + "ffn_gate_up.weight"));
            } else {
                L.ffn_gate = weight(b + "ffn_gate.weight", {E, c.n_ff}, where);
                L.ffn_up = weight(b + "ffn_up.weight", {E, c.n_ff}, where);
            }
            L.ffn_down = weight(b + "ffn_down.weight", {c.n_ff, E}, where);
        }
        if (c.post_norms) {
            L.attn_post_norm = weight(b + "post_attention_norm.weight", {E}, where);
            L.ffn_post_norm = weight(b + "post_ffw_norm.weight", {E}, where);
        }
        if (c.qk_norm) {
            L.attn_q_norm = weight(b + "attn_q_norm.weight", {c.qk_norm_full ? Dq : c.head_dim}, where);
            L.attn_k_norm = weight(b + "attn_k_norm.weight", {c.qk_norm_full ? Dkv : c.head_dim}, where);
        }
        w.layers.push_back(L);
    }

    // Copy the weights out of the mapping into each device's memory.
    for (Impl::Placement& p : m.placements) {
        if (p.ctx->n_tensors() == 0) continue;
        p.buffer = allocate_context_tensors(*p.ctx, p.device->buffer_type());
        p.buffer->set_usage(BufferUsage::Weights); // the backend may lay them out its own way
        for (Tensor* t : p.ctx->tensors()) {
            t->flags |= kFlagConstant;
            if (auto it = made.find(t); it != made.end()) {
                tensor_set(t, it->second.data(), 0, it->second.size() * sizeof(float));
                continue;
            }
            auto parts = merged_parts.find(t);
            if (parts == merged_parts.end()) {
                const gguf::TensorInfo& info = m.file.tensor(t->name);
                tensor_set(t, info.data, 0, info.nbytes);
                m.bytes += info.nbytes;
                continue;
            }
            size_t offset = 0; // rows are whole blocks, so the parts' bytes just follow each other
            for (const gguf::TensorInfo* info : parts->second) {
                tensor_set(t, info->data, offset, info->nbytes);
                offset += info->nbytes;
            }
            if (offset != t->nbytes()) fail(path + ": the parts of " + t->name + " do not add up");
            m.bytes += offset;
        }
    }
    return model;
}

Model::~Model() = default;
const ModelConfig& Model::config() const {
    return impl_->config;
}
const gguf::File& Model::file() const {
    return impl_->file;
}
size_t Model::weight_bytes() const {
    return impl_->bytes;
}
int Model::merged_projections() const {
    int n = 0;
    for (const llama::LayerWeights& L : impl_->weights.layers)
        n += int(L.wqkv != nullptr) + int(L.wqk != nullptr) + int(L.ffn_gate_up != nullptr);
    return n;
}
const std::vector<std::string>& Model::kept_on_host() const {
    return impl_->kept_on_host;
}
std::vector<Device*> Model::devices() const {
    std::vector<Device*> out;
    for (const Impl::Placement& p : impl_->placements)
        if (p.ctx->n_tensors() > 0) out.push_back(p.device);
    return out;
}

// ---- the session ----------------------------------------------------------------------

namespace {

// Host time of an eval, by phase: charge(phase) adds the time since the last lap to it.
struct PhaseClock {
    using Clock = std::chrono::steady_clock;
    Clock::time_point lap = Clock::now();
    void restart() { lap = Clock::now(); }
    void charge(double& phase) {
        const Clock::time_point now = Clock::now();
        phase += std::chrono::duration<double>(now - lap).count();
        lap = now;
    }
};

} // namespace

struct Session::Impl {
    const Model& model;
    SessionOptions options;
    std::unique_ptr<Backend> cpu;
    std::unique_ptr<Backend> gpu;
    std::unique_ptr<Scheduler> sched;
    llama::KvCache cache;
    std::vector<std::unique_ptr<Context>> cache_ctx;
    std::vector<std::unique_ptr<Buffer>> cache_buffers;
    size_t kv_bytes = 0;
    int64_t n_past = 0;
    // The last graph, kept until the next eval, which runs it again unchanged when it has
    // the same shape (a windowed graph: only its inputs depend on n_past; a causal one: at the
    // same n_past).
    struct LastGraph {
        std::unique_ptr<Context> ctx;
        Graph graph;
        llama::GraphIo io;
        int64_t n_tokens = 0, n_window = 0, n_past = 0;
        bool all_logits = false;
        std::optional<Sampling> pick; // how the graph picks the last token's next token, if it does
    } last;
    EvalProfile profile;
    std::vector<TracedNode> trace;

    // Where decode's queued reads land each step's pick (two steps are in flight at
    // most); kept here, so that no read can land in memory that is gone.
    std::array<int32_t, 2> picks{};

    Impl(const Model& m, const SessionOptions& o) : model(m), options(o) {}
    void run(std::span<const int32_t> tokens, bool all_logits, const std::optional<Sampling>& pick,
             std::vector<float>* logits, int32_t* pick_id);
    void check_room(int64_t n_tokens) const;
    void check_tokens(std::span<const int32_t> tokens) const; // ids in the vocabulary
    // Whether the last graph serves n tokens at n_past as it is.
    bool last_graph_fits(int64_t n, bool all_logits, const std::optional<Sampling>& pick) const;
    // The graph for n tokens at n_past: the last one again when it fits, else a new one.
    LastGraph& graph_for(int64_t n, bool all_logits, const std::optional<Sampling>& pick);
    // Writes the inputs of a graph for n tokens at n_past, other than the token ids, through
    // `write` (tensor_set, or a backend's queued write).
    using InputWriter = std::function<void(Tensor* t, const void* src, size_t size)>;
    void write_step_inputs(const llama::GraphIo& io, int64_t n, const InputWriter& write) const;
};

Session::Session(const Model& model, const SessionOptions& options)
    : impl_(std::make_unique<Impl>(model, options)) {
    Impl& s = *impl_;
    const ModelConfig& c = model.config();
    if (s.options.n_ctx <= 0)
        s.options.n_ctx = std::min<int64_t>(c.n_ctx_train > 0 ? c.n_ctx_train : 4096, 4096);
    if (s.options.n_batch <= 0) fail("session: n_batch must be positive");
    if (s.options.decode_window_step < 0) fail("session: decode_window_step must be 0 or positive");
    if (const MatMulPrecision p = s.options.matmul_precision;
        p != MatMulPrecision::F32 && p != MatMulPrecision::TF32 && p != MatMulPrecision::Q8 &&
        p != MatMulPrecision::BF16)
        fail("session: unknown matmul_precision " + std::to_string(int(p)));
    if (const FlashAttnPrecision p = s.options.attention_precision;
        p != FlashAttnPrecision::F32 && p != FlashAttnPrecision::BF16)
        fail("session: unknown attention_precision " + std::to_string(int(p)));
    s.options.n_batch = std::min(s.options.n_batch, s.options.n_ctx);
    const Type kv = s.options.kv_type;
    if (kv != Type::F32 && kv != Type::F16 && kv != Type::Q8_0)
        fail("session: the KV cache type must be f32, f16 or q8_0, not " + std::string(type_name(kv)));
    if (c.head_dim % type_traits(kv).block_size != 0)
        fail("session: head size " + std::to_string(c.head_dim) + " is not a multiple of the " +
             std::string(type_name(kv)) + " block size");

    s.cpu = make_cpu_backend(s.options.n_threads);
    std::vector<Backend*> backends;
    // The device holding weights besides the CPU, if any (the CPU itself may hold none).
    Device* gpu = nullptr;
    for (Device* d : model.devices())
        if (d != &cpu_device()) gpu = d;
    if (gpu) {
        s.gpu = gpu->create_backend();
        backends.push_back(s.gpu.get());
    }
    backends.push_back(s.cpu.get());
    s.sched = std::make_unique<Scheduler>(backends);
    if (!s.options.log_fallbacks) s.sched->set_log({});

    // Each layer's cache lives with the layer's weights.
    s.cache.n_ctx = s.options.n_ctx;
    // Sliding layers keep the rows their window and one batch need, when that is fewer.
    const int64_t ring = c.sliding_window + s.options.n_batch - 1;
    if (s.options.window_cache && c.sliding_window > 0 && ring < s.options.n_ctx) s.cache.ring_rows = ring;
    const Model::Impl& m = model.impl();
    for (const auto& p : m.placements) {
        (void)p;
        s.cache_ctx.push_back(std::make_unique<Context>());
    }
    for (int64_t l = 0; l < c.n_layer; ++l) {
        // the block's device: where its norms are (1-d, never left on the host for their type)
        const llama::LayerWeights& L = m.weights.layers[size_t(l)];
        const Buffer* wb = (L.attn_norm ? L.attn_norm : L.attn_post_norm)->buffer;
        size_t where = 0;
        for (size_t i = 0; i < m.placements.size(); ++i)
            if (m.placements[i].buffer.get() == wb) where = i;
        Context& ctx = *s.cache_ctx[where];
        const std::string n = std::to_string(l);
        const int64_t rows =
            s.cache.ring_rows > 0 && llama::sliding_layer(c, size_t(l)) ? s.cache.ring_rows : s.options.n_ctx;
        s.cache.k.push_back(set_name(ctx.new_tensor(kv, {c.head_dim, rows, c.n_head_kv}), "cache_k." + n));
        s.cache.v.push_back(set_name(ctx.new_tensor(kv, {c.head_dim, rows, c.n_head_kv}), "cache_v." + n));
    }
    for (size_t i = 0; i < s.cache_ctx.size(); ++i) {
        if (s.cache_ctx[i]->n_tensors() == 0) continue;
        s.cache_buffers.push_back(
            allocate_context_tensors(*s.cache_ctx[i], m.placements[i].device->buffer_type()));
        // Windowed graphs read rows nobody has written yet (masked out, but 0 x NaN is NaN):
        // they must hold finite values from the start.
        s.cache_buffers.back()->fill(0);
        s.kv_bytes += s.cache_buffers.back()->size();
    }

    // The worst cases: a full batch whose keys end at the last cache row, with logits for
    // every token, and the largest windowed graph. Every later graph is no larger.
    const int64_t n = s.options.n_batch;
    for (const int64_t window : {int64_t(0), std::min(s.options.n_ctx, llama::kMaxWindowedTokens)}) {
        const int64_t tokens = window ? std::min(window, n) : n; // evals never exceed n_batch
        for (const int pick : {0, 1, 2}) {                       // none, greedy, drawn
            Context worst;
            llama::GraphIo io =
                llama::build_graph(worst, c, m.weights, s.cache, tokens, s.options.n_ctx - tokens, true,
                                   window ? s.options.n_ctx : 0);
            if (pick > 0)
                io.pick = llama::pick_node(worst, io, pick == 1 ? Sampling{} : Sampling{.temperature = 1.0f});
            Graph g = llama::forward_graph(io);
            s.sched->reserve(g);
        }
    }
}

Session::~Session() = default;

std::vector<float> Session::eval(std::span<const int32_t> tokens, bool all_logits) {
    std::vector<float> logits;
    impl_->run(tokens, all_logits, std::nullopt, &logits, nullptr);
    return logits;
}

int32_t Session::eval_greedy(std::span<const int32_t> tokens) {
    return eval_pick(tokens, Sampling{});
}

int32_t Session::eval_pick(std::span<const int32_t> tokens, const Sampling& sampling) {
    int32_t id = -1;
    impl_->run(tokens, false, sampling, nullptr, &id);
    return id;
}

int64_t Session::decode_greedy(int32_t first, int64_t max_steps,
                               const std::function<bool(int32_t)>& on_token) {
    return decode(first, max_steps, Sampling{}, on_token);
}

int64_t Session::decode(int32_t first, int64_t max_steps, const Sampling& sampling,
                        const std::function<bool(int32_t)>& on_token) {
    Impl& s = *impl_;
    s.check_tokens(std::span(&first, 1));
    if (max_steps < 0) fail("session: decode needs max_steps >= 0");
    s.check_room(max_steps); // before any work, as eval does
    EvalProfile& prof = s.profile;
    PhaseClock clock;
    auto charge = [&clock](double& phase) { clock.charge(phase); };

    // Steps queued whose picks the host has not seen (two at most): their backend, the
    // ticket of the read of their pick, and where it lands (Impl::picks).
    struct InFlight {
        Backend* backend;
        Backend::Ticket ticket;
        int32_t* pick;
    };
    std::deque<InFlight> flight;
    const int64_t n_past_before = s.n_past;
    int32_t token = first;  // the next step's token, when the host knows it (nothing in flight)
    bool pipelined = false; // the last graph runs as one split on one backend
    int64_t delivered = 0;
    bool stopped = false; // on_token asked for no more
    // Waits for the oldest step in flight and hands its pick over; false: no more wanted.
    auto land = [&]() -> bool {
        const InFlight f = flight.front();
        flight.pop_front();
        f.backend->wait_for(f.ticket);
        charge(prof.wait);
        token = *f.pick;
        ++delivered;
        stopped = !on_token(token);
        return !stopped;
    };
    // However the loop ends, the cache holds `first` and every pick handed over but the last,
    // as eval_pick one token at a time would leave it: a step queued past that is undone
    // (its cache row lies past n_past and is written again by the next eval).
    auto finish = [&] {
        for (const InFlight& f : flight) f.backend->wait_for(f.ticket);
        flight.clear();
        s.n_past = n_past_before + delivered;
    };
    try {
        for (int64_t step = 0; step < max_steps; ++step) {
            // The step's token comes from the device when the graph and its placement stay,
            // else from the host, once the step in flight has landed.
            if (!flight.empty() && !(pipelined && s.last_graph_fits(1, false, sampling)) && !land()) break;
            clock.restart();
            Impl::LastGraph& last = s.graph_for(1, false, sampling);
            const llama::GraphIo& io = last.io;
            charge(prof.build);
            s.sched->allocate(last.graph);
            charge(prof.allocate);
            Backend* b = s.sched->backend_of(io.pick);
            pipelined = s.sched->n_splits() == 1 && b;
            for (Tensor* in :
                 {io.tokens, io.positions, io.kq_mask, io.kq_mask_swa, io.ring_rows, io.kq_mask_ring})
                pipelined = pipelined && (!in || s.sched->backend_of(in) == b);
            if (!flight.empty() && !pipelined && !land()) break;
            const size_t pick_at = size_t(io.pick->nb[1]) * size_t(io.pick->ne[1] - 1);
            if (!flight.empty()) {
                b->copy_async(io.pick, pick_at, io.tokens, 0, sizeof(int32_t));
                ++prof.fed_on_device;
                s.write_step_inputs(
                    io, 1, [b](Tensor* t, const void* src, size_t size) { b->write_async(t, src, 0, size); });
            } else {
                tensor_set(io.tokens, &token, 0, sizeof(int32_t));
                s.write_step_inputs(
                    io, 1, [](Tensor* t, const void* src, size_t size) { tensor_set(t, src, 0, size); });
            }
            charge(prof.upload);
            s.sched->submit(last.graph);
            charge(prof.submit);
            ++s.n_past;
            ++prof.graphs;
            prof.nodes += int64_t(last.graph.nodes().size());
            int32_t* pick = &s.picks[size_t(step % 2)];
            flight.push_back({b, b->read_async(io.pick, pick, pick_at, sizeof(int32_t)), pick});
            charge(prof.readback);
            // The step before lands while this one runs.
            if (flight.size() > 1 && !land()) break;
        }
        while (!stopped && !flight.empty()) land();
    } catch (...) {
        try {
            finish();
        } catch (...) { // the first error is the one to report
        }
        throw;
    }
    finish();
    return delivered;
}

// Runs tokens in chunks of n_batch. Appends the logits of the chunks that have them to
// *logits (when given); with a pick, the last chunk's graph also picks the last token's next
// token, written to *pick_id.
void Session::Impl::run(std::span<const int32_t> tokens, bool all_logits, const std::optional<Sampling>& pick,
                        std::vector<float>* logits, int32_t* pick_id) {
    Impl& s = *this;
    if (tokens.empty()) fail("session: eval needs at least one token");
    check_room(int64_t(tokens.size()));
    check_tokens(tokens);

    EvalProfile& prof = s.profile;
    PhaseClock clock;
    auto charge = [&clock](double& phase) { clock.charge(phase); };
    for (size_t start = 0; start < tokens.size(); start += size_t(s.options.n_batch)) {
        const size_t n = std::min(tokens.size() - start, size_t(s.options.n_batch));
        const bool last_chunk = start + n == tokens.size();
        const bool chunk_logits = logits && (all_logits || last_chunk);
        const std::optional<Sampling> chunk_pick = last_chunk ? pick : std::nullopt;
        clock.restart();
        LastGraph& last = s.graph_for(int64_t(n), all_logits, chunk_pick);
        const llama::GraphIo& io = last.io;
        Graph& g = last.graph;
        charge(prof.build);
        s.sched->allocate(g); // a reused graph keeps its placement
        charge(prof.allocate);
        tensor_set(io.tokens, tokens.data() + start, 0, n * sizeof(int32_t));
        write_step_inputs(io, int64_t(n),
                          [](Tensor* t, const void* src, size_t size) { tensor_set(t, src, 0, size); });
        charge(prof.upload);
        s.sched->submit(g);
        charge(prof.submit);
        s.sched->wait();
        charge(prof.wait);
        s.n_past += int64_t(n);
        if (s.options.trace_nodes) {
            s.trace.clear();
            const auto& nodes = g.nodes();
            for (size_t i = 0; i < nodes.size(); ++i) {
                const Tensor* node = nodes[i];
                const Tensor* owner = node;
                while (owner->view_src) owner = owner->view_src;
                if (op_def(node->op).is_view && owner->op == Op::None) continue; // inputs, weights
                const Backend* b = s.sched->backend_of(node);
                s.trace.push_back(
                    {compare::node_label(i, node), b ? b->name() : "?", compare::read_values(node)});
            }
        }
        if (chunk_logits) {
            const size_t count = size_t(io.logits->nelements());
            const size_t at = logits->size();
            logits->resize(at + count);
            tensor_get(io.logits, logits->data() + at, 0, count * sizeof(float));
        }
        if (chunk_pick) // the last token's pick: the last column's
            tensor_get(io.pick, pick_id, size_t(io.pick->nb[1]) * size_t(io.pick->ne[1] - 1),
                       sizeof(int32_t));
        charge(prof.readback);
        ++prof.graphs;
        prof.nodes += int64_t(g.nodes().size());
    }
}

void Session::Impl::check_room(int64_t n_tokens) const {
    if (n_past + n_tokens > options.n_ctx)
        fail("session: " + std::to_string(n_tokens) + " more tokens after " + std::to_string(n_past) +
             " exceed the context of " + std::to_string(options.n_ctx));
}

void Session::Impl::check_tokens(std::span<const int32_t> tokens) const {
    const int64_t vocab = model.config().n_vocab;
    for (int32_t t : tokens)
        if (t < 0 || t >= vocab)
            fail("session: token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                 std::to_string(vocab) + ")");
}

bool Session::Impl::last_graph_fits(int64_t n, bool all_logits, const std::optional<Sampling>& pick) const {
    const int64_t window = llama::window_for(n, n_past, options.n_ctx, options.decode_window_step);
    // A windowed graph serves every n_past its tokens fit; a causal one the same n_past
    // again (a session reset between evals of equal length: perplexity's chunks).
    return last.ctx && last.n_tokens == n && last.n_window == window && last.all_logits == all_logits &&
           last.pick == pick && (window != 0 || last.n_past == n_past);
}

Session::Impl::LastGraph& Session::Impl::graph_for(int64_t n, bool all_logits,
                                                   const std::optional<Sampling>& pick) {
    if (last_graph_fits(n, all_logits, pick)) {
        ++profile.reused;
        return last;
    }
    const ModelConfig& c = model.config();
    const int64_t window = llama::window_for(n, n_past, options.n_ctx, options.decode_window_step);
    last = LastGraph{};
    last.ctx = std::make_unique<Context>();
    last.io = llama::build_graph(*last.ctx, c, model.impl().weights, cache, n, n_past, all_logits, window);
    if (pick) last.io.pick = set_name(llama::pick_node(*last.ctx, last.io, *pick), "pick");
    last.graph = llama::forward_graph(last.io);
    if (options.matmul_precision != MatMulPrecision::F32)
        for (Tensor* node : last.graph.nodes())
            if (node->op == Op::MulMat) set_matmul_precision(node, options.matmul_precision);
    if (options.attention_precision != FlashAttnPrecision::F32)
        for (Tensor* node : last.graph.nodes())
            if (node->op == Op::FlashAttnExt) set_attention_precision(node, options.attention_precision);
    if (options.trace_nodes)
        for (Tensor* node : last.graph.nodes())
            if (!node->view_src) node->flags |= kFlagOutput; // nothing reuses its memory
    last.n_tokens = n;
    last.n_window = window;
    last.n_past = n_past;
    last.all_logits = all_logits;
    last.pick = pick;
    return last;
}

void Session::Impl::write_step_inputs(const llama::GraphIo& io, int64_t n, const InputWriter& write) const {
    const int64_t window = last.n_window;
    auto put = [&write](Tensor* t, const auto& values) {
        write(t, values.data(), values.size() * sizeof(values[0]));
    };
    std::vector<int32_t> pos(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) pos[size_t(i)] = int32_t(n_past + i);
    put(io.positions, pos);
    if (io.kq_mask) put(io.kq_mask, llama::window_mask(n, n_past, window));
    if (io.kq_mask_swa)
        put(io.kq_mask_swa, llama::window_mask(n, n_past, window, model.config().sliding_window));
    if (io.ring_rows) {
        std::vector<int32_t> rows(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) rows[size_t(i)] = int32_t((n_past + i) % cache.ring_rows);
        put(io.ring_rows, rows);
    }
    if (io.kq_mask_ring)
        put(io.kq_mask_ring, llama::ring_mask(n, n_past, cache.ring_rows, model.config().sliding_window));
}

int64_t Session::n_past() const {
    return impl_->n_past;
}
int64_t Session::n_ctx() const {
    return impl_->options.n_ctx;
}
void Session::reset() {
    impl_->n_past = 0; // a kept graph stays valid: it depends on n_past only through its inputs
}
size_t Session::kv_bytes() const {
    return impl_->kv_bytes;
}

size_t Session::compute_bytes() const {
    size_t total = 0;
    for (size_t b = 0; b < impl_->sched->backends().size(); ++b)
        total += impl_->sched->allocator(b).buffer_size();
    return total;
}

int Session::n_compute_allocations() const {
    int total = 0;
    for (size_t b = 0; b < impl_->sched->backends().size(); ++b)
        total += impl_->sched->allocator(b).n_buffer_allocations();
    return total;
}

const std::vector<TracedNode>& Session::traced_nodes() const {
    return impl_->trace;
}

std::string Session::describe_schedule() const {
    return impl_->sched->describe();
}

const EvalProfile& Session::profile() const {
    return impl_->profile;
}
void Session::reset_profile() {
    impl_->profile = EvalProfile{};
}

std::string Session::describe_backend_counters() const {
    return impl_->sched->describe_counters();
}

} // namespace gfa
