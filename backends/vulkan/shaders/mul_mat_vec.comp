#version 450
// mul_mat for a few columns (decoding): one workgroup per row m of src0 and matrix of dst,
// its invocations splitting K; each weight is decoded once and meets every column of src1
// (at most NCOLS), then the partial sums meet in shared memory. Rows beyond the workgroup
// limit are walked grid-stride.
#extension GL_GOOGLE_include_directive : require
const uint NT = 64, NCOLS = 8;
layout(local_size_x = 64) in;

#include "op_common.glsl"

shared float partial[NCOLS][NT];

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint K = P.src0.ne.x, M = P.src0.ne.y, N = P.src1.ne.y;
    const uint i2 = gl_WorkGroupID.y % P.dst.ne.z, i3 = gl_WorkGroupID.y / P.dst.ne.z;
    const uint a2 = i2 / P.iarg.x, a3 = i3 / P.iarg.y;
    for (uint m = gl_WorkGroupID.x; m < M; m += gl_NumWorkGroups.x) {
        const uint a_row = row_of(P.src0, m, a2, a3);
        float acc[NCOLS];
        for (uint n = 0u; n < NCOLS; ++n) acc[n] = 0.0;
        for (uint k = tid; k < K; k += NT) {
            const float a = src0_element(a_row, k);
            for (uint n = 0u; n < N; ++n) acc[n] += a * src1_element(row_of(P.src1, n, i2, i3), k);
        }
        for (uint n = 0u; n < N; ++n) partial[n][tid] = acc[n];
        for (uint s = NT / 2u; s > 0u; s >>= 1) {
            barrier();
            if (tid < s)
                for (uint n = 0u; n < N; ++n) partial[n][tid] += partial[n][tid + s];
        }
        barrier();
        if (tid < N) store_dst_at(m, tid, i2, i3, partial[tid][0]);
        barrier(); // the next row reuses `partial`
    }
}
