// Normalization, position encoding and softmax on the GPU, with their backward ops.
// Row ops give one block to each row (rows are dims 1..3 of the node) and reduce with
// block_sum/block_max; rope works per element and pairs each element with its partner.
//
// Backward ops take the incoming gradient dy as src[0] and the forward tensor they need as
// src[1] (the input x for norms and rope's positions; the output y for softmax), with the
// forward op's parameters.
#include "cuda_device.cuh"
#include "early_launch.cuh"
#include "int8_columns.cuh"
#include "op_def.h"
#include "quant_matmul.h"

#include <utility>
#include <vector>

namespace gfa::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxNormThreads = 1024;

__device__ __forceinline__ void row_indices(const TensorView& t, int64_t r, int64_t& i1, int64_t& i2,
                                            int64_t& i3) {
    i1 = r % t.ne[1];
    i2 = (r / t.ne[1]) % t.ne[2];
    i3 = r / (t.ne[1] * t.ne[2]);
}

// ---- norm / rms_norm ---------------------------------------------------------------------

// Threads per row of the norm kernels, one rule for the plain and the fused kernels so that
// both add up a row in the same order. A few rows (a decoding step's) are all the work there
// is, so each row gets up to 1024 threads, two elements or more each: the fused pre-norm that
// also rounds the product's columns (a warp per 32 values) was 3% slower with 256 threads
// than the separate launches, and 3% faster with 1024 (1.1B model, H100). Many rows (a
// prompt) keep blocks of at most 256, which was 3% faster there.
constexpr int64_t kFewRows = 8;
int norm_row_threads(int64_t n, int64_t rows) {
    if (rows > kFewRows) return row_block_threads(n);
    int t = 32;
    while (t < kMaxNormThreads && 2 * t < n) t *= 2;
    return t;
}

// LayerNorm without affine: y = (x - mean) / sqrt(var + eps). rms: y = x / sqrt(mean(x^2) + eps).
__global__ void __launch_bounds__(kMaxNormThreads)
    norm_kernel(TensorView x, TensorView y, float eps, bool rms) {
    await_inputs();
    allow_next_launch();
    __shared__ float shared[32];
    int64_t i1, i2, i3;
    row_indices(y, blockIdx.x, i1, i2, i3);
    const int64_t n = x.ne[0];
    float mean = 0.0f;
    if (!rms) {
        float s = 0.0f;
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += load_f32(x, i, i1, i2, i3);
        mean = block_sum(s, shared) / float(n);
    }
    float sq = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = load_f32(x, i, i1, i2, i3) - mean;
        sq += d * d;
    }
    const float inv = rsqrtf(block_sum(sq, shared) / float(n) + eps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        *f32_ptr(y, i, i1, i2, i3) = (load_f32(x, i, i1, i2, i3) - mean) * inv;
}

// rms_norm_back: with r = 1/sqrt(mean(x^2) + eps), dx = r * (dy - x * r^2 * mean(dy * x)).
// norm_back: with xh = (x - mean) * r, dx = r * (dy - mean(dy) - xh * mean(dy * xh)).
__global__ void norm_back_kernel(TensorView dy, TensorView x, TensorView dx, float eps, bool rms) {
    __shared__ float shared[32];
    int64_t i1, i2, i3;
    row_indices(dx, blockIdx.x, i1, i2, i3);
    const int64_t n = x.ne[0];
    float mean = 0.0f;
    if (!rms) {
        float s = 0.0f;
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += load_f32(x, i, i1, i2, i3);
        mean = block_sum(s, shared) / float(n);
    }
    float sq = 0.0f, dy_sum = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = load_f32(x, i, i1, i2, i3) - mean;
        sq += d * d;
        dy_sum += load_f32(dy, i, i1, i2, i3);
    }
    const float r = rsqrtf(block_sum(sq, shared) / float(n) + eps);
    const float dy_mean = rms ? 0.0f : block_sum(dy_sum, shared) / float(n);
    float dot = 0.0f; // sum of dy * xh
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        dot += load_f32(dy, i, i1, i2, i3) * (load_f32(x, i, i1, i2, i3) - mean) * r;
    const float dot_mean = block_sum(dot, shared) / float(n);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float xh = (load_f32(x, i, i1, i2, i3) - mean) * r;
        *f32_ptr(dx, i, i1, i2, i3) = r * (load_f32(dy, i, i1, i2, i3) - dy_mean - xh * dot_mean);
    }
}

