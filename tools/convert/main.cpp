// convert: a Hugging Face Llama-family checkpoint (LLaMA 2/3, Mistral, Mixtral, Granite, Qwen2/3, Qwen3-MoE,
// Phi-3, OLMo 2, Gemma 2/3) to GGUF with the tensor names and metadata keys llama.cpp uses.
//
//   convert MODEL_DIR -o OUT.gguf [--type f32|f16|bf16|q8_0]
//
// MODEL_DIR holds config.json and model.safetensors (or shards listed by
// model.safetensors.index.json). Weights may be stored as F32, F16 or BF16.
//
// Rotary layout: HF LLaMA checkpoints rotate the two halves of each head (d, d + D/2),
// while GGUF files of architecture "llama" rotate adjacent pairs (2i, 2i+1) (rope mode
// Normal), so the rows of Q and K are permuted per head here. Qwen2, Qwen3 and Qwen3-MoE keep
// the HF layout and are run with NeoX rope, so their rows stay as they are; so do Gemma 2 and 3, whose
// RMSNorm gains are stored as 1 + weight (Gemma scales by 1 + w; llama.cpp's files hold the sum).
#include "safetensors.h"

#include <ggml-fa/error.h>
#include <ggml-fa/gguf.h>
#include <ggml-fa/types.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <map>
#include <set>
#include <string>
#include <vector>

using nlohmann::json;
using namespace convert;

