// Data movement on the GPU: fill, conversions between types (cont/cpy, with dequantization
// of every block type in quant_blocks.cuh and q8_0 quantization), row gathers and scatters, concat, repeat
// and its gradient. Each kernel walks its elements with a grid-stride loop over flat indices,
// except repeat_back over many copies, which splits the copies too.
#include "cuda_device.cuh"
#include "early_launch.cuh"
#include "op_def.h"

#include <algorithm>

namespace gfa::cuda {

namespace {

constexpr int kThreads = 256;

// ---- fill ---------------------------------------------------------------------------------

__global__ void fill_kernel(TensorView dst, float value, int64_t n) {
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        int64_t i0, i1, i2, i3;
        unflatten(k, dst.ne, i0, i1, i2, i3);
        store_plain(dst.data + offset_of(dst, i0, i1, i2, i3), dst.type, value);
    }
}

void run_fill(const ComputeCtx& ctx, Tensor* dst) {
    const int64_t n = dst->nelements();
    fill_kernel<<<grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(view_of(dst),
                                                                    dst->params<FillParams>().value, n);
}
bool supports_fill(const Tensor* dst) {
    return is_float_type(dst->type);
}

// ---- cpy / cont ---------------------------------------------------------------------------

// Element k of src (row-major) goes to element k of dst, converting through float.
__global__ void convert_kernel(TensorView src, TensorView dst, int64_t n) {
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        int64_t i0, i1, i2, i3;
        unflatten(k, src.ne, i0, i1, i2, i3);
        const float v = load_any(src, i0, i1, i2, i3);
        unflatten(k, dst.ne, i0, i1, i2, i3);
        store_plain(dst.data + offset_of(dst, i0, i1, i2, i3), dst.type, v);
    }
}

// Same plain type on both sides: copy the element's bytes (exact for i32 too).
__global__ void copy_bytes_kernel(TensorView src, TensorView dst, int64_t n, int elem_size) {
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        int64_t i0, i1, i2, i3;
        unflatten(k, src.ne, i0, i1, i2, i3);
        const char* s = src.data + offset_of(src, i0, i1, i2, i3);
        unflatten(k, dst.ne, i0, i1, i2, i3);
        char* d = dst.data + offset_of(dst, i0, i1, i2, i3);
        if (elem_size == 4)
            *reinterpret_cast<uint32_t*>(d) = *reinterpret_cast<const uint32_t*>(s);
        else if (elem_size == 2)
            *reinterpret_cast<uint16_t*>(d) = *reinterpret_cast<const uint16_t*>(s);
        else
            for (int b = 0; b < elem_size; ++b) d[b] = s[b];
    }
}

// Quantizes 32 consecutive elements of one row into a q8_0 block (same rounding as the CPU:
// d = amax / 127, q = round(x / d)).
__device__ void quantize_block_q8_0(const float* x, block_q8_0* out) {
    float amax = 0.0f;
    for (int j = 0; j < QK8_0; ++j) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    out->d = __half_as_ushort(__float2half_rn(d));
    for (int j = 0; j < QK8_0; ++j) out->qs[j] = int8_t(roundf(x[j] * id));
}

// One thread per destination block; src and dst have the same row length.
__global__ void quantize_rows_q8_0_kernel(TensorView src, TensorView dst, int64_t n_blocks) {
    const int64_t blocks_per_row = dst.ne[0] / QK8_0;
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n_blocks;
         k += int64_t(gridDim.x) * blockDim.x) {
        const int64_t ib = k % blocks_per_row, r = k / blocks_per_row;
        const int64_t i1 = r % src.ne[1], i2 = (r / src.ne[1]) % src.ne[2], i3 = r / (src.ne[1] * src.ne[2]);
        float x[QK8_0];
        for (int j = 0; j < QK8_0; ++j) x[j] = load_any(src, ib * QK8_0 + j, i1, i2, i3);
        // dst row r in row-major order over dst's own shape
        const int64_t d1 = r % dst.ne[1], d2 = (r / dst.ne[1]) % dst.ne[2], d3 = r / (dst.ne[1] * dst.ne[2]);
        quantize_block_q8_0(x, reinterpret_cast<block_q8_0*>(dst.data + offset_of(dst, 0, d1, d2, d3)) + ib);
    }
}

