#version 450
// One AdamW step in place, one invocation per element: dst is the parameter (read, then
// written), src0 its gradient, src1 and src2 the moments m and v (read, then written).
// The step's values (adamw_values: lr, beta1, beta2, eps, weight decay, 1 - beta1^t,
// 1 - beta2^t, grad_clip) are an f32 tensor bound as the table, starting at word iarg.x.
// With iarg.z = 1, the extra binding holds the squared global gradient norm at word iarg.y: above
// grad_clip's square, every gradient is scaled by grad_clip / norm.
#extension GL_GOOGLE_include_directive : require
layout(local_size_x = 256) in;

#define GFA_WRITABLE_SOURCES
#include "op_common.glsl"

void main() {
    const uint a = P.iarg.x;
    const float lr = uintBitsToFloat(table_words[a]), beta1 = uintBitsToFloat(table_words[a + 1]);
    const float beta2 = uintBitsToFloat(table_words[a + 2]), eps = uintBitsToFloat(table_words[a + 3]);
    const float decay = uintBitsToFloat(table_words[a + 4]);
    const float c1 = uintBitsToFloat(table_words[a + 5]), c2 = uintBitsToFloat(table_words[a + 6]);
    const float limit = uintBitsToFloat(table_words[a + 7]);
    float clip = 1.0;
    if (P.iarg.z == 1u) {
        const float norm_sq = uintBitsToFloat(extra_words[P.iarg.y]);
        if (limit > 0.0 && norm_sq > limit * limit) clip = limit / sqrt(norm_sq);
    }
    for (uint k = invocation(); k < P.n; k += n_invocations()) {
        const uvec4 d = unflatten(k, P.dst.ne);
        const float g = clip * src0_at(d.x, d.y, d.z, d.w);
        const uint m_at = byte_of(P.src1, d.x, d.y, d.z, d.w), v_at = byte_of(P.src2, d.x, d.y, d.z, d.w);
        const float m = beta1 * uintBitsToFloat(src1_words[m_at >> 2]) + (1.0 - beta1) * g;
        const float v = beta2 * uintBitsToFloat(src2_words[v_at >> 2]) + (1.0 - beta2) * g * g;
        src1_words[m_at >> 2] = floatBitsToUint(m);
        src2_words[v_at >> 2] = floatBitsToUint(v);
        const uint w_at = byte_of(P.dst, d.x, d.y, d.z, d.w);
        const float w = uintBitsToFloat(dst_words[w_at >> 2]);
        dst_words[w_at >> 2] = floatBitsToUint(w - lr * ((m / c1) / (sqrt(v / c2) + eps) + decay * w));
    }
}