namespace {

struct HParams {
    std::string arch; // the GGUF architecture: llama, qwen2, qwen3, qwen3moe, gemma2, ...
    std::string model_type;
    int64_t n_vocab = 0, n_embd = 0, n_ff = 0, n_layer = 0, n_head = 0, n_head_kv = 0, head_dim = 0;
    int64_t n_ctx_train = 0;
    int64_t n_expert = 0, n_expert_used = 0; // Mixtral, Qwen2/3-MoE: experts per block, experts per token
    int64_t n_ff_expert = 0;                 // Qwen2/3-MoE: each expert's width (n_ff: the dense one)
    int64_t n_ff_shared = 0;                 // Qwen2-MoE: the shared expert's width
    double rope_theta = 10000.0, norm_eps = 1e-6;
    double rope_linear_factor = 0.0; // 0: no scaling
    // Llama 3.1 style ("rope_type": "llama3"): low frequencies slowed by `factor`, high ones
    // kept, a smooth blend between; written as one divisor per pair (rope_freqs.weight).
    struct Llama3Rope {
        double factor, low_freq_factor, high_freq_factor;
        int64_t original_context;
    };
    std::optional<Llama3Rope> rope_llama3;
    // Phi-3's LongRoPE ("rope_type": "longrope"): a divisor per rotating pair for contexts up to
    // the original length (short) and beyond (long), and the factor on the rotated q and k.
    struct LongRope {
        std::vector<double> long_factor, short_factor;
        std::optional<double> attention_factor;
        std::optional<int64_t> original_context;
    };
    std::optional<LongRope> rope_long;
    int64_t n_rot = 0; // rotated dims of a head (Phi-3's partial_rotary_factor), else head_dim
    bool tied = false;
    std::optional<int64_t> bos, eos;
    // Gemma 2 and 3
    double attn_softcap = 0.0, final_softcap = 0.0;
    // Granite's multipliers
    double embedding_multiplier = 1.0, residual_multiplier = 1.0, attention_multiplier = 0.0,
           logits_scaling = 1.0;
    int64_t sliding_window = 0, sliding_pattern = 0;
    double rope_local_base = 0.0; // Gemma 3's sliding layers
};

template <typename T> T required(const json& cfg, const char* key) {
    if (!cfg.contains(key) || cfg[key].is_null())
        gfa::fail(std::string("config.json: missing \"") + key + "\"");
    try {
        return cfg[key].get<T>();
    } catch (const json::exception& e) {
        gfa::fail(std::string("config.json: \"") + key + "\" has the wrong type: " + e.what());
    }
}

template <typename T> T optional_or(const json& cfg, const char* key, T fallback) {
    if (!cfg.contains(key) || cfg[key].is_null()) return fallback;
    return cfg[key].get<T>();
}

// The llama3 rope scaling as one divisor per rotating pair: the factor by which the
// scaling divides pair i's frequency base^(-2i/D). Wavelengths shorter than
// original_context / high_freq_factor keep their frequency, those longer than
// original_context / low_freq_factor are slowed by `factor`, and in between the frequency is
// the blend (1 - s) f / factor + s f with s = (original_context / wavelength - low) /
// (high - low), so the divisor is 1 / ((1 - s) / factor + s).
std::vector<float> llama3_rope_factors(const HParams& h) {
    const HParams::Llama3Rope& r = *h.rope_llama3;
    const double pi = 3.14159265358979323846;
    const double low_wavelength = double(r.original_context) / r.low_freq_factor;
    const double high_wavelength = double(r.original_context) / r.high_freq_factor;
    std::vector<float> out;
    for (int64_t i = 0; i < h.head_dim / 2; ++i) {
        const double freq = std::pow(h.rope_theta, -2.0 * double(i) / double(h.head_dim));
        const double wavelength = 2.0 * pi / freq;
        double divisor = 1.0;
        if (wavelength > low_wavelength) {
            divisor = r.factor;
        } else if (wavelength >= high_wavelength) {
            const double s = (double(r.original_context) / wavelength - r.low_freq_factor) /
                             (r.high_freq_factor - r.low_freq_factor);
            divisor = 1.0 / ((1.0 - s) / r.factor + s);
        }
        out.push_back(float(divisor));
    }
    return out;
}

// One rope description: its base and its scaling (none, linear or Llama 3.1's). `where` names
// the JSON object in errors.
void read_rope_entry(const json& rs, const std::string& where, HParams& h, bool base_inside) {
    if (base_inside) h.rope_theta = optional_or<double>(rs, "rope_theta", h.rope_theta);
    const std::string type = rs.contains("rope_type") ? rs["rope_type"].get<std::string>()
                                                      : optional_or<std::string>(rs, "type", "default");
    if (type == "linear") {
        h.rope_linear_factor = required<double>(rs, "factor");
        if (!(h.rope_linear_factor > 0)) gfa::fail("config.json: " + where + " (linear) needs factor > 0");
    } else if (type == "llama3") {
        h.rope_llama3 =
            HParams::Llama3Rope{required<double>(rs, "factor"), required<double>(rs, "low_freq_factor"),
                                required<double>(rs, "high_freq_factor"),
                                required<int64_t>(rs, "original_max_position_embeddings")};
        const auto& r = *h.rope_llama3;
        if (!(r.factor > 0) || !(r.high_freq_factor > r.low_freq_factor) || !(r.low_freq_factor > 0) ||
            r.original_context <= 0)
            gfa::fail("config.json: " + where +
                      " (llama3) needs factor > 0, high_freq_factor > low_freq_factor > 0 and "
                      "original_max_position_embeddings > 0");
    } else if (type == "longrope" || type == "su") {
        HParams::LongRope r;
        r.long_factor = required<std::vector<double>>(rs, "long_factor");
        r.short_factor = required<std::vector<double>>(rs, "short_factor");
        if (rs.contains("attention_factor") && !rs["attention_factor"].is_null())
            r.attention_factor = rs["attention_factor"].get<double>();
        if (rs.contains("original_max_position_embeddings"))
            r.original_context = rs["original_max_position_embeddings"].get<int64_t>();
        h.rope_long = r;
    } else if (type != "default") {
        gfa::fail("config.json: " + where + " type \"" + type +
                  "\" is not supported (linear, llama3 and longrope are)");
    }
}

// Rope settings in either layout transformers writes: before 5.0, "rope_theta" and
// "rope_scaling" at the top level (Gemma 3's sliding layers: "rope_local_base_freq"); from 5.0
// on, "rope_parameters" holding the base too, and for models with layer kinds one such object
// per kind ("full_attention", "sliding_attention").
void read_rope(const json& cfg, HParams& h) {
    h.rope_theta = optional_or<double>(cfg, "rope_theta", 10000.0);
    h.rope_local_base = optional_or<double>(cfg, "rope_local_base_freq", 10000.0);
    if (cfg.contains("rope_parameters") && !cfg["rope_parameters"].is_null()) {
        const json& rp = cfg["rope_parameters"];
        if (!rp.is_object()) gfa::fail("config.json: \"rope_parameters\" must be an object");
        if (rp.contains("full_attention") || rp.contains("sliding_attention")) {
            if (rp.contains("full_attention"))
                read_rope_entry(rp["full_attention"], "rope_parameters.full_attention", h, true);
            if (rp.contains("sliding_attention")) {
                // GGUF gives the sliding layers a base of their own and no scaling.
                HParams local;
                local.rope_theta = h.rope_local_base;
                read_rope_entry(rp["sliding_attention"], "rope_parameters.sliding_attention", local, true);
                if (local.rope_linear_factor != 0.0 || local.rope_llama3)
                    gfa::fail("config.json: rope_parameters.sliding_attention scales positions, which GGUF "
                              "files cannot express");
                h.rope_local_base = local.rope_theta;
            }
        } else {
            read_rope_entry(rp, "rope_parameters", h, true);
        }
    } else if (cfg.contains("rope_scaling") && !cfg["rope_scaling"].is_null()) {
        read_rope_entry(cfg["rope_scaling"], "rope_scaling", h, false);
    }
    if (!(h.rope_theta > 0) || !(h.rope_local_base > 0))
        gfa::fail("config.json: rope bases must be positive");
}

// "layer_types" (transformers >= 4.53): one entry per layer, "sliding_attention" or
// "full_attention". GGUF files express only "every n-th layer global, the others windowed".
std::vector<std::string> layer_types(const json& cfg) {
    std::vector<std::string> types;
    if (!cfg.contains("layer_types") || cfg["layer_types"].is_null()) return types;
    try {
        types = cfg["layer_types"].get<std::vector<std::string>>();
    } catch (const json::exception& e) {
        gfa::fail(std::string("config.json: \"layer_types\" must be a list of strings: ") + e.what());
    }
    return types;
}

std::optional<int64_t> pattern_of_layer_types(const json& cfg) {
    const auto types = layer_types(cfg);
    for (size_t l = 0; l < types.size(); ++l)
        if (types[l] == "full_attention") return int64_t(l + 1);
    return std::nullopt;
}

void check_layer_types(const json& cfg, const HParams& h) {
    const auto types = layer_types(cfg);
    if (types.empty()) return;
    if (int64_t(types.size()) != h.n_layer)
        gfa::fail("config.json: \"layer_types\" has " + std::to_string(types.size()) + " entries for " +
                  std::to_string(h.n_layer) + " layers");
    for (size_t l = 0; l < types.size(); ++l) {
        const bool sliding =
            h.sliding_pattern > 0 && int64_t(l % size_t(h.sliding_pattern)) < h.sliding_pattern - 1;
        const char* expected = sliding ? "sliding_attention" : "full_attention";
        if (types[l] != expected)
            gfa::fail("config.json: layer_types[" + std::to_string(l) + "] is \"" + types[l] + "\"; " +
                      (h.sliding_pattern > 0
                           ? "GGUF files can only say that the last layer of every " +
                                 std::to_string(h.sliding_pattern) + " is global, the others windowed"
                           : std::string("this architecture has no windowed layers in GGUF")));
    }
}

HParams read_config(const std::filesystem::path& dir) {
    const auto path = dir / "config.json";
    std::ifstream in(path);
    if (!in) gfa::fail(path.string() + ": cannot open");
    json cfg;
    try {
        cfg = json::parse(in);
    } catch (const json::exception& e) {
        gfa::fail(path.string() + ": does not parse: " + e.what());
    }
    HParams h;
    h.model_type = required<std::string>(cfg, "model_type");
    if (h.model_type == "llama" || h.model_type == "mistral" || h.model_type == "mixtral")
        h.arch = "llama";
    else if (h.model_type == "qwen2" || h.model_type == "qwen3" || h.model_type == "phi3" ||
             h.model_type == "gemma2" || h.model_type == "granite" || h.model_type == "olmo2")
        h.arch = h.model_type;
    else if (h.model_type == "qwen3_moe")
        h.arch = "qwen3moe";
    else if (h.model_type == "qwen2_moe")
        h.arch = "qwen2moe";
    else if (h.model_type == "gemma3_text")
        h.arch = "gemma3";
    else
        gfa::fail("config.json: model_type \"" + h.model_type +
                  "\" is not supported (llama, mistral, mixtral, granite, qwen2, qwen2_moe, qwen3, "
                  "qwen3_moe, phi3, olmo2, gemma2, gemma3_text are)");
    h.n_vocab = required<int64_t>(cfg, "vocab_size");
    h.n_embd = required<int64_t>(cfg, "hidden_size");
    h.n_ff = required<int64_t>(cfg, "intermediate_size");
    h.n_layer = required<int64_t>(cfg, "num_hidden_layers");
    h.n_head = required<int64_t>(cfg, "num_attention_heads");
    h.n_head_kv = optional_or<int64_t>(cfg, "num_key_value_heads", h.n_head);
    if (h.n_head <= 0 || h.n_head_kv <= 0 || h.n_head % h.n_head_kv != 0)
        gfa::fail("config.json: num_attention_heads (" + std::to_string(h.n_head) +
                  ") must be a positive multiple of num_key_value_heads (" + std::to_string(h.n_head_kv) +
                  ")");
    h.head_dim = optional_or<int64_t>(cfg, "head_dim", h.n_embd / h.n_head);
    if (h.head_dim <= 0 || h.head_dim % 2 != 0) gfa::fail("config.json: the head dimension must be even");
    h.n_ctx_train = optional_or<int64_t>(cfg, "max_position_embeddings", 2048);
    h.norm_eps = optional_or<double>(cfg, "rms_norm_eps", 1e-6);
    h.tied = optional_or<bool>(cfg, "tie_word_embeddings", false);
    read_rope(cfg, h);
    h.n_rot = h.head_dim;
    const bool qwen_moe = h.model_type == "qwen2_moe" || h.model_type == "qwen3_moe";
    if (h.model_type == "mixtral" || qwen_moe) {
        // Mixtral's count is num_local_experts; Qwen3-MoE's num_experts as transformers 4.x
        // writes it, num_local_experts as 5.x does.
        const bool mixtral = h.model_type == "mixtral";
        const char* experts = mixtral ? "num_local_experts" : "num_experts";
        if (!mixtral && !cfg.contains(experts)) experts = "num_local_experts";
        h.n_expert = required<int64_t>(cfg, experts);
        h.n_expert_used = required<int64_t>(cfg, "num_experts_per_tok");
        if (h.n_expert < 1 || h.n_expert_used < 1 || h.n_expert_used > h.n_expert)
            gfa::fail("config.json: num_experts_per_tok (" + std::to_string(h.n_expert_used) +
                      ") must be in [1, " + experts + " = " + std::to_string(h.n_expert) + "]");
    }
    if (qwen_moe) {
        h.n_ff_expert = required<int64_t>(cfg, "moe_intermediate_size");
        if (h.n_ff_expert <= 0) gfa::fail("config.json: moe_intermediate_size must be positive");
        // GGUF readers make every block a mixture; for qwen3moe they weigh the chosen experts by
        // the softmax of their logits alone, for qwen2moe by their share of the softmax over all
        // experts. transformers makes a block dense where decoder_sparse_step or mlp_only_layers
        // say so, and renormalizes the chosen experts' weights with norm_topk_prob (false by
        // default).
        const int64_t step = optional_or<int64_t>(cfg, "decoder_sparse_step", 1);
        if (step != 1)
            gfa::fail("config.json: decoder_sparse_step " + std::to_string(step) +
                      " makes some layers dense; GGUF files of " + h.arch + " have experts in every layer");
        if (!optional_or<std::vector<int64_t>>(cfg, "mlp_only_layers", {}).empty())
            gfa::fail("config.json: mlp_only_layers names dense layers; GGUF files of " + h.arch +
                      " have experts in every layer");
        const bool norm_topk = optional_or<bool>(cfg, "norm_topk_prob", false);
        if (h.arch == "qwen3moe" && !norm_topk)
            gfa::fail("config.json: norm_topk_prob is false (or missing, which transformers reads as false): "
                      "GGUF readers renormalize the chosen experts' weights");
        if (h.arch == "qwen2moe" && norm_topk)
            gfa::fail(
                "config.json: norm_topk_prob is true: GGUF readers of qwen2moe weigh the chosen experts by "
                "their share of the softmax over all experts, without renormalizing");
    }
    if (h.arch == "qwen2moe") {
        h.n_ff_shared = required<int64_t>(cfg, "shared_expert_intermediate_size");
        if (h.n_ff_shared <= 0) gfa::fail("config.json: shared_expert_intermediate_size must be positive");
    }
    if (h.arch == "granite") {
        h.embedding_multiplier = optional_or<double>(cfg, "embedding_multiplier", 1.0);
        h.residual_multiplier = optional_or<double>(cfg, "residual_multiplier", 1.0);
        h.attention_multiplier =
            optional_or<double>(cfg, "attention_multiplier", 1.0 / std::sqrt(double(h.head_dim)));
        h.logits_scaling = optional_or<double>(cfg, "logits_scaling", 1.0);
    }
    if (h.arch == "phi3") {
        // top level (transformers 4.x) or inside rope_parameters (5.x)
        double partial = optional_or<double>(cfg, "partial_rotary_factor", 1.0);
        if (cfg.contains("rope_parameters") && cfg["rope_parameters"].is_object())
            partial = optional_or<double>(cfg["rope_parameters"], "partial_rotary_factor", partial);
        h.n_rot = int64_t(std::llround(double(h.head_dim) * partial));
        if (!(partial > 0 && partial <= 1) || h.n_rot % 2 != 0)
            gfa::fail("config.json: partial_rotary_factor " + std::to_string(partial) +
                      " must rotate an even number of a head's dims");
        if (cfg.contains("sliding_window") && cfg["sliding_window"].is_number_integer())
            h.sliding_window = cfg["sliding_window"].get<int64_t>();
        if (h.rope_long) {
            HParams::LongRope& r = *h.rope_long;
            if (!r.original_context)
                r.original_context = required<int64_t>(cfg, "original_max_position_embeddings");
            if (int64_t(r.long_factor.size()) != h.n_rot / 2 ||
                int64_t(r.short_factor.size()) != h.n_rot / 2 || *r.original_context <= 0)
                gfa::fail("config.json: longrope needs " + std::to_string(h.n_rot / 2) +
                          " long and short factors and original_max_position_embeddings > 0");
            if (!r.attention_factor) { // as transformers derives it
                const double scale = double(h.n_ctx_train) / double(*r.original_context);
                r.attention_factor =
                    scale <= 1.0 ? 1.0
                                 : std::sqrt(1.0 + std::log(scale) / std::log(double(*r.original_context)));
            }
        }
    } else if (h.rope_long) {
        gfa::fail("config.json: longrope is Phi-3's rope; " + h.model_type + " files cannot express it");
    }
    if (h.arch == "gemma2" || h.arch == "gemma3") {
        const bool g2 = h.arch == "gemma2";
        h.tied = optional_or<bool>(cfg, "tie_word_embeddings", true);
        h.attn_softcap = optional_or<double>(cfg, "attn_logit_softcapping", g2 ? 50.0 : 0.0);
        h.final_softcap = optional_or<double>(cfg, "final_logit_softcapping", g2 ? 30.0 : 0.0);
        h.sliding_window = optional_or<int64_t>(cfg, "sliding_window", 4096);
        h.sliding_pattern = g2 ? 2 : optional_or<int64_t>(cfg, "sliding_window_pattern", 0);
        if (h.sliding_pattern == 0) h.sliding_pattern = pattern_of_layer_types(cfg).value_or(6);
        if (!g2 && h.attn_softcap != 0.0)
            gfa::fail("config.json: gemma3 with attn_logit_softcapping is not what GGUF readers expect");
        const std::string act = optional_or<std::string>(cfg, "hidden_activation", "gelu_pytorch_tanh");
        if (act != "gelu_pytorch_tanh")
            gfa::fail("config.json: hidden_activation \"" + act +
                      "\" is not supported (gelu_pytorch_tanh is)");
        // GGUF keeps no query scale: readers use the head size, or n_embd / n_head for the
        // 27B models (46 layers in Gemma 2, 62 in Gemma 3; llama.cpp's rule). Other
        // checkpoints would read wrongly.
        const int64_t expected = h.n_layer == (g2 ? 46 : 62) ? h.n_embd / h.n_head : h.head_dim;
        const double qpas = optional_or<double>(cfg, "query_pre_attn_scalar", double(expected));
        if (qpas != double(expected))
            gfa::fail("config.json: query_pre_attn_scalar " + std::to_string(qpas) +
                      " is not what GGUF readers assume for this shape (" + std::to_string(expected) + ")");
        if (g2 && (h.attn_softcap <= 0 || h.final_softcap <= 0))
            gfa::fail(
                "config.json: gemma2 needs positive attn_logit_softcapping and final_logit_softcapping");
        if (h.sliding_window <= 0 || h.sliding_pattern <= 0)
            gfa::fail("config.json: sliding_window and sliding_window_pattern must be positive");
    }
    // Qwen's optional sliding windows (on the layers from max_window_layers on) have no GGUF
    // keys; llama.cpp's readers attend over everything.
    if ((h.arch == "qwen2" || h.arch == "qwen2moe" || h.arch == "qwen3" || h.arch == "qwen3moe") &&
        optional_or<bool>(cfg, "use_sliding_window", false))
        gfa::fail("config.json: use_sliding_window is true; GGUF files of " + h.arch +
                  " cannot say which layers are windowed");
    check_layer_types(cfg, h);
    if (cfg.contains("bos_token_id") && cfg["bos_token_id"].is_number_integer())
        h.bos = cfg["bos_token_id"].get<int64_t>();
    if (cfg.contains("eos_token_id") && cfg["eos_token_id"].is_number_integer())
        h.eos = cfg["eos_token_id"].get<int64_t>();
    return h;
}

// HF tensor name -> GGUF name; empty for tensors that are not weights (rotary caches).
std::string gguf_name(const std::string& hf, const std::string& arch) {
    static const std::regex layer_re(R"(model\.layers\.(\d+)\.(.+))");
    if (hf == "model.embed_tokens.weight") return "token_embd.weight";
    if (hf == "model.norm.weight") return "output_norm.weight";
    if (hf == "lm_head.weight") return "output.weight";
    std::smatch m;
    if (std::regex_match(hf, m, layer_re)) {
        const std::string rest = m[2];
        if (rest == "self_attn.rotary_emb.inv_freq") return "";
        // Gemma 2 norms the attention output, then the feed-forward input and output.
        static const std::pair<const char*, const char*> gemma2[] = {
            {"post_attention_layernorm.weight", "post_attention_norm.weight"},
            {"pre_feedforward_layernorm.weight", "ffn_norm.weight"},
            {"post_feedforward_layernorm.weight", "post_ffw_norm.weight"},
        };
        if (arch == "gemma2" || arch == "gemma3")
            for (const auto& [from, to] : gemma2)
                if (rest == from) return "blk." + std::string(m[1]) + "." + to;
        // OLMo 2 norms each block's attention and feed-forward outputs (no input norms).
        if (arch == "olmo2" && rest == "post_attention_layernorm.weight")
            return "blk." + std::string(m[1]) + ".post_attention_norm.weight";
        if (arch == "olmo2" && rest == "post_feedforward_layernorm.weight")
            return "blk." + std::string(m[1]) + ".post_ffw_norm.weight";
        const bool qk_norm = arch == "gemma3" || arch == "qwen3" || arch == "qwen3moe" || arch == "olmo2";
        if (arch == "phi3" && rest == "self_attn.qkv_proj.weight")
            return "blk." + std::string(m[1]) + ".attn_qkv.weight";
        if (arch == "phi3" && rest == "mlp.gate_up_proj.weight")
            return "blk." + std::string(m[1]) + ".ffn_up.weight";
        if (qk_norm && rest == "self_attn.q_norm.weight")
            return "blk." + std::string(m[1]) + ".attn_q_norm.weight";
        if (qk_norm && rest == "self_attn.k_norm.weight")
            return "blk." + std::string(m[1]) + ".attn_k_norm.weight";
        const bool qwen_moe = arch == "qwen2moe" || arch == "qwen3moe";
        if (rest == "block_sparse_moe.gate.weight" || (qwen_moe && rest == "mlp.gate.weight"))
            return "blk." + std::string(m[1]) + ".ffn_gate_inp.weight";
        // Qwen2-MoE's shared expert and its gate
        static const std::pair<const char*, const char*> shared[] = {
            {"mlp.shared_expert.gate_proj.weight", "ffn_gate_shexp.weight"},
            {"mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight"},
            {"mlp.shared_expert.down_proj.weight", "ffn_down_shexp.weight"},
            {"mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight"},
        };
        if (arch == "qwen2moe")
            for (const auto& [from, to] : shared)
                if (rest == from) return "blk." + std::string(m[1]) + "." + to;
        static const std::pair<const char*, const char*> table[] = {
            {"input_layernorm.weight", "attn_norm.weight"},
            {"self_attn.q_proj.weight", "attn_q.weight"},
            {"self_attn.q_proj.bias", "attn_q.bias"},
            {"self_attn.k_proj.weight", "attn_k.weight"},
            {"self_attn.k_proj.bias", "attn_k.bias"},
            {"self_attn.v_proj.weight", "attn_v.weight"},
            {"self_attn.v_proj.bias", "attn_v.bias"},
            {"self_attn.o_proj.weight", "attn_output.weight"},
            {"post_attention_layernorm.weight", "ffn_norm.weight"},
            {"mlp.gate_proj.weight", "ffn_gate.weight"},
            {"mlp.up_proj.weight", "ffn_up.weight"},
            {"mlp.down_proj.weight", "ffn_down.weight"},
        };
        for (const auto& [from, to] : table)
            if (rest == from) return "blk." + std::string(m[1]) + "." + to;
    }
    gfa::fail("tensor " + hf + " is not part of a Llama-family checkpoint this converter knows");
}

// Rows of a Q or K projection (weight [rows, cols] or bias [rows]) from the HF rotary-halves
// order to the interleaved-pairs order: in each head of head_dim rows, new row 2i + j is old
// row j * head_dim/2 + i.
std::vector<float> interleave_rotary_rows(const std::vector<float>& w, int64_t rows, int64_t cols,
                                          int64_t head_dim) {
    if (rows % head_dim != 0)
        gfa::fail("cannot permute a projection of " + std::to_string(rows) + " rows into heads of " +
                  std::to_string(head_dim));
    std::vector<float> out(w.size());
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < rows / head_dim; ++h)
        for (int64_t i = 0; i < half; ++i)
            for (int64_t j = 0; j < 2; ++j) {
                const int64_t dst = h * head_dim + 2 * i + j, src = h * head_dim + j * half + i;
                std::memcpy(&out[size_t(dst * cols)], &w[size_t(src * cols)], size_t(cols) * sizeof(float));
            }
    return out;
}

