// The int8 form in which the quantized matrix-vector products read their f32 columns
// (quant_matmul.h): each 32 consecutive values of a column as q = round(v / d) with d =
// max |v| / 127, and per block (d, d * sum of q). One definition for every kernel that writes
// such blocks (the products' own rounding launch, the pre-norm and the decoding attention in
// front of a product), so that all of them write the same bits.
#pragma once

#include <cstdint>

namespace gfa::cuda {

// 32 values, one per lane of a warp (lane l holds value l): q_block[lane] and *ds_block. The
// whole warp calls it.
__device__ __forceinline__ void round_block_to_int8(float v, int lane, int8_t* q_block, float2* ds_block) {
    float amax = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
    const int qv = max(-127, min(127, __float2int_rn(v * inv)));
    q_block[lane] = int8_t(qv);
    // The sum of the rounded values (exact in float: at most 32 * 127): with it, an offset
    // term sees the same x as the integer term, so the error stays sum_k w_k (x~_k - x_k).
    // The sum of the exact x would leave d q_k (up to twice w_k) multiplying the rounding.
    int sum = qv;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) *ds_block = make_float2(d, d * float(sum));
}

// The same for 32 values held 4 to a lane by 8 consecutive lanes (lane & 7 = j holds values
// 4 j .. 4 j + 3), the group aligned to 8 lanes and wholly active. The bits are those of
// round_block_to_int8: the maximum does not depend on the order, nor does the integer sum.
// q4 gets the lane's 4 values.
__device__ __forceinline__ void round_quad_block_to_int8(const float (&v)[4], int lane, int8_t* q4,
                                                         float2* ds_block) {
    const unsigned group = 0xffu << (lane & 24);
    float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
    for (int o = 1; o < 8; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(group, amax, o));
    const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
    int qv[4], sum = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        qv[k] = max(-127, min(127, __float2int_rn(v[k] * inv)));
        sum += qv[k];
    }
    *reinterpret_cast<char4*>(q4) = make_char4(char(qv[0]), char(qv[1]), char(qv[2]), char(qv[3]));
    for (int o = 1; o < 8; o <<= 1) sum += __shfl_xor_sync(group, sum, o);
    if ((lane & 7) == 0) *ds_block = make_float2(d, d * float(sum));
}

} // namespace gfa::cuda
