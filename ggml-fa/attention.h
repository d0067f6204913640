// flash_attn_ext's parameters and the semantics every implementation shares.
#pragma once

#include <cmath>
#include <cstdint>

namespace gfa::attn {

// What flash_attn_ext's products may give up for speed. F32: the CPU and Vulkan multiply in
// f32 (16-bit K/V converted exactly), the reference in double. BF16: a backend may round Q,
// K, V and the probabilities to bf16 for its products (f32 sums), about 3e-3 relative error
// like the GPU kernels' 16-bit tensor-core products; the CPU then uses AVX512-BF16 pair
// products where the build targets them (twice the f32 multiply rate). The gradient and the
// reference stay exact either way.
enum class Precision : int32_t { F32 = 0, BF16 = 1 };

// The typed parameters of flash_attn_ext (also the op's public params struct).
struct Params {
    float scale = 1.0f;         // multiplies q.k
    float max_bias = 0.0f;      // ALiBi: > 0 scales the mask by a per-head slope
    float logit_softcap = 0.0f; // > 0: s = softcap * tanh(s / softcap), before the mask
    bool causal = false;        // bottom-right aligned (see visible())
    int32_t window_left = -1;   // keys at most this far left of the diagonal; -1 = unlimited
    int32_t window_right = -1;  // keys at most this far right of the diagonal; -1 = unlimited
    Precision precision = Precision::F32;
};

// Query row i sees key column j? The diagonal is bottom-right aligned: p = i + Skv - Sq.
inline bool visible(const Params& p, int64_t i, int64_t j, int64_t Sq, int64_t Skv) {
    const int64_t diag = i + Skv - Sq;
    if (p.causal && j > diag) return false;
    if (p.window_left >= 0 && j < diag - p.window_left) return false;
    if (p.window_right >= 0 && j > diag + p.window_right) return false;
    return true;
}

// ALiBi slope of head h (ggml's definition): 1 when max_bias == 0.
inline float alibi_slope(float max_bias, int64_t h, int64_t n_head) {
    if (max_bias <= 0.0f) return 1.0f;
    const int64_t n_head_log2 = int64_t(1) << int64_t(std::floor(std::log2(double(n_head))));
    const float m0 = std::pow(2.0f, -max_bias / float(n_head_log2));
    const float m1 = std::pow(2.0f, -max_bias / 2.0f / float(n_head_log2));
    return h < n_head_log2 ? std::pow(m0, float(h + 1)) : std::pow(m1, float(2 * (h - n_head_log2) + 1));
}

} // namespace gfa::attn