gfa::Type parse_type(const std::string& s) {
    if (s == "f32") return gfa::Type::F32;
    if (s == "f16") return gfa::Type::F16;
    if (s == "bf16") return gfa::Type::BF16;
    if (s == "q8_0") return gfa::Type::Q8_0;
    gfa::fail("--type " + s + ": expected f32, f16, bf16 or q8_0");
}

// 1-d tensors (norms, biases) stay f32, as in llama.cpp, and so does a mixture's router
// (ffn_gate_inp, and Qwen2-MoE's shared-expert gate): rounding it would move tokens between
// experts. A matrix whose rows do not fill whole quantization blocks falls back to f16.
gfa::Type storage_type(gfa::Type wanted, int n_dims, int64_t ne0, const std::string& name) {
    if (n_dims < 2 || name.find("ffn_gate_inp") != std::string::npos) return gfa::Type::F32;
    const auto& tr = gfa::type_traits(wanted);
    if (ne0 % tr.block_size != 0) return gfa::Type::F16;
    return wanted;
}

// The pre-tokenizer of a byte-level tokenizer.json as the tokenizer.ggml.pre name readers know
// it by: the split pattern (a Split step's regex, or ByteLevel's own GPT-2 pattern, after
// single digits split off for SmolLM) must be one of llama-3's, Qwen2's, GPT-2's or tekken's, as
// llama.cpp's converter also refuses others.
std::string pre_tokenizer_name(const json& tok, const std::string& where) {
    static const std::pair<const char*, const char*> kKnown[] = {
        {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
         "llama-bpe"},
        {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
         "qwen2"},
        {R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
         "tekken"},
    };
    const json* pre = tok.contains("pre_tokenizer") ? &tok["pre_tokenizer"] : nullptr;
    std::vector<const json*> steps;
    if (pre && pre->is_object()) {
        if (optional_or<std::string>(*pre, "type", "") == "Sequence" && pre->contains("pretokenizers"))
            for (const json& p : (*pre)["pretokenizers"]) steps.push_back(&p);
        else
            steps.push_back(pre);
    }
    std::optional<std::string> pattern;
    bool gpt2_regex = false, digits_first = false, other_step = false;
    for (const json* p : steps) {
        const std::string type = optional_or<std::string>(*p, "type", "");
        if (type == "Split" && p->contains("pattern") && (*p)["pattern"].contains("Regex"))
            pattern = (*p)["pattern"]["Regex"].get<std::string>();
        else if (type == "ByteLevel")
            gpt2_regex = optional_or<bool>(*p, "use_regex", true);
        else if (type == "Digits" && !gpt2_regex && optional_or<bool>(*p, "individual_digits", false))
            digits_first = true;
        else
            other_step = true; // a step none of the known pre-tokenizers has
    }
    if (!pattern && gpt2_regex && !other_step) return digits_first ? "smollm" : "gpt-2";
    if (pattern && !gpt2_regex && !digits_first && !other_step)
        for (const auto& [regex, name] : kKnown)
            if (*pattern == regex) return name;
    gfa::fail(where + ": the byte-level pre-tokenizer " +
              (pattern ? "pattern " + *pattern : std::string("(no split pattern)")) +
              " is not one GGUF readers know (llama-3's, Qwen2's, GPT-2's, SmolLM's or tekken's)");
}

