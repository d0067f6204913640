// Matrix products on the GPU.
//
// mul_mat: dst[m, n] = sum_k a[k, m] * b[k, n] per matrix, a broadcast over b's dims 2-3
// (a's matrix i2 / (B2/A2), i3 / (B3/A3)). In cuBLAS's column-major terms a is a K x M
// matrix and b a K x N one, so dst (M x N) = a^T * b.
//   f32 weights: f32 GEMM with f32 accumulation (no TF32, so results match fp32 paths, unless
//   the node allows TF32: set_matmul_precision).
//   f16/bf16 weights: b is converted to the weight type, GEMM with f32 accumulation.
//   block-quantized weights (q8_0, q4_0, q4_1, q5_0, q5_1, q4_K, q5_K, q6_K): for N > 8 a is
//   dequantized to f16 and b converted, then cuBLAS; for decoding (N <= 8) a matrix-vector
//   kernel reads the blocks directly (quant_matmul.cu).
// out_prod: dst[m, n] = sum_k a[m, k] * b[n, k], i.e. dst = a * b^T, f32 through cuBLAS.
#include "cuda_device.cuh"
#include "early_launch.cuh"
#include "matvec_rows.cuh"
#include "op_def.h"
#include "quant_matmul.h"

#include <climits>
#include <cstdint>
#include <type_traits>

namespace gfa::cuda {

namespace {

constexpr int kThreads = 256;

// One GEMM operand: a pointer to matrix (0, 0), its type, leading dimension and the element
// strides between matrices along dims 2 and 3, plus how many matrices it has there.
struct Operand {
    const char* ptr;
    cudaDataType type;
    size_t elem_size;
    int64_t ld, stride2, stride3, ne2, ne3;
};

Operand operand_of(const Tensor* t, const void* data, cudaDataType type, size_t elem_size) {
    return {static_cast<const char*>(data),
            type,
            elem_size,
            int64_t(t->nb[1] / elem_size),
            int64_t(t->nb[2] / elem_size),
            int64_t(t->nb[3] / elem_size),
            t->ne[2],
            t->ne[3]};
}
// The same operand as a packed copy (rows of `row` elements).
Operand packed_operand(const Tensor* t, const void* data, cudaDataType type, size_t elem_size, int64_t row) {
    return {static_cast<const char*>(data), type,     elem_size, row, row * t->ne[1],
            row * t->ne[1] * t->ne[2],      t->ne[2], t->ne[3]};
}

int checked_int(int64_t v, const char* what) {
    if (v > INT_MAX)
        fail(std::string("mul_mat on CUDA: ") + what + " " + std::to_string(v) +
             " exceeds cuBLAS's int range");
    return int(v);
}

// C[i2, i3] = op(A[i2 / rA2, i3 / rA3]) * op(B[i2, i3]) for every matrix of C (f32 result).
// A broadcast along dim 2 becomes a strided batch with a zero or real stride when it can,
// otherwise one strided batch per A matrix.
void batched_gemm(const ComputeCtx& ctx, cublasOperation_t op_a, cublasOperation_t op_b, int64_t m, int64_t n,
                  int64_t k, const Operand& A, const Operand& B, float* C, int64_t ldc, int64_t c_stride2,
                  int64_t c_stride3, cublasComputeType_t compute = CUBLAS_COMPUTE_32F) {
    const float one = 1.0f, zero = 0.0f;
    const int64_t r2 = B.ne2 / A.ne2, r3 = B.ne3 / A.ne3;
    auto call = [&](const char* a, const char* b, float* c, int64_t stride_a, int64_t batch) {
        GFA_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
            ctx.cublas, op_a, op_b, checked_int(m, "rows"), checked_int(n, "columns"),
            checked_int(k, "depth"), &one, a, A.type, checked_int(A.ld, "leading dim"), stride_a, b, B.type,
            checked_int(B.ld, "leading dim"), B.stride2, &zero, c, CUDA_R_32F,
            checked_int(ldc, "leading dim"), c_stride2, checked_int(batch, "batch"), compute,
            CUBLAS_GEMM_DEFAULT));
    };
    for (int64_t i3 = 0; i3 < B.ne3; ++i3) {
        const char* a3 = A.ptr + (i3 / r3) * A.stride3 * int64_t(A.elem_size);
        const char* b3 = B.ptr + i3 * B.stride3 * int64_t(B.elem_size);
        float* c3 = C + i3 * c_stride3;
        if (r2 == 1 || A.ne2 == 1) {
            call(a3, b3, c3, A.ne2 == 1 ? 0 : A.stride2, B.ne2);
        } else {
            for (int64_t i02 = 0; i02 < A.ne2; ++i02)
                call(a3 + i02 * A.stride2 * int64_t(A.elem_size),
                     b3 + i02 * r2 * B.stride2 * int64_t(B.elem_size), c3 + i02 * r2 * c_stride2, 0, r2);
        }
    }
}

