// Reductions on the GPU: one block per row sums the row in a tree (warp shuffles, then
// across warps); sum() sums rows into scratch first and then adds the row sums in a single
// block, so results do not depend on scheduling.
#include "cuda_device.cuh"
#include "op_def.h"

namespace gfa::cuda {

namespace {

// out[r] = factor * sum of row r of a (rows in row-major order over dims 1..3).
__global__ void row_sum_kernel(TensorView a, float factor, float* out) {
    __shared__ float shared[32];
    const int64_t r = blockIdx.x;
    const int64_t i1 = r % a.ne[1], i2 = (r / a.ne[1]) % a.ne[2], i3 = r / (a.ne[1] * a.ne[2]);
    float acc = 0.0f;
    for (int64_t i0 = threadIdx.x; i0 < a.ne[0]; i0 += blockDim.x) acc += load_f32(a, i0, i1, i2, i3);
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) out[r] = acc * factor;
}

__global__ void sum_to_scalar_kernel(const float* values, int64_t n, float factor, float* out) {
    __shared__ float shared[32];
    float acc = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += values[i];
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) *out = acc * factor;
}

// Row sums into a contiguous f32 destination (sum_rows and mean results are contiguous nodes).
void launch_row_sums(const ComputeCtx& ctx, const Tensor* a, float factor, float* out) {
    row_sum_kernel<<<unsigned(a->nrows()), row_block_threads(a->ne[0]), 0, ctx.stream>>>(view_of(a), factor,
                                                                                         out);
}

void run_sum(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* a = dst->src[0];
    float* partial = static_cast<float*>(
        ctx.scratch->get(size_t(a->nrows()) * sizeof(float), ctx.stream, ctx.device_name));
    launch_row_sums(ctx, a, 1.0f, partial);
    GFA_CUDA_CHECK_LAUNCH();
    launch_sum_to_scalar(ctx, partial, a->nrows(), 1.0f, static_cast<float*>(dst->data));
}
void run_sum_rows(const ComputeCtx& ctx, Tensor* dst) {
    launch_row_sums(ctx, dst->src[0], 1.0f, static_cast<float*>(dst->data));
}
void run_mean(const ComputeCtx& ctx, Tensor* dst) {
    launch_row_sums(ctx, dst->src[0], 1.0f / float(dst->src[0]->ne[0]), static_cast<float*>(dst->data));
}

bool supports_reduce(const Tensor* dst) {
    return dst->src[0]->type == Type::F32 && dst->type == Type::F32 && dst->is_contiguous() &&
           dst->src[0]->nrows() < (int64_t(1) << 31);
}

} // namespace

void launch_sum_to_scalar(const ComputeCtx& ctx, const float* values, int64_t n, float factor, float* out) {
    sum_to_scalar_kernel<<<1, 1024, 0, ctx.stream>>>(values, n, factor, out);
}

void register_reduce_kernels(KernelTable& t) {
    t[size_t(Op::Sum)] = {run_sum, supports_reduce};
    t[size_t(Op::SumRows)] = {run_sum_rows, supports_reduce};
    t[size_t(Op::Mean)] = {run_mean, supports_reduce};
}

} // namespace gfa::cuda
