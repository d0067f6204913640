// Data movement on the CPU: fill, conversions between types (cont/cpy), row gathers and
// scatters, concat, repeat and its gradient.
#include "cpu_kernels.h"
#include "op_def.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

namespace gfa::cpu {

namespace {

bool row_is_packed(const Tensor* t) {
    return t->nb[0] == t->element_size() || t->ne[0] == 1;
}

// Reads row (i1, i2, i3) of t as floats. Quantized rows must be packed.
void read_row_f32(const Tensor* t, int64_t i1, int64_t i2, int64_t i3, float* out) {
    const TypeTraits& tt = type_traits(t->type);
    const char* row = element_ptr(t, 0, i1, i2, i3);
    if (t->type == Type::I32) {
        for (int64_t i = 0; i < t->ne[0]; ++i)
            out[i] = float(*reinterpret_cast<const int32_t*>(row + i * t->nb[0]));
    } else if (row_is_packed(t)) {
        tt.to_float(row, out, t->ne[0]);
    } else {
        for (int64_t i = 0; i < t->ne[0]; ++i) tt.to_float(row + i * t->nb[0], out + i, 1);
    }
}

// Writes n floats starting at flat element index `flat` of t (row-major over ne).
void write_flat_f32(Tensor* t, int64_t flat, const float* values, int64_t n) {
    const TypeTraits& tt = type_traits(t->type);
    while (n > 0) {
        const int64_t i0 = flat % t->ne[0];
        const int64_t r = flat / t->ne[0];
        const int64_t i1 = r % t->ne[1], i2 = (r / t->ne[1]) % t->ne[2], i3 = r / (t->ne[1] * t->ne[2]);
        const int64_t run = std::min(n, t->ne[0] - i0);
        char* dst = element_ptr(t, 0, i1, i2, i3);
        if (t->type == Type::I32) {
            for (int64_t i = 0; i < run; ++i)
                *reinterpret_cast<int32_t*>(dst + (i0 + i) * t->nb[0]) = int32_t(values[i]);
        } else if (tt.block_size > 1) {
            tt.from_float(values, dst + size_t(i0 / tt.block_size) * tt.type_size,
                          run); // row-aligned runs only
        } else if (row_is_packed(t)) {
            tt.from_float(values, dst + i0 * t->nb[0], run);
        } else {
            for (int64_t i = 0; i < run; ++i) tt.from_float(values + i, dst + (i0 + i) * t->nb[0], 1);
        }
        flat += run;
        values += run;
        n -= run;
    }
}

// Copies src into dst element by element in row-major order, converting types.
void copy_convert(const ComputeCtx& ctx, const Tensor* src, Tensor* dst) {
    if (src->type == dst->type && src->is_contiguous() && dst->is_contiguous()) {
        const size_t bytes = src->nbytes();
        ctx.pool.run([&](int ith, int nth) {
            const auto [b, e] = split_range(int64_t(bytes), ith, nth);
            std::memcpy(static_cast<char*>(dst->data) + b, static_cast<const char*>(src->data) + b,
                        size_t(e - b));
        });
        return;
    }
    ctx.pool.run(
        [&](int ith, int nth) {
            std::vector<float> row(size_t(src->ne[0]));
            for_each_row(src, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                read_row_f32(src, i1, i2, i3, row.data());
                const int64_t flat = ((i3 * src->ne[2] + i2) * src->ne[1] + i1) * src->ne[0];
                write_flat_f32(dst, flat, row.data(), src->ne[0]);
            });
        },
        rows_of(src));
}

bool quant_rows_align(const Tensor* src, const Tensor* dst) {
    // Quantized rows can only be read and written whole.
    const TypeTraits& ts = type_traits(src->type);
    const TypeTraits& td = type_traits(dst->type);
    if (ts.block_size > 1 && !row_is_packed(src)) return false;
    if (td.block_size > 1 && (dst->ne[0] != src->ne[0] || !row_is_packed(dst))) return false;
    const bool src_ok = src->type == Type::I32 || ts.to_float;
    const bool dst_ok = dst->type == Type::I32 || td.from_float;
    return src_ok && dst_ok;
}

void run_cont(const ComputeCtx& ctx, Tensor* dst) {
    copy_convert(ctx, dst->src[0], dst);
}
bool supports_cont(const Tensor* dst) {
    return quant_rows_align(dst->src[0], dst);
}
void run_cpy(const ComputeCtx& ctx, Tensor* dst) {
    copy_convert(ctx, dst->src[0], dst);
}
bool supports_cpy(const Tensor* dst) {
    return quant_rows_align(dst->src[0], dst);
}

void run_fill(const ComputeCtx& ctx, Tensor* dst) {
    const float value = dst->params<FillParams>().value;
    ctx.pool.run(
        [&](int ith, int nth) {
            std::vector<float> row(size_t(dst->ne[0]), value);
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                type_traits(dst->type).from_float(row.data(), element_ptr(dst, 0, i1, i2, i3), dst->ne[0]);
            });
        },
        rows_of(dst));
}