void run_norm_common(const ComputeCtx& ctx, Tensor* dst, bool rms) {
    const Tensor* x = dst->src[0];
    launch_early(norm_kernel, unsigned(dst->nrows()), norm_row_threads(x->ne[0], dst->nrows()), 0, ctx.stream,
                 view_of(x), view_of(dst), dst->params<NormParams>().eps, rms);
}
void run_norm(const ComputeCtx& ctx, Tensor* dst) {
    run_norm_common(ctx, dst, false);
}
void run_rms_norm(const ComputeCtx& ctx, Tensor* dst) {
    run_norm_common(ctx, dst, true);
}

void run_norm_back_common(const ComputeCtx& ctx, Tensor* dst, bool rms) {
    const Tensor* x = dst->src[1];
    norm_back_kernel<<<unsigned(dst->nrows()), row_block_threads(x->ne[0]), 0, ctx.stream>>>(
        view_of(dst->src[0]), view_of(x), view_of(dst), dst->params<NormParams>().eps, rms);
}
void run_norm_back(const ComputeCtx& ctx, Tensor* dst) {
    run_norm_back_common(ctx, dst, false);
}
void run_rms_norm_back(const ComputeCtx& ctx, Tensor* dst) {
    run_norm_back_common(ctx, dst, true);
}

bool f32_rows_fit(const Tensor* dst) {
    return dst->type == Type::F32 && dst->nrows() < (int64_t(1) << 31);
}
bool supports_norm(const Tensor* dst) {
    const Tensor* x = dst->src[0];
    return f32_rows_fit(dst) && x->type == Type::F32 && x->ne == dst->ne;
}
bool supports_norm_back(const Tensor* dst) {
    const Tensor *dy = dst->src[0], *x = dst->src[1];
    return f32_rows_fit(dst) && dy && x && dy->type == Type::F32 && x->type == Type::F32 &&
           dy->ne == dst->ne && x->ne == dst->ne;
}

// ---- rope ------------------------------------------------------------------------------------

// The rotation of one rope: y = rope(x) at positions pos.
struct RopeArgs {
    int n_dims;
    bool neox;
    float freq_base, freq_scale;
    float direction;      // +1 for the forward rotation, -1 for its transpose (rope_back)
    const float* factors; // per-pair divisors of the angle (packed f32), or null
};

// The rotated pair of i0 (its two elements) for the rope's layout.
struct RopePair {
    int64_t pair, first, second;
};
__device__ __forceinline__ RopePair rope_pair_of(const RopeArgs& r, int64_t i0) {
    const int64_t half = r.n_dims / 2;
    if (r.neox) return {i0 % half, i0 % half, i0 % half + half};
    return {i0 / 2, 2 * (i0 / 2), 2 * (i0 / 2) + 1};
}

// sin and cos of the angle of `pair` at the position of token i2, the sine signed by direction.
// The angle is formed in double (positions in the thousands times a frequency lose, in f32,
// the digits sin and cos need) and reduced to [-pi, pi] there; sin and cos then run in f32,
// as on Vulkan: a double sincos per pair cost more than the rope's memory traffic.
__device__ __forceinline__ void rope_sincos(const TensorView& pos, const RopeArgs& r, int64_t pair,
                                            int64_t i2, double& s, double& c) {
    constexpr double kTwoPi = 6.283185307179586476925286766559;
    const float p = float(*reinterpret_cast<const int32_t*>(pos.data + i2 * pos.nb[0]));
    double theta =
        double(p) * double(r.freq_scale) * pow(double(r.freq_base), -2.0 * double(pair) / double(r.n_dims));
    if (r.factors) theta /= double(r.factors[pair]);
    theta -= kTwoPi * floor(theta / kTwoPi + 0.5);
    float sf, cf;
    sincosf(float(theta), &sf, &cf);
    s = double(sf) * r.direction;
    c = double(cf);
}

// x: [head_dim, n_head, n_tokens, B], pos: i32 [n_tokens]. Element (i0, i1, i2, i3) of y is
// one half of a rotated pair.
__device__ __forceinline__ float rope_value(const TensorView& x, const TensorView& pos, const RopeArgs& r,
                                            int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    if (i0 >= r.n_dims) return load_f32(x, i0, i1, i2, i3);
    const RopePair q = rope_pair_of(r, i0);
    double s, c;
    rope_sincos(pos, r, q.pair, i2, s, c);
    const double x0 = load_f32(x, q.first, i1, i2, i3), x1 = load_f32(x, q.second, i1, i2, i3);
    const double out = i0 == q.first ? x0 * c - x1 * s : x0 * s + x1 * c;
    return float(out);
}

