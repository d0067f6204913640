#version 450
// mul_mat, tiled: dst[m, n] = sum_k src0[k, m] * src1[k, n] per matrix, src0 (the weights)
// of any type, decoded as tiles are loaded, src1 f32/f16/bf16, dst f32. A workgroup owns a
// BM x BN block of dst and walks K in steps of BK through shared memory; each invocation
// accumulates 4 x 4 results. Matrix (i2, i3) of src1 meets matrix (i2 / r2, i3 / r3) of src0.
#extension GL_GOOGLE_include_directive : require
const uint NT = 256, BM = 64, BN = 64, BK = 16;
layout(local_size_x = 256) in;

#include "op_common.glsl"

shared float As[BK][BM + 1]; // +1: rows of the tile start in different banks
shared float Bs[BK][BN + 1];

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint K = P.src0.ne.x, M = P.src0.ne.y, N = P.src1.ne.y;
    const uint m0 = gl_WorkGroupID.x * BM, n0 = gl_WorkGroupID.y * BN;
    const uint i2 = gl_WorkGroupID.z % P.dst.ne.z, i3 = gl_WorkGroupID.z / P.dst.ne.z;
    const uint a2 = i2 / P.iarg.x, a3 = i3 / P.iarg.y;
    const uint tx = tid % 16u, ty = tid / 16u; // results (m0 + tx + 16 i, n0 + ty + 16 j)

    float acc[4][4];
    for (uint i = 0u; i < 4u; ++i)
        for (uint j = 0u; j < 4u; ++j) acc[i][j] = 0.0;

    for (uint k0 = 0u; k0 < K; k0 += BK) {
        // Stage 1: the BK x BM tile of src0 and the BK x BN tile of src1 (zeros past the edges).
        for (uint e = tid; e < BK * BM; e += NT) {
            const uint m = e / BK, k = e % BK;
            As[k][m] = m0 + m < M && k0 + k < K ? src0_element(row_of(P.src0, m0 + m, a2, a3), k0 + k) : 0.0;
        }
        for (uint e = tid; e < BK * BN; e += NT) {
            const uint n = e / BK, k = e % BK;
            Bs[k][n] = n0 + n < N && k0 + k < K ? src1_element(row_of(P.src1, n0 + n, i2, i3), k0 + k) : 0.0;
        }
        barrier();
        // Stage 2: the tile's products.
        for (uint k = 0u; k < BK; ++k) {
            float a[4], b[4];
            for (uint i = 0u; i < 4u; ++i) a[i] = As[k][tx + 16u * i];
            for (uint j = 0u; j < 4u; ++j) b[j] = Bs[k][ty + 16u * j];
            for (uint i = 0u; i < 4u; ++i)
                for (uint j = 0u; j < 4u; ++j) acc[i][j] += a[i] * b[j];
        }
        barrier();
    }
    // Stage 3: the results inside dst.
    for (uint i = 0u; i < 4u; ++i)
        for (uint j = 0u; j < 4u; ++j) {
            const uint m = m0 + tx + 16u * i, n = n0 + ty + 16u * j;
            if (m < M && n < N) store_dst_at(m, n, i2, i3, acc[i][j]);
        }
}