int64_t row_index(const Tensor* rows, int64_t i, int64_t j, int64_t limit, const char* op) {
    const char* p = element_ptr(rows, i, j, 0, 0);
    const int64_t r =
        rows->type == Type::I64 ? *reinterpret_cast<const int64_t*>(p) : *reinterpret_cast<const int32_t*>(p);
    if (r < 0 || r >= limit)
        fail(std::string(op) + ": row index " + std::to_string(r) + " at position " + std::to_string(i) +
             " is outside [0, " + std::to_string(limit) + ")");
    return r;
}

void run_get_rows(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* a = dst->src[0];
    const Tensor* rows = dst->src[1];
    ctx.pool.run(
        [&](int ith, int nth) {
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                const int64_t r = row_index(rows, i1, rows->ne[1] == 1 ? 0 : i2, a->ne[1], "get_rows");
                read_row_f32(a, r, i2, i3, f32_row(dst, i1, i2, i3));
            });
        },
        rows_of(dst));
}
bool supports_get_rows(const Tensor* dst) {
    return row_is_packed(dst->src[0]) && type_traits(dst->src[0]->type).to_float;
}

void run_get_rows_back(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* grad = dst->src[0];
    const Tensor* rows = dst->src[1];
    // Several gathered rows may name the same source row: each worker owns a column range,
    // so the accumulation needs no synchronization and is deterministic.
    ctx.pool.run([&](int ith, int nth) {
        const auto [c0, c1] = split_range(dst->ne[0], ith, nth);
        for (int64_t i3 = 0; i3 < dst->ne[3]; ++i3)
            for (int64_t i2 = 0; i2 < dst->ne[2]; ++i2)
                for (int64_t i1 = 0; i1 < dst->ne[1]; ++i1) {
                    float* d = f32_row(dst, i1, i2, i3);
                    for (int64_t c = c0; c < c1; ++c) d[c] = 0.0f;
                }
        for (int64_t i2 = 0; i2 < grad->ne[2]; ++i2)
            for (int64_t i = 0; i < grad->ne[1]; ++i) {
                const int64_t r = row_index(rows, i, rows->ne[1] == 1 ? 0 : i2, dst->ne[1], "get_rows_back");
                const float* g = f32_row(grad, i, i2, 0);
                float* d = f32_row(dst, r, i2, 0);
                for (int64_t c = c0; c < c1; ++c) d[c] += g[c];
            }
    });
}

void run_set_rows(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* b = dst->src[1];
    const Tensor* rows = dst->src[2];
    const TypeTraits& tt = type_traits(dst->type);
    ctx.pool.run(
        [&](int ith, int nth) {
            for_each_row(b, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                const int64_t r = row_index(rows, i1, 0, dst->ne[1], "set_rows");
                tt.from_float(f32_row(b, i1, i2, i3), element_ptr(dst, 0, r, i2, i3), dst->ne[0]);
            });
        },
        rows_of(b));
}
bool supports_set_rows(const Tensor* dst) {
    return row_is_packed(dst) && row_is_packed(dst->src[1]);
}

void run_concat(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* a = dst->src[0];
    const Tensor* b = dst->src[1];
    const int dim = dst->params<ConcatParams>().dim;
    ctx.pool.run(
        [&](int ith, int nth) {
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                float* d = f32_row(dst, i1, i2, i3);
                for (int64_t i0 = 0; i0 < dst->ne[0]; ++i0) {
                    int64_t idx[4] = {i0, i1, i2, i3};
                    const Tensor* s = a;
                    if (idx[dim] >= a->ne[dim]) {
                        idx[dim] -= a->ne[dim];
                        s = b;
                    }
                    d[i0] = *reinterpret_cast<const float*>(element_ptr(s, idx[0], idx[1], idx[2], idx[3]));
                }
            });
        },
        rows_of(dst));
}

