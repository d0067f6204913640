// Element-wise arithmetic on the CPU. Binary ops broadcast b over a by repeating it; the
// common case (b's row as long as a's, both packed) runs as a straight vectorizable loop.
#include "cpu_kernels.h"
#include "op_def.h"

#include <cmath>

namespace gfa::cpu {

namespace {

template <class F> void binary_kernel(const ComputeCtx& ctx, Tensor* dst, F f) {
    const Tensor* a = dst->src[0];
    const Tensor* b = dst->src[1];
    const bool packed = a->nb[0] == 4 && b->nb[0] == 4 && dst->nb[0] == 4;
    ctx.pool.run(
        [&](int ith, int nth) {
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                float* d = f32_row(dst, i1, i2, i3);
                const char* pa = element_ptr(a, 0, i1, i2, i3);
                const char* pb = element_ptr(b, 0, i1 % b->ne[1], i2 % b->ne[2], i3 % b->ne[3]);
                const int64_t n = dst->ne[0];
                if (packed && b->ne[0] == n) {
                    const float* x = reinterpret_cast<const float*>(pa);
                    const float* y = reinterpret_cast<const float*>(pb);
                    for (int64_t i = 0; i < n; ++i) d[i] = f(x[i], y[i]);
                } else {
                    for (int64_t i = 0; i < n; ++i)
                        d[i] = f(*reinterpret_cast<const float*>(pa + i * a->nb[0]),
                                 *reinterpret_cast<const float*>(pb + (i % b->ne[0]) * b->nb[0]));
                }
            });
        },
        rows_of(dst));
}

template <class F> void unary_kernel(const ComputeCtx& ctx, Tensor* dst, F f) {
    const Tensor* a = dst->src[0];
    ctx.pool.run(
        [&](int ith, int nth) {
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                float* d = f32_row(dst, i1, i2, i3);
                const char* pa = element_ptr(a, 0, i1, i2, i3);
                if (a->nb[0] == 4) {
                    const float* x = reinterpret_cast<const float*>(pa);
                    for (int64_t i = 0; i < dst->ne[0]; ++i) d[i] = f(x[i]);
                } else {
                    for (int64_t i = 0; i < dst->ne[0]; ++i)
                        d[i] = f(*reinterpret_cast<const float*>(pa + i * a->nb[0]));
                }
            });
        },
        rows_of(dst));
}

// dst rows are always written packed (dst is a fresh contiguous node).
bool f32_inputs(const Tensor* dst) {
    for (const Tensor* s : dst->src)
        if (s && s->type != Type::F32) return false;
    return dst->type == Type::F32 && dst->nb[0] == 4;
}

void run_add(const ComputeCtx& c, Tensor* d) {
    binary_kernel(c, d, [](float x, float y) { return x + y; });
}
void run_sub(const ComputeCtx& c, Tensor* d) {
    binary_kernel(c, d, [](float x, float y) { return x - y; });
}
void run_mul(const ComputeCtx& c, Tensor* d) {
    binary_kernel(c, d, [](float x, float y) { return x * y; });
}
void run_div(const ComputeCtx& c, Tensor* d) {
    binary_kernel(c, d, [](float x, float y) { return x / y; });
}
void run_scale(const ComputeCtx& c, Tensor* d) {
    const ScaleParams p = d->params<ScaleParams>();
    unary_kernel(c, d, [p](float x) { return x * p.scale + p.bias; });
}
void run_sqr(const ComputeCtx& c, Tensor* d) {
    unary_kernel(c, d, [](float x) { return x * x; });
}
void run_sqrt(const ComputeCtx& c, Tensor* d) {
    unary_kernel(c, d, [](float x) { return std::sqrt(x); });
}
void run_exp(const ComputeCtx& c, Tensor* d) {
    unary_kernel(c, d, [](float x) { return std::exp(x); });
}
void run_log(const ComputeCtx& c, Tensor* d) {
    unary_kernel(c, d, [](float x) { return std::log(x); });
}
void run_neg(const ComputeCtx& c, Tensor* d) {
    unary_kernel(c, d, [](float x) { return -x; });
}
void run_tanh(const ComputeCtx& c, Tensor* d) {
    unary_kernel(c, d, [](float x) { return std::tanh(x); });
}

} // namespace

void register_elementwise_kernels(KernelTable& t) {
    t[size_t(Op::Add)] = {run_add, f32_inputs};
    t[size_t(Op::Sub)] = {run_sub, f32_inputs};
    t[size_t(Op::Mul)] = {run_mul, f32_inputs};
    t[size_t(Op::Div)] = {run_div, f32_inputs};
    t[size_t(Op::Scale)] = {run_scale, f32_inputs};
    t[size_t(Op::Sqr)] = {run_sqr, f32_inputs};
    t[size_t(Op::Sqrt)] = {run_sqrt, f32_inputs};
    t[size_t(Op::Exp)] = {run_exp, f32_inputs};
    t[size_t(Op::Log)] = {run_log, f32_inputs};
    t[size_t(Op::Neg)] = {run_neg, f32_inputs};
    t[size_t(Op::Tanh)] = {run_tanh, f32_inputs};
}

} // namespace gfa::cpu
