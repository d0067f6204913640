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

// What a fused launch adds to the product (quant_matvec's `extras`); default: nothing.
//
// residual_sum: the residual add behind the product, residual_sum = residual + dst, written
// by the thread that writes dst's element (so a sum placed in place over dst or over the
// residual is still right).
//
// norm: the next block's pre-norm behind that add, h = rms_norm(x) * gain with x the sum
// (one column): the thread block that finishes last (a ticket from `counter`, which starts
// at 0 and is left at 0) computes it, with the sum of squares added up in the order of the
// rms_norm kernel with `norm_threads` threads (bit for bit its result), and writes the
// rms_norm and mul nodes and h's int8 columns at `columns` for the product behind.
struct NormBehind {
    TensorView x{}, gain{}, normed{}, out{};
    float eps = 0.0f;
    int norm_threads = 0;
    ColumnBlocks columns{};
    unsigned* counter = nullptr; // null: no norm
};
struct ProductExtras {
    TensorView residual{}, residual_sum{}; // residual_sum.data null: no add
    NormBehind norm{};
};

// The extras of a fused residual add behind `product` (is_residual_add_of) [and of the
// pre-norm behind that add: its rms_norm and mul nodes, h's columns at `columns`].
ProductExtras residual_add_extras(const ComputeCtx& ctx, const Tensor* product, const Tensor* add,
                                  const Tensor* norm = nullptr, const Tensor* mul = nullptr,
                                  void* columns = nullptr);
// nodes[i], nodes[i + 1]: rms_norm(add) -> mul by a row of weights, which a quantized product
// of one column reads right behind them, such that the kernel of `product` (the add's
// product) can compute them in its last thread block.
bool is_norm_behind(std::span<Tensor* const> nodes, size_t i, const Tensor* add, const Tensor* product);
// The NormBehind of those nodes, h's int8 columns at `columns`.
NormBehind norm_behind(const ComputeCtx& ctx, const Tensor* norm, const Tensor* mul, void* columns);

// Step 2: dst = a^T b from the quantized columns (N <= kQuantMatvecMaxColumns). a_constant:
// no kernel writes a while graphs run, so the kernel may fetch it before its inputs are ready.
// n_ff > 0: a is a merged gate/up matrix (gate rows, then n_ff up rows) and glu(p, c) gets
// swiglu(dst(p, c), dst(n_ff + p, c)) as well (quant_matvec_split must be at most 2).
void quant_matvec(const TensorView& a, const TensorView& b, const TensorView& dst, const void* scratch,
                  bool a_constant, const TensorView& glu, int64_t n_ff, cudaStream_t stream,
                  const ProductExtras& extras = {});

// How many warps share one row of a in quant_matvec (1, 2 or 4) with that many columns.
int quant_matvec_split(const TensorView& a, int64_t columns);

// a's rows as a packed f16 matrix [K, M * A2 * A3] (exact dequantization, then rounded to
// f16). `out` is 16-byte aligned.
void dequantize_to_f16(const TensorView& a, void* out, cudaStream_t stream);

} // namespace gfa::cuda