// One thread per rotated pair, both elements from one angle and one row's index arithmetic;
// the same arithmetic per element as rope_value (the fused cache writes below), so the same
// bits. Each row has n_dims / 2 pairs, then the elements past n_dims, which are copied. In
// place (y == x) is safe: a thread reads both elements of its pair before writing them.
__global__ void rope_kernel(TensorView x, TensorView pos, TensorView y, RopeArgs r, int64_t n_rows) {
    await_inputs();
    allow_next_launch();
    const int64_t half = r.n_dims / 2, per_row = half + (y.ne[0] - r.n_dims), n = n_rows * per_row;
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        const int64_t row = k / per_row, j = k - row * per_row;
        const int64_t i1 = row % y.ne[1], rest = row / y.ne[1], i2 = rest % y.ne[2], i3 = rest / y.ne[2];
        if (j >= half) {
            const int64_t i0 = r.n_dims + (j - half);
            *f32_ptr(y, i0, i1, i2, i3) = load_f32(x, i0, i1, i2, i3);
            continue;
        }
        const int64_t first = r.neox ? j : 2 * j, second = r.neox ? j + half : 2 * j + 1;
        double s, c;
        rope_sincos(pos, r, j, i2, s, c);
        const double x0 = load_f32(x, first, i1, i2, i3), x1 = load_f32(x, second, i1, i2, i3);
        *f32_ptr(y, first, i1, i2, i3) = float(x0 * c - x1 * s);
        *f32_ptr(y, second, i1, i2, i3) = float(x0 * s + x1 * c);
    }
}

RopeArgs rope_args(const Tensor* node, float direction) {
    const RopeParams p = node->params<RopeParams>();
    const Tensor* factors = node->src[2];
    return {p.n_dims,    p.mode == RopeMode::NeoX,
            p.freq_base, p.freq_scale,
            direction,   factors ? static_cast<const float*>(factors->data) : nullptr};
}

// ---- rope -> set_rows -> set_rows, fused ------------------------------------------------------
//
// A decoding step's rope over q and k, then the cache writes of k and v: one launch instead
// of three. A set_rows whose rows come from the rope's output recomputes each value with
// rope_value (the same bits the rope node stores), so no thread waits for another; the
// rope node's output is still written for its other readers (attention's q).

struct CacheWrite {
    TensorView b, rows, dst; // set_rows' source, row indices and destination
    int64_t n;               // elements of b
    bool from_rope;          // b lies in the rope's output: recompute instead of reading
};

__device__ __forceinline__ int64_t row_index(const TensorView& rows, int64_t i) {
    const char* p = rows.data + i * rows.nb[0];
    return rows.type == kTypeI64 ? *reinterpret_cast<const int64_t*>(p)
                                 : int64_t(*reinterpret_cast<const int32_t*>(p));
}

__global__ void rope_set_rows_kernel(TensorView x, TensorView pos, TensorView y, RopeArgs r, int64_t n_rope,
                                     CacheWrite w1, CacheWrite w2, int32_t* error) {
    await_inputs();
    allow_next_launch();
    const int64_t total = n_rope + w1.n + w2.n;
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total;
         k += int64_t(gridDim.x) * blockDim.x) {
        int64_t i0, i1, i2, i3;
        if (k < n_rope) {
            unflatten(k, y.ne, i0, i1, i2, i3);
            *f32_ptr(y, i0, i1, i2, i3) = rope_value(x, pos, r, i0, i1, i2, i3);
            continue;
        }
        const bool first = k < n_rope + w1.n;
        const CacheWrite& w = first ? w1 : w2;
        unflatten(first ? k - n_rope : k - n_rope - w1.n, w.b.ne, i0, i1, i2, i3);
        const int64_t row = row_index(w.rows, i1);
        if (row < 0 || row >= w.dst.ne[1]) {
            report_error(error, kRowIndexOutOfRange);
            continue;
        }
        float v;
        if (w.from_rope) { // y is packed f32: the element's place in y gives its indices
            int64_t j0, j1, j2, j3;
            unflatten((w.b.data - y.data + offset_of(w.b, i0, i1, i2, i3)) / 4, y.ne, j0, j1, j2, j3);
            v = rope_value(x, pos, r, j0, j1, j2, j3);
        } else {
            v = load_f32(w.b, i0, i1, i2, i3);
        }
        store_plain(w.dst.data + offset_of(w.dst, i0, row, i2, i3), w.dst.type, v);
    }
}

