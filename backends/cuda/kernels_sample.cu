// sample_token on CUDA: a decoding step draws its token where its logits are, so that sampled
// generation, like greedy generation, sends nothing but the id back and lets the device pass
// it on to the next step (Session::decode).
//
// The draw follows the op's rule (src/ops/sample_rule.h) step by step. The top_k candidates
// are found in two stages, so that a vocabulary-sized column is read by many blocks at once:
// each block of the first takes a chunk of a column (8192 values, held in registers) and keeps
// its chunk's top_k; one block per column then keeps the top_k of those. Both select by radix
// (kth_largest): every value is a 64-bit candidate (its rank key, then its position reversed,
// so that larger means first in top_k's order and no two are equal), and eight passes of 8-bit
// digits from the top find the k-th largest, each counting the digits of the candidates that
// still share the prefix chosen so far. The winners are ranked, weighed in double precision,
// and the draw walks their prefix sums in the rule's order.
#include "cuda_common.h"
#include "cuda_device.cuh"

#include "../../src/ops/sample_rule.h"

#include <algorithm>
#include <cstdint>

namespace gfa::cuda {

namespace {

constexpr int kMaxCandidates = 128; // top_k on the device: at most this many
constexpr int kChunkThreads = 512;  // stage 1: a block per chunk of a column
constexpr int kChunkPerThread = 16; // values a thread holds
constexpr int64_t kChunk = int64_t(kChunkThreads) * kChunkPerThread;
constexpr int kMaxChunks = 32;      // columns of up to 262144 values
constexpr int kMergeThreads = 1024; // stage 2: a block per column
constexpr int kMergePerThread = kMaxChunks * kMaxCandidates / kMergeThreads;

// Larger values get larger keys; NaN ranks as -inf and -0 as +0, as in top_k's order.
__device__ __forceinline__ uint32_t rank_key(float v) {
    if (isnan(v)) v = -INFINITY;
    if (v == 0.0f) v = 0.0f;
    const uint32_t b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float value_of_key(uint32_t key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}
// A candidate as one integer: larger first, then the lower position. Never 0 (the smallest
// key, -inf's, is 0x007fffff), which marks "no candidate".
__device__ __forceinline__ uint64_t candidate(float v, int64_t i) {
    return (uint64_t(rank_key(v)) << 32) | uint64_t(0xffffffffu - uint32_t(i));
}
__device__ __forceinline__ float candidate_value(uint64_t c) {
    return value_of_key(uint32_t(c >> 32));
}
__device__ __forceinline__ int32_t candidate_position(uint64_t c) {
    return int32_t(0xffffffffu - uint32_t(c));
}

struct SelectShared {
    uint32_t hist[256];
    uint64_t prefix;
    uint32_t needed;
    uint32_t n_out;
};

// The k-th largest of the candidates the block's threads hold (0: none; k at most their
// number), by 8-bit digits from the top. Every thread of the block calls it.
template <int kThreads, int kPer>
__device__ uint64_t kth_largest(const uint64_t (&c)[kPer], uint32_t k, SelectShared& sh) {
    const int tid = int(threadIdx.x), lane = tid % 32;
    if (tid == 0) sh.prefix = 0, sh.needed = k;
    uint64_t prefix = 0, mask = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int d = tid; d < 256; d += kThreads) sh.hist[d] = 0;
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
            const bool counted = c[j] != 0 && (c[j] & mask) == prefix;
            const uint32_t digit = counted ? uint32_t(c[j] >> shift) & 0xffu : 256u;
            const uint32_t peers = __match_any_sync(0xffffffffu, digit); // lanes with this digit
            if (counted && lane == __ffs(peers) - 1) atomicAdd(&sh.hist[digit], uint32_t(__popc(peers)));
        }
        __syncthreads();
        if (tid < 32) { // the digit where the needed-th largest falls: lane l sums digits 255-8l .. 248-8l
            const uint32_t needed = sh.needed;
            uint32_t own = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) own += sh.hist[255 - 8 * lane - j];
            uint32_t through = own; // the lanes' counts from the top digit, inclusive
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const uint32_t up = __shfl_up_sync(0xffffffffu, through, o);
                if (lane >= o) through += up;
            }
            __syncwarp(); // every lane has read sh.needed before one lane changes it
            uint32_t before = through - own;
            if (before < needed && needed <= through) {
                for (int j = 0; j < 8; ++j) {
                    const int d = 255 - 8 * lane - j;
                    if (needed - before <= sh.hist[d]) {
                        sh.prefix |= uint64_t(d) << shift;
                        sh.needed = needed - before;
                        break;
                    }
                    before += sh.hist[d];
                }
            }
        }
        __syncthreads();
        prefix = sh.prefix;
        mask |= uint64_t(0xff) << shift;
    }
    return prefix;
}

// Stage 1: block (chunk, column) writes its chunk's min(k, chunk length) largest candidates,
// in no order, to chunk_best[column][chunk][0 ..).
__global__ void __launch_bounds__(kChunkThreads)
    chunk_candidates_kernel(TensorView logits, uint64_t* chunk_best, int k) {
    __shared__ SelectShared sh;
    const int tid = int(threadIdx.x);
    const int64_t n = logits.ne[0], chunk = blockIdx.x, column = blockIdx.y;
    const int64_t begin = chunk * kChunk, length = min(kChunk, n - begin);
    const char* row = logits.data + column * logits.nb[1];
    uint64_t c[kChunkPerThread];
#pragma unroll
    for (int j = 0; j < kChunkPerThread; ++j) {
        const int64_t i = begin + tid + int64_t(j) * kChunkThreads;
        c[j] = i < begin + length ? candidate(*reinterpret_cast<const float*>(row + i * logits.nb[0]), i) : 0;
    }
    const uint32_t keep = uint32_t(min(int64_t(k), length));
    const uint64_t kth = kth_largest<kChunkThreads, kChunkPerThread>(c, keep, sh);
    if (tid == 0) sh.n_out = 0;
    __syncthreads();
    uint64_t* out = chunk_best + (column * gridDim.x + chunk) * kMaxCandidates;
#pragma unroll
    for (int j = 0; j < kChunkPerThread; ++j)
        if (c[j] != 0 && c[j] >= kth) out[atomicAdd(&sh.n_out, 1u)] = c[j];
}

