#version 450
// mul_mat_id, a matrix-vector product per column: dst[:, s, t] = src0[:, :, e]^T . src1[:, s
// (0 when src1 has one column per token), t] with e = src2[s, t], the expert token t chose in
// slot s. Workgroup row y of the grid is one (slot, token) column (columns beyond the grid
// are walked grid-stride); within it, as in mul_mat_vec.comp, each subgroup owns one row m of
// the expert's matrix at a time, its invocations splitting K, and the partial sums meet in
// one subgroupAdd, with no shared memory and no barrier. An expert id outside [0, E) is
// reported through the status word and its column becomes NaN; nothing outside the tensors
// is read.
//
// Every column decodes its expert's weights on its own, so a prompt decodes each expert once
// per token that chose it. Grouping a prompt's columns by expert (as the CPU kernel does)
// would decode each expert once and give crowded experts the tiled shader: a later
// improvement. Decoding steps, one column per slot, are what this shader is for.
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
layout(local_size_x = 128) in;

#include "op_common.glsl"

void main() {
    const uint lane = gl_SubgroupInvocationID, width = gl_SubgroupSize;
    const uint K = P.src0.ne.x, M = P.src0.ne.y, E = P.src0.ne.z;
    const uint slots = P.src2.ne.x, columns = slots * P.src2.ne.y;
    const uint first_row = gl_WorkGroupID.x * gl_NumSubgroups + gl_SubgroupID;
    const uint row_stride = gl_NumWorkGroups.x * gl_NumSubgroups;
    const bool b_packed = P.src1.nb.x == 4u; // src1 is f32 (the op requires it)
    // Packed f16 experts in whole words (rows of even length starting on a word) are read a
    // word, two weights, at a time.
    const bool a_f16_pairs = P.src0.type == T_F16 && P.src0.nb.x == 2u && K % 2u == 0u &&
                             P.src0.off % 4u == 0u && P.src0.nb.y % 4u == 0u && P.src0.nb.z % 4u == 0u;
    for (uint c = gl_WorkGroupID.y; c < columns; c += gl_NumWorkGroups.y) {
        const uint s = c % slots, t = c / slots;
        const int e = int(src2_words[byte_of(P.src2, s, t, 0u, 0u) >> 2]);
        if (e < 0 || uint(e) >= E) { // the same for the whole workgroup
            if (gl_WorkGroupID.x == 0u && gl_LocalInvocationID.x == 0u) report_expert(e, t, E);
            for (uint m = first_row; m < M; m += row_stride)
                if (lane == 0u) store_dst_at(m, s, t, 0u, uintBitsToFloat(0x7fc00000u));
            continue;
        }
        const uint b_row = row_of(P.src1, P.src1.ne.y == 1u ? 0u : s, t, 0u);
        for (uint m = first_row; m < M; m += row_stride) {
            const uint a_row = row_of(P.src0, m, uint(e), 0u);
            float acc = 0.0;
            if (b_packed && a_f16_pairs) {
                for (uint k2 = lane; k2 < K / 2u; k2 += width) {
                    const vec2 a = unpackHalf2x16(src0_words[(a_row >> 2) + k2]);
                    const uint at = (b_row >> 2) + 2u * k2;
                    acc += a.x * uintBitsToFloat(src1_words[at]) + a.y * uintBitsToFloat(src1_words[at + 1u]);
                }
            } else if (b_packed) {
                for (uint k = lane; k < K; k += width)
                    acc += src0_element(a_row, k) * uintBitsToFloat(src1_words[(b_row >> 2) + k]);
            } else {
                for (uint k = lane; k < K; k += width) acc += src0_element(a_row, k) * src1_element(b_row, k);
            }
            const float sum = subgroupAdd(acc);
            if (lane == 0u) store_dst_at(m, s, t, 0u, sum);
        }
    }
}