void launch_rope(const ComputeCtx& ctx, Tensor* dst, float direction) {
    const RopeArgs args = rope_args(dst, direction);
    const int64_t n_rows = dst->nelements() / dst->ne[0];
    const int64_t n = n_rows * (args.n_dims / 2 + (dst->ne[0] - args.n_dims));
    launch_early(rope_kernel, grid_for(n, kThreads), kThreads, 0, ctx.stream, view_of(dst->src[0]),
                 view_of(dst->src[1]), view_of(dst), args, n_rows);
}
void run_rope(const ComputeCtx& ctx, Tensor* dst) {
    launch_rope(ctx, dst, 1.0f);
}
void run_rope_back(const ComputeCtx& ctx, Tensor* dst) {
    launch_rope(ctx, dst, -1.0f);
}
bool supports_rope(const Tensor* dst) {
    const Tensor *x = dst->src[0], *pos = dst->src[1];
    const RopeParams p = dst->params<RopeParams>();
    const Tensor* factors = dst->src[2];
    if (factors &&
        (factors->type != Type::F32 || factors->nb[0] != sizeof(float) || factors->ne[0] != p.n_dims / 2))
        return false;
    return x && pos && x->type == Type::F32 && dst->type == Type::F32 && x->ne == dst->ne &&
           pos->type == Type::I32 && pos->ne[0] == x->ne[2] && p.n_dims > 0 && p.n_dims % 2 == 0 &&
           p.n_dims <= x->ne[0] && (p.mode == RopeMode::Normal || p.mode == RopeMode::NeoX);
}

// ---- softmax ---------------------------------------------------------------------------------

__device__ float alibi_slope_device(float max_bias, int64_t h, int64_t n_head) {
    if (max_bias <= 0.0f) return 1.0f;
    const int64_t n_head_log2 = int64_t(1) << int64_t(floor(log2(double(n_head))));
    const float m0 = powf(2.0f, -max_bias / float(n_head_log2));
    const float m1 = powf(2.0f, -max_bias / 2.0f / float(n_head_log2));
    return h < n_head_log2 ? powf(m0, float(h + 1)) : powf(m1, float(2 * (h - n_head_log2) + 1));
}

// softmax over dim 0 of v = x * scale + slope * mask (mask optional: data == nullptr).
// A row whose entries are all -inf is written as zeros rather than NaN.
__global__ void soft_max_kernel(TensorView x, TensorView mask, TensorView y, float scale, float max_bias) {
    __shared__ float shared[32];
    int64_t i1, i2, i3;
    row_indices(y, blockIdx.x, i1, i2, i3);
    const int64_t n = x.ne[0];
    const float slope = alibi_slope_device(max_bias, i2, x.ne[2]);
    const bool has_mask = mask.data != nullptr;
    const int64_t m2 = has_mask ? i2 % mask.ne[2] : 0, m3 = has_mask ? i3 % mask.ne[3] : 0;
    auto value = [&](int64_t i) {
        float v = load_f32(x, i, i1, i2, i3) * scale;
        if (has_mask) v += slope * load_plain(mask.data + offset_of(mask, i, i1, m2, m3), mask.type);
        return v;
    };
    float mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, value(i));
    mx = block_max(mx, shared);
    float sum = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += mx == -INFINITY ? 0.0f : expf(value(i) - mx);
    sum = block_sum(sum, shared);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        *f32_ptr(y, i, i1, i2, i3) = mx == -INFINITY ? 0.0f : expf(value(i) - mx) * inv;
}

void run_soft_max(const ComputeCtx& ctx, Tensor* dst) {
    const SoftMaxParams p = dst->params<SoftMaxParams>();
    const Tensor* mask = dst->src[1];
    TensorView mv{};
    if (mask) mv = view_of(mask);
    soft_max_kernel<<<unsigned(dst->nrows()), row_block_threads(dst->ne[0]), 0, ctx.stream>>>(
        view_of(dst->src[0]), mv, view_of(dst), p.scale, p.max_bias);
}
bool supports_soft_max(const Tensor* dst) {
    const Tensor *x = dst->src[0], *mask = dst->src[1];
    if (!f32_rows_fit(dst) || !x || x->type != Type::F32 || x->ne != dst->ne) return false;
    if (!mask) return true;
    return (mask->type == Type::F32 || mask->type == Type::F16) && mask->ne[0] == x->ne[0] &&
           mask->ne[1] >= x->ne[1] && x->ne[2] % mask->ne[2] == 0 && x->ne[3] % mask->ne[3] == 0;
}

