// How the matrix-vector kernels (16-bit and quantized weights) share rows among the warps
// of a block. A long row is split over `split` warps (1, 2 or 4) so that every lane has its
// whole part of the row in flight at once; short rows keep one warp each.
#pragma once

#include "cuda_device.cuh"

namespace gfa::cuda {

// Warp w of a block of kWarps works on slice w % split of row block * (kWarps / split) +
// w / split. A lane's units (16-byte chunks, quant items) are first, first + stride, ...
struct RowSlice {
    int64_t row;
    int slice;  // 0 .. split-1
    int first;  // the lane's first unit
    int stride; // 32 * split: units between a lane's consecutive ones
};

template <int kWarps> __device__ __forceinline__ RowSlice row_slice(int split) {
    const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
    const int slice = warp % split;
    return {int64_t(blockIdx.x) * (kWarps / split) + warp / split, slice, slice * 32 + lane, 32 * split};
}

// Adds a row's partial sums (per column) across its slices, in slice order, and writes them
// to dst(row, c). Every thread of the block calls it (it synchronizes when split > 1).
template <int kWarps, int NC>
__device__ __forceinline__ void write_row_sums(float (&acc)[NC], int n_cols, const RowSlice& rs, int split,
                                               bool has_row, const TensorView& dst, int64_t i2, int64_t i3) {
    __shared__ float partial[kWarps][NC];
    const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        if (c >= n_cols) break;
        const float s = has_row ? warp_sum(acc[c]) : 0.0f;
        if (split == 1) {
            if (has_row && lane == 0) *f32_ptr(dst, rs.row, c, i2, i3) = s;
        } else if (lane == 0) {
            partial[warp][c] = s;
        }
    }
    if (split == 1) return; // the same for the whole block
    __syncthreads();
    if (has_row && rs.slice == 0 && lane < n_cols) {
        float total = 0.0f;
        for (int j = 0; j < split; ++j) total += partial[warp + j][lane];
        *f32_ptr(dst, rs.row, lane, i2, i3) = total;
    }
}

// The smallest split (1, 2, 4, at most kWarps) that lets a lane hold its part of a row of
// n_units in one pass of `unroll` units.
inline int row_split_for(int64_t n_units, int unroll, int max_split) {
    int split = 1;
    while (split < max_split && n_units > int64_t(32) * split * unroll) split *= 2;
    return split;
}

} // namespace gfa::cuda