// f32 x f32 products: TensorFloat-32 tensor cores where the node allows it (set_matmul_precision).
cublasComputeType_t f32_compute_type(const Tensor* product) {
    return matmul_precision(product) >= MatMulPrecision::TF32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                              : CUBLAS_COMPUTE_32F;
}

// Writes t (any readable type, any strides) as a packed f32, f16 or bf16 copy.
enum class Packed { F32, F16, BF16 };

__global__ void pack_kernel(TensorView t, void* out, Packed to, int64_t n) {
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        int64_t i0, i1, i2, i3;
        unflatten(k, t.ne, i0, i1, i2, i3);
        const float v = load_any(t, i0, i1, i2, i3);
        if (to == Packed::F32)
            static_cast<float*>(out)[k] = v;
        else if (to == Packed::BF16)
            static_cast<__nv_bfloat16*>(out)[k] = __float2bfloat16_rn(v);
        else
            static_cast<__half*>(out)[k] = __float2half_rn(v);
    }
}

void launch_pack(const ComputeCtx& ctx, const Tensor* t, void* out, Packed to) {
    const int64_t n = t->nelements();
    pack_kernel<<<grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(view_of(t), out, to, n);
    GFA_CUDA_CHECK_LAUNCH();
}

size_t align_up(size_t v) {
    return (v + 255) / 256 * 256;
}

// ---- f16/bf16 matrix-vector ------------------------------------------------------------------
//
// Decoding with 16-bit weights reads each weight once, so one kernel does it all: cuBLAS would
// need b converted to 16 bits first (a second launch) and its own host-side setup, which at a
// few hundred small products per token cost more host time than the GPU spends on them.
// One warp per output row, or 2 or 4 for long rows (matvec_rows.cuh); each lane streams 16
// bytes (8 weights) per chunk, kHalfUnroll chunks in flight (a whole row of 2048 weights at
// once), past L1 (the weights are read once)
// while b's f32 values, which every row reads, stay in L1. b is not rounded: the result is an
// fp32 dot product. The kernel is launched early (early_launch.cuh): when a is constant (a
// model's weights) the first chunks are requested before the kernel that writes b finishes.

constexpr int kHalfMatvecWarps = 4;
constexpr int kHalfUnroll = 8;
constexpr int kHalfMatvecMaxColumns = 8;

__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

template <class W> __device__ __forceinline__ float2 unpack_pair(uint32_t bits) {
    if constexpr (std::is_same_v<W, __half>)
        return __half22float2(*reinterpret_cast<const __half2*>(&bits));
    else
        return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
}

// The kHalfUnroll chunks of a lane's pass starting at chunk `base`, `stride` chunks apart.
__device__ __forceinline__ void load_weight_chunks(uint4 (&w)[kHalfUnroll], const uint4* row, int base,
                                                   int stride, int n_chunks) {
#pragma unroll
    for (int u = 0; u < kHalfUnroll; ++u)
        if (base + stride * u < n_chunks) w[u] = load_streaming(row + base + stride * u);
}

