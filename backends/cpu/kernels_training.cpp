// Training kernels on the CPU: cross-entropy loss and its backward op, the AdamW step.
#include "cpu_kernels.h"
#include "op_def.h"
#include "row_math.h"

#include <ggml-fa/ops.h>

#include <cmath>
#include <vector>

namespace gfa::cpu {

namespace {

// log(sum(exp(x - max))) + max of one row, with the exponentials staged in `tmp`.
double log_sum_exp(const float* x, int64_t n, std::vector<float>& tmp) {
    const float max = max_f32(x, n);
    tmp.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) tmp[size_t(i)] = vexp(x[i] - max);
    return double(max) + std::log(sum_f64(tmp.data(), n));
}

// Labels as i32 classes (one per row): the row's class, checked on the calling thread before
// any work (a class out of range is an error naming the op, nothing is written).
bool class_labels(const Tensor* labels) {
    return labels->type == Type::I32;
}
int32_t class_of(const Tensor* labels, int64_t i1, int64_t i2, int64_t i3) {
    return *reinterpret_cast<const int32_t*>(element_ptr(labels, i1, i2, i3, 0));
}
void check_classes(const Tensor* logits, const Tensor* labels, const char* op) {
    for (int64_t i3 = 0; i3 < labels->ne[2]; ++i3)
        for (int64_t i2 = 0; i2 < labels->ne[1]; ++i2)
            for (int64_t i1 = 0; i1 < labels->ne[0]; ++i1) {
                const int32_t c = class_of(labels, i1, i2, i3);
                if (c < 0 || c >= logits->ne[0])
                    fail(std::string(op) + ": class " + std::to_string(c) + " is out of range [0, " +
                         std::to_string(logits->ne[0]) + ")");
            }
}

// Per row: -sum_c labels_c * (x_c - lse) = lse * sum(labels) - labels . x (with a class
// index: lse - x_class). Each worker sums its rows in double; the partial sums are added in
// worker order, so the result does not depend on thread timing.
void run_cross_entropy_loss(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *logits = dst->src[0], *labels = dst->src[1];
    const int64_t n = logits->ne[0];
    const bool classes = class_labels(labels);
    if (classes) check_classes(logits, labels, "cross_entropy_loss");
    std::vector<double> partial(size_t(ctx.pool.size()), 0.0);
    ctx.pool.run([&](int ith, int nth) {
        std::vector<float> scratch_x, scratch_l, tmp;
        double acc = 0.0;
        for_each_row(logits, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
            const float* x = packed_row(logits, i1, i2, i3, scratch_x);
            if (classes) {
                acc += log_sum_exp(x, n, tmp) - double(x[class_of(labels, i1, i2, i3)]);
                return;
            }
            const float* l = packed_row(labels, i1, i2, i3, scratch_l);
            acc += log_sum_exp(x, n, tmp) * sum_f64(l, n) - dot_f64(l, x, n);
        });
        partial[size_t(ith)] = acc;
    });
    double total = 0.0;
    for (double v : partial) total += v;
    *static_cast<float*>(dst->data) = float(total / double(logits->nrows()));
}

// d loss / d x_c = (softmax_c * sum(labels) - labels_c) * grad / n_rows
void run_cross_entropy_loss_back(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *grad = dst->src[0], *logits = dst->src[1], *labels = dst->src[2];
    const int64_t n = logits->ne[0];
    const float g = *static_cast<const float*>(grad->data) / float(logits->nrows());
    const bool classes = class_labels(labels);
    if (classes) check_classes(logits, labels, "cross_entropy_loss_back");
    ctx.pool.run([&](int ith, int nth) {
        std::vector<float> scratch_x, scratch_l, tmp;
        for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
            const float* x = packed_row(logits, i1, i2, i3, scratch_x);
            float* dx = f32_row(dst, i1, i2, i3);
            const float lse = float(log_sum_exp(x, n, tmp));
            if (classes) {
                for (int64_t i = 0; i < n; ++i) dx[i] = vexp(x[i] - lse) * g;
                dx[class_of(labels, i1, i2, i3)] -= g;
                return;
            }
            const float* l = packed_row(labels, i1, i2, i3, scratch_l);
            const float label_sum = float(sum_f64(l, n));
            for (int64_t i = 0; i < n; ++i) dx[i] = (vexp(x[i] - lse) * label_sum - l[i]) * g;
        });
    });
}

// Every tensor f32 but the labels, which may be i32 classes.
bool f32_but_labels(const Tensor* dst) {
    const Tensor* labels = dst->src[dst->op == Op::CrossEntropyLoss ? 1 : 2];
    for (const Tensor* s : dst->src)
        if (s && s->type != Type::F32 && !(s == labels && s->type == Type::I32)) return false;
    return dst->type == Type::F32 && dst->is_contiguous();
}

void run_adamw(const ComputeCtx& ctx, Tensor* dst) {
    const float* a = static_cast<const float*>(dst->src[4]->data); // adamw_values()
    const float lr = a[0], beta1 = a[1], beta2 = a[2], eps = a[3], decay = a[4];
    const float inv_c1 = 1.0f / a[5], inv_c2 = 1.0f / a[6];
    const Tensor* norm_sq = dst->src[5];
    const float clip =
        norm_sq ? float(adamw_clip_factor(a[7], *static_cast<const float*>(norm_sq->data))) : 1.0f;
    float* __restrict w = static_cast<float*>(dst->src[0]->data);
    const float* __restrict g = static_cast<const float*>(dst->src[1]->data);
    float* __restrict m = static_cast<float*>(dst->src[2]->data);
    float* __restrict v = static_cast<float*>(dst->src[3]->data);
    // The four tensors are distinct (the builder's shapes and types match, and the graph
    // gives each its own memory), so the loop can be vectorized.
    ctx.pool.run([&](int ith, int nth) {
        const auto [b, e] = split_range(dst->nelements(), ith, nth);
        for (int64_t i = b; i < e; ++i) {
            const float gi = clip * g[i];
            const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
            const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            w[i] -= lr * ((mi * inv_c1) / (std::sqrt(vi * inv_c2) + eps) + decay * w[i]);
        }
    });
}

} // namespace

void register_training_kernels(KernelTable& t) {
    t[size_t(Op::AdamW)] = {run_adamw, nullptr};
    t[size_t(Op::CrossEntropyLoss)] = {run_cross_entropy_loss, f32_but_labels};
    t[size_t(Op::CrossEntropyLossBack)] = {run_cross_entropy_loss_back, f32_but_labels};
}

} // namespace gfa::cpu
