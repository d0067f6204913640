// sample_token on CUDA: a decoding step draws its token where its logits are, so that sampled
// generation, like greedy generation, sends nothing but the id back and lets the device pass
// it on to the next step (Session::decode).
//
// One block per column of logits. The draw follows the op's rule (src/ops/sample_rule.h) step
// by step: the top_k candidates are found by a radix select over the values' rank keys (four
// passes of 8-bit digits from the top, each counting the digits of the keys that still share
// the prefix chosen so far), then those above the k-th key are gathered, and of the keys equal
// to it the ones at the lowest positions (an ordered pass); the candidates are ranked, weighed
// in double precision, and the draw walks their prefix sums in the rule's order.
#include "cuda_common.h"
#include "cuda_device.cuh"

#include "../../src/ops/sample_rule.h"

#include <algorithm>
#include <cstdint>

namespace gfa::cuda {

namespace {

constexpr int kSampleThreads = 1024;
constexpr int kSampleMaxCandidates = 128; // top_k on the device: at most this many

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
// A candidate as one integer: larger first, then the lower position.
__device__ __forceinline__ uint64_t candidate(uint32_t key, int64_t i) {
    return (uint64_t(key) << 32) | uint64_t(0xffffffffu - uint32_t(i));
}

__global__ void __launch_bounds__(kSampleThreads)
    sample_token_kernel(TensorView logits, TensorView positions, TensorView dst, SampleParams p) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t warp_ties[kSampleThreads / 32];
    __shared__ uint64_t found[kSampleMaxCandidates];
    __shared__ uint64_t ranked[kSampleMaxCandidates];
    __shared__ double weight[kSampleMaxCandidates];
    __shared__ uint32_t chosen_prefix, still_needed, n_found;
    const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
    const int64_t column = blockIdx.x;
    const char* row = logits.data + column * logits.nb[1];
    const int64_t n = logits.ne[0];
    const int k = int(p.top_k == 0 ? n : min(int64_t(p.top_k), n));
    auto key_at = [&](int64_t i) { return rank_key(*reinterpret_cast<const float*>(row + i * logits.nb[0])); };

    // 1. The k-th largest key, digit by digit from the top.
    if (tid == 0) chosen_prefix = 0, still_needed = uint32_t(k);
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = tid; d < 256; d += kSampleThreads) hist[d] = 0;
        __syncthreads();
        for (int64_t base = 0; base < n; base += kSampleThreads) {
            const int64_t i = base + tid;
            const uint32_t key = i < n ? key_at(i) : 0;
            const bool counted = i < n && (key & mask) == prefix;
            const uint32_t digit = counted ? (key >> shift) & 0xffu : 256u;
            const uint32_t peers = __match_any_sync(0xffffffffu, digit); // lanes with this digit
            if (counted && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], uint32_t(__popc(peers)));
        }
        __syncthreads();
        if (tid == 0) {
            uint32_t needed = still_needed;
            for (int d = 255; d >= 0; --d) {
                if (hist[d] >= needed) {
                    chosen_prefix |= uint32_t(d) << shift;
                    break;
                }
                needed -= hist[d];
            }
            still_needed = needed;
        }
        __syncthreads();
        prefix = chosen_prefix;
        mask |= 0xffu << shift;
    }
    const uint32_t kth = prefix;          // the k-th largest key
    const uint32_t ties = still_needed;   // keys equal to it among the k: the lowest positions
    const uint32_t above = uint32_t(k) - ties;

    // 2. The candidates: every key above kth (any order), then the first `ties` equal to it.
    if (tid == 0) n_found = 0;
    __syncthreads();
    for (int64_t i = tid; i < n; i += kSampleThreads) {
        const uint32_t key = key_at(i);
        if (key > kth) found[atomicAdd(&n_found, 1u)] = candidate(key, i);
    }
    uint32_t taken = 0; // the same in every thread
    for (int64_t base = 0; base < n && taken < ties; base += kSampleThreads) {
        const int64_t i = base + tid;
        const bool tie = i < n && key_at(i) == kth;
        const uint32_t ballot = __ballot_sync(0xffffffffu, tie);
        if (lane == 0) warp_ties[warp] = uint32_t(__popc(ballot));
        __syncthreads();
        uint32_t before = 0, total = 0;
        for (int w = 0; w < kSampleThreads / 32; ++w) {
            if (w < warp) before += warp_ties[w];
            total += warp_ties[w];
        }
        const uint32_t rank = taken + before + uint32_t(__popc(ballot & ((1u << lane) - 1u)));
        if (tie && rank < ties) found[above + rank] = candidate(kth, i);
        taken += total;
        __syncthreads();
    }
    __syncthreads();

    // 3. Ranked: a candidate's place is the number of candidates before it (all distinct).
    if (tid < k) {
        const uint64_t mine = found[tid];
        int place = 0;
        for (int j = 0; j < k; ++j) place += found[j] > mine;
        ranked[place] = mine;
    }
    __syncthreads();

    // 4. Weights, then the rule's sums in its order, in one thread.
    const double top = double(value_of_key(uint32_t(ranked[0] >> 32)));
    if (tid < k) {
        const double v = double(value_of_key(uint32_t(ranked[tid] >> 32)));
        weight[tid] = v > -INFINITY ? ::exp((v - top) / double(p.temperature)) : 0.0;
    }
    __syncthreads();
    if (tid == 0) {
        auto position_of = [](uint64_t c) { return int32_t(0xffffffffu - uint32_t(c)); };
        int32_t pick = position_of(ranked[0]);
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
            pick = position_of(ranked[run - 1]);
            for (int i = 0; i < run; ++i) {
                sum += weight[i];
                if (sum > target) {
                    pick = position_of(ranked[i]);
                    break;
                }
            }
        }
        *reinterpret_cast<int32_t*>(dst.data + column * dst.nb[1]) = pick;
    }
}

void run_sample_token(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *logits = dst->src[0], *positions = dst->src[1];
    if (logits->ne[1] == 0) return;
    sample_token_kernel<<<unsigned(logits->ne[1]), kSampleThreads, 0, ctx.stream>>>(
        view_of(logits), view_of(positions), view_of(dst), dst->params<SampleParams>());
    GFA_CUDA_CHECK_LAUNCH();
}

// At most kSampleMaxCandidates candidates (top_k 0 only for rows that short), positions that
// fit the candidates' 32 bits.
bool supports_sample_token(const Tensor* dst) {
    const Tensor* logits = dst->src[0];
    const SampleParams& p = dst->params<SampleParams>();
    const int64_t k = p.top_k == 0 ? logits->ne[0] : std::min<int64_t>(p.top_k, logits->ne[0]);
    return k >= 1 && k <= kSampleMaxCandidates && logits->ne[0] < (int64_t(1) << 31);
}

} // namespace

void register_sample_kernels(KernelTable& t) {
    t[size_t(Op::SampleToken)] = {run_sample_token, supports_sample_token};
}

} // namespace gfa::cuda