// softmax back: dx = scale * y * (dy - sum(dy * y)) per row (no ALiBi slope).
__global__ void soft_max_back_kernel(TensorView dy, TensorView y, TensorView dx, float scale) {
    __shared__ float shared[32];
    int64_t i1, i2, i3;
    row_indices(dx, blockIdx.x, i1, i2, i3);
    const int64_t n = dx.ne[0];
    float dot = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        dot += load_f32(dy, i, i1, i2, i3) * load_f32(y, i, i1, i2, i3);
    dot = block_sum(dot, shared);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        *f32_ptr(dx, i, i1, i2, i3) =
            scale * load_f32(y, i, i1, i2, i3) * (load_f32(dy, i, i1, i2, i3) - dot);
}

void run_soft_max_back(const ComputeCtx& ctx, Tensor* dst) {
    soft_max_back_kernel<<<unsigned(dst->nrows()), row_block_threads(dst->ne[0]), 0, ctx.stream>>>(
        view_of(dst->src[0]), view_of(dst->src[1]), view_of(dst), dst->params<SoftMaxParams>().scale);
}
bool supports_soft_max_back(const Tensor* dst) {
    return supports_norm_back(dst) && dst->params<SoftMaxParams>().max_bias == 0.0f;
}

// ---- diag_mask_inf -----------------------------------------------------------------------------

// Entries above the shifted diagonal (i0 > n_past + i1) get `fill`: -inf in the forward op,
// 0 in its gradient.
__global__ void diag_mask_inf_kernel(TensorView x, TensorView y, int n_past, float fill, int64_t n) {
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
         k += int64_t(gridDim.x) * blockDim.x) {
        int64_t i0, i1, i2, i3;
        unflatten(k, y.ne, i0, i1, i2, i3);
        *f32_ptr(y, i0, i1, i2, i3) = i0 > n_past + i1 ? fill : load_f32(x, i0, i1, i2, i3);
    }
}
void run_diag_mask_inf(const ComputeCtx& ctx, Tensor* dst) {
    const int64_t n = dst->nelements();
    const DiagMaskNodeParams p = dst->params<DiagMaskNodeParams>();
    diag_mask_inf_kernel<<<grid_for(n, kThreads), kThreads, 0, ctx.stream>>>(
        view_of(dst->src[0]), view_of(dst), p.n_past, p.fill, n);
}
bool supports_diag_mask_inf(const Tensor* dst) {
    return dst->type == Type::F32 && dst->src[0]->type == Type::F32 && dst->src[0]->ne == dst->ne;
}

// ---- fused: [add ->] rms_norm -> mul by a row of weights ------------------------------------

