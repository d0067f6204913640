#version 450
// flash_attn_ext backward, dK and dV: a workgroup owns BC keys of one kv head and walks the
// query tiles (of every query head in its GQA group) that can see them, so the sums over
// queries and heads stay in registers and no two workgroups write the same gradient: the
// result does not depend on scheduling (deterministic by construction).
#extension GL_GOOGLE_include_directive : require

layout(constant_id = 0) const uint DMAX = 64;
layout(constant_id = 1) const uint BR = 16; // query rows per step
layout(constant_id = 2) const uint BC = 16; // keys per workgroup
const uint NT = 128;
layout(local_size_x = 128) in;

#include "fa_common.glsl"

const uint TPK = NT / BC;    // invocations per key
const uint DPT = DMAX / TPK; // gradient dims per invocation

shared float Qs[BR * DMAX], dOs[BR * DMAX], Ks[BC * DMAX], Vs[BC * DMAX];
shared float Ps[BR * BC], dSs[BR * BC];
shared float row_lse[BR], row_D[BR];

#include "fa_backward_pair.glsl"

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint j0 = gl_WorkGroupID.x * BC;
    const uint hk = gl_WorkGroupID.y, b = gl_WorkGroupID.z;
    const uint cols = min(BC, P.Skv - j0);

    load_key_tile(j0, cols, hk, b, tid);
    const uint my_key = tid / TPK, lane = tid % TPK;
    float dk[DPT], dv[DPT];
    for (uint k = 0; k < DPT; ++k) {
        dk[k] = 0.0;
        dv[k] = 0.0;
    }

    const uvec2 rows_seen = row_range(j0, j0 + cols - 1u);
    for (uint h = hk * P.group_size; h < (hk + 1u) * P.group_size; ++h) {
        const float slope = alibi_slope(h);
        for (uint i0 = rows_seen.x - rows_seen.x % BR; i0 < rows_seen.y; i0 += BR) {
            const uint rows = min(BR, P.Sq - i0);
            barrier(); // the previous step is done with the query tile and Ps/dSs
            load_query_tile(i0, rows, h, b, tid);
            barrier();

            // Stage 1: P and dS of every pair of the step.
            for (uint e = tid; e < BR * BC; e += NT) {
                const uint r = e / BC, c = e % BC;
                float p, ds;
                if (r < rows && c < cols) pair_gradient(r, c, i0 + r, j0 + c, h, b, slope, p, ds);
                else {
                    p = 0.0;
                    ds = 0.0;
                }
                Ps[e] = p;
                dSs[e] = ds;
            }
            barrier();

            // Stage 2: dV += P^T dO, dK += dS^T Q.
            for (uint k = 0; k < DPT; ++k) {
                const uint d = lane + k * TPK;
                float sv = 0.0, sk = 0.0;
                for (uint r = 0; r < BR; ++r) {
                    if (d < P.Dv) sv += Ps[r * BC + my_key] * dOs[r * DMAX + d];
                    if (d < P.Dk) sk += dSs[r * BC + my_key] * Qs[r * DMAX + d];
                }
                dv[k] += sv;
                dk[k] += sk;
            }
        }
    }

    // Stage 3: write this tile's dK and dV (f32, dense [D, Skv, Hkv, B]); keys no query sees
    // get zeros.
    if (my_key < cols) {
        const uint j = j0 + my_key;
        for (uint k = 0; k < DPT; ++k) {
            const uint d = lane + k * TPK;
            if (d < P.Dk) grad_words[P.dk_off + ((b * P.Hkv + hk) * P.Skv + j) * P.Dk + d] = floatBitsToUint(dk[k]);
            if (d < P.Dv) grad_words[P.dv_off + ((b * P.Hkv + hk) * P.Skv + j) * P.Dv + d] = floatBitsToUint(dv[k]);
        }
    }
}
