#version 450
// flash_attn_ext backward, dQ: a workgroup owns BR query rows of one head and walks the key
// tiles they can see, recomputing P and dS (as the dK/dV shader does) and summing dS K in
// registers. No atomics: one workgroup writes each row of dQ.
#extension GL_GOOGLE_include_directive : require

layout(constant_id = 0) const uint DMAX = 64;
layout(constant_id = 1) const uint BR = 16; // query rows per workgroup
layout(constant_id = 2) const uint BC = 16; // keys per step
const uint NT = 128;
layout(local_size_x = 128) in;

#include "fa_common.glsl"

const uint TPR = NT / BR;
const uint DPT = DMAX / TPR;

shared float Qs[BR * DMAX], dOs[BR * DMAX], Ks[BC * DMAX], Vs[BC * DMAX];
shared float dSs[BR * BC];
shared float row_lse[BR], row_D[BR];

#include "fa_backward_pair.glsl"

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint i0 = gl_WorkGroupID.x * BR;
    const uint h = gl_WorkGroupID.y, b = gl_WorkGroupID.z;
    const uint hk = h / P.group_size;
    const uint rows = min(BR, P.Sq - i0);
    const float slope = alibi_slope(h);

    load_query_tile(i0, rows, h, b, tid);
    const uint my_row = tid / TPR, lane = tid % TPR;
    float dq[DPT];
    for (uint k = 0; k < DPT; ++k) dq[k] = 0.0;

    const uvec2 keys = key_range(i0, i0 + rows - 1u);
    for (uint j0 = keys.x - keys.x % BC; j0 < keys.y; j0 += BC) {
        const uint cols = min(BC, P.Skv - j0);
        barrier(); // the previous step is done with the key tile and dSs
        load_key_tile(j0, cols, hk, b, tid);
        barrier();

        // Stage 1: dS of every pair of the step.
        for (uint e = tid; e < BR * BC; e += NT) {
            const uint r = e / BC, c = e % BC;
            float p, ds = 0.0;
            if (r < rows && c < cols) pair_gradient(r, c, i0 + r, j0 + c, h, b, slope, p, ds);
            dSs[e] = ds;
        }
        barrier();

        // Stage 2: dQ += dS K.
        for (uint k = 0; k < DPT; ++k) {
            const uint d = lane + k * TPR;
            if (d >= P.Dk) break;
            float s = 0.0;
            for (uint c = 0; c < BC; ++c) s += dSs[my_row * BC + c] * Ks[c * DMAX + d];
            dq[k] += s;
        }
    }

    // Stage 3: write dQ (f32, dense [Dk, Sq, Hq, B]); rows that saw nothing get zeros.
    if (my_row < rows) {
        const uint i = i0 + my_row;
        for (uint k = 0; k < DPT; ++k) {
            const uint d = lane + k * TPR;
            if (d >= P.Dk) break;
            grad_words[P.dq_off + ((b * P.Hq + h) * P.Sq + i) * P.Dk + d] = floatBitsToUint(dq[k]);
        }
    }
}