// The pre-norm of a transformer block, h = rms_norm(x) * w, and in front of it the residual
// add that makes x: one block per row, as the separate kernels, and every node's result is
// written, so readers of the intermediate nodes (the residual stream) still find them. Each
// thread takes the elements of norm_kernel's loop (tid, tid + blockDim, ...) in the same
// order and the reduction is block_sum, so the results are bit for bit those of the
// separate launches. A decoded token's row is all there is to do, so every memory access
// that can be is issued together: a chunk of kNormChunk elements per thread is loaded
// before any of it is stored (a store in between would order the next load behind it), a
// row that fits one chunk stays in registers for the second pass, and the first chunk of
// w is loaded up front, before the kernel in front has finished when w is constant (early
// launch). Each element is read and written by one thread only, which keeps outputs placed
// in place over an input correct.
//
// With `columns` (its q non-null) the kernel also writes out's rows, as the columns of the
// quantized matrix-vector product behind it, in their int8 form (round_block_to_int8: bit
// for bit what that product's own rounding launch writes). Lane l of a warp holds element
// 32 m + l of the row at every step (blockDim.x is a multiple of 32, and the host asks for
// this only where n is too), so each warp rounds whole blocks of 32.
//
// kBlockMax: the most threads a launch may have. Rows of up to kThreads (256) threads hold
// chunks of 8 elements a thread; a block of 1024 threads has 64 registers a thread, and
// chunks of 4.
template <bool kAdd, int kBlockMax>
__global__ void __launch_bounds__(kBlockMax)
    add_rms_norm_mul_kernel(TensorView a, TensorView b, TensorView sum, TensorView normed, TensorView w,
                            TensorView out, float eps, bool w_constant, ColumnBlocks columns) {
    constexpr int kNormChunk = kBlockMax > kThreads ? 4 : 8;
    __shared__ float shared[32];
    const int64_t n = out.ne[0], step = blockDim.x;
    float w_first[kNormChunk];
    auto load_first_weights = [&] {
#pragma unroll
        for (int k = 0; k < kNormChunk; ++k)
            if (threadIdx.x + k * step < n) w_first[k] = load_f32(w, threadIdx.x + k * step, 0, 0, 0);
    };
    if (w_constant) load_first_weights();
    await_inputs();
    if (!w_constant) load_first_weights();

    int64_t i1, i2, i3;
    row_indices(out, blockIdx.x, i1, i2, i3);
    float x[kNormChunk];
    float sq = 0.0f;
    for (int64_t base = threadIdx.x; base < n; base += kNormChunk * step) {
#pragma unroll
        for (int k = 0; k < kNormChunk; ++k) {
            const int64_t i = base + k * step;
            if (i < n)
                x[k] = kAdd ? load_f32(a, i, i1, i2, i3) + load_f32(b, i, i1, i2, i3)
                            : load_f32(a, i, i1, i2, i3);
        }
#pragma unroll
        for (int k = 0; k < kNormChunk; ++k) {
            const int64_t i = base + k * step;
            if (i >= n) break;
            if constexpr (kAdd) *f32_ptr(sum, i, i1, i2, i3) = x[k];
            sq += x[k] * x[k];
        }
    }
    const float inv = rsqrtf(block_sum(sq, shared) / float(n) + eps);
    // The next kernel (the product that reads this row) launches only now: launched at the
    // start, its thousands of blocks asked L2 for their weights while this single block was
    // still loading and reducing the row, and slowed it; after the reduction they overlap
    // only the stores. Decoding went 1-3% faster (H100: 1.1B q4_K_M, q8_0, f16; 8B q4_K_M).
    allow_next_launch();
    const bool in_registers = n <= kNormChunk * step; // else re-read what pass 1 stored
    const TensorView& x_view = kAdd ? sum : a;
    for (int64_t base = threadIdx.x; base < n; base += kNormChunk * step) {
        const bool first = base == threadIdx.x;
        float xs[kNormChunk], ws[kNormChunk];
#pragma unroll
        for (int k = 0; k < kNormChunk; ++k) {
            const int64_t i = base + k * step;
            if (i < n) {
                xs[k] = first && in_registers ? x[k] : load_f32(x_view, i, i1, i2, i3);
                ws[k] = first ? w_first[k] : load_f32(w, i, 0, 0, 0);
            }
        }
#pragma unroll
        for (int k = 0; k < kNormChunk; ++k) {
            const int64_t i = base + k * step;
            if (i >= n) break;
            const float y = xs[k] * inv, scaled = y * ws[k];
            *f32_ptr(normed, i, i1, i2, i3) = y;
            *f32_ptr(out, i, i1, i2, i3) = scaled;
            if (columns.q) {
                const int64_t at = int64_t(blockIdx.x) * n + i; // the value's place in the columns
                const int lane = int(threadIdx.x) % 32;
                round_block_to_int8(scaled, lane, columns.q + (at - lane), columns.ds + at / 32);
            }
        }
    }
}

bool is_f32(const Tensor* t) {
    return t && t->type == Type::F32;
}

// mul(norm, w) with w one row of weights for every row of norm, all f32.
bool is_row_scaling_of(const Tensor* mul, const Tensor* norm) {
    if (mul->op != Op::Mul || mul->src[0] != norm || !is_f32(mul) || mul->ne != norm->ne) return false;
    const Tensor* w = mul->src[1];
    return is_f32(w) && w->ne[0] == norm->ne[0] && w->ne[1] == 1 && w->ne[2] == 1 && w->ne[3] == 1;
}

bool is_f32_rms_norm_of(const Tensor* norm, const Tensor* x) {
    return norm->op == Op::RmsNorm && norm->src[0] == x && is_f32(norm) && is_f32(x);
}

// The pre-norm ending at `mul` (mul -> rms_norm -> x, with_add: x = add(a, b)).
void launch_pre_norm(const ComputeCtx& ctx, const Tensor* mul, bool with_add, ColumnBlocks columns) {
    const Tensor* norm = mul->src[0];
    const Tensor* x = norm->src[0];
    const TensorView none{};
    const float eps = norm->params<NormParams>().eps;
    const unsigned rows = unsigned(mul->nrows());
    const int threads = norm_row_threads(mul->ne[0], mul->nrows());
    const bool w_constant = is_constant(mul->src[1]);
    auto launch = [&](auto kernel, const TensorView& a, const TensorView& b, const TensorView& sum) {
        launch_early(kernel, rows, threads, 0, ctx.stream, a, b, sum, view_of(norm), view_of(mul->src[1]),
                     view_of(mul), eps, w_constant, columns);
    };
    const bool wide = threads > kThreads;
    if (with_add)
        launch(wide ? add_rms_norm_mul_kernel<true, kMaxNormThreads>
                    : add_rms_norm_mul_kernel<true, kThreads>,
               view_of(x->src[0]), view_of(x->src[1]), view_of(x));
    else
        launch(wide ? add_rms_norm_mul_kernel<false, kMaxNormThreads>
                    : add_rms_norm_mul_kernel<false, kThreads>,
               view_of(x), none, none);
}

