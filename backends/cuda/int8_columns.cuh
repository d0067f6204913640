// The int8 form in which the quantized matrix-vector products read their f32 columns
// (quant_matmul.h): each 32 consecutive values of a column as q = round(v / d) with d =
// max |v| / 127, and per block (d, d * sum of q). One definition for every kernel that writes
// such blocks (the products' own rounding launch and the pre-norm in front of a product), so
// that all of them write the same bits.
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

} // namespace gfa::cuda
