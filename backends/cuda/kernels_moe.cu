// A mixture of experts on the GPU: top_k (the router's choice of experts per token) and
// mul_mat_id (each token's input times its chosen experts' matrices), so that a model's
// experts stay in device memory and its layers run without a trip to the host.
//
// mul_mat_id is a matrix-vector product per (slot, token) pair: one warp per output row, its
// lanes reading consecutive 8-value pieces of the chosen expert's row (decoded exactly, as
// get_rows decodes them) against the f32 input column, summed in f32. The input columns are
// not rounded to 8 bits as the quantized mul_mat path rounds them, so the result is as exact
// as the CPU's f32 product. Every pair reads its expert's rows once, so decoding reads what it
// must; a prompt reads each expert once per token that chose it (the pairs are not yet grouped
// by expert).
#include "cuda_device.cuh"
#include "op_def.h"
#include "quant_blocks.cuh"

#include <algorithm>

namespace gfa::cuda {

namespace {

// ---- top_k ----------------------------------------------------------------------------------

// The rank order of top_k's definition: larger values first, NaN as low as -inf, ties by the
// lower position. a ranks before b?
__device__ __forceinline__ bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
    a = isnan(a) ? -INFINITY : a;
    b = isnan(b) ? -INFINITY : b;
    return a > b || (a == b && ia < ib);
}

// One warp per row. Pick j is the best-ranked value that ranks after pick j - 1: each lane
// scans its share of the row for it, then the warp keeps the best lane's. O(k n / 32) per
// row, and no memory besides the row: a router's rows hold a few hundred experts at most.
__global__ void top_k_kernel(TensorView a, TensorView dst, int64_t n_rows) {
    const int lane = int(threadIdx.x) % 32;
    const int64_t n = a.ne[0], k = dst.ne[0];
    for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < n_rows;
         r += int64_t(gridDim.x) * blockDim.x / 32) {
        const int64_t i1 = r % a.ne[1], i2 = (r / a.ne[1]) % a.ne[2], i3 = r / (a.ne[1] * a.ne[2]);
        float last = INFINITY;
        int64_t last_i = -1; // nothing picked yet: every value ranks after (+inf, -1)
        for (int64_t j = 0; j < k; ++j) {
            float best = 0.0f;
            int64_t best_i = -1;
            for (int64_t i = lane; i < n; i += 32) {
                const float v = load_f32(a, i, i1, i2, i3);
                const bool after_last = last_i < 0 || ranks_before(last, last_i, v, i);
                if (after_last && (best_i < 0 || ranks_before(v, i, best, best_i))) best = v, best_i = i;
            }
            for (int o = 16; o > 0; o >>= 1) {
                const float other = __shfl_xor_sync(0xffffffffu, best, o);
                const int64_t other_i = __shfl_xor_sync(0xffffffffu, best_i, o);
                if (other_i >= 0 && (best_i < 0 || ranks_before(other, other_i, best, best_i)))
                    best = other, best_i = other_i;
            }
            if (lane == 0)
                *reinterpret_cast<int32_t*>(dst.data + j * dst.nb[0] + i1 * dst.nb[1] + i2 * dst.nb[2] +
                                            i3 * dst.nb[3]) = int32_t(best_i);
            last = best, last_i = best_i;
        }
    }
}

void run_top_k(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* a = dst->src[0];
    const int64_t rows = a->ne[1] * a->ne[2] * a->ne[3];
    if (rows == 0) return;
    constexpr int kThreads = 128;
    top_k_kernel<<<grid_for(rows * 32, kThreads), kThreads, 0, ctx.stream>>>(view_of(a), view_of(dst), rows);
    GFA_CUDA_CHECK_LAUNCH();
}

bool supports_top_k(const Tensor* dst) {
    const Tensor* a = dst->src[0];
    return a && a->type == Type::F32 && dst->type == Type::I32 && dst->ne[0] <= a->ne[0] &&
           a->ne[0] <= INT32_MAX;
}

// ---- mul_mat_id -------------------------------------------------------------------------------

constexpr int kRowsPerBlock = 4; // one warp per output row

// Weights of a block type: 8 values of the row at a time, decoded exactly.
template <int T> struct QuantRow {
    using B = QuantBlock<T>;
    static constexpr int kChunksPerBlock = B::kValues / 8;
    __device__ __forceinline__ static void load8(const char* row, int64_t chunk, float (&v)[8]) {
        dequantize_chunk<T>(row + (chunk / kChunksPerBlock) * B::kBytes, int(chunk % kChunksPerBlock), v);
    }
};