void run_rms_norm_mul(const ComputeCtx& ctx, Tensor* mul) {
    launch_pre_norm(ctx, mul, false, {});
}

void run_add_rms_norm_mul(const ComputeCtx& ctx, Tensor* mul) {
    launch_pre_norm(ctx, mul, true, {});
}

// A pre-norm, then the quantized matrix-vector product that reads its result [then the
// swiglu fused behind that product]: the pre-norm's kernel also writes the product's int8
// columns, so the product needs no rounding launch of its own (decoding does four such
// launches a layer, all on the critical path).
void run_pre_norm_matvec(const ComputeCtx& ctx, Tensor* last) {
    const std::span<Tensor* const> nodes = ctx.fused;
    const size_t norm_nodes = !nodes.empty() && nodes[0]->op == Op::Add ? 3 : 2;
    if (nodes.size() < norm_nodes + 1 || nodes.size() > norm_nodes + 2 || nodes.back() != last)
        fail("CUDA: the fused pre-norm -> product launch lost its nodes");
    const Tensor* mul = nodes[norm_nodes - 1];
    Tensor* product = nodes[norm_nodes];
    // Behind the product: its swiglu, or a second product of the same columns.
    Tensor* behind = nodes.size() == norm_nodes + 2 ? nodes[norm_nodes + 1] : nullptr;
    const TensorView columns_of = view_of(mul);
    void* columns = ctx.scratch->get(quantized_columns_bytes(columns_of), ctx.stream, ctx.device_name);
    launch_pre_norm(ctx, mul, norm_nodes == 3, column_blocks_in(columns_of, columns));
    if (behind && behind->op == Op::MulMat)
        compute_mul_mat_pair(ctx, product, behind, columns);
    else
        compute_mul_mat(ctx, product, behind, columns);
}

// The product reads mul as its b, through the quantized matrix-vector path, in the column
// order the pre-norm kernel's rows have (one row per column, whole blocks of 32).
bool is_quant_matvec_of(const Tensor* product, const Tensor* mul) {
    return product->op == Op::MulMat && product->src[1] == mul && takes_quant_matvec(product) &&
           mul->ne[0] % 32 == 0 && mul->ne[2] == 1 && mul->ne[3] == 1 && mul->is_contiguous();
}

// Whether the bytes two tensors (or views) span overlap.
bool memory_overlaps(const Tensor* a, const Tensor* b) {
    auto span = [](const Tensor* t) {
        const char* p = static_cast<const char*>(t->data);
        if (t->nelements() == 0) return std::pair{p, p};
        size_t last = t->element_size();
        for (int d = 0; d < 4; ++d) last += size_t(t->ne[d] - 1) * t->nb[d];
        return std::pair{p, p + last};
    };
    const auto [a0, a1] = span(a);
    const auto [b0, b1] = span(b);
    return a0 < b1 && b0 < a1;
}

// The tensor whose memory a view uses.
const Tensor* storage_of(const Tensor* t) {
    while (t->view_src) t = t->view_src;
    return t;
}

// set_rows into a 16-bit or f32 cache (q8_0 caches quantize whole blocks: their own kernel).
bool is_plain_cache_write(const Tensor* s) {
    const Tensor *b = s->src[1], *rows = s->src[2];
    return s->op == Op::SetRows && b && rows && b->type == Type::F32 && is_float_type(s->type) &&
           (rows->type == Type::I32 || rows->type == Type::I64);
}

CacheWrite cache_write(const Tensor* s, const Tensor* rope) {
    return {view_of(s->src[1]), view_of(s->src[2]), view_of(s), s->src[1]->nelements(),
            storage_of(s->src[1]) == rope};
}

