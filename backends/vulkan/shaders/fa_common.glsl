// What every flash_attn_ext shader shares: the parameter block (mirrored by FaParams in
// vk_flash_attn.cpp), the eleven storage buffers, typed loads and stores, and the op's
// semantics (visibility, ALiBi slope, the score of one query/key pair), written to agree
// with src/attention/problem.h.
//
// Tensors are bound as arrays of 32-bit words, so one shader reads f32, f16 and bf16 without
// 16-bit storage features: element e of a 16-bit tensor is half (e & 1) of word e >> 1.
// Offsets and strides are in elements of the tensor's own type (the LSE, the gradients and
// the row scratch are f32).

#include "math.glsl"

const uint T_F32 = 0u, T_F16 = 1u, T_BF16 = 2u;
// K/V caches of blocks of 32 (forward only); their offsets and strides are in bytes.
const uint T_Q8_0 = 3u, T_Q4_0 = 4u;
#define NEG_INF uintBitsToFloat(0xff800000u)

layout(std430, binding = 0) readonly buffer ParamsBlock {
    uint Dk, Dv, Sq, Skv, Hq, Hkv, B, group_size;
    uint q_type, k_type, v_type, o_type, mask_type, dO_type, has_mask, has_sinks;
    uint has_lse, causal; int window_left, window_right;
    float scale, softcap, m0, m1;
    uint n_head_log2, use_alibi, pad0, pad1;
    uint q_off, q_nb1, q_nb2, q_nb3;
    uint k_off, k_nb1, k_nb2, k_nb3;
    uint v_off, v_nb1, v_nb2, v_nb3;
    uint mask_off, mask_nb1, mask_nb2, mask_nb3; // nb2/nb3 are 0 where the mask broadcasts
    uint o_off, o_nb1, o_nb2, o_nb3;             // o and dO are [Dv, Hq, Sq, B]
    uint dO_off, dO_nb1, dO_nb2, dO_nb3;
    uint lse_off, lse_nb0, lse_nb1, lse_nb2;     // [Sq, Hq, B]
    uint sinks_off, sinks_nb0, rowD_off, pad2;
    uint dq_off, dk_off, dv_off, dsinks_off;     // dense f32 inside the gradient node
} P;

layout(std430, binding = 1) readonly buffer QBuf { uint q_words[]; };
layout(std430, binding = 2) readonly buffer KBuf { uint k_words[]; };
layout(std430, binding = 3) readonly buffer VBuf { uint v_words[]; };
layout(std430, binding = 4) readonly buffer MaskBuf { uint mask_words[]; };
layout(std430, binding = 5) readonly buffer SinksBuf { uint sinks_words[]; };
layout(std430, binding = 6) buffer OBuf { uint o_words[]; }; // written by the forward (with the LSE)
layout(std430, binding = 7) readonly buffer DOBuf { uint dO_words[]; };
layout(std430, binding = 8) readonly buffer LseBuf { uint lse_words[]; };
layout(std430, binding = 9) buffer GradBuf { uint grad_words[]; };  // dQ, dK, dV, dSinks
layout(std430, binding = 10) buffer RowDBuf { uint rowD_words[]; }; // D_i = dO_i . O_i

float half_of(uint word, uint e) {
    return unpackHalf2x16(word)[e & 1u];
}
float bf16_of(uint word, uint e) {
    return uintBitsToFloat((e & 1u) == 1u ? (word & 0xffff0000u) : (word << 16));
}
// Element e of a tensor of type t held in `words`.
#define LOAD_AS(words, t, e)                                                                        \
    ((t) == T_F32 ? uintBitsToFloat(words[e])                                                        \
                  : ((t) == T_F16 ? half_of(words[(e) >> 1], (e)) : bf16_of(words[(e) >> 1], (e))))

float load_q(uint d, uint i, uint h, uint b) {
    const uint e = P.q_off + d + i * P.q_nb1 + h * P.q_nb2 + b * P.q_nb3;
    return LOAD_AS(q_words, P.q_type, e);
}
// Byte b and the 16 bits at (even) byte b of `words`.
#define BYTE_AT(words, b) ((words[(b) >> 2] >> (((b) & 3u) * 8u)) & 0xffu)
#define HALF_AT(words, b) unpackHalf2x16(words[(b) >> 2] >> (((b) & 2u) * 8u)).x
// Value d of the row of blocks starting at byte `row`, decoded as src/quants.cpp decodes it.
#define BLOCK_VALUE(words, t, row, d, out)                                                         \
    {                                                                                               \
        const uint in_block = (d) % 32u;                                                            \
        const uint blk = (row) + ((d) / 32u) * ((t) == T_Q8_0 ? 34u : 18u);                         \
        const uint q = BYTE_AT(words, blk + 2u + ((t) == T_Q8_0 ? in_block : (in_block & 15u)));    \
        precise float decoded = HALF_AT(words, blk) *                                               \
            ((t) == T_Q8_0 ? float(int(q << 24) >> 24)                                              \
                           : float(int((q >> (in_block < 16u ? 0u : 4u)) & 15u) - 8));              \
        out = decoded;                                                                              \
    }