// Register budgets: 64 for one column, 80 for two, 128 for four or more (ptxas spilled
// at 64 with two and at 80 with four).
template <class W, int NC>
__global__ void __launch_bounds__(kHalfMatvecWarps * 32, NC >= 4   ? 4
                                                         : NC == 2 ? 6
                                                                   : 8)
    half_matvec_kernel(TensorView a, TensorView b, TensorView dst, int64_t r2, int64_t r3, int split,
                       bool a_constant, int64_t n_ff, TensorView glu) {
    const RowSlice rs = row_slice<kHalfMatvecWarps>(split, n_ff);
    const bool has_row = n_ff > 0 ? rs.pair < n_ff : rs.row < dst.ne[0];
    const MatrixRow m = matrix_row(a, dst, rs.row, r2, r3);
    const int64_t i2 = m.i2, i3 = m.i3;
    const uint4* row = reinterpret_cast<const uint4*>(m.row);
    const int n_chunks = int(a.ne[0] / 8);

    uint4 w[kHalfUnroll];
    if (a_constant && has_row) load_weight_chunks(w, row, rs.first, rs.stride, n_chunks);
    await_inputs();
    allow_next_launch();
    if (!a_constant && has_row) load_weight_chunks(w, row, rs.first, rs.stride, n_chunks);

    const char* columns = b.data + i2 * b.nb[2] + i3 * b.nb[3];
    const int n_cols = int(dst.ne[1]);
    float acc[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[c] = 0.0f;
    const int pass = rs.stride * kHalfUnroll;
    for (int base = rs.first; has_row && base < n_chunks; base += pass) {
        if (base != rs.first) load_weight_chunks(w, row, base, rs.stride, n_chunks);
#pragma unroll
        for (int u = 0; u < kHalfUnroll; ++u) {
            const int chunk = base + rs.stride * u;
            if (chunk >= n_chunks) break;
            const float2 w01 = unpack_pair<W>(w[u].x), w23 = unpack_pair<W>(w[u].y);
            const float2 w45 = unpack_pair<W>(w[u].z), w67 = unpack_pair<W>(w[u].w);
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                if (c >= n_cols) break;
                const float4* x = reinterpret_cast<const float4*>(columns + c * b.nb[1]) + 2 * chunk;
                const float4 x0 = __ldg(x), x1 = __ldg(x + 1);
                acc[c] += w01.x * x0.x + w01.y * x0.y + w23.x * x0.z + w23.y * x0.w + w45.x * x1.x +
                          w45.y * x1.y + w67.x * x1.z + w67.y * x1.w;
            }
        }
    }
    write_row_sums<kHalfMatvecWarps>(acc, n_cols, rs, split, has_row, dst, i2, i3, n_ff, glu);
}

int half_matvec_split(const Tensor* a) {
    return row_split_for(a->ne[0] / 8, kHalfUnroll, kHalfMatvecWarps);
}

// The kernel's 16-byte weight loads and float4 column loads need aligned rows and columns.
bool half_matvec_applies(const Tensor* a, const Tensor* b, const Tensor* dst) {
    auto aligned16 = [](const Tensor* t) {
        return (reinterpret_cast<uintptr_t>(t->data) | uintptr_t(t->nb[1]) | uintptr_t(t->nb[2]) |
                uintptr_t(t->nb[3])) %
                   16 ==
               0;
    };
    return (a->type == Type::F16 || a->type == Type::BF16) && b->ne[1] <= kHalfMatvecMaxColumns &&
           a->ne[0] % 8 == 0 && a->ne[0] / 8 <= INT_MAX && a->nb[0] == 2 && b->nb[0] == 4 && aligned16(a) &&
           aligned16(b) && dst->ne[2] * dst->ne[3] <= 65535;
}

