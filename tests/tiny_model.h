// A tiny random Llama-family model written as GGUF, for tests that load and run models.
#pragma once

#include <ggml-fa/backend.h>
#include <ggml-fa/gguf.h>
#include <ggml-fa/model.h>
#include <ggml-fa/types.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace gfa::test {

struct TinyModel {
    std::string arch = "llama";
    int64_t vocab = 37, embd = 40, ff = 24, layers = 2, heads = 5, heads_kv = 1;
    bool biases = false, tied = false;
    std::vector<float> rope_factors; // rope_freqs.weight (head_dim / 2 values) when not empty
    float rope_linear_scale = 0.0f;  // rope.scaling.type "linear" with this factor when > 0
    // Tensors whose names end in one of these hold f16-rounded values, stored as f16 (or as
    // f32 with rounded_as_f32: the same values in another type).
    std::vector<std::string> f16_tensors;
    bool rounded_as_f32 = false;
    // The type of the 2-d weight matrices (encoded by the library's encoder; dim 0 of each
    // must then be a multiple of the type's block); f32 keeps the options above.
    Type matrix_type = Type::F32;
    bool decoded_as_f32 = false; // write the matrices' decoded values as f32 instead
    // arch "gemma2": post norms, soft caps small enough to bite, a window shorter than prompts
    int64_t sliding_window = 4;
    float attn_softcap = 5.0f, final_softcap = 3.0f;
    int64_t head_size = 0; // attention.key_length when > 0 (heads * head_size may differ from embd)
    // A mixture of experts (Mixtral, or arch "qwen2moe" / "qwen3moe") when experts > 0: a router and stacked
    // expert matrices instead of ffn_gate/up/down, experts_used per token.
    int64_t experts = 0, experts_used = 0;
    // qwen2moe, qwen3moe: feed_forward_length holds dense_ff (the checkpoint's dense width) and
    // expert_feed_forward_length ff, unless expert_ff_key is off.
    int64_t dense_ff = 0;
    bool expert_ff_key = true;
    // qwen2moe: the shared expert's width (expert_shared_feed_forward_length)
    int64_t shared_ff = 0;
    int64_t head_dim() const { return head_size > 0 ? head_size : embd / heads; }
};