void run_repeat(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* a = dst->src[0];
    ctx.pool.run(
        [&](int ith, int nth) {
            for_each_row(dst, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
                float* d = f32_row(dst, i1, i2, i3);
                const char* s = element_ptr(a, 0, i1 % a->ne[1], i2 % a->ne[2], i3 % a->ne[3]);
                for (int64_t i0 = 0; i0 < dst->ne[0]; ++i0)
                    d[i0] = *reinterpret_cast<const float*>(s + (i0 % a->ne[0]) * a->nb[0]);
            });
        },
        rows_of(dst));
}

// Each destination row is the sum of the r1 * r2 * r3 source rows repeated onto it, each
// contributing its r0 slices. Rows are added whole into a double accumulator (contiguous,
// so the loop vectorizes; walking a column per element was ~10x slower). When there are
// fewer destination rows than workers (a norm weight's gradient: one row summed over every
// token), each row's sources are split among the workers and the partial sums added in
// worker order, so the result does not depend on timing.
void run_repeat_back(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* g = dst->src[0];
    const int64_t n0 = dst->ne[0];
    const int64_t r0 = g->ne[0] / n0, r1 = g->ne[1] / dst->ne[1], r2 = g->ne[2] / dst->ne[2],
                  r3 = g->ne[3] / dst->ne[3];
    const int64_t dst_rows = dst->nrows(), per_row = r1 * r2 * r3;
    const int nth = ctx.pool.size();
    const int64_t chunks = dst_rows >= nth ? 1 : std::min<int64_t>(per_row, nth);
    std::vector<double> partial(size_t(dst_rows * chunks * n0), 0.0);
    auto coords = [&](int64_t row) {
        return std::array<int64_t, 3>{row % dst->ne[1], (row / dst->ne[1]) % dst->ne[2],
                                      row / (dst->ne[1] * dst->ne[2])};
    };
    ctx.pool.run(
        [&](int ith, int n) {
            const auto [begin, end] = split_range(dst_rows * chunks, ith, n);
            for (int64_t item = begin; item < end; ++item) {
                const int64_t row = item / chunks, chunk = item % chunks;
                const auto [i1, i2, i3] = coords(row);
                const auto [k_begin, k_end] = split_range(per_row, int(chunk), int(chunks));
                double* acc = &partial[size_t(item * n0)];
                for (int64_t k = k_begin; k < k_end; ++k) {
                    const int64_t k1 = k % r1, k2 = (k / r1) % r2, k3 = k / (r1 * r2);
                    const char* s =
                        element_ptr(g, 0, i1 + k1 * dst->ne[1], i2 + k2 * dst->ne[2], i3 + k3 * dst->ne[3]);
                    for (int64_t k0 = 0; k0 < r0; ++k0) {
                        if (g->nb[0] == sizeof(float)) {
                            const float* x = reinterpret_cast<const float*>(s) + k0 * n0;
                            for (int64_t i0 = 0; i0 < n0; ++i0) acc[i0] += double(x[i0]);
                        } else {
                            for (int64_t i0 = 0; i0 < n0; ++i0)
                                acc[i0] +=
                                    double(*reinterpret_cast<const float*>(s + (i0 + k0 * n0) * g->nb[0]));
                        }
                    }
                }
            }
        },
        int(std::min<int64_t>(dst_rows * chunks, INT32_MAX)));
    for (int64_t row = 0; row < dst_rows; ++row) {
        const auto [i1, i2, i3] = coords(row);
        float* d = f32_row(dst, i1, i2, i3);
        for (int64_t i0 = 0; i0 < n0; ++i0) {
            double sum = 0.0;
            for (int64_t c = 0; c < chunks; ++c) sum += partial[size_t((row * chunks + c) * n0 + i0)];
            d[i0] = float(sum);
        }
    }
}

} // namespace

void register_movement_kernels(KernelTable& t) {
    t[size_t(Op::Fill)] = {run_fill, nullptr};
    t[size_t(Op::Cont)] = {run_cont, supports_cont};
    t[size_t(Op::Cpy)] = {run_cpy, supports_cpy};
    t[size_t(Op::GetRows)] = {run_get_rows, supports_get_rows};
    t[size_t(Op::GetRowsBack)] = {run_get_rows_back, nullptr};
    t[size_t(Op::SetRows)] = {run_set_rows, supports_set_rows};
    t[size_t(Op::Concat)] = {run_concat, nullptr};
    t[size_t(Op::Repeat)] = {run_repeat, nullptr};
    t[size_t(Op::RepeatBack)] = {run_repeat_back, nullptr};
}

} // namespace gfa::cpu
