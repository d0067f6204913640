#version 450
// Ops over rows (dim 0), one workgroup per row (grid-stride over rows): the two
// normalizations and their backward ops, softmax with an optional mask, scale and ALiBi
// slope and its backward, row sums and means, and the cross-entropy loss's backward. The
// whole-tensor reductions (sum, the cross-entropy loss) run in one workgroup. Each row is read
// twice or three times rather than kept in shared memory, so rows of any length work.
#extension GL_GOOGLE_include_directive : require
const uint NT = 128;
layout(local_size_x = 128) in;

#include "op_common.glsl"

// P.op (RowOp in vk_ops.cpp)
const uint OP_NORM = 0u, OP_RMS_NORM = 1u, OP_SOFT_MAX = 2u, OP_SUM_ROWS = 3u, OP_MEAN = 4u, OP_SUM = 5u,
           OP_NORM_BACK = 6u, OP_RMS_NORM_BACK = 7u, OP_SOFT_MAX_BACK = 8u, OP_CE_LOSS = 9u,
           OP_CE_LOSS_BACK = 10u;

shared float partial[NT];
shared float partial_lo[NT];

// hi + lo += x without losing the low bits (Neumaier's compensated summation).
void add_compensated(inout float hi, inout float lo, float x) {
    precise float s = hi + x;
    precise float err = abs(hi) >= abs(x) ? (hi - s) + x : (x - s) + hi;
    hi = s;
    lo += err;
}

// The sum of every invocation's hi + lo, the partial sums combined with their rounding errors
// carried along, so that sums of many terms of either sign (a loss) keep about the accuracy
// of a double-precision sum. Returned to all invocations.
float workgroup_sum_compensated(float hi, float lo) {
    const uint tid = gl_LocalInvocationID.x;
    barrier();
    partial[tid] = hi;
    partial_lo[tid] = lo;
    for (uint s = NT / 2u; s > 0u; s >>= 1) {
        barrier();
        if (tid < s) {
            float h = partial[tid], l = partial_lo[tid] + partial_lo[tid + s];
            add_compensated(h, l, partial[tid + s]);
            partial[tid] = h;
            partial_lo[tid] = l;
        }
    }
    barrier();
    return partial[0] + partial_lo[0];
}

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

// ALiBi slope of head h: a table the host computed with attn::alibi_slope, or 1.
float alibi_slope(uint h) {
    return P.iarg.y == 0u ? 1.0 : uintBitsToFloat(table_words[h]);
}

// The cross-entropy ops' labels as i32 classes (src2 [rows...]): row (i1, i2, i3)'s class, or
// -1 (reported) when it lies outside the n0 logits.
int label_class(uint i1, uint i2, uint i3, uint n0) {
    const int t = int(src2_words[byte_of(P.src2, i1, i2, i3, 0u) >> 2]);
    if (t < 0 || uint(t) >= n0) {
        report(STATUS_CLASS_OUT_OF_RANGE);
        return -1;
    }
    return t;
}

