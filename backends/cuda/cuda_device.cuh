// Device-side helpers for the kernel files: element access by type, index decoding, and
// warp/block reductions. Plain functions, no templates beyond what the reductions need.
#pragma once

#include "cuda_common.h"
#include "quant_blocks.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace gfa::cuda {

inline constexpr int kTypeF32 = int(Type::F32);
inline constexpr int kTypeF16 = int(Type::F16);
inline constexpr int kTypeBF16 = int(Type::BF16);
inline constexpr int kTypeI32 = int(Type::I32);
inline constexpr int kTypeI64 = int(Type::I64);
inline constexpr int kTypeQ8_0 = int(Type::Q8_0);
inline constexpr int kTypeQ4_0 = int(Type::Q4_0);

// Byte offset of element (i0, i1, i2, i3).
__device__ __forceinline__ int64_t offset_of(const TensorView& t, int64_t i0, int64_t i1, int64_t i2,
                                             int64_t i3) {
    return i0 * t.nb[0] + i1 * t.nb[1] + i2 * t.nb[2] + i3 * t.nb[3];
}

// Splits a flat row-major index (dim 0 fastest) into four indices over `ne`.
__device__ __forceinline__ void unflatten(int64_t flat, const int64_t* ne, int64_t& i0, int64_t& i1,
                                          int64_t& i2, int64_t& i3) {
    i0 = flat % ne[0];
    flat /= ne[0];
    i1 = flat % ne[1];
    flat /= ne[1];
    i2 = flat % ne[2];
    i3 = flat / ne[2];
}

__device__ __forceinline__ float half_bits_to_float(uint16_t bits) {
    return __half2float(__ushort_as_half(bits));
}

// Reads element (i0, ...) of a plain (non-block) type as float.
__device__ __forceinline__ float load_plain(const char* p, int type) {
    switch (type) {
    case kTypeF32:
        return *reinterpret_cast<const float*>(p);
    case kTypeF16:
        return __half2float(*reinterpret_cast<const __half*>(p));
    case kTypeBF16:
        return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p));
    case kTypeI32:
        return float(*reinterpret_cast<const int32_t*>(p));
    default:
        return __int_as_float(0x7fc00000); // NaN: unsupported types never get here
    }
}

__device__ __forceinline__ void store_plain(char* p, int type, float v) {
    switch (type) {
    case kTypeF32:
        *reinterpret_cast<float*>(p) = v;
        break;
    case kTypeF16:
        *reinterpret_cast<__half*>(p) = __float2half_rn(v);
        break;
    case kTypeBF16:
        *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v);
        break;
    case kTypeI32:
        *reinterpret_cast<int32_t*>(p) = int32_t(v);
        break;
    default:
        break;
    }
}

// Element (i0, i1, i2, i3) of any readable type (quantized rows must be packed).
__device__ __forceinline__ float load_any(const TensorView& t, int64_t i0, int64_t i1, int64_t i2,
                                          int64_t i3) {
    switch (t.type) {
    case kTypeF32:
    case kTypeF16:
    case kTypeBF16:
    case kTypeI32:
        return load_plain(t.data + offset_of(t, i0, i1, i2, i3), t.type);
    default:
        return dequantize_element(t.type, t.data + offset_of(t, 0, i1, i2, i3), t.ne[0], i0);
    }
}

__device__ __forceinline__ float load_f32(const TensorView& t, int64_t i0, int64_t i1, int64_t i2,
                                          int64_t i3) {
    return *reinterpret_cast<const float*>(t.data + offset_of(t, i0, i1, i2, i3));
}
__device__ __forceinline__ float* f32_ptr(const TensorView& t, int64_t i0, int64_t i1, int64_t i2,
                                          int64_t i3) {
    return reinterpret_cast<float*>(t.data + offset_of(t, i0, i1, i2, i3));
}

// ---- reductions -----------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the result. `shared` holds 32 floats. Safe to call repeatedly in one kernel.
__device__ __forceinline__ float block_sum(float v, float* shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads(); // the previous call's readers are done with `shared`
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < n_warps ? shared[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < n_warps ? shared[lane] : -INFINITY;
    return warp_max(v);
}

// Threads per block for a kernel that gives one block to each row of n elements.
inline int row_block_threads(int64_t n) {
    int t = 32;
    while (t < 256 && t < n) t *= 2;
    return t;
}

__device__ __forceinline__ float sigmoid(float x) {
    return 1.0f / (1.0f + expf(-x));
}
// silu(gate) * up: the swiglu op, and the fused gate/up product's epilogue (one definition,
// so both give the same bits).
__device__ __forceinline__ float swiglu_value(float gate, float up) {
    return gate * sigmoid(gate) * up;
}

// Reports a kernel-side error to the host (first writer wins), with numbers for its message
// (only the first writer's are kept).
__device__ __forceinline__ void report_error(int32_t* flag, int32_t code, int32_t a = 0, int32_t b = 0,
                                             int32_t c = 0) {
    if (flag && atomicCAS(flag, 0, code) == 0) flag[1] = a, flag[2] = b, flag[3] = c;
}

} // namespace gfa::cuda
