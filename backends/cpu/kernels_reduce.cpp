// Reductions on the CPU, top_k and sample_token. Rows are summed in double so long rows stay
// accurate; sum() adds per-worker partials in worker order, so the result does not depend on
// timing.
#include "cpu_kernels.h"
#include "../../src/ops/sample_rule.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace gfa::cpu {

namespace {

double row_sum(const Tensor* a, int64_t i1, int64_t i2, int64_t i3) {
    const char* p = element_ptr(a, 0, i1, i2, i3);
    double acc = 0.0;
    for (int64_t i = 0; i < a->ne[0]; ++i) acc += *reinterpret_cast<const float*>(p + i * a->nb[0]);
    return acc;
}

void run_sum(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* a = dst->src[0];
    std::vector<double> partial(size_t(ctx.pool.size()), 0.0);
    ctx.pool.run([&](int ith, int nth) {
        double acc = 0.0;
        for_each_row(a, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) { acc += row_sum(a, i1, i2, i3); });
        partial[size_t(ith)] = acc;
    });
    double total = 0.0;
    for (double p : partial) total += p;
    *static_cast<float*>(dst->data) = float(total);
}

template <bool Average> void run_rows(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* a = dst->src[0];
    ctx.pool.run([&](int ith, int nth) {
        for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
            const double s = row_sum(a, i1, i2, i3);
            *f32_row(dst, i1, i2, i3) = float(Average ? s / double(a->ne[0]) : s);
        });
    });
}

// Each row's k largest positions, by a partial sort of the positions (value descending,
// position ascending on ties, as the reference orders them).
void run_top_k(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* a = dst->src[0];
    const int64_t n = a->ne[0], k = dst->ne[0];
    if (k == 1) { // greedy decoding's pick: one pass, no position list to sort
        ctx.pool.run([&](int ith, int nth) {
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                const char* p = element_ptr(a, 0, i1, i2, i3);
                float best = -INFINITY;
                int32_t at = 0;
                for (int64_t i = 0; i < n; ++i) {
                    const float v = *reinterpret_cast<const float*>(p + i * a->nb[0]);
                    if (v > best) best = v, at = int32_t(i); // NaN never passes; ties keep the first
                }
                *reinterpret_cast<int32_t*>(element_ptr(dst, 0, i1, i2, i3)) = at;
            });
        });
        return;
    }
    ctx.pool.run([&](int ith, int nth) {
        std::vector<int32_t> order(static_cast<size_t>(n));
        std::vector<float> row(static_cast<size_t>(n));
        for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
            const char* p = element_ptr(a, 0, i1, i2, i3);
            for (int64_t i = 0; i < n; ++i) {
                const float v = *reinterpret_cast<const float*>(p + i * a->nb[0]);
                row[size_t(i)] = std::isnan(v) ? -INFINITY : v; // NaN ranks last, the order stays strict
                order[size_t(i)] = int32_t(i);
            }
            std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t x, int32_t y) {
                return row[size_t(x)] > row[size_t(y)] || (row[size_t(x)] == row[size_t(y)] && x < y);
            });
            char* out = element_ptr(dst, 0, i1, i2, i3);
            for (int64_t j = 0; j < k; ++j)
                *reinterpret_cast<int32_t*>(out + j * dst->nb[0]) = order[size_t(j)];
        });
    });
}

// One draw per column, by the op's rule (src/ops/sample_rule.h) on the column in double.
void run_sample_token(const ComputeCtx&, Tensor* dst) {
    const Tensor *logits = dst->src[0], *positions = dst->src[1];
    const SampleParams& p = dst->params<SampleParams>();
    std::vector<double> column(static_cast<size_t>(logits->ne[0]));
    for (int64_t c = 0; c < logits->ne[1]; ++c) {
        const char* at = element_ptr(logits, 0, c, 0, 0);
        for (int64_t i = 0; i < logits->ne[0]; ++i)
            column[size_t(i)] = *reinterpret_cast<const float*>(at + i * logits->nb[0]);
        const int64_t position = *reinterpret_cast<const int32_t*>(element_ptr(positions, c, 0, 0, 0));
        *reinterpret_cast<int32_t*>(element_ptr(dst, 0, c, 0, 0)) =
            int32_t(sample_rule::pick(column, p, position));
    }
}

bool f32_input(const Tensor* dst) {
    return dst->src[0]->type == Type::F32;
}

} // namespace

void register_reduce_kernels(KernelTable& t) {
    t[size_t(Op::Sum)] = {run_sum, f32_input};
    t[size_t(Op::SumRows)] = {run_rows<false>, f32_input};
    t[size_t(Op::Mean)] = {run_rows<true>, f32_input};
    t[size_t(Op::TopK)] = {run_top_k, f32_input};
    t[size_t(Op::SampleToken)] = {run_sample_token, nullptr};
}

} // namespace gfa::cpu