// Writes a random model of the given shape; `skip` leaves one tensor out, `bad_shape`
// gives one tensor a wrong shape.
inline std::string write_model(const TinyModel& m, uint32_t seed, const std::string& skip = "",
                               const std::string& bad_shape = "") {
    static int files_written = 0; // the same seed must not give two models one path
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    gguf::Writer w;
    const std::string& A = m.arch;
    w.set("general.architecture", A);
    w.set(A + ".context_length", uint32_t(64));
    w.set(A + ".embedding_length", uint32_t(m.embd));
    w.set(A + ".block_count", uint32_t(m.layers));
    const bool moe_arch = A == "qwen2moe" || A == "qwen3moe";
    w.set(A + ".feed_forward_length", uint32_t(moe_arch ? m.dense_ff : m.ff));
    if (moe_arch && m.expert_ff_key) w.set(A + ".expert_feed_forward_length", uint32_t(m.ff));
    if (A == "qwen2moe") w.set(A + ".expert_shared_feed_forward_length", uint32_t(m.shared_ff));
    w.set(A + ".attention.head_count", uint32_t(m.heads));
    w.set(A + ".attention.head_count_kv", uint32_t(m.heads_kv));
    w.set(A + ".attention.layer_norm_rms_epsilon", 1e-5f);
    w.set(A + ".rope.freq_base", 10000.0f);
    if (m.head_size > 0) {
        w.set(A + ".attention.key_length", uint32_t(m.head_size));
        w.set(A + ".attention.value_length", uint32_t(m.head_size));
    }
    if (A == "gemma2") {
        w.set(A + ".attention.sliding_window", uint32_t(m.sliding_window));
        w.set(A + ".attn_logit_softcapping", m.attn_softcap);
        w.set(A + ".final_logit_softcapping", m.final_softcap);
    }
    if (A == "gemma3") { // windows on two of every three layers, a rope base of their own
        w.set(A + ".attention.sliding_window", uint32_t(m.sliding_window));
        w.set(A + ".attention.sliding_window_pattern", uint32_t(3));
        w.set(A + ".rope.freq_base_swa", 1000.0f);
    }
    if (m.experts > 0) {
        w.set(A + ".expert_count", uint32_t(m.experts));
        w.set(A + ".expert_used_count", uint32_t(m.experts_used));
    }
    if (m.rope_linear_scale > 0.0f) {
        w.set(A + ".rope.scaling.type", std::string("linear"));
        w.set(A + ".rope.scaling.factor", m.rope_linear_scale);
    }
    if (!m.rope_factors.empty())
        w.add_tensor("rope_freqs.weight", Type::F32, {int64_t(m.rope_factors.size())}, m.rope_factors.data(),
                     m.rope_factors.size() * sizeof(float));
    auto add = [&](const std::string& name, std::vector<int64_t> dims, float scale, float offset = 0.0f) {
        if (name == skip) return;
        if (name == bad_shape) dims[0] += 1;
        int64_t n = 1;
        for (int64_t d : dims) n *= d;
        std::vector<float> v(static_cast<size_t>(n));
        for (float& x : v) x = offset + scale * normal(rng);
        if (m.matrix_type != Type::F32 && dims.size() >= 2) {
            const TypeTraits& tt = type_traits(m.matrix_type);
            std::vector<std::byte> encoded(size_t(n / tt.block_size) * tt.type_size);
            tt.from_float(v.data(), encoded.data(), n);
            if (!m.decoded_as_f32) {
                w.add_tensor(name, m.matrix_type, dims, encoded.data(), encoded.size());
                return;
            }
            tt.to_float(encoded.data(), v.data(), n);
            w.add_tensor(name, Type::F32, dims, v.data(), v.size() * sizeof(float));
            return;
        }
        const bool half =
            std::any_of(m.f16_tensors.begin(), m.f16_tensors.end(), [&](const std::string& end) {
                return name.size() >= end.size() &&
                       name.compare(name.size() - end.size(), end.size(), end) == 0;
            });
        if (!half) {
            w.add_tensor(name, Type::F32, dims, v.data(), v.size() * sizeof(float));
            return;
        }
        std::vector<uint16_t> h(v.size());
        for (size_t i = 0; i < v.size(); ++i) h[i] = fp32_to_fp16(v[i]);
        if (!m.rounded_as_f32) {
            w.add_tensor(name, Type::F16, dims, h.data(), h.size() * sizeof(uint16_t));
            return;
        }
        for (size_t i = 0; i < v.size(); ++i) v[i] = fp16_to_fp32(h[i]);
        w.add_tensor(name, Type::F32, dims, v.data(), v.size() * sizeof(float));
    };
    const int64_t D = m.head_dim(), Dq = m.heads * D, Dkv = m.heads_kv * D;
    const float s = 1.0f / std::sqrt(float(m.embd));
    add("token_embd.weight", {m.embd, m.vocab}, 1.0f);
    add("output_norm.weight", {m.embd}, 0.1f, 1.0f);
    if (!m.tied) add("output.weight", {m.embd, m.vocab}, s);
    for (int64_t l = 0; l < m.layers; ++l) {
        const std::string b = "blk." + std::to_string(l) + ".";
        add(b + "attn_norm.weight", {m.embd}, 0.1f, 1.0f);
        add(b + "attn_q.weight", {m.embd, Dq}, 2 * s);
        add(b + "attn_k.weight", {m.embd, Dkv}, 2 * s);
        add(b + "attn_v.weight", {m.embd, Dkv}, s);
        if (m.biases) {
            add(b + "attn_q.bias", {Dq}, 0.3f);
            add(b + "attn_k.bias", {Dkv}, 0.3f);
            add(b + "attn_v.bias", {Dkv}, 0.3f);
        }
        add(b + "attn_output.weight", {Dq, m.embd}, 1.0f / std::sqrt(float(Dq)));
        add(b + "ffn_norm.weight", {m.embd}, 0.1f, 1.0f);
        if (m.experts > 0) {
            add(b + "ffn_gate_inp.weight", {m.embd, m.experts}, 3 * s); // clear preferences
            add(b + "ffn_gate_exps.weight", {m.embd, m.ff, m.experts}, s);
            add(b + "ffn_up_exps.weight", {m.embd, m.ff, m.experts}, s);
            add(b + "ffn_down_exps.weight", {m.ff, m.embd, m.experts}, 1.0f / std::sqrt(float(m.ff)));
            if (A == "qwen2moe") {
                add(b + "ffn_gate_inp_shexp.weight", {m.embd}, 3 * s); // gates from near 0 to near 1
                add(b + "ffn_gate_shexp.weight", {m.embd, m.shared_ff}, s);
                add(b + "ffn_up_shexp.weight", {m.embd, m.shared_ff}, s);
                add(b + "ffn_down_shexp.weight", {m.shared_ff, m.embd}, 1.0f / std::sqrt(float(m.shared_ff)));
            }
        } else {
            add(b + "ffn_gate.weight", {m.embd, m.ff}, s);
            add(b + "ffn_up.weight", {m.embd, m.ff}, s);
            add(b + "ffn_down.weight", {m.ff, m.embd}, 1.0f / std::sqrt(float(m.ff)));
        }
        if (A == "gemma2" || A == "gemma3") {
            add(b + "post_attention_norm.weight", {m.embd}, 0.1f, 1.0f);
            add(b + "post_ffw_norm.weight", {m.embd}, 0.1f, 1.0f);
        }
        if (A == "gemma3" || A == "qwen3" || A == "qwen3moe") {
            add(b + "attn_q_norm.weight", {D}, 0.1f, 1.0f);
            add(b + "attn_k_norm.weight", {D}, 0.1f, 1.0f);
        }
    }
    const std::string path = (std::filesystem::temp_directory_path() /
                              ("gfa-test-model-" + std::to_string(seed) + "-" + std::to_string(rng()) + "-" +
                               std::to_string(files_written++) + ".gguf"))
                                 .string();
    w.write(path);
    return path;
}

