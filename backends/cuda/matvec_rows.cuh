// How the matrix-vector kernels (16-bit and quantized weights) share rows among the warps
// of a block. A long row is split over `split` warps (1, 2 or 4) so that every lane has its
// whole part of the row in flight at once; short rows keep one warp each.
//
// In gated mode (a merged gate/up projection followed by swiglu, fused) a block takes pairs
// of rows: gate row p and up row n_ff + p, and once both are summed writes
// swiglu(gate, up) for p as well as both rows of the product.
#pragma once

#include "cuda_device.cuh"

namespace gfa::cuda {

// Warp w of a block of kWarps works on slice w % split of row block * (kWarps / split) +
// w / split. A lane's units (16-byte chunks, quant items) are first, first + stride, ...
struct RowSlice {
    int64_t row;
    int slice;    // 0 .. split-1
    int first;    // the lane's first unit
    int stride;   // 32 * split: units between a lane's consecutive ones
    int local;    // the row's place among the block's rows
    int64_t pair; // gated mode: the gate/up pair (the output row of swiglu)
};

// n_ff > 0: gated mode, rows n_ff apart paired within the block (needs split <= kWarps / 2).
// `block`: the block's place among the product's blocks (blockIdx.x, unless the launch runs
// two products).
template <int kWarps>
__device__ __forceinline__ RowSlice row_slice(int split, int64_t n_ff, unsigned block = blockIdx.x) {
    const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
    const int log2_split = __ffs(split) - 1; // split is 1, 2 or 4: shifts, not divisions
    const int slice = warp & (split - 1), local = warp >> log2_split, rows = kWarps >> log2_split;
    if (n_ff == 0) return {int64_t(block) * rows + local, slice, slice * 32 + lane, 32 * split, local, 0};
    const int pairs = rows / 2;
    const int64_t pair = int64_t(block) * pairs + (local & (pairs - 1)); // pairs: a power of 2
    return {local < pairs ? pair : n_ff + pair, slice, slice * 32 + lane, 32 * split, local, pair};
}

// Where a warp's row of a starts, and the indices (i2, i3) of the output matrix of block row
// blockIdx.y, for a's matrices broadcast r2 and r3 times. One matrix (the usual product)
// takes none of the 64-bit divisions of batched ones.
struct MatrixRow {
    const char* row;
    int64_t i2, i3;
};
__device__ __forceinline__ MatrixRow matrix_row(const TensorView& a, const TensorView& dst, int64_t row,
                                                int64_t r2, int64_t r3) {
    MatrixRow m{a.data + row * a.nb[1], 0, 0};
    if (gridDim.y > 1) {
        m.i2 = blockIdx.y % dst.ne[2];
        m.i3 = blockIdx.y / dst.ne[2];
        m.row += (m.i2 / r2) * a.nb[2] + (m.i3 / r3) * a.nb[3];
    }
    return m;
}

// Adds a row's partial sums (per column) across its slices, in slice order, and writes them
// to dst(row, c); in gated mode (n_ff > 0) then swiglu(gate, up) to glu(pair, c). Every
// thread of the block calls it (it synchronizes when split > 1 or in gated mode).
template <int kWarps, int NC>
__device__ __forceinline__ void write_row_sums(float (&acc)[NC], int n_cols, const RowSlice& rs, int split,
                                               bool has_row, const TensorView& dst, int64_t i2, int64_t i3,
                                               int64_t n_ff, const TensorView& glu) {
    __shared__ float partial[kWarps][NC];
    __shared__ float totals[kWarps][NC]; // per local row
    const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        if (c >= n_cols) break;
        const float s = has_row ? warp_sum(acc[c]) : 0.0f;
        if (split == 1) {
            if (has_row && lane == 0) {
                *f32_ptr(dst, rs.row, c, i2, i3) = s;
                totals[rs.local][c] = s;
            }
        } else if (lane == 0) {
            partial[warp][c] = s;
        }
    }
    if (split > 1) { // the same for the whole block
        __syncthreads();
        if (has_row && rs.slice == 0 && lane < n_cols) {
            float total = 0.0f;
            for (int j = 0; j < split; ++j) total += partial[warp + j][lane];
            *f32_ptr(dst, rs.row, lane, i2, i3) = total;
            totals[rs.local][lane] = total;
        }
    }
    if (n_ff == 0) return; // the same for the whole block
    __syncthreads();
    const int pairs = kWarps / 2 >> (__ffs(split) - 1);
    if (has_row && rs.slice == 0 && rs.local < pairs && lane < n_cols)
        *f32_ptr(glu, rs.pair, lane, i2, i3) =
            swiglu_value(totals[rs.local][lane], totals[rs.local + pairs][lane]);
}

// Groups of rows a product of `rows` rows (gated: n_ff pairs) takes at this split.
inline int64_t row_groups(int64_t rows, int64_t n_ff, int split, int warps) {
    const int64_t per_group = n_ff > 0 ? warps / split / 2 : warps / split;
    return ((n_ff > 0 ? n_ff : rows) + per_group - 1) / per_group;
}

// The smallest split (1, 2, 4, at most max_split) that lets a lane hold its part of a row of
// n_units in one pass of `unroll` units.
inline int row_split_for(int64_t n_units, int unroll, int max_split) {
    int split = 1;
    while (split < max_split && n_units > int64_t(32) * split * unroll) split *= 2;
    return split;
}

} // namespace gfa::cuda