// glu: the swiglu node of a fused gate/up product (find_glu_fusion), else null.
template <class W>
void launch_half_matvec(const ComputeCtx& ctx, const Tensor* a, const Tensor* b, Tensor* dst,
                        const Tensor* glu) {
    const int split = half_matvec_split(a);
    const int64_t n_ff = glu ? dst->ne[0] / 2 : 0;
    const dim3 grid(unsigned(row_groups(dst->ne[0], n_ff, split, kHalfMatvecWarps)),
                    unsigned(dst->ne[2] * dst->ne[3]));
    const dim3 block(kHalfMatvecWarps * 32);
    const int64_t r2 = b->ne[2] / a->ne[2], r3 = b->ne[3] / a->ne[3];
    const TensorView va = view_of(a), vb = view_of(b), vd = view_of(dst),
                     vg = glu ? view_of(glu) : TensorView{};
    const int64_t n = b->ne[1];
    const bool a_constant = is_constant(a);
    auto launch = [&](auto kernel) {
        launch_early(kernel, grid, block, 0, ctx.stream, va, vb, vd, r2, r3, split, a_constant, n_ff, vg);
    };
    if (n == 1)
        launch(half_matvec_kernel<W, 1>);
    else if (n == 2)
        launch(half_matvec_kernel<W, 2>);
    else if (n <= 4)
        launch(half_matvec_kernel<W, 4>);
    else
        launch(half_matvec_kernel<W, 8>);
}

// ---- mul_mat ------------------------------------------------------------------------------------

} // namespace

bool takes_quant_matvec(const Tensor* mul_mat) {
    return is_cuda_quant_type(mul_mat->src[0]->type) && mul_mat->src[1]->ne[1] <= kQuantMatvecMaxColumns;
}

void compute_mul_mat(const ComputeCtx& ctx, Tensor* dst, const Tensor* glu, const void* quantized_b) {
    const Tensor *a = dst->src[0], *b = dst->src[1];
    const int64_t K = a->ne[0], M = a->ne[1], N = b->ne[1];
    float* C = static_cast<float*>(dst->data);
    const int64_t ldc = M, c2 = int64_t(dst->nb[2] / 4), c3 = int64_t(dst->nb[3] / 4);
    const bool quantized = is_cuda_quant_type(a->type);

    // Only a quantized matrix-vector product right after another one on the same b may
    // reuse its int8 columns; every other path may overwrite scratch memory.
    const QuantizedColumns previous = ctx.last_columns ? *ctx.last_columns : QuantizedColumns{};
    if (ctx.last_columns) *ctx.last_columns = {};

    if (takes_quant_matvec(dst)) {
        const TensorView vb = view_of(b);
        const void* columns = quantized_b;
        if (!columns) {
            void* scratch = ctx.scratch->get(quantized_columns_bytes(vb), ctx.stream, ctx.device_name);
            if (previous.b != b || previous.columns != scratch) quantize_columns(vb, scratch, ctx.stream);
            columns = scratch;
        }
        quant_matvec(view_of(a), vb, view_of(dst), columns, is_constant(a), glu ? view_of(glu) : TensorView{},
                     glu ? dst->ne[0] / 2 : 0, ctx.stream);
        if (ctx.last_columns) *ctx.last_columns = {b, columns};
        return;
    }
    if (half_matvec_applies(a, b, dst)) {
        if (a->type == Type::F16)
            launch_half_matvec<__half>(ctx, a, b, dst, glu);
        else
            launch_half_matvec<__nv_bfloat16>(ctx, a, b, dst, glu);
        return;
    }
    if (glu) fail("mul_mat on CUDA: a fused swiglu needs the matrix-vector path");
    if (a->type == Type::F32) {
        Operand B = operand_of(b, b->data, CUDA_R_32F, 4);
        if (!row_is_packed(b)) { // a transposed or permuted b: GEMM reads a packed copy
            void* packed = ctx.scratch->get(size_t(b->nelements()) * 4, ctx.stream, ctx.device_name);
            launch_pack(ctx, b, packed, Packed::F32);
            B = packed_operand(b, packed, CUDA_R_32F, 4, K);
        }
        batched_gemm(ctx, CUBLAS_OP_T, CUBLAS_OP_N, M, N, K, operand_of(a, a->data, CUDA_R_32F, 4), B, C, ldc,
                     c2, c3, f32_compute_type(dst));
        return;
    }
    // Half-precision GEMM: b (and a quantized a) converted into packed scratch copies.
    const bool bf16 = a->type == Type::BF16;
    const cudaDataType half_type = bf16 ? CUDA_R_16BF : CUDA_R_16F;
    const size_t b_bytes = align_up(size_t(b->nelements()) * 2);
    const size_t a_bytes = quantized ? align_up(size_t(a->nelements()) * 2) : 0;
    char* scratch = static_cast<char*>(ctx.scratch->get(b_bytes + a_bytes, ctx.stream, ctx.device_name));
    launch_pack(ctx, b, scratch, bf16 ? Packed::BF16 : Packed::F16);
    const Operand B = packed_operand(b, scratch, half_type, 2, K);
    Operand A;
    if (quantized) {
        dequantize_to_f16(view_of(a), scratch + b_bytes, ctx.stream);
        A = packed_operand(a, scratch + b_bytes, CUDA_R_16F, 2, K);
    } else {
        A = operand_of(a, a->data, half_type, 2);
    }
    batched_gemm(ctx, CUBLAS_OP_T, CUBLAS_OP_N, M, N, K, A, B, C, ldc, c2, c3);
}