// Stage 2: block `column` keeps the k largest of its chunks' candidates, ranks them and draws.
__global__ void __launch_bounds__(kMergeThreads)
    draw_kernel(TensorView logits, TensorView positions, TensorView dst, const uint64_t* chunk_best,
                int chunks, SampleParams p) {
    __shared__ SelectShared sh;
    __shared__ uint64_t found[kMaxCandidates];
    __shared__ uint64_t ranked[kMaxCandidates];
    __shared__ double weight[kMaxCandidates];
    const int tid = int(threadIdx.x);
    const int64_t n = logits.ne[0], column = blockIdx.x;
    const int k = int(p.top_k == 0 ? n : min(int64_t(p.top_k), n));
    const uint64_t* best = chunk_best + column * chunks * kMaxCandidates;
    uint64_t c[kMergePerThread];
#pragma unroll
    for (int j = 0; j < kMergePerThread; ++j) {
        const int q = tid + j * kMergeThreads, chunk = q / kMaxCandidates, slot = q % kMaxCandidates;
        const int64_t kept = chunk < chunks ? min(int64_t(k), min(kChunk, n - chunk * kChunk)) : 0;
        c[j] = slot < kept ? best[q] : 0;
    }
    const uint64_t kth = kth_largest<kMergeThreads, kMergePerThread>(c, uint32_t(k), sh);
    if (tid == 0) sh.n_out = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kMergePerThread; ++j)
        if (c[j] != 0 && c[j] >= kth) found[atomicAdd(&sh.n_out, 1u)] = c[j];
    __syncthreads();
    // Ranked: a candidate's place is the number of candidates before it (all distinct).
    if (tid < k) {
        const uint64_t mine = found[tid];
        int place = 0;
        for (int j = 0; j < k; ++j) place += found[j] > mine;
        ranked[place] = mine;
    }
    __syncthreads();
    // Weights, then the rule's sums in its order, in one thread.
    const double top = double(candidate_value(ranked[0]));
    if (tid < k) {
        const double v = double(candidate_value(ranked[tid]));
        weight[tid] = v > -INFINITY ? ::exp((v - top) / double(p.temperature)) : 0.0;
    }
    __syncthreads();
    if (tid != 0) return;
    int32_t pick = candidate_position(ranked[0]);
    if (top > -INFINITY) {
        double total = 0.0;
        for (int i = 0; i < k; ++i) total += weight[i];
        int run = k;
        double share = 0.0, mass = 0.0;
        for (int i = 0; i < k; ++i) {
            share += weight[i] / total;
            mass += weight[i];
            if (share >= double(p.top_p)) {
                run = i + 1;
                break;
            }
        }
        const int32_t position = *reinterpret_cast<const int32_t*>(positions.data + column * positions.nb[0]);
        const double target = sample_rule::sample_uniform(p.seed, position) * mass;
        double sum = 0.0;
        pick = candidate_position(ranked[run - 1]);
        for (int i = 0; i < run; ++i) {
            sum += weight[i];
            if (sum > target) {
                pick = candidate_position(ranked[i]);
                break;
            }
        }
    }
    *reinterpret_cast<int32_t*>(dst.data + column * dst.nb[1]) = pick;
}

void run_sample_token(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *logits = dst->src[0], *positions = dst->src[1];
    const int64_t columns = logits->ne[1];
    if (columns == 0) return;
    const SampleParams& p = dst->params<SampleParams>();
    const int64_t n = logits->ne[0];
    const int k = int(p.top_k == 0 ? n : std::min<int64_t>(p.top_k, n));
    const int chunks = int((n + kChunk - 1) / kChunk);
    auto* chunk_best = static_cast<uint64_t*>(ctx.scratch->get(
        size_t(columns) * size_t(chunks) * kMaxCandidates * sizeof(uint64_t), ctx.stream, ctx.device_name));
    const TensorView vl = view_of(logits);
    chunk_candidates_kernel<<<dim3(unsigned(chunks), unsigned(columns)), kChunkThreads, 0, ctx.stream>>>(
        vl, chunk_best, k);
    GFA_CUDA_CHECK_LAUNCH();
    draw_kernel<<<unsigned(columns), kMergeThreads, 0, ctx.stream>>>(vl, view_of(positions), view_of(dst),
                                                                     chunk_best, chunks, p);
    GFA_CUDA_CHECK_LAUNCH();
}

// At most kMaxCandidates candidates (top_k 0 only for columns that short), columns of at most
// kMaxChunks chunks, at most 65535 columns (the first stage's grid).
bool supports_sample_token(const Tensor* dst) {
    const Tensor* logits = dst->src[0];
    const SampleParams& p = dst->params<SampleParams>();
    const int64_t n = logits->ne[0];
    const int64_t k = p.top_k == 0 ? n : std::min<int64_t>(p.top_k, n);
    return k >= 1 && k <= kMaxCandidates && n <= kMaxChunks * kChunk && logits->ne[1] <= 65535;
}

} // namespace

void register_sample_kernels(KernelTable& t) {
    t[size_t(Op::SampleToken)] = {run_sample_token, supports_sample_token};
}

} // namespace gfa::cuda