// The vocabulary of tokenizer.json (a Hugging Face BPE tokenizer) as tokenizer.ggml.* keys.
// Byte-fallback vocabularies (LLaMA 2, Mistral) become SentencePiece-style "llama" with
// score -id for each piece (their pieces are numbered in merge order, which is what
// SentencePiece's scores encode); byte-level ones (LLaMA 3, Qwen2) become "gpt2" with the
// merges. Returns false when the directory has no tokenizer.json.
bool write_vocabulary(gfa::gguf::Writer& w, const std::filesystem::path& dir, int64_t n_vocab) {
    const auto path = dir / "tokenizer.json";
    if (!std::filesystem::exists(path)) return false;
    std::ifstream in(path);
    json tok;
    try {
        tok = json::parse(in);
    } catch (const json::exception& e) {
        gfa::fail(path.string() + ": does not parse: " + e.what());
    }
    const json& model = tok.at("model");
    if (optional_or<std::string>(model, "type", "BPE") != "BPE")
        gfa::fail(path.string() + ": only BPE tokenizers are supported");
    const bool spm = optional_or<bool>(model, "byte_fallback", false);

    std::vector<std::string> tokens;
    std::vector<int32_t> types;
    auto put = [&](int64_t id, const std::string& text, int32_t type) {
        if (id < 0 || id > 10'000'000)
            gfa::fail(path.string() + ": token id " + std::to_string(id) + " out of range");
        if (size_t(id) >= tokens.size()) {
            tokens.resize(size_t(id) + 1);
            types.resize(size_t(id) + 1, 0);
        }
        tokens[size_t(id)] = text;
        types[size_t(id)] = type;
    };
    static const std::regex byte_piece("<0x[0-9A-Fa-f]{2}>");
    for (const auto& [text, id] : model.at("vocab").items())
        put(id.get<int64_t>(), text, spm && std::regex_match(text, byte_piece) ? 6 : 1);
    if (tok.contains("added_tokens"))
        for (const json& t : tok["added_tokens"])
            put(t.at("id").get<int64_t>(), t.at("content").get<std::string>(),
                optional_or<bool>(t, "special", false) ? 3 : 4);
    if (const auto unk = model.find("unk_token"); unk != model.end() && unk->is_string())
        for (size_t i = 0; i < tokens.size(); ++i)
            if (tokens[i] == unk->get<std::string>()) types[i] = 2;
    // Ids the tokenizer leaves unused up to the model's vocabulary size are padding.
    if (int64_t(tokens.size()) < n_vocab) {
        tokens.resize(size_t(n_vocab));
        types.resize(size_t(n_vocab), 0);
    }
    for (size_t i = 0; i < tokens.size(); ++i)
        if (types[i] == 0) {
            tokens[i] = "[PAD" + std::to_string(i) + "]";
            types[i] = 5;
        }

    auto string_array = [](const std::vector<std::string>& v) {
        gfa::gguf::Array a;
        a.type = gfa::gguf::ValueType::String;
        for (const std::string& s : v) a.items.emplace_back(s);
        return gfa::gguf::Value(std::move(a));
    };
    gfa::gguf::Array type_array{gfa::gguf::ValueType::I32, {}};
    for (int32_t t : types) type_array.items.emplace_back(t);
    w.set("tokenizer.ggml.model", spm ? "llama" : "gpt2");
    w.set("tokenizer.ggml.tokens", string_array(tokens));
    w.set("tokenizer.ggml.token_type", gfa::gguf::Value(std::move(type_array)));
    if (spm) {
        gfa::gguf::Array scores{gfa::gguf::ValueType::F32, {}};
        for (size_t i = 0; i < tokens.size(); ++i) scores.items.emplace_back(-float(i));
        w.set("tokenizer.ggml.scores", gfa::gguf::Value(std::move(scores)));
    } else {
        std::vector<std::string> merges;
        if (model.contains("merges"))
            for (const json& m : model["merges"])
                merges.push_back(m.is_string()
                                     ? m.get<std::string>()
                                     : m.at(0).get<std::string>() + " " + m.at(1).get<std::string>());
        w.set("tokenizer.ggml.merges", string_array(merges));
        w.set("tokenizer.ggml.pre", pre_tokenizer_name(tok, path.string()));
    }
    // tokenizer_config.json says whether a BOS token starts each text.
    const auto config = dir / "tokenizer_config.json";
    if (std::filesystem::exists(config)) {
        std::ifstream cin(config);
        try {
            const json c = json::parse(cin);
            if (c.contains("add_bos_token") && c["add_bos_token"].is_boolean())
                w.set("tokenizer.ggml.add_bos_token", c["add_bos_token"].get<bool>());
        } catch (const json::exception& e) {
            gfa::fail(config.string() + ": does not parse: " + e.what());
        }
    }
    return true;
}