void copy_convert(const ComputeCtx& ctx, const Tensor* src, Tensor* dst) {
    const int64_t n = src->nelements();
    if (src->type == dst->type && src->is_contiguous() && dst->is_contiguous()) {
        GFA_CUDA_CHECK(
            cudaMemcpyAsync(dst->data, src->data, src->nbytes(), cudaMemcpyDeviceToDevice, ctx.stream));
        return;
    }
    if (dst->type == Type::Q8_0) {
        const int64_t n_blocks = n / QK8_0;
        quantize_rows_q8_0_kernel<<<grid_for(n_blocks, kThreads), kThreads, 0, ctx.stream>>>(
            view_of(src), view_of(dst), n_blocks);
        return;
    }
    if (src->type == dst->type && !type_traits(src->type).is_quantized) {
        copy_bytes_kernel<<<grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(view_of(src), view_of(dst), n,
                                                                              int(src->element_size()));
        return;
    }
    convert_kernel<<<grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(view_of(src), view_of(dst), n);
}

bool readable(const Tensor* t) {
    if (is_cuda_quant_type(t->type))
        return row_is_packed(t) && t->ne[0] % type_traits(t->type).block_size == 0;
    return is_float_type(t->type) || t->type == Type::I32;
}

bool supports_copy(const Tensor* dst) {
    const Tensor* src = dst->src[0];
    if (src->type == dst->type && src->is_contiguous() && dst->is_contiguous()) return true;
    if (!readable(src)) return false;
    if (dst->type == Type::Q8_0)
        return dst->ne[0] == src->ne[0] && row_is_packed(dst) && src->type != Type::I32;
    return is_float_type(dst->type) || dst->type == Type::I32;
}

void run_copy(const ComputeCtx& ctx, Tensor* dst) {
    copy_convert(ctx, dst->src[0], dst);
}

// ---- get_rows / get_rows_back / set_rows -------------------------------------------------

__device__ __forceinline__ int64_t read_index(const TensorView& rows, int64_t i, int64_t j) {
    const char* p = rows.data + i * rows.nb[0] + j * rows.nb[1];
    return rows.type == kTypeI64 ? *reinterpret_cast<const int64_t*>(p)
                                 : int64_t(*reinterpret_cast<const int32_t*>(p));
}

__global__ void get_rows_kernel(TensorView a, TensorView rows, TensorView dst, int64_t n, int32_t* error) {
    await_inputs();
    allow_next_launch();
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        int64_t i0, i1, i2, i3;
        unflatten(k, dst.ne, i0, i1, i2, i3);
        const int64_t r = read_index(rows, i1, rows.ne[1] == 1 ? 0 : i2);
        float v = 0.0f;
        if (r < 0 || r >= a.ne[1])
            report_error(error, kRowIndexOutOfRange);
        else
            v = load_any(a, i0, r, i2, i3);
        *f32_ptr(dst, i0, i1, i2, i3) = v;
    }
}

// Quantized source: one thread block per gathered row, each thread dequantizing 8 values at
// a time (exactly, as the CPU does) instead of a block per element.
template <int T>
__global__ void get_rows_quant_kernel(TensorView a, TensorView rows, TensorView dst, int32_t* error) {
    await_inputs();
    allow_next_launch();
    const int64_t r = blockIdx.x;
    const int64_t i1 = r % dst.ne[1], i2 = (r / dst.ne[1]) % dst.ne[2], i3 = r / (dst.ne[1] * dst.ne[2]);
    const int64_t src_row = read_index(rows, i1, rows.ne[1] == 1 ? 0 : i2);
    const bool valid = src_row >= 0 && src_row < a.ne[1];
    if (!valid && threadIdx.x == 0) report_error(error, kRowIndexOutOfRange);
    const char* row = a.data + (valid ? src_row : 0) * a.nb[1] + i2 * a.nb[2] + i3 * a.nb[3];
    for (int64_t c = threadIdx.x; c < dst.ne[0] / 8; c += blockDim.x) {
        float v[8];
        if (valid) {
            dequantize_row_chunk<T>(row, a.ne[0], c, v);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) *f32_ptr(dst, 8 * c + i, i1, i2, i3) = v[i];
    }
}

void run_get_rows(const ComputeCtx& ctx, Tensor* dst) {
    const int64_t n = dst->nelements();
    if (is_cuda_quant_type(dst->src[0]->type)) {
        const int64_t n_rows = dst->ne[1] * dst->ne[2] * dst->ne[3];
        if (n_rows == 0) return;
        const TensorView a = view_of(dst->src[0]);
        dispatch_quant_view(a.type, [&](auto tag) {
            launch_early(get_rows_quant_kernel<decltype(tag)::value>, unsigned(n_rows), 128, 0, ctx.stream, a,
                         view_of(dst->src[1]), view_of(dst), ctx.error_flag);
        });
        return;
    }
    launch_early(get_rows_kernel, grid_for(n, kThreads), kThreads, 0, ctx.stream, view_of(dst->src[0]),
                 view_of(dst->src[1]), view_of(dst), n, ctx.error_flag);
}
bool supports_get_rows(const Tensor* dst) {
    return readable(dst->src[0]) && dst->src[0]->type != Type::I32 && dst->src[1]->type == Type::I32 &&
           dst->type == Type::F32;
}

