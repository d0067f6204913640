// Normalization, rope, softmax and the causal mask on the CPU. Every kernel works one row
// (dim 0) at a time, rows split over the workers; row statistics accumulate in double.
#include "cpu_kernels.h"
#include "op_def.h"
#include "row_math.h"

#include <cmath>
#include <limits>
#include <vector>

namespace gfa::cpu {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- norm / rms_norm ----

// y = (x - mean) * inv_std, with mean = 0 for RMS norm.
void normalize_kernel(const ComputeCtx& ctx, Tensor* dst, bool centered) {
    const Tensor* a = dst->src[0];
    const double eps = dst->params<NormParams>().eps;
    const int64_t n = dst->ne[0];
    ctx.pool.run(
        [&](int ith, int nth) {
            std::vector<float> scratch;
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                const float* x = packed_row(a, i1, i2, i3, scratch);
                float* y = f32_row(dst, i1, i2, i3);
                const double mean = centered ? sum_f64(x, n) / double(n) : 0.0;
                const double inv_std = 1.0 / std::sqrt(sum_sq_dev_f64(x, n, mean) / double(n) + eps);
                const float m = float(mean), s = float(inv_std);
                for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) * s;
            });
        },
        rows_of(dst));
}
void run_norm(const ComputeCtx& c, Tensor* d) {
    normalize_kernel(c, d, true);
}
void run_rms_norm(const ComputeCtx& c, Tensor* d) {
    normalize_kernel(c, d, false);
}

// dx = inv_std * (dy - mean(dy) - y * mean(dy * y)),  y = (x - mean) * inv_std
// (RMS norm: mean = 0 and no mean(dy) term).
void normalize_back_kernel(const ComputeCtx& ctx, Tensor* dst, bool centered) {
    const Tensor *dy_t = dst->src[0], *x_t = dst->src[1];
    const double eps = dst->params<NormParams>().eps;
    const int64_t n = dst->ne[0];
    ctx.pool.run(
        [&](int ith, int nth) {
            std::vector<float> scratch_dy, scratch_x;
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                const float* dy = packed_row(dy_t, i1, i2, i3, scratch_dy);
                const float* x = packed_row(x_t, i1, i2, i3, scratch_x);
                float* dx = f32_row(dst, i1, i2, i3);
                const double mean = centered ? sum_f64(x, n) / double(n) : 0.0;
                const double inv_std = 1.0 / std::sqrt(sum_sq_dev_f64(x, n, mean) / double(n) + eps);
                const double mean_dy = centered ? sum_f64(dy, n) / double(n) : 0.0;
                // mean(dy * y) = (sum(dy * x) - mean * sum(dy)) * inv_std / n
                const double sum_dy = centered ? mean_dy * double(n) : 0.0;
                const double mean_dy_y = (dot_f64(dy, x, n) - mean * sum_dy) * inv_std / double(n);
                const float m = float(mean), s = float(inv_std), mdy = float(mean_dy);
                const float k = float(inv_std * mean_dy_y);
                for (int64_t i = 0; i < n; ++i) dx[i] = s * (dy[i] - mdy - (x[i] - m) * k);
            });
        },
        rows_of(dst));
}
void run_norm_back(const ComputeCtx& c, Tensor* d) {
    normalize_back_kernel(c, d, true);
}
void run_rms_norm_back(const ComputeCtx& c, Tensor* d) {
    normalize_back_kernel(c, d, false);
}

// ---- rope ----

