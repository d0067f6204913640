#version 450
// flash_attn_ext backward, the sinks' gradient: a sink is a logit with a zero value, so
// dSink_h = -sum over the head's rows of P_sink D_i with P_sink = exp(sink_h - LSE_i). One
// workgroup per head sums in a fixed order (deterministic).
#extension GL_GOOGLE_include_directive : require

layout(local_size_x = 128) in;

#include "fa_common.glsl"

shared float partial[128];

void main() {
    const uint tid = gl_LocalInvocationID.x, h = gl_WorkGroupID.x;
    const float sink = sink_logit(h);
    float sum = 0.0;
    for (uint n = tid; n < P.B * P.Sq; n += 128u) {
        const uint b = n / P.Sq, i = n % P.Sq;
        const float lse = load_lse(i, h, b);
        if (lse == NEG_INF) continue;
        sum += exp(sink - lse) * uintBitsToFloat(rowD_words[P.rowD_off + (b * P.Hq + h) * P.Sq + i]);
    }
    partial[tid] = sum;
    barrier();
    for (uint stride = 64u; stride > 0u; stride >>= 1) {
        if (tid < stride) partial[tid] += partial[tid + stride];
        barrier();
    }
    if (tid == 0u) grad_words[P.dsinks_off + h] = floatBitsToUint(-partial[0]);
}