void usage() {
    std::fprintf(
        stderr,
        "usage: convert MODEL_DIR -o OUT.gguf [--type f32|f16|bf16|q8_0]\n"
        "  MODEL_DIR: a Hugging Face LLaMA / Mistral / Mixtral / Granite / Qwen2 / Qwen3 /\n"
        "  Qwen3-MoE / Phi-3 / OLMo 2 / Gemma 2 / Gemma 3 checkpoint (config.json + *.safetensors)\n");
}

int run(int argc, char** argv) {
    std::string dir, out_path;
    gfa::Type type = gfa::Type::F16;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) gfa::fail(a + " needs a value");
            return argv[++i];
        };
        if (a == "-o" || a == "--outfile")
            out_path = next();
        else if (a == "--type" || a == "--outtype")
            type = parse_type(next());
        else if (a == "-h" || a == "--help") {
            usage();
            return 0;
        } else if (!a.empty() && a[0] == '-')
            gfa::fail("unknown option " + a);
        else if (dir.empty())
            dir = a;
        else
            gfa::fail("more than one model directory given");
    }
    if (dir.empty() || out_path.empty()) {
        usage();
        return 2;
    }

    const HParams h = read_config(dir);
    const Checkpoint ckpt(dir);

    gfa::gguf::Writer w;
    const std::string& A = h.arch;
    w.set("general.architecture", A);
    w.set("general.name", std::filesystem::path(dir).filename().string());
    w.set("general.file_type", gfa::gguf::file_type_of(type));
    w.set(A + ".vocab_size", uint32_t(h.n_vocab));
    w.set(A + ".context_length", uint32_t(h.n_ctx_train));
    w.set(A + ".embedding_length", uint32_t(h.n_embd));
    w.set(A + ".block_count", uint32_t(h.n_layer));
    w.set(A + ".feed_forward_length", uint32_t(h.n_ff));
    w.set(A + ".attention.head_count", uint32_t(h.n_head));
    w.set(A + ".attention.head_count_kv", uint32_t(h.n_head_kv));
    w.set(A + ".attention.key_length", uint32_t(h.head_dim));
    w.set(A + ".attention.value_length", uint32_t(h.head_dim));
    w.set(A + ".attention.layer_norm_rms_epsilon", float(h.norm_eps));
    w.set(A + ".rope.freq_base", float(h.rope_theta));
    w.set(A + ".rope.dimension_count", uint32_t(h.n_rot));
    if (h.n_expert > 0) {
        w.set(A + ".expert_count", uint32_t(h.n_expert));
        w.set(A + ".expert_used_count", uint32_t(h.n_expert_used));
    }
    if (h.n_ff_expert > 0) w.set(A + ".expert_feed_forward_length", uint32_t(h.n_ff_expert));
    if (h.n_ff_shared > 0) w.set(A + ".expert_shared_feed_forward_length", uint32_t(h.n_ff_shared));
    if (h.arch == "phi3" && h.sliding_window > 0)
        w.set(A + ".attention.sliding_window", uint32_t(h.sliding_window));
    if (h.arch == "granite") {
        w.set(A + ".embedding_scale", float(h.embedding_multiplier));
        w.set(A + ".residual_scale", float(h.residual_multiplier));
        w.set(A + ".attention.scale", float(h.attention_multiplier));
        w.set(A + ".logit_scale", float(h.logits_scaling));
    }
    if (h.rope_long) {
        w.set(A + ".rope.scaling.attn_factor", float(*h.rope_long->attention_factor));
        w.set(A + ".rope.scaling.original_context_length", uint32_t(*h.rope_long->original_context));
    }
    if (h.arch == "gemma2") {
        w.set(A + ".attn_logit_softcapping", float(h.attn_softcap));
        w.set(A + ".final_logit_softcapping", float(h.final_softcap));
        w.set(A + ".attention.sliding_window", uint32_t(h.sliding_window));
    }
    if (h.arch == "gemma3") {
        if (h.final_softcap > 0) w.set(A + ".final_logit_softcapping", float(h.final_softcap));
        w.set(A + ".attention.sliding_window", uint32_t(h.sliding_window));
        w.set(A + ".attention.sliding_window_pattern", uint32_t(h.sliding_pattern));
        w.set(A + ".rope.freq_base_swa", float(h.rope_local_base));
    }
    if (h.rope_linear_factor > 0) {
        w.set(A + ".rope.scaling.type", "linear");
        w.set(A + ".rope.scaling.factor", float(h.rope_linear_factor));
    }
    if (h.bos) w.set("tokenizer.ggml.bos_token_id", uint32_t(*h.bos));
    if (h.eos) w.set("tokenizer.ggml.eos_token_id", uint32_t(*h.eos));

    const bool has_vocabulary = write_vocabulary(w, dir, h.n_vocab);
    // Without tokenizer.json the file says so the way llama.cpp's converter does: llama.cpp
    // refuses a model without tokenizer.ggml.model, and with "no_vocab" it numbers
    // vocab_size dummy tokens so token ids can still be fed in.
    if (!has_vocabulary) w.set("tokenizer.ggml.model", "no_vocab");

    const bool permute_rotary = h.arch == "llama" || h.arch == "granite";
    std::set<std::string> written;
    int n_fallback = 0;
    // Experts come one matrix each (Mixtral's w1 gate, w3 up, w2 down; Qwen3-MoE's gate_proj,
    // up_proj, down_proj); GGUF stacks each block's into one [cols, rows, n_expert] tensor,
    // written once all are read.
    struct Stack {
        int64_t rows = 0, cols = 0;
        std::vector<std::vector<float>> experts;
    };
    std::map<std::string, Stack> stacks;
    static const std::regex expert_re(
        R"(model\.layers\.(\d+)\.(?:block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3))"
        R"(|mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj))\.weight)");
    const int64_t expert_ff = h.n_ff_expert > 0 ? h.n_ff_expert : h.n_ff;
    for (const auto& [hf_name, t] : ckpt.tensors()) {
        std::smatch em;
        if (h.n_expert > 0 && std::regex_match(hf_name, em, expert_re)) {
            const bool block_sparse = em[2].matched; // Mixtral's names
            const int64_t e = std::stoll(block_sparse ? em[2] : em[4]);
            const std::string part = block_sparse ? em[3] : em[5];
            const std::string which = part == "w1" || part == "gate_proj" ? "ffn_gate_exps"
                                      : part == "w3" || part == "up_proj" ? "ffn_up_exps"
                                                                          : "ffn_down_exps";
            if (e >= h.n_expert || t->shape.size() != 2)
                gfa::fail("tensor " + hf_name + ": expert " + std::to_string(e) + " of " +
                          std::to_string(h.n_expert) + ", or not a matrix");
            const bool down = which == "ffn_down_exps";
            const std::vector<int64_t> want =
                down ? std::vector<int64_t>{h.n_embd, expert_ff} : std::vector<int64_t>{expert_ff, h.n_embd};
            if (t->shape != want)
                gfa::fail("tensor " + hf_name + ": shape [" + std::to_string(t->shape[0]) + ", " +
                          std::to_string(t->shape[1]) + "], the config says [" + std::to_string(want[0]) +
                          ", " + std::to_string(want[1]) + "] (" +
                          (h.n_ff_expert > 0 ? "moe_intermediate_size" : "intermediate_size") + ")");
            Stack& st = stacks["blk." + std::string(em[1]) + "." + which + ".weight"];
            if (st.experts.empty()) {
                st.rows = t->shape[0];
                st.cols = t->shape[1];
                st.experts.resize(size_t(h.n_expert));
            }
            st.experts[size_t(e)] = t->to_f32();
            continue;
        }
        const std::string name = gguf_name(hf_name, h.arch);
        if (name.empty()) continue;
        // A tied checkpoint may still store lm_head; the model reads token_embd instead.
        if (name == "output.weight" && h.tied) continue;
        if (t->shape.empty() || t->shape.size() > 2)
            gfa::fail("tensor " + hf_name + ": expected 1 or 2 dimensions, got " +
                      std::to_string(t->shape.size()));
        const int n_dims = int(t->shape.size());
        const int64_t rows = n_dims == 2 ? t->shape[0] : 1;
        const int64_t cols = n_dims == 2 ? t->shape[1] : t->shape[0];
        std::vector<float> values = t->to_f32();
        const bool is_q = name.find(".attn_q.") != std::string::npos;
        const bool is_k = name.find(".attn_k.") != std::string::npos;
        // Gemma's RMSNorm multiplies by 1 + weight.
        if ((h.arch == "gemma2" || h.arch == "gemma3") && name.find("norm.weight") != std::string::npos)
            for (float& v : values) v += 1.0f;
        if (permute_rotary && (is_q || is_k)) {
            // A bias is one column of rows.
            values = n_dims == 2 ? interleave_rotary_rows(values, rows, cols, h.head_dim)
                                 : interleave_rotary_rows(values, cols, 1, h.head_dim);
        }
        const gfa::Type st = storage_type(type, n_dims, cols, name);
        if (st != type && n_dims == 2 && st != gfa::Type::F32) ++n_fallback;
        const std::vector<uint8_t> bytes = gfa::encode_rows(values, st, cols);
        std::vector<int64_t> dims{cols};
        if (n_dims == 2) dims.push_back(rows);
        w.add_tensor(name, st, dims, bytes.data(), bytes.size());
        written.insert(name);
    }

    for (auto& [name, st] : stacks) {
        std::vector<float> values;
        for (size_t e = 0; e < st.experts.size(); ++e) {
            if (st.experts[e].empty())
                gfa::fail(dir + ": " + name + " lacks expert " + std::to_string(e) + " of the checkpoint");
            values.insert(values.end(), st.experts[e].begin(), st.experts[e].end());
        }
        const gfa::Type stype = storage_type(type, 2, st.cols, name);
        if (stype != type) ++n_fallback;
        const std::vector<uint8_t> bytes = gfa::encode_rows(values, stype, st.cols);
        w.add_tensor(name, stype, {st.cols, st.rows, h.n_expert}, bytes.data(), bytes.size());
        written.insert(name);
    }

    if (h.rope_long)
        for (const auto& [name, values] :
             {std::pair{"rope_factors_long.weight", &h.rope_long->long_factor},
              std::pair{"rope_factors_short.weight", &h.rope_long->short_factor}}) {
            const std::vector<float> f(values->begin(), values->end());
            w.add_tensor(name, gfa::Type::F32, {int64_t(f.size())}, f.data(), f.size() * sizeof(float));
            written.insert(name);
        }
    if (h.rope_llama3) {
        const std::vector<float> factors = llama3_rope_factors(h);
        w.add_tensor("rope_freqs.weight", gfa::Type::F32, {int64_t(factors.size())}, factors.data(),
                     factors.size() * sizeof(float));
        written.insert("rope_freqs.weight");
    }

    // Every tensor the model needs must be there.
    std::vector<std::string> needed{"token_embd.weight", "output_norm.weight"};
    if (!h.tied) needed.push_back("output.weight");
    for (int64_t l = 0; l < h.n_layer; ++l)
        for (const char* s :
             h.arch == "phi3" ? std::vector<const char*>{"attn_norm", "attn_qkv", "attn_output", "ffn_norm",
                                                         "ffn_up", "ffn_down"}
             : h.arch == "olmo2" ? std::vector<const char*>{"attn_q", "attn_k", "attn_v", "attn_output",
                                                            "ffn_gate", "ffn_up", "ffn_down"}
             : h.n_expert > 0
                 ? std::vector<const char*>{"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                            "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                                            "ffn_down_exps"}
                 : std::vector<const char*>{"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                            "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"})
            needed.push_back("blk." + std::to_string(l) + "." + s + ".weight");
    if (h.arch == "gemma2" || h.arch == "gemma3" || h.arch == "olmo2")
        for (int64_t l = 0; l < h.n_layer; ++l)
            for (const char* s : {"post_attention_norm", "post_ffw_norm"})
                needed.push_back("blk." + std::to_string(l) + "." + s + ".weight");
    if (h.arch == "qwen2moe")
        for (int64_t l = 0; l < h.n_layer; ++l)
            for (const char* s : {"ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"})
                needed.push_back("blk." + std::to_string(l) + "." + s + ".weight");
    if (h.arch == "gemma3" || h.arch == "qwen3" || h.arch == "qwen3moe" || h.arch == "olmo2")
        for (int64_t l = 0; l < h.n_layer; ++l)
            for (const char* s : {"attn_q_norm", "attn_k_norm"})
                needed.push_back("blk." + std::to_string(l) + "." + s + ".weight");
    for (const std::string& n : needed)
        if (!written.count(n)) gfa::fail(dir + ": the checkpoint has no tensor for " + n);

    w.write(out_path);
    std::fprintf(
        stderr, "convert: %s (%s, %lld layers) -> %s: %zu tensors, %s%s%s\n", dir.c_str(),
        h.model_type.c_str(), (long long)h.n_layer, out_path.c_str(), written.size(),
        std::string(gfa::type_name(type)).c_str(),
        n_fallback ? (" (" + std::to_string(n_fallback) + " matrices in f16: rows not whole blocks)").c_str()
                   : "",
        has_vocabulary ? ", with the vocabulary of tokenizer.json" : "");
    return 0;
}

} // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const gfa::Error& e) {
        std::fprintf(stderr, "convert: error: %s\n", e.what());
        return 1;
    }
}
