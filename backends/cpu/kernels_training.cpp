// Training kernels on the CPU: the AdamW step.
#include "cpu_kernels.h"

#include <ggml-fa/ops.h>

#include <cmath>

namespace gfa::cpu {

namespace {

void run_adamw(const ComputeCtx& ctx, Tensor* dst) {
    const AdamWParams p = dst->params<AdamWParams>();
    float* w = static_cast<float*>(dst->src[0]->data);
    const float* g = static_cast<const float*>(dst->src[1]->data);
    float* m = static_cast<float*>(dst->src[2]->data);
    float* v = static_cast<float*>(dst->src[3]->data);
    const float c1 = 1.0f - std::pow(p.beta1, float(p.step)), c2 = 1.0f - std::pow(p.beta2, float(p.step));
    ctx.pool.run([&](int ith, int nth) {
        const auto [b, e] = split_range(dst->nelements(), ith, nth);
        for (int64_t i = b; i < e; ++i) {
            m[i] = p.beta1 * m[i] + (1.0f - p.beta1) * g[i];
            v[i] = p.beta2 * v[i] + (1.0f - p.beta2) * g[i] * g[i];
            w[i] -= p.lr * ((m[i] / c1) / (std::sqrt(v[i] / c2) + p.eps) + p.weight_decay * w[i]);
        }
    });
}

} // namespace

void register_training_kernels(KernelTable& t) {
    t[size_t(Op::AdamW)] = {run_adamw, nullptr};
}

} // namespace gfa::cpu