// Rotates pair i of every head by theta_i = pos * freq_scale * freq_base^(-2i/n_dims)
// (divided by freq_factors[i] when given; negated for RopeBack). The cos/sin table of every
// token (dim 2) is made first, once: heads and the sequences of a batch (dim 3) share it, and
// the trigonometry, in double since pos * freq loses digits in float, would otherwise cost more
// than the rotations.
void run_rope(const ComputeCtx& ctx, Tensor* dst) {
    const RopeParams p = dst->params<RopeParams>();
    const Tensor *a = dst->src[0], *pos = dst->src[1], *factors = dst->src[2];
    const double sign = dst->op == Op::RopeBack ? -1.0 : 1.0;
    const int64_t half = p.n_dims / 2, n = dst->ne[0], n_tokens = dst->ne[2];
    std::vector<double> inv_freq(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i) {
        inv_freq[size_t(i)] =
            double(p.freq_scale) * std::pow(double(p.freq_base), -2.0 * double(i) / p.n_dims);
        if (factors)
            inv_freq[size_t(i)] /= double(*reinterpret_cast<const float*>(element_ptr(factors, i, 0, 0, 0)));
    }
    // cos_sin[(token * half + i) * 2 + {0, 1}]
    std::vector<float> cos_sin(size_t(n_tokens * half * 2));
    ctx.pool.run(
        [&](int ith, int nth) {
            for (int64_t t = ith; t < n_tokens; t += nth) {
                const int32_t position = *reinterpret_cast<const int32_t*>(element_ptr(pos, t, 0, 0, 0));
                for (int64_t i = 0; i < half; ++i) {
                    const double theta = sign * double(position) * inv_freq[size_t(i)];
                    cos_sin[size_t((t * half + i) * 2)] = float(std::cos(theta));
                    cos_sin[size_t((t * half + i) * 2 + 1)] = float(std::sin(theta));
                }
            }
        },
        n_tokens);
    ctx.pool.run(
        [&](int ith, int nth) {
            std::vector<float> scratch;
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                const float* x = packed_row(a, i1, i2, i3, scratch);
                float* y = f32_row(dst, i1, i2, i3);
                const float* cs = cos_sin.data() + i2 * half * 2;
                if (p.mode == RopeMode::NeoX) { // pairs (i, i + half)
                    for (int64_t i = 0; i < half; ++i) {
                        const float c = cs[2 * i], s = cs[2 * i + 1];
                        y[i] = x[i] * c - x[i + half] * s;
                        y[i + half] = x[i] * s + x[i + half] * c;
                    }
                } else { // pairs (2i, 2i + 1)
                    for (int64_t i = 0; i < half; ++i) {
                        const float c = cs[2 * i], s = cs[2 * i + 1];
                        y[2 * i] = x[2 * i] * c - x[2 * i + 1] * s;
                        y[2 * i + 1] = x[2 * i] * s + x[2 * i + 1] * c;
                    }
                }
                for (int64_t i = p.n_dims; i < n; ++i) y[i] = x[i]; // dims past n_dims pass through
            });
        },
        rows_of(dst));
}

// ---- softmax ----

// y = softmax(x * scale + slope(head) * mask) over each row; a row whose every entry is
// -inf (fully masked) becomes zeros rather than 0/0.
void run_soft_max(const ComputeCtx& ctx, Tensor* dst) {
    const SoftMaxParams p = dst->params<SoftMaxParams>();
    const Tensor *a = dst->src[0], *mask = dst->src[1];
    const int64_t n = dst->ne[0];
    std::vector<float> slopes(size_t(a->ne[2]));
    for (int64_t h = 0; h < a->ne[2]; ++h) slopes[size_t(h)] = attn::alibi_slope(p.max_bias, h, a->ne[2]);
    const float scale = p.scale;
    ctx.pool.run(
        [&](int ith, int nth) {
            std::vector<float> scratch_x, scratch_m;
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                const float* x = packed_row(a, i1, i2, i3, scratch_x);
                float* y = f32_row(dst, i1, i2, i3);
                // stage 1: logits
                if (mask) {
                    const float* m = packed_row(mask, i1, i2 % mask->ne[2], i3 % mask->ne[3], scratch_m);
                    const float slope = slopes[size_t(i2)];
                    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale + slope * m[i];
                } else {
                    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale;
                }
                // stage 2: exponentiate relative to the row max
                const float max = max_f32(y, n);
                if (max == kNegInf) {
                    for (int64_t i = 0; i < n; ++i) y[i] = 0.0f;
                    return;
                }
                for (int64_t i = 0; i < n; ++i) y[i] = vexp(y[i] - max);
                // stage 3: normalize
                const float inv_sum = float(1.0 / sum_f64(y, n));
                for (int64_t i = 0; i < n; ++i) y[i] *= inv_sum;
            });
        },
        rows_of(dst));
}

