// Training ops on the GPU: cross-entropy loss (forward and backward) and the AdamW step.
//
// cross_entropy_loss(logits, labels) = -(1/rows) * sum over rows of sum_c labels * log_softmax(logits);
// its backward op takes (dL/dloss [1], logits, labels) and gives
// dL/dlogits = dL/dloss / rows * (softmax(logits) * sum(labels) - labels) per row: the exact
// derivative, which is the familiar softmax - labels when label rows sum to 1.
#include "cuda_device.cuh"
#include "op_def.h"

namespace gfa::cuda {

namespace {

constexpr int kThreads = 256;

// Per row: max and log-sum-exp of the logits, shared by the forward and backward kernels.
__device__ void row_log_sum_exp(const TensorView& logits, int64_t i1, int64_t i2, int64_t i3, float* shared,
                                float& mx, float& lse) {
    const int64_t n = logits.ne[0];
    mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, load_f32(logits, i, i1, i2, i3));
    mx = block_max(mx, shared);
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += expf(load_f32(logits, i, i1, i2, i3) - mx);
    lse = logf(block_sum(s, shared));
}

// Labels as i32 classes ([rows...]): row (i1, i2, i3)'s class, or -1 (reported) when it lies
// outside the n logits.
__device__ int64_t label_class(const TensorView& labels, int64_t i1, int64_t i2, int64_t i3, int64_t n,
                               int32_t* error_flag) {
    const int32_t t = *reinterpret_cast<const int32_t*>(labels.data + offset_of(labels, i1, i2, i3, 0));
    if (t < 0 || t >= n) {
        report_error(error_flag, kClassOutOfRange);
        return -1;
    }
    return t;
}

// row_loss[r] = sum_c labels * (logit - max - lse), i.e. the row's sum of labels * log p.
__global__ void cross_entropy_rows_kernel(TensorView logits, TensorView labels, float* row_loss,
                                          int32_t* error_flag) {
    __shared__ float shared[32];
    const int64_t r = blockIdx.x;
    const int64_t i1 = r % logits.ne[1], i2 = (r / logits.ne[1]) % logits.ne[2],
                  i3 = r / (logits.ne[1] * logits.ne[2]);
    float mx, lse;
    row_log_sum_exp(logits, i1, i2, i3, shared, mx, lse);
    if (labels.type == kTypeI32) { // a class per row: log p of that class
        const int64_t t = label_class(labels, i1, i2, i3, logits.ne[0], error_flag);
        if (threadIdx.x == 0) row_loss[r] = t < 0 ? 0.0f : load_f32(logits, t, i1, i2, i3) - mx - lse;
        return;
    }
    float acc = 0.0f;
    for (int64_t i = threadIdx.x; i < logits.ne[0]; i += blockDim.x)
        acc += load_f32(labels, i, i1, i2, i3) * (load_f32(logits, i, i1, i2, i3) - mx - lse);
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) row_loss[r] = acc;
}

void run_cross_entropy(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *logits = dst->src[0], *labels = dst->src[1];
    const int64_t rows = logits->nrows();
    float* row_loss =
        static_cast<float*>(ctx.scratch->get(size_t(rows) * sizeof(float), ctx.stream, ctx.device_name));
    cross_entropy_rows_kernel<<<unsigned(rows), row_block_threads(logits->ne[0]), 0, ctx.stream>>>(
        view_of(logits), view_of(labels), row_loss, ctx.error_flag);
    GFA_CUDA_CHECK_LAUNCH();
    launch_sum_to_scalar(ctx, row_loss, rows, -1.0f / float(rows), static_cast<float*>(dst->data));
}

__global__ void cross_entropy_back_kernel(const float* grad, TensorView logits, TensorView labels,
                                          TensorView dx, float inv_rows, int32_t* error_flag) {
    __shared__ float shared[32];
    const int64_t r = blockIdx.x;
    const int64_t i1 = r % logits.ne[1], i2 = (r / logits.ne[1]) % logits.ne[2],
                  i3 = r / (logits.ne[1] * logits.ne[2]);
    float mx, lse;
    row_log_sum_exp(logits, i1, i2, i3, shared, mx, lse);
    if (labels.type == kTypeI32) { // one-hot at the row's class
        const int64_t t = label_class(labels, i1, i2, i3, logits.ne[0], error_flag);
        const float g = *grad * inv_rows;
        for (int64_t i = threadIdx.x; i < logits.ne[0]; i += blockDim.x) {
            const float p = expf(load_f32(logits, i, i1, i2, i3) - mx - lse);
            *f32_ptr(dx, i, i1, i2, i3) = g * (p - (i == t ? 1.0f : 0.0f));
        }
        return;
    }
    float label_sum = 0.0f;
    for (int64_t i = threadIdx.x; i < logits.ne[0]; i += blockDim.x)
        label_sum += load_f32(labels, i, i1, i2, i3);
    label_sum = block_sum(label_sum, shared);
    const float g = *grad * inv_rows;
    for (int64_t i = threadIdx.x; i < logits.ne[0]; i += blockDim.x) {
        const float p = expf(load_f32(logits, i, i1, i2, i3) - mx - lse);
        *f32_ptr(dx, i, i1, i2, i3) = g * (p * label_sum - load_f32(labels, i, i1, i2, i3));
    }
}

