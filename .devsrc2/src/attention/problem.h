// The flash_attn_ext problem as kernels see it: sizes, parameters and strided views,
// with no graph or tensor types. The CPU reference, the CPU FlashAttention-2 kernels and
// the CUDA kernels all take this one descriptor, so they can be tested against each other
// directly and the backends only translate tensors into it.
//
// Layouts (ggml's, see docs/ARCHITECTURE.md):
//   q    [Dk, Sq,  Hq,  B]        k [Dk, Skv, Hkv, B]        v [Dv, Skv, Hkv, B]
//   mask [Skv, Sq, 1|Hq, 1|B]     (additive, f32 or f16; optional)
//   sinks[Hq]                      (f32, optional)
//   o    [Dv, Hq, Sq, B]           lse [Sq, Hq, B] (f32, natural log; optional)
// Strides are in bytes; element 0 of every row is contiguous (nb0 == element size).
#pragma once

#include <ggml-fa/attention.h>
#include <ggml-fa/types.h>

#include <cmath>
#include <cstdint>

namespace gfa::attn {

// A strided 4-d view into memory a kernel reads or writes.
struct View {
    Type type = Type::F32;
    void* data = nullptr;
    int64_t ne[4] = {0, 0, 0, 0};
    int64_t nb[4] = {0, 0, 0, 0}; // bytes
    bool present() const { return data != nullptr; }
    template <class T> T* at(int64_t i1, int64_t i2 = 0, int64_t i3 = 0) const {
        return reinterpret_cast<T*>(static_cast<char*>(data) + i1 * nb[1] + i2 * nb[2] + i3 * nb[3]);
    }
};

struct Problem {
    int64_t Dk = 0, Dv = 0, Sq = 0, Skv = 0, Hq = 0, Hkv = 0, B = 0;
    Params params;
    View q, k, v, mask, sinks; // inputs (mask, sinks optional)
    View o, lse;               // outputs (lse optional in the forward)
};

// Gradient problem: the forward's inputs and outputs plus dO; produces dQ, dK, dV and,
// when sinks are present, dSinks. dq/dk/dv have the layouts of q/k/v; dsinks [Hq] f32.
struct BackwardProblem {
    Problem fwd;     // q, k, v, mask, sinks, o and lse (lse required)
    View dO;         // [Dv, Hq, Sq, B]
    View dq, dk, dv; // outputs
    View dsinks;     // optional output
    bool deterministic = false;
};

// ---- shared semantics: every implementation must agree on these ----------------------

// Score of one (query, key) pair from the raw dot product q.k:
//   s = scale * qk; if softcap > 0: s = softcap * tanh(s / softcap); s += slope * mask.
// Invisible pairs (visible() false, or mask == -inf) are dropped from the softmax.
// Sinks: head h adds exp(sinks[h]) to the softmax denominator (a logit with a zero value).
// A row with nothing visible (and no sink) yields O = 0 and LSE = -inf.

// ---- addressing (the layouts above; every implementation reads memory the same way) --

inline char* row_at(const View& v, int64_t i1, int64_t i2 = 0, int64_t i3 = 0) {
    return v.at<char>(i1, i2, i3);
}
// Row of Dv outputs for query i of head h: o is [Dv, Hq, Sq, B].
inline char* o_row(const View& o, int64_t i, int64_t h, int64_t b) {
    return o.at<char>(h, i, b);
}
// LSE of query i, head h: lse is [Sq, Hq, B], so element 0 is strided by nb[0].
inline float* lse_at(const View& lse, int64_t i, int64_t h, int64_t b) {
    return reinterpret_cast<float*>(static_cast<char*>(lse.data) + i * lse.nb[0] + h * lse.nb[1] +
                                    b * lse.nb[2]);
}
// Mask row (Skv values) for query i of head h; the mask broadcasts over heads and batches
// whose extent is 1. nullptr when there is no mask.
inline const char* mask_row(const View& mask, int64_t i, int64_t h, int64_t b) {
    if (!mask.present()) return nullptr;
    return mask.at<const char>(i, mask.ne[2] == 1 ? 0 : h, mask.ne[3] == 1 ? 0 : b);
}
inline float sink_logit(const View& sinks, int64_t h) {
    return *reinterpret_cast<const float*>(static_cast<const char*>(sinks.data) + h * sinks.nb[0]);
}
// Query head h reads kv head h / (Hq / Hkv).
inline int64_t kv_head(const Problem& p, int64_t h) {
    return h / (p.Hq / p.Hkv);
}

// Checks sizes, types and strides; throws gfa::Error naming `who` and the problem.
// Implemented in validate.cpp; every backend calls these before touching memory.
void validate(const Problem& p, const char* who);
void validate(const BackwardProblem& p, const char* who);

} // namespace gfa::attn