// Scatter-add: several gathered rows may name the same source row, so the adds are atomic.
__global__ void get_rows_back_kernel(TensorView grad, TensorView rows, TensorView dst, int64_t n,
                                     int32_t* error) {
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        int64_t i0, i1, i2, i3;
        unflatten(k, grad.ne, i0, i1, i2, i3);
        const int64_t r = read_index(rows, i1, rows.ne[1] == 1 ? 0 : i2);
        if (r < 0 || r >= dst.ne[1]) {
            report_error(error, kRowIndexOutOfRange);
            continue;
        }
        atomicAdd(f32_ptr(dst, i0, r, i2, i3), load_f32(grad, i0, i1, i2, i3));
    }
}

void run_get_rows_back(const ComputeCtx& ctx, Tensor* dst) {
    GFA_CUDA_CHECK(cudaMemsetAsync(dst->data, 0, dst->nbytes(), ctx.stream));
    const Tensor* grad = dst->src[0];
    const int64_t n = grad->nelements();
    get_rows_back_kernel<<<grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(
        view_of(grad), view_of(dst->src[1]), view_of(dst), n, ctx.error_flag);
}
bool supports_get_rows_back(const Tensor* dst) {
    return dst->type == Type::F32 && dst->is_contiguous() && dst->src[0]->type == Type::F32 &&
           dst->src[1]->type == Type::I32;
}

__global__ void set_rows_kernel(TensorView b, TensorView rows, TensorView dst, int64_t n, int32_t* error) {
    await_inputs();
    allow_next_launch();
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        int64_t i0, i1, i2, i3;
        unflatten(k, b.ne, i0, i1, i2, i3);
        const int64_t r = read_index(rows, i1, 0);
        if (r < 0 || r >= dst.ne[1]) {
            report_error(error, kRowIndexOutOfRange);
            continue;
        }
        store_plain(dst.data + offset_of(dst, i0, r, i2, i3), dst.type, load_f32(b, i0, i1, i2, i3));
    }
}

// One thread per q8_0 block of the rows being written.
__global__ void set_rows_q8_0_kernel(TensorView b, TensorView rows, TensorView dst, int64_t n_blocks,
                                     int32_t* error) {
    await_inputs();
    allow_next_launch();
    const int64_t blocks_per_row = b.ne[0] / QK8_0;
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n_blocks;
         k += int64_t(gridDim.x) * blockDim.x) {
        const int64_t ib = k % blocks_per_row, rr = k / blocks_per_row;
        const int64_t i1 = rr % b.ne[1], i2 = (rr / b.ne[1]) % b.ne[2], i3 = rr / (b.ne[1] * b.ne[2]);
        const int64_t r = read_index(rows, i1, 0);
        if (r < 0 || r >= dst.ne[1]) {
            report_error(error, kRowIndexOutOfRange);
            continue;
        }
        float x[QK8_0];
        for (int j = 0; j < QK8_0; ++j) x[j] = load_f32(b, ib * QK8_0 + j, i1, i2, i3);
        quantize_block_q8_0(x, reinterpret_cast<block_q8_0*>(dst.data + offset_of(dst, 0, r, i2, i3)) + ib);
    }
}

void run_set_rows(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* b = dst->src[1];
    if (dst->type == Type::Q8_0) {
        const int64_t n_blocks = b->nelements() / QK8_0;
        launch_early(set_rows_q8_0_kernel, grid_for(n_blocks, kThreads), kThreads, 0, ctx.stream, view_of(b),
                     view_of(dst->src[2]), view_of(dst), n_blocks, ctx.error_flag);
        return;
    }
    const int64_t n = b->nelements();
    launch_early(set_rows_kernel, grid_for(n, kThreads), kThreads, 0, ctx.stream, view_of(b),
                 view_of(dst->src[2]), view_of(dst), n, ctx.error_flag);
}
bool supports_set_rows(const Tensor* dst) {
    const Tensor* b = dst->src[1];
    const Tensor* rows = dst->src[2];
    if (b->type != Type::F32 || (rows->type != Type::I32 && rows->type != Type::I64)) return false;
    if (dst->type == Type::Q8_0) return row_is_packed(dst);
    return is_float_type(dst->type);
}