void run_cross_entropy_back(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *grad = dst->src[0], *logits = dst->src[1], *labels = dst->src[2];
    const int64_t rows = logits->nrows();
    cross_entropy_back_kernel<<<unsigned(rows), row_block_threads(logits->ne[0]), 0, ctx.stream>>>(
        static_cast<const float*>(grad->data), view_of(logits), view_of(labels), view_of(dst),
        1.0f / float(rows), ctx.error_flag);
}

// f32 labels of the logits' shape, or i32 classes (one per row; the builder checked the shape).
bool supported_labels(const Tensor* logits, const Tensor* labels) {
    return labels->type == Type::I32 || (labels->type == Type::F32 && logits->ne == labels->ne);
}
bool supports_cross_entropy(const Tensor* dst) {
    const Tensor *logits = dst->src[0], *labels = dst->src[1];
    return logits && labels && logits->type == Type::F32 && supported_labels(logits, labels) &&
           dst->type == Type::F32 && dst->nelements() == 1 && logits->nrows() < (int64_t(1) << 31);
}
bool supports_cross_entropy_back(const Tensor* dst) {
    const Tensor *grad = dst->src[0], *logits = dst->src[1], *labels = dst->src[2];
    return grad && logits && labels && grad->type == Type::F32 && grad->nelements() == 1 &&
           logits->type == Type::F32 && supported_labels(logits, labels) && dst->ne == logits->ne &&
           dst->type == Type::F32 && logits->nrows() < (int64_t(1) << 31);
}

// ---- AdamW ---------------------------------------------------------------------------------

// values: adamw_values() (lr, beta1, beta2, eps, weight decay, the two bias corrections,
// grad_clip), read from device memory so that a replayed graph takes each step's values;
// norm_sq (or null): the squared global gradient norm that grad_clip bounds.
__global__ void adamw_kernel(float* w, const float* g, float* m, float* v, const float* values,
                             const float* norm_sq, int64_t n) {
    const float lr = values[0], beta1 = values[1], beta2 = values[2], eps = values[3], decay = values[4];
    const float c1 = values[5], c2 = values[6], limit = values[7];
    const float clip = norm_sq && limit > 0.0f && *norm_sq > limit * limit ? limit / sqrtf(*norm_sq) : 1.0f;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * blockDim.x) {
        const float gi = clip * g[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        w[i] -= lr * ((mi / c1) / (sqrtf(vi / c2) + eps) + decay * w[i]);
    }
}

void run_adamw(const ComputeCtx& ctx, Tensor* dst) {
    const int64_t n = dst->nelements();
    adamw_kernel<<<grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(
        static_cast<float*>(dst->src[0]->data), static_cast<const float*>(dst->src[1]->data),
        static_cast<float*>(dst->src[2]->data), static_cast<float*>(dst->src[3]->data),
        static_cast<const float*>(dst->src[4]->data),
        dst->src[5] ? static_cast<const float*>(dst->src[5]->data) : nullptr, n);
}
bool supports_adamw(const Tensor* dst) {
    for (int i = 0; i < 5; ++i) {
        const Tensor* s = dst->src[i];
        if (!s || s->type != Type::F32 || !s->is_contiguous() || (i < 4 && s->ne != dst->ne)) return false;
    }
    return !dst->src[5] || dst->src[5]->type == Type::F32;
}

} // namespace

void register_training_kernels(KernelTable& t) {
    t[size_t(Op::CrossEntropyLoss)] = {run_cross_entropy, supports_cross_entropy};
    t[size_t(Op::CrossEntropyLossBack)] = {run_cross_entropy_back, supports_cross_entropy_back};
    t[size_t(Op::AdamW)] = {run_adamw, supports_adamw};
}

} // namespace gfa::cuda
