#version 450
// mul_mat for a few columns (decoding): each subgroup owns one row m of src0 at a time, its
// invocations splitting K; each weight is decoded once and meets every column of src1 (at
// most NCOLS), and the subgroup's partial sums meet in one subgroupAdd per column, with no
// shared memory and no barrier. A workgroup holds as many rows as it has subgroups; rows
// beyond the workgroup limit are walked grid-stride.
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
const uint NCOLS = 8;
layout(local_size_x = 128) in;

#include "op_common.glsl"

void main() {
    const uint lane = gl_SubgroupInvocationID, width = gl_SubgroupSize;
    const uint K = P.src0.ne.x, M = P.src0.ne.y, N = P.src1.ne.y;
    const uint i2 = gl_WorkGroupID.y % P.dst.ne.z, i3 = gl_WorkGroupID.y / P.dst.ne.z;
    const uint a2 = i2 / P.iarg.x, a3 = i3 / P.iarg.y;
    uint b_rows[NCOLS];
    for (uint n = 0u; n < N; ++n) b_rows[n] = row_of(P.src1, n, i2, i3);
    const uint stride = gl_NumWorkGroups.x * gl_NumSubgroups;
    const bool b_packed_f32 = P.src1.type == T_F32 && P.src1.nb.x == 4u;
    // Packed f16 weights in whole words (rows of even length starting on a word) are read a
    // word, two weights, at a time.
    const bool a_f16_pairs = P.src0.type == T_F16 && P.src0.nb.x == 2u && K % 2u == 0u &&
                             P.src0.off % 4u == 0u && P.src0.nb.y % 4u == 0u && P.src0.nb.z % 4u == 0u &&
                             P.src0.nb.w % 4u == 0u;
    for (uint m = gl_WorkGroupID.x * gl_NumSubgroups + gl_SubgroupID; m < M; m += stride) {
        const uint a_row = row_of(P.src0, m, a2, a3);
        float acc[NCOLS];
        for (uint n = 0u; n < NCOLS; ++n) acc[n] = 0.0;
        if (b_packed_f32 && a_f16_pairs) {
            for (uint k2 = lane; k2 < K / 2u; k2 += width) {
                const vec2 a = unpackHalf2x16(src0_words[(a_row >> 2) + k2]);
                for (uint n = 0u; n < N; ++n) {
                    const uint at = (b_rows[n] >> 2) + 2u * k2;
                    acc[n] += a.x * uintBitsToFloat(src1_words[at]) + a.y * uintBitsToFloat(src1_words[at + 1u]);
                }
            }
        } else if (b_packed_f32) {
            for (uint k = lane; k < K; k += width) {
                const float a = src0_element(a_row, k);
                for (uint n = 0u; n < N; ++n) acc[n] += a * uintBitsToFloat(src1_words[(b_rows[n] >> 2) + k]);
            }
        } else {
            for (uint k = lane; k < K; k += width) {
                const float a = src0_element(a_row, k);
                for (uint n = 0u; n < N; ++n) acc[n] += a * src1_element(b_rows[n], k);
            }
        }
        for (uint n = 0u; n < N; ++n) {
            const float sum = subgroupAdd(acc[n]);
            if (lane == 0u) store_dst_at(m, n, i2, i3, sum);
        }
    }
}