// ||a - b|| / ||b|| of two runs' logits; infinity when either holds a value that is not
// finite or the sizes differ.
inline double logits_error(const std::vector<float>& a, const std::vector<float>& b) {
    if (a.size() != b.size()) return INFINITY;
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
        num += double(a[i] - b[i]) * double(a[i] - b[i]);
        den += double(b[i]) * double(b[i]);
    }
    return std::sqrt(num / den);
}

// Session::eval_greedy against the logits of the same steps: `prompt` tokens in one call,
// then the rest one at a time (the given tokens, not the picks, so both sessions see the
// same inputs). Session a alternates eval_greedy and eval (switching between the two graphs
// of a step), session b always returns logits. Returns one line per disagreement: a pick that
// is not the first largest of b's logits, a's logits not equal to b's, or a compute
// allocation after a's first call (the reserve must cover the greedy graphs); with `device`,
// also a greedy step's graph placed anywhere else (the pick must run where the logits are).
// Empty: all agree.
inline std::vector<std::string> greedy_disagreements(const Model& model, const SessionOptions& so,
                                                     const std::vector<int32_t>& tokens, size_t prompt,
                                                     const Device* device = nullptr) {
    Session a(model, so), b(model, so);
    std::vector<std::string> found;
    auto first_max = [](const std::vector<float>& x) {
        return int32_t(std::max_element(x.begin(), x.end()) - x.begin()); // the first of equals
    };
    int allocations = -1;
    for (size_t at = 0, step = 0; at < tokens.size(); ++step) {
        const size_t n = at == 0 ? prompt : 1;
        const std::span<const int32_t> part(tokens.data() + at, n);
        const std::vector<float> logits = b.eval(part);
        const std::string where = "step " + std::to_string(step) + " (" + std::to_string(n) + " tokens): ";
        if (logits.empty() ||
            !std::all_of(logits.begin(), logits.end(), [](float v) { return std::isfinite(v); }))
            found.push_back(where + "logits not all finite");
        if (step % 2 == 0) {
            const int32_t pick = a.eval_greedy(part), expected = first_max(logits);
            if (pick != expected)
                found.push_back(where + "picked " + std::to_string(pick) + ", the logits say " +
                                std::to_string(expected));
            const std::string schedule = a.describe_schedule();
            if (device && (schedule.find(device->name()) == std::string::npos ||
                           schedule.find("CPU") != std::string::npos))
                found.push_back(where + "the graph is not all on " + device->name() + ":\n" + schedule);
        } else if (a.eval(part) != logits) {
            found.push_back(where + "logits differ from the twin session's");
        }
        if (allocations < 0) allocations = a.n_compute_allocations();
        if (a.n_compute_allocations() != allocations) found.push_back(where + "a compute allocation");
        at += n;
    }
    return found;
}

// The model in `path` with its last gpu_layers blocks on `gpu` (the default: every block, the
// head and the embeddings).
inline std::unique_ptr<Model> load_on(Device* gpu, const std::string& path, int gpu_layers = 1000) {
    ModelLoadOptions load;
    load.gpu = gpu;
    load.gpu_layers = gpu_layers;
    return Model::load(path, load);
}

