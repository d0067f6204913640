// Products with quantized weights on the GPU (quant_matmul.cu): the decoding path, a
// matrix-vector kernel that reads the blocks directly, and the dequantization to f16 in
// front of cuBLAS for larger products. Used by mul_mat (kernels_matmul.cu) and by
// tools/bench_quant_cuda.
//
// Shapes follow mul_mat: a is [K, M, A2, A3] of a block type with packed rows, b is f32
// [K, N, B2, B3] with B2 % A2 == 0 and B3 % A3 == 0 (any strides), dst is f32 [M, N, B2, B3].
#pragma once

#include "cuda_common.h"

namespace gfa::cuda {

// Most columns of b the matrix-vector path takes.
inline constexpr int kQuantMatvecMaxColumns = 8;

// Scratch bytes for b's columns in the matrix-vector path's 8-bit form.
size_t quantized_columns_bytes(const TensorView& b);

// Step 1 of the matrix-vector path: each column of b in blocks of 32 as int8 values
// q = round(x / d) with d = max |x| / 127, and per block (d, d * sum of q) for the formats
// with an offset. `scratch` holds quantized_columns_bytes(b) bytes, 16-byte aligned.
void quantize_columns(const TensorView& b, void* scratch, cudaStream_t stream);

// Where step 1 puts column c (columns ordered n, then i2, then i3) in `scratch`: its int8
// values at q + c * K, its (scale, sum) pairs at ds + c * (K / 32). For kernels that write
// the columns themselves (a pre-norm in front of the product) with round_block_to_int8.
struct ColumnBlocks {
    int8_t* q;
    float2* ds;
};
ColumnBlocks column_blocks_in(const TensorView& b, void* scratch);

// Step 2: dst = a^T b from the quantized columns (N <= kQuantMatvecMaxColumns). a_constant:
// no kernel writes a while graphs run, so the kernel may fetch it before its inputs are ready.
// n_ff > 0: a is a merged gate/up matrix (gate rows, then n_ff up rows) and glu(p, c) gets
// swiglu(dst(p, c), dst(n_ff + p, c)) as well (quant_matvec_split must be at most 2).
void quant_matvec(const TensorView& a, const TensorView& b, const TensorView& dst, const void* scratch,
                  bool a_constant, const TensorView& glu, int64_t n_ff, cudaStream_t stream);

// Two products of one column with two matrices of the same K (types that cannot be merged into
// one matrix), in one launch: dst1 = a1^T b and dst2 = a2^T b from b's quantized columns, bit
// for bit what two quant_matvec launches give. quant_matvec_pairs tells whether a pair of
// weights has such a launch (a few pairs of block types; GFA_CUDA_PAIRED_PRODUCTS=0: none, for
// measuring); quant_matvec_pair fails for any other.
bool quant_matvec_pairs(const TensorView& a1, const TensorView& a2, int64_t columns);
void quant_matvec_pair(const TensorView& a1, const TensorView& dst1, bool a1_constant, const TensorView& a2,
                       const TensorView& dst2, bool a2_constant, const TensorView& b, const void* scratch,
                       cudaStream_t stream);

// How many warps share one row of a in quant_matvec (1, 2 or 4) with that many columns.
int quant_matvec_split(const TensorView& a, int64_t columns);
// How many items (a lane's share of a block) each lane of those warps loads per pass.
int quant_matvec_depth(const TensorView& a, int64_t columns);

// a's rows as a packed f16 matrix [K, M * A2 * A3] (exact dequantization, then rounded to
// f16). `out` is 16-byte aligned.
void dequantize_to_f16(const TensorView& a, void* out, cudaStream_t stream);

} // namespace gfa::cuda