// dx = scale * y * (dy - sum(dy * y))
void run_soft_max_back(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *dy_t = dst->src[0], *y_t = dst->src[1];
    const float scale = dst->params<SoftMaxParams>().scale;
    const int64_t n = dst->ne[0];
    ctx.pool.run(
        [&](int ith, int nth) {
            std::vector<float> scratch_dy, scratch_y;
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                const float* dy = packed_row(dy_t, i1, i2, i3, scratch_dy);
                const float* y = packed_row(y_t, i1, i2, i3, scratch_y);
                float* dx = f32_row(dst, i1, i2, i3);
                const float dot = float(dot_f64(dy, y, n));
                for (int64_t i = 0; i < n; ++i) dx[i] = scale * y[i] * (dy[i] - dot);
            });
        },
        rows_of(dst));
}

// ---- causal mask ----

// Row i1 keeps columns 0..i1 + n_past and fills the rest (-inf, or 0 for the gradient).
void run_diag_mask(const ComputeCtx& ctx, Tensor* dst) {
    const DiagMaskNodeParams p = dst->params<DiagMaskNodeParams>();
    const Tensor* a = dst->src[0];
    const int64_t n = dst->ne[0];
    ctx.pool.run(
        [&](int ith, int nth) {
            std::vector<float> scratch;
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                const float* x = packed_row(a, i1, i2, i3, scratch);
                float* y = f32_row(dst, i1, i2, i3);
                const int64_t keep = std::min(n, i1 + int64_t(p.n_past) + 1);
                if (x != y) // in place, the kept part is already there
                    for (int64_t i = 0; i < keep; ++i) y[i] = x[i];
                for (int64_t i = keep; i < n; ++i) y[i] = p.fill;
            });
        },
        rows_of(dst));
}

// ---- supports predicates ----

bool all_f32(const Tensor* dst) {
    for (const Tensor* s : dst->src)
        if (s && s->type != Type::F32) return false;
    return dst->type == Type::F32 && dst->is_contiguous();
}
bool rope_supported(const Tensor* dst) {
    return dst->type == Type::F32 && dst->is_contiguous() && dst->src[0]->type == Type::F32 &&
           dst->src[1]->type == Type::I32;
}
bool soft_max_supported(const Tensor* dst) {
    const Tensor* mask = dst->src[1];
    return dst->type == Type::F32 && dst->is_contiguous() && dst->src[0]->type == Type::F32 &&
           (!mask || mask->type == Type::F32 || mask->type == Type::F16);
}

} // namespace

void register_norm_kernels(KernelTable& t) {
    t[size_t(Op::Norm)] = {run_norm, all_f32};
    t[size_t(Op::NormBack)] = {run_norm_back, all_f32};
    t[size_t(Op::RmsNorm)] = {run_rms_norm, all_f32};
    t[size_t(Op::RmsNormBack)] = {run_rms_norm_back, all_f32};
    t[size_t(Op::Rope)] = {run_rope, rope_supported};
    t[size_t(Op::RopeBack)] = {run_rope, rope_supported};
    t[size_t(Op::SoftMax)] = {run_soft_max, soft_max_supported};
    t[size_t(Op::SoftMaxBack)] = {run_soft_max_back, all_f32};
    t[size_t(Op::DiagMaskInf)] = {run_diag_mask, all_f32};
}

} // namespace gfa::cpu