bool takes_matvec_pair(const Tensor* first, const Tensor* second) {
    const Tensor* b = first->src[1];
    return first->op == Op::MulMat && second->op == Op::MulMat && second->src[1] == b &&
           takes_quant_matvec(first) && takes_quant_matvec(second) &&
           quant_matvec_pairs(view_of(first->src[0]), view_of(second->src[0]), b->ne[1]);
}

void compute_mul_mat_pair(const ComputeCtx& ctx, Tensor* first, Tensor* second, const void* quantized_b) {
    if (!takes_matvec_pair(first, second)) fail("CUDA: the paired products lost their pairing");
    if (ctx.last_columns) *ctx.last_columns = {};
    const Tensor* b = first->src[1];
    quant_matvec_pair(view_of(first->src[0]), view_of(first), is_constant(first->src[0]),
                      view_of(second->src[0]), view_of(second), is_constant(second->src[0]), view_of(b),
                      quantized_b, ctx.stream);
    if (ctx.last_columns) *ctx.last_columns = {b, quantized_b};
}

namespace {

void run_mul_mat(const ComputeCtx& ctx, Tensor* dst) {
    compute_mul_mat(ctx, dst, nullptr);
}

// The fused gate/up product: `swiglu` is the last node, its sources views of the product.
void run_mul_mat_swiglu(const ComputeCtx& ctx, Tensor* swiglu) {
    compute_mul_mat(ctx, swiglu->src[0]->view_src, swiglu);
}

// A view of the product m: rows of half its width at column `first`, as the graph builder's
// split of a merged gate/up product makes them.
bool is_half_of(const Tensor* v, const Tensor* m, int64_t first) {
    return v && v->view_src == m && v->type == Type::F32 && v->view_offs == size_t(first) * 4 &&
           v->ne[0] == m->ne[0] / 2 && v->ne[1] == m->ne[1] && v->ne[2] == 1 && v->ne[3] == 1 &&
           v->nb[0] == 4 && v->nb[1] == m->nb[1];
}

bool supports_mul_mat(const Tensor* dst) {
    const Tensor *a = dst->src[0], *b = dst->src[1];
    if (!a || !b || b->type != Type::F32 || dst->type != Type::F32 || !dst->is_contiguous()) return false;
    if (a->ne[0] != b->ne[0] || dst->ne[0] != a->ne[1] || dst->ne[1] != b->ne[1] || dst->ne[2] != b->ne[2] ||
        dst->ne[3] != b->ne[3] || b->ne[2] % a->ne[2] != 0 || b->ne[3] % a->ne[3] != 0)
        return false;
    if (!row_is_packed(a)) return false;
    switch (a->type) {
    case Type::F32:
        return true;
    case Type::F16:
    case Type::BF16:
        return a->nb[1] % 2 == 0 && a->nb[2] % 2 == 0 && a->nb[3] % 2 == 0;
    default:
        break;
    }
    if (!is_cuda_quant_type(a->type)) return false;
    // Whole blocks per row; 2-byte aligned strides (every block size is even, so only a
    // strange view could fail this); the matrix-vector path puts the batch in grid.y.
    return a->ne[0] % type_traits(a->type).block_size == 0 && a->nb[1] % 2 == 0 && a->nb[2] % 2 == 0 &&
           a->nb[3] % 2 == 0 && (b->ne[1] > kQuantMatvecMaxColumns || dst->ne[2] * dst->ne[3] <= 65535);
}

// ---- out_prod -------------------------------------------------------------------------------------

// An f32 operand whose dim 0 or dim 1 is the packed one: cuBLAS reads the other layout as
// the transposed matrix (gradients pass transpose() views here).
Operand f32_operand(const Tensor* t, bool& transposed) {
    transposed = !row_is_packed(t);
    Operand op = operand_of(t, t->data, CUDA_R_32F, 4);
    if (transposed) op.ld = int64_t(t->nb[0] / 4);
    return op;
}
bool f32_gemm_layout(const Tensor* t) {
    return t->type == Type::F32 && (row_is_packed(t) || t->ne[1] == 1 || t->nb[1] == 4);
}

void run_out_prod(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *a = dst->src[0], *b = dst->src[1];
    const int64_t M = a->ne[0], K = a->ne[1], N = b->ne[0];
    // dst = a * b^T with a an M x K and b an N x K column-major matrix.
    bool a_t = false, b_t = false;
    const Operand A = f32_operand(a, a_t), B = f32_operand(b, b_t);
    batched_gemm(ctx, a_t ? CUBLAS_OP_T : CUBLAS_OP_N, b_t ? CUBLAS_OP_N : CUBLAS_OP_T, M, N, K, A, B,
                 static_cast<float*>(dst->data), M, int64_t(dst->nb[2] / 4), int64_t(dst->nb[3] / 4),
                 f32_compute_type(dst));
}

bool supports_out_prod(const Tensor* dst) {
    const Tensor *a = dst->src[0], *b = dst->src[1];
    if (!a || !b || dst->type != Type::F32 || !dst->is_contiguous() || !f32_gemm_layout(a) ||
        !f32_gemm_layout(b))
        return false;
    return a->ne[1] == b->ne[1] && dst->ne[0] == a->ne[0] && dst->ne[1] == b->ne[0] &&
           dst->ne[2] == b->ne[2] && dst->ne[3] == b->ne[3] && b->ne[2] % a->ne[2] == 0 &&
           b->ne[3] % a->ne[3] == 0;
}

} // namespace

