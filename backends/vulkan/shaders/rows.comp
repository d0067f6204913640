#version 450
// Ops over rows (dim 0), one workgroup per row (grid-stride over rows): the two
// normalizations, softmax with an optional mask, scale and ALiBi slope, and row sums and
// means. Each row is read
// twice or three times rather than kept in shared memory, so rows of any length work.
#extension GL_GOOGLE_include_directive : require
const uint NT = 128;
layout(local_size_x = 128) in;

#include "op_common.glsl"

// P.op (RowOp in vk_ops.cpp)
const uint OP_NORM = 0u, OP_RMS_NORM = 1u, OP_SOFT_MAX = 2u, OP_SUM_ROWS = 3u, OP_MEAN = 4u;

shared float partial[NT];

// The sum (or maximum) of every invocation's x, returned to all of them.
float workgroup_sum(float x) {
    const uint tid = gl_LocalInvocationID.x;
    barrier(); // the previous reduction's readers are done with `partial`
    partial[tid] = x;
    for (uint s = NT / 2u; s > 0u; s >>= 1) {
        barrier();
        if (tid < s) partial[tid] += partial[tid + s];
    }
    barrier();
    return partial[0];
}
float workgroup_max(float x) {
    const uint tid = gl_LocalInvocationID.x;
    barrier();
    partial[tid] = x;
    for (uint s = NT / 2u; s > 0u; s >>= 1) {
        barrier();
        if (tid < s) partial[tid] = max(partial[tid], partial[tid + s]);
    }
    barrier();
    return partial[0];
}

// ALiBi slope of head h: a table the host computed with attn::alibi_slope (src2), or 1.
float alibi_slope(uint h) {
    return P.iarg.y == 0u ? 1.0 : uintBitsToFloat(src2_words[h]);
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint n0 = P.src0.ne.x;
    const uint rows = P.dst.ne.y * P.dst.ne.z * P.dst.ne.w;
    for (uint r = gl_WorkGroupID.x; r < rows; r += gl_NumWorkGroups.x) {
        const uvec4 c = unflatten(r * P.dst.ne.x, P.dst.ne);
        const uint x_row = row_of(P.src0, c.y, c.z, c.w);
        const uint y_row = row_of(P.dst, c.y, c.z, c.w);
        if (P.op == OP_SOFT_MAX) {
            // farg.x = scale; the mask (src1) row is c.y, its dims 2 and 3 broadcast.
            const bool masked = P.iarg.z != 0u;
            const uint m_row = masked ? row_of(P.src1, c.y, c.z % P.src1.ne.z, c.w % P.src1.ne.w) : 0u;
            const float slope = alibi_slope(c.z);
            float m = uintBitsToFloat(0xff800000u); // -inf
            for (uint i = tid; i < n0; i += NT) {
                float s = src0_element(x_row, i) * P.farg.x;
                if (masked) s += slope * src1_element(m_row, i);
                m = max(m, s);
            }
            m = workgroup_max(m);
            const bool empty = isinf(m) && m < 0.0; // every entry -inf: the row is zeros
            float sum = 0.0;
            for (uint i = tid; i < n0; i += NT) {
                float s = src0_element(x_row, i) * P.farg.x;
                if (masked) s += slope * src1_element(m_row, i);
                sum += empty ? 0.0 : exp(s - m);
            }
            sum = workgroup_sum(sum);
            const float inv = sum > 0.0 ? 1.0 / sum : 0.0;
            for (uint i = tid; i < n0; i += NT) {
                float s = src0_element(x_row, i) * P.farg.x;
                if (masked) s += slope * src1_element(m_row, i);
                store_dst(y_row + i * P.dst.nb.x, empty ? 0.0 : exp(s - m) * inv);
            }
            continue;
        }
        if (P.op == OP_SUM_ROWS || P.op == OP_MEAN) {
            float s = 0.0;
            for (uint i = tid; i < n0; i += NT) s += src0_element(x_row, i);
            s = workgroup_sum(s);
            if (tid == 0u) store_dst(y_row, P.op == OP_MEAN ? s / float(n0) : s);
            continue;
        }
        // Normalizations: y = (x - mean) / sqrt(var + eps), or x / sqrt(mean(x^2) + eps).
        float mean = 0.0;
        if (P.op == OP_NORM) {
            float s = 0.0;
            for (uint i = tid; i < n0; i += NT) s += src0_element(x_row, i);
            mean = workgroup_sum(s) / float(n0);
        }
        float ss = 0.0;
        for (uint i = tid; i < n0; i += NT) {
            const float v = src0_element(x_row, i) - mean;
            ss += v * v;
        }
        const float inv_std = 1.0 / sqrt(workgroup_sum(ss) / float(n0) + P.farg.x);
        for (uint i = tid; i < n0; i += NT) store_dst(y_row + i * P.dst.nb.x, (src0_element(x_row, i) - mean) * inv_std);
    }
}
