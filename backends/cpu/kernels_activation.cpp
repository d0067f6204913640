// Activations on the CPU: silu, gelu (tanh / erf), relu, step, swiglu and the backward ops
// silu_back and gelu_back. Element-wise over packed rows, rows split over the workers.
#include "cpu_kernels.h"
#include "op_def.h"
#include "row_math.h"

#include <cmath>
#include <numbers>
#include <vector>

namespace gfa::cpu {

namespace {

constexpr float kGeluTanhC = 0.7978845608f; // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;
constexpr float kInvSqrt2 = float(1.0 / std::numbers::sqrt2);
constexpr float kInvSqrt2Pi = 0.3989422804f; // 1 / sqrt(2 pi)

template <class F> void unary_kernel(const ComputeCtx& ctx, Tensor* dst, F f) {
    const Tensor* a = dst->src[0];
    const int64_t n = dst->ne[0];
    ctx.pool.run(
        [&](int ith, int nth) {
            std::vector<float> scratch;
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                const float* x = packed_row(a, i1, i2, i3, scratch);
                float* y = f32_row(dst, i1, i2, i3);
                for (int64_t i = 0; i < n; ++i) y[i] = f(x[i]);
            });
        },
        rows_of(dst));
}

// Two same-shaped sources: (dy, x) for the backward ops, (gate, up) for swiglu.
template <class F> void binary_kernel(const ComputeCtx& ctx, Tensor* dst, F f) {
    const Tensor *a = dst->src[0], *b = dst->src[1];
    const int64_t n = dst->ne[0];
    ctx.pool.run(
        [&](int ith, int nth) {
            std::vector<float> scratch_a, scratch_b;
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                const float* x = packed_row(a, i1, i2, i3, scratch_a);
                const float* z = packed_row(b, i1, i2, i3, scratch_b);
                float* y = f32_row(dst, i1, i2, i3);
                for (int64_t i = 0; i < n; ++i) y[i] = f(x[i], z[i]);
            });
        },
        rows_of(dst));
}

// silu(x) = x * sigmoid(x); its slope is s * (1 + x * (1 - s)).
void run_silu(const ComputeCtx& c, Tensor* d) {
    unary_kernel(c, d, [](float x) { return x * vsigmoid(x); });
}
void run_silu_back(const ComputeCtx& c, Tensor* d) {
    binary_kernel(c, d, [](float dy, float x) {
        const float s = vsigmoid(x);
        return dy * s * (1.0f + x * (1.0f - s));
    });
}
void run_swiglu(const ComputeCtx& c, Tensor* d) {
    binary_kernel(c, d, [](float gate, float up) { return gate * vsigmoid(gate) * up; });
}

// gelu(x) = 0.5 x (1 + tanh(c (x + 0.044715 x^3)))   or   0.5 x (1 + erf(x / sqrt 2))
void run_gelu(const ComputeCtx& c, Tensor* d) {
    if (d->params<GeluParams>().approx == GeluApprox::Erf) {
        unary_kernel(c, d, [](float x) { return 0.5f * x * (1.0f + std::erf(x * kInvSqrt2)); });
    } else {
        unary_kernel(c, d, [](float x) {
            return 0.5f * x * (1.0f + vtanh(kGeluTanhC * x * (1.0f + kGeluCubic * x * x)));
        });
    }
}
void run_gelu_back(const ComputeCtx& c, Tensor* d) {
    if (d->params<GeluParams>().approx == GeluApprox::Erf) {
        // Phi(x) + x phi(x)
        binary_kernel(c, d, [](float dy, float x) {
            return dy * (0.5f * (1.0f + std::erf(x * kInvSqrt2)) + x * kInvSqrt2Pi * vexp(-0.5f * x * x));
        });
    } else {
        binary_kernel(c, d, [](float dy, float x) {
            const float th = vtanh(kGeluTanhC * x * (1.0f + kGeluCubic * x * x));
            return dy * (0.5f * (1.0f + th) +
                         0.5f * x * (1.0f - th * th) * kGeluTanhC * (1.0f + 3.0f * kGeluCubic * x * x));
        });
    }
}

void run_relu(const ComputeCtx& c, Tensor* d) {
    unary_kernel(c, d, [](float x) { return x > 0.0f ? x : 0.0f; });
}
void run_step(const ComputeCtx& c, Tensor* d) {
    unary_kernel(c, d, [](float x) { return x > 0.0f ? 1.0f : 0.0f; });
}

bool all_f32(const Tensor* dst) {
    for (const Tensor* s : dst->src)
        if (s && s->type != Type::F32) return false;
    return dst->type == Type::F32 && dst->is_contiguous();
}

} // namespace

void register_activation_kernels(KernelTable& t) {
    t[size_t(Op::Silu)] = {run_silu, all_f32};
    t[size_t(Op::SiluBack)] = {run_silu_back, all_f32};
    t[size_t(Op::Gelu)] = {run_gelu, all_f32};
    t[size_t(Op::GeluBack)] = {run_gelu_back, all_f32};
    t[size_t(Op::Relu)] = {run_relu, all_f32};
    t[size_t(Op::Step)] = {run_step, all_f32};
    t[size_t(Op::Swiglu)] = {run_swiglu, all_f32};
}

} // namespace gfa::cpu
