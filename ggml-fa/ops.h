// The operations: builder functions that add a node to a context, with their typed
// parameters. Each builder validates its inputs and throws gfa::Error naming the op and the
// shapes when they cannot work. Shapes follow ggml: dim 0 is the contiguous one.
#pragma once

#include <ggml-fa/tensor.h>

#include <array>
#include <cmath>

#include <ggml-fa/attention.h>

namespace gfa {

// ---- parameter structs ---------------------------------------------------------------

struct FillParams {
    float value;
};
struct ScaleParams {
    float scale;
    float bias;
}; // x * scale + bias
struct NormParams {
    float eps;
};
struct SoftMaxParams {
    float scale;
    float max_bias;
}; // softmax(x * scale + slope * mask)
struct DiagMaskParams {
    int32_t n_past;
};
struct ConcatParams {
    int32_t dim;
};
struct PermuteParams {
    int32_t axes[kMaxDims];
}; // result dim axes[i] comes from source dim i
enum class GeluApprox : int32_t { Tanh, Erf };
struct GeluParams {
    GeluApprox approx;
};

enum class RopeMode : int32_t {
    Normal = 0, // rotate pairs (2i, 2i+1)   (LLaMA in GGUF layout)
    NeoX = 2,   // rotate pairs (i, i + n_dims/2)
};
struct RopeParams {
    int32_t n_dims; // leading dims of each head that rotate; the rest pass through
    RopeMode mode;
    float freq_base;  // theta_i = pos * freq_scale * freq_base^(-2i/n_dims) (/ freq_factors[i])
    float freq_scale; // linear position scaling (1 = none)
};

struct AdamWParams {
    float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.0f;
    int32_t step = 1;       // 1-based, for bias correction
    float grad_clip = 0.0f; // > 0: the gradients are scaled so that their global L2 norm
                            // (over every parameter of the step) is at most this
};
// What an AdamW step reads at run time, from an f32 tensor of kAdamWValues elements: lr,
// beta1, beta2, eps, weight_decay, the step's bias corrections 1 - beta1^step and
// 1 - beta2^step, and grad_clip. Kept in a tensor rather than in the node so that one graph
// trains for many steps while the step count and the learning rate change (the same node
// list each step: what a GPU backend needs to replay it as one graph).
inline constexpr int64_t kAdamWValues = 8;
std::array<float, kAdamWValues> adamw_values(const AdamWParams& p); // throws for step < 1
// The factor grad_clip applies to every gradient: grad_clip / norm when the global norm is
// larger, else 1 (also when clipping is off: grad_clip 0).
inline double adamw_clip_factor(double grad_clip, double grad_norm_sq) {
    return grad_clip > 0.0 && grad_norm_sq > grad_clip * grad_clip ? grad_clip / std::sqrt(grad_norm_sq)
                                                                   : 1.0;
}

// flash_attn_ext parameters (shared with the kernels): scale, ALiBi max_bias, logit
// softcap, causal, window. See src/attention/problem.h for the exact semantics.
using FlashAttnParams = attn::Params;
struct FlashAttnOptions {
    Type out_type = Type::F32; // f32, f16 or bf16
    bool with_lse = false;     // also produce the row log-sum-exp (see flash_attn_lse)
};
// Stored on the node: the user's params plus options.
struct FlashAttnNodeParams {
    FlashAttnParams attn;
    FlashAttnOptions options;
};
struct FlashAttnBackParams {
    FlashAttnParams attn;
    bool deterministic;
};
// What a flash_attn_ext node's products may give up for speed (FlashAttnParams::precision),
// set after the node is built (a model's graphs, for example); its gradient stays exact.
using FlashAttnPrecision = attn::Precision;
void set_attention_precision(Tensor* attn_node, FlashAttnPrecision precision);

// ---- data movement and views ----------------------------------------------------------

Tensor* fill(Context& ctx, Type type, std::initializer_list<int64_t> ne, float value);
Tensor* cpy(Context& ctx, Tensor* a, Tensor* b);  // copy a into b (converting types); result views b
Tensor* cast(Context& ctx, Tensor* a, Type type); // a new contiguous tensor of another type
Tensor* cont(Context& ctx, Tensor* a);
Tensor* reshape(Context& ctx, Tensor* a, std::initializer_list<int64_t> ne); // a must be contiguous
Tensor* view(Context& ctx, Tensor* a, std::initializer_list<int64_t> ne, std::initializer_list<size_t> nb,
             size_t offset);
Tensor* permute(Context& ctx, Tensor* a, int ax0, int ax1, int ax2, int ax3);
Tensor* transpose(Context& ctx, Tensor* a);                         // swap dims 0 and 1
Tensor* get_rows(Context& ctx, Tensor* a, Tensor* rows);            // a[.., rows[i], ..] -> f32
Tensor* set_rows(Context& ctx, Tensor* a, Tensor* b, Tensor* rows); // a[rows[i]] = b[i]; result views a
Tensor* concat(Context& ctx, Tensor* a, Tensor* b, int dim);
Tensor* repeat(Context& ctx, Tensor* a, Tensor* like); // tile a to like's shape

// ---- element-wise ---------------------------------------------------------------------

Tensor* add(Context& ctx, Tensor* a, Tensor* b); // b broadcast over a (can_repeat(b, a))
Tensor* sub(Context& ctx, Tensor* a, Tensor* b);
Tensor* mul(Context& ctx, Tensor* a, Tensor* b);
Tensor* div(Context& ctx, Tensor* a, Tensor* b);
Tensor* scale(Context& ctx, Tensor* a, float s, float bias = 0.0f);
Tensor* sqr(Context& ctx, Tensor* a);
Tensor* sqrt(Context& ctx, Tensor* a);
Tensor* exp(Context& ctx, Tensor* a);
Tensor* log(Context& ctx, Tensor* a);
Tensor* neg(Context& ctx, Tensor* a);
Tensor* tanh(Context& ctx, Tensor* a);

// ---- reductions -----------------------------------------------------------------------

Tensor* sum(Context& ctx, Tensor* a);      // -> [1]
Tensor* sum_rows(Context& ctx, Tensor* a); // -> [1, ne1, ne2, ne3]
// The positions (i32) of the k largest values of each row of a (f32), largest first, ties
// broken by the lower position: [k, ne1, ne2, ne3]. (A mixture of experts' router choice.)
// No gradient.
Tensor* top_k(Context& ctx, Tensor* a, int64_t k);
// How sample_token draws a token from a column of logits: the top_k most likely (0: every
// token; ranked as top_k ranks them), weighed exp((logit - largest) / temperature), then the
// shortest run of them, most likely first, holding top_p of their weight; the token is drawn
// from that run with u = sample_uniform(seed, position) in [0, 1) (src/ops/sample_rule.h), a
// function of the seed and the logits' position alone, so that every backend draws the same
// token from the same logits and a replayed graph draws anew at each position.
struct SampleParams {
    float temperature = 1.0f; // > 0
    int32_t top_k = 40;       // 0 (or more than the column holds): every token
    float top_p = 1.0f;       // in (0, 1]
    uint32_t unused = 0;      // (no padding: parameters are compared and hashed as bytes)
    uint64_t seed = 0;
};
// One token drawn from each column of logits [n_vocab, n] (f32), the logits of the tokens at
// positions [n] (i32): i32 [1, n]. No gradient.
Tensor* sample_token(Context& ctx, Tensor* logits, Tensor* positions, const SampleParams& p);
Tensor* mean(Context& ctx, Tensor* a); // row means -> [1, ne1, ne2, ne3]

// ---- matrix products ------------------------------------------------------------------

// a: [K, M, A2, A3] (weights: f32/f16/bf16/q8_0/q4_0/...), b: [K, N, B2, B3] f32 with
// B2 % A2 == 0 and B3 % A3 == 0: b's matrix i2 uses a's matrix i2 / (B2 / A2), as GQA groups heads
// (repeat/add broadcast by modulo instead). Result [M, N, B2, B3] f32 = b * a^T per matrix.
Tensor* mul_mat(Context& ctx, Tensor* a, Tensor* b);
// a: [M, K], b: [N, K] -> [M, N] = sum_k a[:,k] b[:,k]^T (batched over dims 2-3 like mul_mat)
Tensor* out_prod(Context& ctx, Tensor* a, Tensor* b);
// The products of a mixture of experts. as: [K, M, E], E weight matrices of one type (any
// mul_mat weight type); b: [K, Nb, T] f32 with Nb = 1 (one input per token, shared by its
// experts) or Nb = k; ids: [k, T] i32, the experts chosen for each token. Result [M, k, T] f32:
// column (i, t) = as[:, :, ids[i, t]]^T b[:, Nb == 1 ? 0 : i, t]. An expert number outside
// [0, E) is an error when the node runs. No gradient.
Tensor* mul_mat_id(Context& ctx, Tensor* as, Tensor* b, Tensor* ids);

// How much precision a product may give up for speed; each level allows what the one before
// it does. F32 (the default): f32 multiplies everywhere (a CPU multiplying quantized weights
// by many columns may round the columns to 16 bits per 32 values: about 1e-5 of relative
// error), but for the CPU's decoding products (1 to 3 columns, bound by reading the weights),
// which, as llama.cpp's, round the columns to f16 against f16 and bf16 weights (scaled by a
// power of two into f16's range: about 2e-4) and to 8 bits per 32 values against quantized
// ones (0.4%).
// TF32: a GPU may round f32 operands to TensorFloat-32 (10-bit mantissa, f32 range and
// accumulation) on its tensor cores, as PyTorch's allow_tf32 does; the CPU and Vulkan compute
// f32 anyway. Q8: besides, the CPU may round the columns that meet quantized weights
// to 8 bits per 32 values, as its decoding path and llama.cpp always do (about 0.4% relative
// error per product), which runs a prompt's products with q4_0, q8_0, q4_1, q5_0, q5_1, q2_K,
// q3_K, q4_K, q5_K, iq4_nl and iq4_xs weights at about 1.7 times the rate (q6_K keeps 16 bits).
// BF16: besides, products with f32, f16 or bf16 weights may round both operands to bf16 (the
// CPU then multiplies bf16 pairs with AVX512-BF16 in prompts: about twice the f32 rate,
// about 2e-3 of relative error per product; bf16 weights stay exact).
enum class MatMulPrecision : int32_t { F32 = 0, TF32 = 1, Q8 = 2, BF16 = 3 };
struct MatMulParams {
    MatMulPrecision precision;
};
// On a mul_mat, mul_mat_id or out_prod node; the gradients built from it later inherit it.
void set_matmul_precision(Tensor* product, MatMulPrecision precision);
MatMulPrecision matmul_precision(const Tensor* product);

// ---- normalization, position encoding, softmax ----------------------------------------

Tensor* norm(Context& ctx, Tensor* a, float eps);     // LayerNorm over dim 0, no affine
Tensor* rms_norm(Context& ctx, Tensor* a, float eps); // RMSNorm over dim 0, no affine
// a: [head_dim, n_head, n_tokens, B], pos: i32 [n_tokens]. freq_factors (optional, f32
// [n_dims / 2], Llama 3.1 style long-context scaling): pair i's angle is divided by factor i.
Tensor* rope(Context& ctx, Tensor* a, Tensor* pos, const RopeParams& p, Tensor* freq_factors = nullptr);
// softmax over dim 0 of a * scale + slope * mask; mask optional [ne0, ne1, 1|ne2, 1|ne3]
// (f32/f16; rows past a's ne1 are ignored). slope = attn::alibi_slope(max_bias, head = dim 2);
// max_bias > 0 needs a mask. A row that is -inf everywhere gives zeros. The mask is treated
// as a constant by autodiff (it gets no gradient).
Tensor* soft_max_ext(Context& ctx, Tensor* a, Tensor* mask, float scale, float max_bias);
Tensor* soft_max(Context& ctx, Tensor* a);
Tensor* diag_mask_inf(Context& ctx, Tensor* a, int n_past);

// ---- activations ----------------------------------------------------------------------

Tensor* silu(Context& ctx, Tensor* a);
Tensor* gelu(Context& ctx, Tensor* a, GeluApprox approx = GeluApprox::Tanh);
Tensor* relu(Context& ctx, Tensor* a);
Tensor* swiglu(Context& ctx, Tensor* gate, Tensor* up); // silu(gate) * up

// ---- losses and optimizers ------------------------------------------------------------

// logits, labels: [n_classes, n_rows...] (labels are probabilities) -> [1] mean over rows
// of -sum_c labels * log_softmax(logits). Or labels i32 [n_rows...] (logits' shape without
// dim 0): each row's class, as if one-hot, without the n_classes-wide label rows (a class out
// of range is an error when the graph runs). Autodiff treats the labels as constants: only
// the logits get a gradient.
Tensor* cross_entropy_loss(Context& ctx, Tensor* logits, Tensor* labels);
// One AdamW step, updating param, m and v in place; the result views param. `values`: f32
// [kAdamWValues] holding adamw_values() of the step (set before each run). grad_norm_sq
// (optional, f32 [1]): the squared global norm of the gradients, which grad_clip compares
// with its square: above it, grad is scaled by grad_clip / norm.
Tensor* adamw_step(Context& ctx, Tensor* param, Tensor* grad, Tensor* m, Tensor* v, Tensor* values,
                   Tensor* grad_norm_sq = nullptr);

// ---- attention ------------------------------------------------------------------------

// q [Dk, Sq, Hq, B], k [Dk, Skv, Hkv, B], v [Dv, Skv, Hkv, B], mask [Skv, Sq, 1|Hq, 1|B]
// (optional, f32/f16), sinks [Hq] f32 (optional) -> [Dv, Hq, Sq, B].
Tensor* flash_attn_ext(Context& ctx, Tensor* q, Tensor* k, Tensor* v, Tensor* mask, const FlashAttnParams& p,
                       Tensor* sinks = nullptr, FlashAttnOptions options = {});
// The row log-sum-exp [Sq, Hq, B] f32 of a flash_attn_ext node built with with_lse.
Tensor* flash_attn_lse(Context& ctx, Tensor* attn);

// ---- marking --------------------------------------------------------------------------

void set_param(Tensor* t);
void set_input(Tensor* t);
void set_output(Tensor* t);
void set_loss(Tensor* t);
Tensor* set_name(Tensor* t, std::string name);

} // namespace gfa