float load_k(uint d, uint j, uint hk, uint b) {
    const uint row = P.k_off + j * P.k_nb1 + hk * P.k_nb2 + b * P.k_nb3;
    if (P.k_type >= T_Q8_0) {
        float v;
        BLOCK_VALUE(k_words, P.k_type, row, d, v);
        return v;
    }
    return LOAD_AS(k_words, P.k_type, row + d);
}
float load_v(uint d, uint j, uint hk, uint b) {
    const uint row = P.v_off + j * P.v_nb1 + hk * P.v_nb2 + b * P.v_nb3;
    if (P.v_type >= T_Q8_0) {
        float v;
        BLOCK_VALUE(v_words, P.v_type, row, d, v);
        return v;
    }
    return LOAD_AS(v_words, P.v_type, row + d);
}
float load_mask(uint j, uint i, uint h, uint b) {
    const uint e = P.mask_off + j + i * P.mask_nb1 + h * P.mask_nb2 + b * P.mask_nb3;
    return LOAD_AS(mask_words, P.mask_type, e);
}
float load_o(uint d, uint h, uint i, uint b) {
    const uint e = P.o_off + d + h * P.o_nb1 + i * P.o_nb2 + b * P.o_nb3;
    return LOAD_AS(o_words, P.o_type, e);
}
float load_dO(uint d, uint h, uint i, uint b) {
    const uint e = P.dO_off + d + h * P.dO_nb1 + i * P.dO_nb2 + b * P.dO_nb3;
    return LOAD_AS(dO_words, P.dO_type, e);
}
float sink_logit(uint h) {
    return uintBitsToFloat(sinks_words[P.sinks_off + h * P.sinks_nb0]);
}
float load_lse(uint i, uint h, uint b) {
    return uintBitsToFloat(lse_words[P.lse_off + i * P.lse_nb0 + h * P.lse_nb1 + b * P.lse_nb2]);
}

// Writes element e of o. A 16-bit element shares its word with a neighbour another
// invocation may write at the same time: clearing our half and setting it are two atomics
// on disjoint bits, correct in any order.
void store_o(uint e, float x) {
    if (P.o_type == T_F32) {
        o_words[e] = floatBitsToUint(x);
        return;
    }
    const uint bits = P.o_type == T_F16 ? f16_bits(x) : bf16_bits(x);
    const uint shift = 16u * (e & 1u);
    atomicAnd(o_words[e >> 1], ~(0xffffu << shift));
    atomicOr(o_words[e >> 1], bits << shift);
}

// ---- the op's semantics (src/attention/problem.h) ----

// Query row i sees key j? The diagonal is bottom-right aligned: diag = i + Skv - Sq.
bool visible(uint i, uint j) {
    const int diag = int(i) + int(P.Skv) - int(P.Sq);
    const int jj = int(j);
    if (P.causal != 0u && jj > diag) return false;
    if (P.window_left >= 0 && jj < diag - P.window_left) return false;
    if (P.window_right >= 0 && jj > diag + P.window_right) return false;
    return true;
}

// Keys [lo, hi) that rows first..last can see at most (visible() still decides per pair).
uvec2 key_range(uint first, uint last) {
    int lo = 0, hi = int(P.Skv);
    const int shift = int(P.Skv) - int(P.Sq);
    if (P.window_left >= 0) lo = max(lo, int(first) + shift - P.window_left);
    if (P.causal != 0u) hi = min(hi, int(last) + shift + 1);
    if (P.window_right >= 0) hi = min(hi, int(last) + shift + P.window_right + 1);
    lo = min(lo, int(P.Skv));
    return uvec2(uint(lo), uint(max(hi, lo)));
}

// Query rows [lo, hi) that can see any of keys first..last (the transpose of key_range).
uvec2 row_range(uint first, uint last) {
    int lo = 0, hi = int(P.Sq);
    const int shift = int(P.Skv) - int(P.Sq);
    if (P.causal != 0u) lo = max(lo, int(first) - shift);
    if (P.window_right >= 0) lo = max(lo, int(first) - shift - P.window_right);
    if (P.window_left >= 0) hi = min(hi, int(last) - shift + P.window_left + 1);
    lo = min(lo, int(P.Sq));
    return uvec2(uint(lo), uint(max(hi, lo)));
}

// ALiBi slope of head h (ggml's definition); 1 without ALiBi.
float alibi_slope(uint h) {
    if (P.use_alibi == 0u) return 1.0;
    return h < P.n_head_log2 ? pow(P.m0, float(h + 1u)) : pow(P.m1, float(2u * (h - P.n_head_log2) + 1u));
}

// The score of a visible pair from its raw dot product, NEG_INF when the mask hides it.
// `t` returns tanh(scale qk / softcap), which the softcap's gradient needs.
float pair_score(float qk, uint i, uint j, uint h, uint b, float slope, out float t) {
    float x = P.scale * qk;
    t = 0.0;
    if (P.softcap > 0.0) {
        t = stable_tanh(x / P.softcap);
        x = P.softcap * t;
    }
    if (P.has_mask != 0u) {
        const float m = load_mask(j, i, h, b);
        if (m == NEG_INF) return NEG_INF;
        x += slope * m;
    }
    return x;
}