// ---- concat, repeat, repeat_back -----------------------------------------------------------

__global__ void concat_kernel(TensorView a, TensorView b, TensorView dst, int dim, int64_t n) {
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        int64_t idx[4];
        unflatten(k, dst.ne, idx[0], idx[1], idx[2], idx[3]);
        const int64_t out = offset_of(dst, idx[0], idx[1], idx[2], idx[3]);
        const TensorView* s = &a;
        if (idx[dim] >= a.ne[dim]) {
            idx[dim] -= a.ne[dim];
            s = &b;
        }
        *reinterpret_cast<float*>(dst.data + out) = load_f32(*s, idx[0], idx[1], idx[2], idx[3]);
    }
}

void run_concat(const ComputeCtx& ctx, Tensor* dst) {
    const int64_t n = dst->nelements();
    concat_kernel<<<grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(
        view_of(dst->src[0]), view_of(dst->src[1]), view_of(dst), dst->params<ConcatParams>().dim, n);
}

__global__ void repeat_kernel(TensorView a, TensorView dst, int64_t n) {
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        int64_t i0, i1, i2, i3;
        unflatten(k, dst.ne, i0, i1, i2, i3);
        *f32_ptr(dst, i0, i1, i2, i3) = load_f32(a, i0 % a.ne[0], i1 % a.ne[1], i2 % a.ne[2], i3 % a.ne[3]);
    }
}

void run_repeat(const ComputeCtx& ctx, Tensor* dst) {
    const int64_t n = dst->nelements();
    repeat_kernel<<<grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(view_of(dst->src[0]), view_of(dst), n);
}

// repeat_back sums the copies of every output element (a gradient of broadcasting: norm weights
// and biases from [E, tokens] rows). Few copies: one thread per output element walks them.
__global__ void repeat_back_kernel(TensorView g, TensorView dst, int64_t n) {
    const int64_t r0 = g.ne[0] / dst.ne[0], r1 = g.ne[1] / dst.ne[1], r2 = g.ne[2] / dst.ne[2],
                  r3 = g.ne[3] / dst.ne[3];
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        int64_t i0, i1, i2, i3;
        unflatten(k, dst.ne, i0, i1, i2, i3);
        float acc = 0.0f;
        for (int64_t k3 = 0; k3 < r3; ++k3)
            for (int64_t k2 = 0; k2 < r2; ++k2)
                for (int64_t k1 = 0; k1 < r1; ++k1)
                    for (int64_t k0 = 0; k0 < r0; ++k0)
                        acc += load_f32(g, i0 + k0 * dst.ne[0], i1 + k1 * dst.ne[1], i2 + k2 * dst.ne[2],
                                        i3 + k3 * dst.ne[3]);
        *f32_ptr(dst, i0, i1, i2, i3) = acc;
    }
}

// Many copies (thousands of token rows for a few hundred outputs): one thread per output would
// leave the GPU nearly idle, so the copies are split too. A block takes 32 consecutive outputs
// (one per lane, so a warp reads 32 neighbouring floats of a row) and one range of copies, which
// its warps share round-robin, four loads in flight each. Warps add their sums in a fixed
// order, and ranges (gridDim.y > 1) write partial sums that repeat_back_combine_kernel adds in
// range order: the result does not depend on scheduling.
constexpr int kCopyLanes = 32, kCopyWarps = 8, kCopyUnroll = 4;