Fusion find_glu_fusion(std::span<Tensor* const> nodes, size_t i) {
    if (nodes.size() - i < 2) return {};
    const Tensor* m = nodes[i];
    const Tensor* s = nodes[i + 1];
    if (m->op != Op::MulMat || s->op != Op::Swiglu || !supports_mul_mat(m) || m->ne[0] % 2 != 0 ||
        m->ne[2] != 1 || m->ne[3] != 1 || s->type != Type::F32 || !s->is_contiguous())
        return {};
    const int64_t n_ff = m->ne[0] / 2;
    if (!is_half_of(s->src[0], m, 0) || !is_half_of(s->src[1], m, n_ff) || s->ne != s->src[0]->ne) return {};
    // Only the matrix-vector paths pair rows, and only with at most 2 warps a row.
    const Tensor *a = m->src[0], *b = m->src[1];
    if (half_matvec_applies(a, b, m))
        return half_matvec_split(a) <= 2 ? Fusion{2, run_mul_mat_swiglu} : Fusion{};
    if (takes_quant_matvec(m) && quant_matvec_split(view_of(a), b->ne[1]) <= 2)
        return {2, run_mul_mat_swiglu};
    return {};
}

void register_matmul_kernels(KernelTable& t) {
    t[size_t(Op::MulMat)] = {run_mul_mat, supports_mul_mat};
    t[size_t(Op::OutProd)] = {run_out_prod, supports_out_prod};
}

} // namespace gfa::cuda