// Session::decode against eval_pick token by token in a twin session (greedy unless
// `sampling` says otherwise): the same picks, and the same cache afterwards (the next eval's logits bit for
// bit), also where the caller stops after `stop_after` picks (by returning false, or by throwing with
// stop_by_throwing). max_steps past the context must fail before any work. Returns the
// disagreements; *fed_on_device (when given) gets the steps whose token the device passed on
// itself.
inline std::vector<std::string> decode_disagreements(const Model& model, const SessionOptions& so,
                                                     const std::vector<int32_t>& prompt, int64_t max_steps,
                                                     int64_t stop_after = -1, bool stop_by_throwing = false,
                                                     int64_t* fed_on_device = nullptr,
                                                     const Sampling& sampling = {}) {
    std::vector<std::string> found;
    Session serial(model, so), queued(model, so);
    const int32_t first = serial.eval_pick(prompt, sampling);
    const bool fits = serial.n_past() + max_steps <= serial.n_ctx();
    const int64_t wanted = !fits ? 0 : stop_after >= 0 ? std::min(stop_after, max_steps) : max_steps;
    std::vector<int32_t> want;
    for (int32_t next = first; int64_t(want.size()) < wanted;) {
        const int32_t one[1] = {next};
        next = serial.eval_pick(one, sampling);
        want.push_back(next);
    }
    if (queued.eval_pick(prompt, sampling) != first)
        found.push_back("the twin sessions' prompts picked differently");
    queued.reset_profile();
    std::vector<int32_t> got;
    struct Stop {};
    int64_t delivered = -1;
    try {
        delivered = queued.decode(first, max_steps, sampling, [&](int32_t id) {
            got.push_back(id);
            const bool more = stop_after < 0 || int64_t(got.size()) < stop_after;
            if (!more && stop_by_throwing) throw Stop{};
            return more;
        });
        if (!fits) found.push_back("max_steps past the context gave no error");
    } catch (const Stop&) {
        delivered = int64_t(got.size());
    } catch (const Error& e) {
        if (fits || std::string(e.what()).find("exceed the context") == std::string::npos)
            found.push_back(std::string("decode threw: ") + e.what());
        delivered = int64_t(got.size());
    }
    if (delivered != wanted || got != want) {
        std::string line = "picks handed over (" + std::to_string(delivered) + "):";
        for (int32_t id : got) line.append(" ").append(std::to_string(id));
        line += "; token by token:";
        for (int32_t id : want) line.append(" ").append(std::to_string(id));
        found.push_back(line);
    }
    if (queued.n_past() != serial.n_past())
        found.push_back("n_past " + std::to_string(queued.n_past()) + " after decode, " +
                        std::to_string(serial.n_past()) + " token by token");
    if (fed_on_device) *fed_on_device = queued.profile().fed_on_device;
    // The cache holds the same rows: the next token gives the same logits.
    if (serial.n_past() < serial.n_ctx()) {
        const int32_t one[1] = {want.empty() ? first : want.back()};
        if (queued.eval(one) != serial.eval(one)) found.push_back("the next eval's logits differ");
    }
    return found;
}

// A small model for training tests: grouped heads (4 query heads on 2 key/value heads),
// head size 8 (the smallest attention kernels take).
inline ModelConfig tiny_train_config() {
    ModelConfig c;
    c.arch = "llama";
    c.n_vocab = 13;
    c.n_embd = 24;
    c.n_layer = 2;
    c.n_ff = 20;
    c.n_head = 4;
    c.n_head_kv = 2;
    c.head_dim = 8;
    c.norm_eps = 1e-5f;
    c.rope = {.n_dims = 8, .mode = RopeMode::Normal, .freq_base = 10000.0f, .freq_scale = 1.0f};
    return c;
}

// A training config reshaped as the other architectures have it: variant 0 leaves it llama,
// 1 makes it Qwen2 (NeoX rope, q/k/v biases, tied embeddings), 2 Gemma 2 (also scaled
// embeddings, post norms, GeGLU, soft caps small enough to bite and a window of 3 positions
// on the even layers, shorter than the tests' sequences), 3 Gemma 3 (q/k norms, no caps,
// windows on all but every third layer with a rope base of their own, linear position
// scaling 2 on the global layers), 4 Qwen3 (NeoX rope, q/k norms, untied embeddings, heads twice
// as large: q is wider than the embedding).
inline ModelConfig train_config_variant(ModelConfig c, int variant) {
    if (variant == 0) return c;
    c.rope.mode = RopeMode::NeoX;
    if (variant == 4) {
        c.arch = "qwen3";
        c.qk_norm = true;
        c.head_dim = c.rope.n_dims = 2 * c.head_dim;
        return c;
    }
    c.tied_embeddings = true;
    if (variant == 1) {
        c.arch = "qwen2";
        c.qkv_bias = true;
        return c;
    }
    c.post_norms = c.gelu_ffn = true;
    c.embd_scale = std::sqrt(float(c.n_embd));
    c.attn_scale = 1.0f / std::sqrt(float(c.head_dim));
    c.sliding_window = 3;
    c.rope_sliding = c.rope;
    if (variant == 2) {
        c.arch = "gemma2";
        c.attn_softcap = 2.0f;
        c.final_softcap = 3.0f;
        return c;
    }
    c.arch = "gemma3";
    c.qk_norm = true;
    c.sliding_pattern = 3;
    c.rope_sliding.freq_base = 1000.0f;
    c.rope.freq_scale = 0.5f;
    return c;
}

struct TempFile {
    std::string path;
    ~TempFile() { std::remove(path.c_str()); }
};

} // namespace gfa::test