// log(sum(exp(row))) of the row of src1 at byte `row` (the logits of the cross-entropy ops).
float row_logsumexp(uint row, uint n0) {
    const uint tid = gl_LocalInvocationID.x;
    float m = uintBitsToFloat(0xff800000u);
    for (uint i = tid; i < n0; i += NT) m = max(m, src1_element(row, i));
    m = workgroup_max(m);
    float s = 0.0;
    for (uint i = tid; i < n0; i += NT) s += exp(src1_element(row, i) - m);
    return m + log(workgroup_sum(s));
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    if (P.op == OP_SUM) { // every element of src0, in any layout
        float hi = 0.0, lo = 0.0;
        for (uint k = tid; k < P.n; k += NT) {
            const uvec4 c = unflatten(k, P.src0.ne);
            add_compensated(hi, lo, src0_at(c.x, c.y, c.z, c.w));
        }
        const float s = workgroup_sum_compensated(hi, lo);
        if (tid == 0u) store_dst(P.dst.off, s);
        return;
    }
    if (P.op == OP_CE_LOSS) { // src1 = logits, src2 = labels: mean over rows of -labels . log_softmax
        const uint n0 = P.src1.ne.x, rows = P.src1.ne.y * P.src1.ne.z * P.src1.ne.w;
        float total = 0.0, total_lo = 0.0; // kept by every invocation alike
        for (uint r = 0u; r < rows; ++r) {
            const uvec4 c = unflatten(r * n0, P.src1.ne);
            const uint x_row = row_of(P.src1, c.y, c.z, c.w), l_row = row_of(P.src2, c.y, c.z, c.w);
            const float lse = row_logsumexp(x_row, n0);
            if (P.src2.type == T_I32) { // a class per row: lse - x[class], the same in every invocation
                const int t = label_class(c.y, c.z, c.w, n0);
                if (t >= 0) add_compensated(total, total_lo, lse - src1_element(x_row, uint(t)));
                continue;
            }
            float hi = 0.0, lo = 0.0;
            for (uint i = tid; i < n0; i += NT)
                add_compensated(hi, lo, src2_element(l_row, i) * (src1_element(x_row, i) - lse));
            add_compensated(total, total_lo, -workgroup_sum_compensated(hi, lo));
        }
        if (tid == 0u) store_dst(P.dst.off, (total + total_lo) / float(rows));
        return;
    }
    const uint n0 = P.op == OP_CE_LOSS_BACK ? P.dst.ne.x : P.src0.ne.x; // the row length
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
        if (P.op == OP_CE_LOSS_BACK) {
            // src0 = the loss's gradient, src1 = logits, src2 = labels:
            // (softmax(x) * sum(labels) - labels) * grad / rows.
            const uint l_row = row_of(P.src2, c.y, c.z, c.w), x_row2 = row_of(P.src1, c.y, c.z, c.w);
            const float lse = row_logsumexp(x_row2, n0);
            const float g = src0_element(P.src0.off, 0u) / float(rows);
            if (P.src2.type == T_I32) { // one-hot at the row's class
                const int t = label_class(c.y, c.z, c.w, n0);
                for (uint i = tid; i < n0; i += NT)
                    store_dst(y_row + i * P.dst.nb.x,
                              (exp(src1_element(x_row2, i) - lse) - (int(i) == t ? 1.0 : 0.0)) * g);
                continue;
            }
            float ls = 0.0;
            for (uint i = tid; i < n0; i += NT) ls += src2_element(l_row, i);
            ls = workgroup_sum(ls);
            for (uint i = tid; i < n0; i += NT)
                store_dst(y_row + i * P.dst.nb.x,
                          (exp(src1_element(x_row2, i) - lse) * ls - src2_element(l_row, i)) * g);
            continue;
        }
        if (P.op == OP_SOFT_MAX_BACK) { // src0 = dy, src1 = y: scale * y * (dy - dy . y)
            const uint dy_row = x_row, yy_row = row_of(P.src1, c.y, c.z, c.w);
            float dot = 0.0;
            for (uint i = tid; i < n0; i += NT) dot += src0_element(dy_row, i) * src1_element(yy_row, i);
            dot = workgroup_sum(dot);
            for (uint i = tid; i < n0; i += NT) {
                const float yv = src1_element(yy_row, i);
                store_dst(y_row + i * P.dst.nb.x, P.farg.x * yv * (src0_element(dy_row, i) - dot));
            }
            continue;
        }
        if (P.op == OP_NORM_BACK || P.op == OP_RMS_NORM_BACK) {
            // src0 = dy, src1 = x: dx = inv_std (dy - mean(dy) - y mean(dy y)), y = (x - mean) inv_std
            // (no mean terms for RMS).
            const bool centered = P.op == OP_NORM_BACK;
            const uint dy_row = x_row, xx_row = row_of(P.src1, c.y, c.z, c.w);
            float mean = 0.0;
            if (centered) {
                float s = 0.0;
                for (uint i = tid; i < n0; i += NT) s += src1_element(xx_row, i);
                mean = workgroup_sum(s) / float(n0);
            }
            float ss = 0.0;
            for (uint i = tid; i < n0; i += NT) {
                const float v = src1_element(xx_row, i) - mean;
                ss += v * v;
            }
            const float inv_std = 1.0 / sqrt(workgroup_sum(ss) / float(n0) + P.farg.x);
            float sdy = 0.0, sdyy = 0.0;
            for (uint i = tid; i < n0; i += NT) {
                const float dy = src0_element(dy_row, i);
                sdy += dy;
                sdyy += dy * (src1_element(xx_row, i) - mean) * inv_std;
            }
            const float mean_dy = centered ? workgroup_sum(sdy) / float(n0) : 0.0;
            const float mean_dy_y = workgroup_sum(sdyy) / float(n0);
            for (uint i = tid; i < n0; i += NT) {
                const float y = (src1_element(xx_row, i) - mean) * inv_std;
                store_dst(y_row + i * P.dst.nb.x, inv_std * (src0_element(dy_row, i) - mean_dy - y * mean_dy_y));
            }
            continue;
        }
        if (P.op == OP_SUM_ROWS || P.op == OP_MEAN) {
            float hi = 0.0, lo = 0.0;
            for (uint i = tid; i < n0; i += NT) add_compensated(hi, lo, src0_element(x_row, i));
            const float s = workgroup_sum_compensated(hi, lo);
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