__global__ void repeat_back_ranges_kernel(TensorView g, TensorView dst, int64_t n, int64_t copies,
                                          int64_t per_range, float* partial) {
    __shared__ float warp_sums[kCopyWarps][kCopyLanes];
    const int lane = int(threadIdx.x), warp = int(threadIdx.y);
    const int64_t k = blockIdx.x * int64_t(kCopyLanes) + lane;
    const int64_t r0 = g.ne[0] / dst.ne[0], r1 = g.ne[1] / dst.ne[1], r2 = g.ne[2] / dst.ne[2];
    // Byte steps from one copy to the next along each dimension of g.
    const int64_t step0 = dst.ne[0] * g.nb[0], step1 = dst.ne[1] * g.nb[1], step2 = dst.ne[2] * g.nb[2],
                  step3 = dst.ne[3] * g.nb[3];
    int64_t i0 = 0, i1 = 0, i2 = 0, i3 = 0;
    if (k < n) unflatten(k, dst.ne, i0, i1, i2, i3);
    const char* first = g.data + offset_of(g, i0, i1, i2, i3);
    auto copy_offset = [&](int64_t c) {
        const int64_t k0 = c % r0, c1 = c / r0, k1 = c1 % r1, c2 = c1 / r1;
        return k0 * step0 + k1 * step1 + (c2 % r2) * step2 + (c2 / r2) * step3;
    };
    const int64_t begin = blockIdx.y * per_range, end = min(copies, begin + per_range);
    float acc[kCopyUnroll] = {};
    if (k < n) {
        int64_t c = begin + warp;
        for (; c + (kCopyUnroll - 1) * kCopyWarps < end; c += kCopyUnroll * kCopyWarps) {
#pragma unroll
            for (int u = 0; u < kCopyUnroll; ++u)
                acc[u] += *reinterpret_cast<const float*>(first + copy_offset(c + u * kCopyWarps));
        }
        for (; c < end; c += kCopyWarps) acc[0] += *reinterpret_cast<const float*>(first + copy_offset(c));
    }
    warp_sums[warp][lane] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    __syncthreads();
    if (warp != 0 || k >= n) return;
    float sum = 0.0f;
    for (int w = 0; w < kCopyWarps; ++w) sum += warp_sums[w][lane];
    if (partial)
        partial[blockIdx.y * n + k] = sum;
    else
        *f32_ptr(dst, i0, i1, i2, i3) = sum;
}

__global__ void repeat_back_combine_kernel(const float* partial, int64_t ranges, TensorView dst, int64_t n) {
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        float sum = 0.0f;
        for (int64_t r = 0; r < ranges; ++r) sum += partial[r * n + k];
        int64_t i0, i1, i2, i3;
        unflatten(k, dst.ne, i0, i1, i2, i3);
        *f32_ptr(dst, i0, i1, i2, i3) = sum;
    }
}

void run_repeat_back(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* g = dst->src[0];
    const int64_t n = dst->nelements();
    const int64_t copies = g->nelements() / std::max<int64_t>(n, 1);
    if (copies < 4 * kCopyWarps) {
        repeat_back_kernel<<<grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(view_of(g), view_of(dst), n);
        return;
    }
    // Enough blocks for about four per multiprocessor, each range at least 256 copies long.
    const int64_t column_blocks = (n + kCopyLanes - 1) / kCopyLanes;
    const int64_t wanted = (4 * int64_t(ctx.sm_count) + column_blocks - 1) / column_blocks;
    const int64_t max_ranges = std::min<int64_t>(std::max<int64_t>(copies / 256, 1), 65535);
    const int64_t step = kCopyUnroll * kCopyWarps;
    const int64_t target_ranges = std::clamp<int64_t>(wanted, 1, max_ranges);
    const int64_t per_range = ((copies + target_ranges - 1) / target_ranges + step - 1) / step * step;
    const int64_t ranges = (copies + per_range - 1) / per_range;
    float* partial = ranges > 1 ? static_cast<float*>(ctx.scratch->get(size_t(ranges * n) * sizeof(float),
                                                                       ctx.stream, ctx.device_name))
                                : nullptr;
    const dim3 grid{unsigned(column_blocks), unsigned(ranges)}, block{kCopyLanes, kCopyWarps};
    repeat_back_ranges_kernel<<<grid, block, 0, ctx.stream>>>(view_of(g), view_of(dst), n, copies, per_range,
                                                              partial);
    if (!partial) return;
    GFA_CUDA_CHECK_LAUNCH();
    repeat_back_combine_kernel<<<grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(partial, ranges,
                                                                                   view_of(dst), n);
}

bool all_f32(const Tensor* dst) {
    for (const Tensor* s : dst->src)
        if (s && s->type != Type::F32) return false;
    return dst->type == Type::F32;
}

} // namespace

void register_movement_kernels(KernelTable& t) {
    t[size_t(Op::Fill)] = {run_fill, supports_fill};
    t[size_t(Op::Cont)] = {run_copy, supports_copy};
    t[size_t(Op::Cpy)] = {run_copy, supports_copy};
    t[size_t(Op::GetRows)] = {run_get_rows, supports_get_rows};
    t[size_t(Op::GetRowsBack)] = {run_get_rows_back, supports_get_rows_back};
    t[size_t(Op::SetRows)] = {run_set_rows, supports_set_rows};
    t[size_t(Op::Concat)] = {run_concat, all_f32};
    t[size_t(Op::Repeat)] = {run_repeat, all_f32};
    t[size_t(Op::RepeatBack)] = {run_repeat_back, all_f32};
}

} // namespace gfa::cuda