// dst[:, i, t] = as[:, :, ids[i, t]]^T b[:, i or 0, t]; grid.x over row blocks, grid.y over
// (slot, token) pairs (grid-stride beyond the launch limit). TYPE < 0: f32/f16/bf16 weights
// read element by element (any strides); else a block type with packed rows.
template <int TYPE>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    mul_mat_id_kernel(TensorView as, TensorView b, TensorView ids, TensorView dst, int32_t* error) {
    const int lane = int(threadIdx.x) % 32;
    const int64_t m = int64_t(blockIdx.x) * kRowsPerBlock + int(threadIdx.x) / 32;
    const int64_t K = as.ne[0], n_slots = ids.ne[0], n_pairs = ids.ne[0] * ids.ne[1];
    if (m >= as.ne[1]) return;
    for (int64_t pair = blockIdx.y; pair < n_pairs; pair += gridDim.y) {
        const int64_t slot = pair % n_slots, token = pair / n_slots;
        const int64_t e = *reinterpret_cast<const int32_t*>(ids.data + slot * ids.nb[0] + token * ids.nb[1]);
        float* out = f32_ptr(dst, m, slot, token, 0);
        if (e < 0 || e >= as.ne[2]) { // the row stays defined; the backend raises the error
            if (lane == 0) {
                report_error(error, kExpertOutOfRange, int32_t(e), int32_t(token), int32_t(as.ne[2]));
                *out = 0.0f;
            }
            continue;
        }
        const int64_t column = b.ne[1] == 1 ? 0 : slot;
        float acc = 0.0f;
        if constexpr (TYPE < 0) {
            for (int64_t k = lane; k < K; k += 32)
                acc += load_any(as, k, m, e, 0) * load_f32(b, k, column, token, 0);
        } else {
            const char* row = as.data + m * as.nb[1] + e * as.nb[2];
            for (int64_t chunk = lane; chunk < K / 8; chunk += 32) {
                float w[8];
                QuantRow<TYPE>::load8(row, chunk, w);
#pragma unroll
                for (int i = 0; i < 8; ++i) acc += w[i] * load_f32(b, 8 * chunk + i, column, token, 0);
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) *out = acc;
    }
}

void run_mul_mat_id(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *as = dst->src[0], *b = dst->src[1], *ids = dst->src[2];
    const int64_t pairs = ids->ne[0] * ids->ne[1];
    if (pairs == 0 || as->ne[1] == 0) return;
    const dim3 grid(unsigned((as->ne[1] + kRowsPerBlock - 1) / kRowsPerBlock),
                    unsigned(std::min<int64_t>(pairs, 65535)));
    auto launch = [&](auto kernel) {
        kernel<<<grid, kRowsPerBlock * 32, 0, ctx.stream>>>(view_of(as), view_of(b), view_of(ids),
                                                            view_of(dst), ctx.error_flag);
        GFA_CUDA_CHECK_LAUNCH();
    };
    if (is_cuda_quant_type(as->type))
        dispatch_quant_type(as->type, [&](auto tag) { launch(mul_mat_id_kernel<decltype(tag)::value>); });
    else
        launch(mul_mat_id_kernel<-1>);
}

bool supports_mul_mat_id(const Tensor* dst) {
    const Tensor *as = dst->src[0], *b = dst->src[1], *ids = dst->src[2];
    if (!as || !b || !ids || b->type != Type::F32 || ids->type != Type::I32 || dst->type != Type::F32 ||
        !dst->is_contiguous() || as->ne[1] > int64_t(INT32_MAX) * kRowsPerBlock)
        return false;
    if (is_float_type(as->type)) return true;
    // Block types: whole blocks per packed row (the op's rule), read 8 values at a time.
    return is_cuda_quant_type(as->type) && row_is_packed(as) &&
           as->ne[0] % type_traits(as->type).block_size == 0 && as->nb[1] % 2 == 0 && as->nb[2] % 2 == 0;
}

} // namespace

void register_moe_kernels(KernelTable& t) {
    t[size_t(Op::TopK)] = {run_top_k, supports_top_k};
    t[size_t(Op::MulMatId)] = {run_mul_mat_id, supports_mul_mat_id};
}

} // namespace gfa::cuda