void run_rope_set_rows(const ComputeCtx& ctx, Tensor* last) {
    if (ctx.fused.size() != 3 || ctx.fused[2] != last)
        fail("CUDA: the fused rope -> set_rows launch lost its nodes");
    const Tensor *rope = ctx.fused[0], *w1 = ctx.fused[1], *w2 = ctx.fused[2];
    const int64_t n_rope = rope->nelements(),
                  total = n_rope + w1->src[1]->nelements() + w2->src[1]->nelements();
    launch_early(rope_set_rows_kernel, grid_for(total, kThreads), kThreads, 0, ctx.stream,
                 view_of(rope->src[0]), view_of(rope->src[1]), view_of(rope), rope_args(rope, 1.0f), n_rope,
                 cache_write(w1, rope), cache_write(w2, rope), ctx.error_flag);
}

} // namespace

Fusion find_rope_fusion(std::span<Tensor* const> nodes, size_t i) {
    if (nodes.size() - i < 3) return {};
    const Tensor *rope = nodes[i], *w1 = nodes[i + 1], *w2 = nodes[i + 2];
    if (rope->op != Op::Rope || !supports_rope(rope) || !rope->is_contiguous() || !is_plain_cache_write(w1) ||
        !is_plain_cache_write(w2))
        return {};
    // In one launch no part may read memory another part writes: the three outputs are
    // disjoint and none overlaps an input (a write that recomputes the rope reads x and
    // positions, not the rope's output).
    const Tensor* outputs[] = {rope, w1, w2};
    std::vector<const Tensor*> inputs = {rope->src[0], rope->src[1]};
    for (const Tensor* w : {w1, w2}) {
        inputs.push_back(w->src[2]);
        if (storage_of(w->src[1]) != rope) inputs.push_back(w->src[1]);
    }
    for (size_t o = 0; o < 3; ++o) {
        for (size_t p = o + 1; p < 3; ++p)
            if (memory_overlaps(outputs[o], outputs[p])) return {};
        for (const Tensor* in : inputs)
            if (memory_overlaps(outputs[o], in)) return {};
    }
    return {3, run_rope_set_rows};
}

Fusion find_norm_fusion(std::span<Tensor* const> nodes, size_t i) {
    const size_t left = nodes.size() - i;
    size_t n = 0; // the pre-norm's nodes
    if (left >= 2 && is_f32_rms_norm_of(nodes[i], nodes[i]->src[0]) &&
        is_row_scaling_of(nodes[i + 1], nodes[i]))
        n = 2;
    else if (left >= 3 && nodes[i]->op == Op::Add && is_f32(nodes[i]) && is_f32(nodes[i]->src[0]) &&
             is_f32(nodes[i]->src[1]) && nodes[i]->src[0]->ne == nodes[i]->ne &&
             nodes[i]->src[1]->ne == nodes[i]->ne && is_f32_rms_norm_of(nodes[i + 1], nodes[i]) &&
             is_row_scaling_of(nodes[i + 2], nodes[i + 1]))
        n = 3;
    if (n == 0) return {};
    if (left > n && is_quant_matvec_of(nodes[i + n], nodes[i + n - 1])) {
        // A second product of the pre-norm's output whose weights could not be merged with the
        // first's (another block type) joins the first's launch, where it has a kernel.
        const bool paired = left > n + 1 && is_quant_matvec_of(nodes[i + n + 1], nodes[i + n - 1]) &&
                            takes_matvec_pair(nodes[i + n], nodes[i + n + 1]) &&
                            !memory_overlaps(nodes[i + n], nodes[i + n + 1]);
        return {find_glu_fusion(nodes, i + n).n_nodes == 2 || paired ? n + 2 : n + 1, run_pre_norm_matvec};
    }
    return {n, n == 2 ? run_rms_norm_mul : run_add_rms_norm_mul};
}

void register_norm_kernels(KernelTable& t) {
    t[size_t(Op::Norm)] = {run_norm, supports_norm};
    t[size_t(Op::RmsNorm)] = {run_rms_norm, supports_norm};
    t[size_t(Op::NormBack)] = {run_norm_back, supports_norm_back};
    t[size_t(Op::RmsNormBack)] = {run_rms_norm_back, supports_norm_back};
    t[size_t(Op::Rope)] = {run_rope, supports_rope};
    t[size_t(Op::RopeBack)] = {run_rope_back, supports_rope};
    t[size_t(Op::SoftMax)] = {run_soft_max, supports_soft_max};
    t[size_t(Op::SoftMaxBack)] = {run_soft_max_back, supports_soft_max_back};
    t[size_t(Op::DiagMaskInf)] = {run_diag_mask_inf, supports_diag_mask_inf};
}

} // namespace gfa::cuda
