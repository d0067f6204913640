// A mixture of experts on the GPU: top_k (the router's choice of experts per token) and
// mul_mat_id (each token's input times its chosen experts' matrices), so that a model's
// experts stay in device memory and its layers run without a trip to the host.
//
// mul_mat_id is a matrix-vector product per (slot, token) pair: one warp per output row, its
// lanes reading consecutive 8-value pieces of the chosen expert's row (decoded exactly, as
// get_rows decodes them) against the f32 input column, summed in f32. The input columns are
// not rounded to 8 bits as the quantized mul_mat path rounds them, so the result is as exact
// as the CPU's f32 product. Decoding (no more pairs than experts) takes the pairs as they
// come, each reading its expert's rows once. A mid-sized batch first sorts its pairs by
// expert into chunks of up to kChunkPairs pairs of one expert, and a warp then decodes each
// piece of an expert's row once for the whole chunk (an expert is read once per kChunkPairs
// tokens that chose it); each output is still one warp's sum in the same order, so these two
// paths give the same bits. A prompt (at least kGemmPairsPerExpert pairs per expert on
// average) runs on the tensor cores: its pairs sorted into chunks of kGemmChunk columns, each
// chunk's inputs gathered into a matrix, and one batched cuBLAS product over the chunks, each
// against its expert's matrix (block types decoded to f16 first, as mul_mat's prefill does;
// f16/bf16 experts read in place with their inputs rounded to that type; f32 in f32).
#include "cuda_device.cuh"
#include "op_def.h"
#include "quant_blocks.cuh"
#include "quant_matmul.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace gfa::cuda {

namespace {

// ---- top_k ----------------------------------------------------------------------------------

// The rank order of top_k's definition: larger values first, NaN as low as -inf, ties by the
// lower position. a ranks before b?
__device__ __forceinline__ bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
    a = isnan(a) ? -INFINITY : a;
    b = isnan(b) ? -INFINITY : b;
    return a > b || (a == b && ia < ib);
}

// One warp per row. Pick j is the best-ranked value that ranks after pick j - 1: each lane
// scans its share of the row for it, then the warp keeps the best lane's. O(k n / 32) per
// row, and no memory besides the row: a router's rows hold a few hundred experts at most.
__global__ void top_k_kernel(TensorView a, TensorView dst, int64_t n_rows) {
    const int lane = int(threadIdx.x) % 32;
    const int64_t n = a.ne[0], k = dst.ne[0];
    for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < n_rows;
         r += int64_t(gridDim.x) * blockDim.x / 32) {
        const int64_t i1 = r % a.ne[1], i2 = (r / a.ne[1]) % a.ne[2], i3 = r / (a.ne[1] * a.ne[2]);
        float last = INFINITY;
        int64_t last_i = -1; // nothing picked yet: every value ranks after (+inf, -1)
        for (int64_t j = 0; j < k; ++j) {
            float best = 0.0f;
            int64_t best_i = -1;
            for (int64_t i = lane; i < n; i += 32) {
                const float v = load_f32(a, i, i1, i2, i3);
                const bool after_last = last_i < 0 || ranks_before(last, last_i, v, i);
                if (after_last && (best_i < 0 || ranks_before(v, i, best, best_i))) best = v, best_i = i;
            }
            for (int o = 16; o > 0; o >>= 1) {
                const float other = __shfl_xor_sync(0xffffffffu, best, o);
                const int64_t other_i = __shfl_xor_sync(0xffffffffu, best_i, o);
                if (other_i >= 0 && (best_i < 0 || ranks_before(other, other_i, best, best_i)))
                    best = other, best_i = other_i;
            }
            if (lane == 0)
                *reinterpret_cast<int32_t*>(dst.data + j * dst.nb[0] + i1 * dst.nb[1] + i2 * dst.nb[2] +
                                            i3 * dst.nb[3]) = int32_t(best_i);
            last = best, last_i = best_i;
        }
    }
}

// k = 1, the first largest value: greedy decoding's pick over a vocabulary of tens of
// thousands of logits. A warp walking such a row alone takes ~1000 dependent steps per lane;
// here a whole block shares the row, each thread keeping its best, then the warps' bests
// meet in shared memory.
constexpr int kFirstMaxThreads = 1024;
static_assert(kFirstMaxThreads == 32 * 32, "the second round is one warp, a lane per warp of the first");

__device__ __forceinline__ void keep_better(float& best, int64_t& best_i, float v, int64_t i) {
    if (i >= 0 && (best_i < 0 || ranks_before(v, i, best, best_i))) best = v, best_i = i;
}

__device__ __forceinline__ void warp_first_max(float& best, int64_t& best_i) {
    for (int o = 16; o > 0; o >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, best, o);
        const int64_t other_i = __shfl_xor_sync(0xffffffffu, best_i, o);
        keep_better(best, best_i, other, other_i);
    }
}

__global__ void __launch_bounds__(kFirstMaxThreads)
    first_max_kernel(TensorView a, TensorView dst, int64_t n_rows) {
    __shared__ float warp_best[kFirstMaxThreads / 32];
    __shared__ int64_t warp_best_i[kFirstMaxThreads / 32];
    const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
    const int64_t n = a.ne[0];
    for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
        const int64_t i1 = r % a.ne[1], i2 = (r / a.ne[1]) % a.ne[2], i3 = r / (a.ne[1] * a.ne[2]);
        float best = 0.0f;
        int64_t best_i = -1;
#pragma unroll 8
        for (int64_t i = threadIdx.x; i < n; i += kFirstMaxThreads)
            keep_better(best, best_i, load_f32(a, i, i1, i2, i3), i);
        warp_first_max(best, best_i);
        if (lane == 0) warp_best[warp] = best, warp_best_i[warp] = best_i;
        __syncthreads();
        if (warp == 0) {
            best = warp_best[lane];
            best_i = warp_best_i[lane];
            warp_first_max(best, best_i);
            if (lane == 0)
                *reinterpret_cast<int32_t*>(dst.data + i1 * dst.nb[1] + i2 * dst.nb[2] + i3 * dst.nb[3]) =
                    int32_t(best_i);
        }
        __syncthreads(); // the shared bests are read before the next row overwrites them
    }
}

void run_top_k(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor* a = dst->src[0];
    const int64_t rows = a->ne[1] * a->ne[2] * a->ne[3];
    if (rows == 0) return;
    // A block per row pays off once a row has more values than a warp has lanes many times over.
    if (dst->ne[0] == 1 && a->ne[0] >= 1024) {
        const unsigned blocks = unsigned(std::min<int64_t>(rows, 1024)); // rows beyond walk grid-stride
        first_max_kernel<<<blocks, kFirstMaxThreads, 0, ctx.stream>>>(view_of(a), view_of(dst), rows);
        GFA_CUDA_CHECK_LAUNCH();
        return;
    }
    constexpr int kThreads = 128;
    top_k_kernel<<<grid_for(rows * 32, kThreads), kThreads, 0, ctx.stream>>>(view_of(a), view_of(dst), rows);
    GFA_CUDA_CHECK_LAUNCH();
}

bool supports_top_k(const Tensor* dst) {
    const Tensor* a = dst->src[0];
    return a && a->type == Type::F32 && dst->type == Type::I32 && dst->ne[0] <= a->ne[0] &&
           a->ne[0] <= INT32_MAX;
}

// ---- mul_mat_id -------------------------------------------------------------------------------

constexpr int kRowsPerBlock = 4; // one warp per output row

// Where pair p = slot + n_slots * token of mul_mat_id reads and writes.
struct PairPlace {
    int64_t slot, token, column; // column: b's column (0 when b is shared by the slots)
};
__device__ __forceinline__ PairPlace pair_place(int64_t pair, const TensorView& ids, const TensorView& b) {
    const int64_t slot = pair % ids.ne[0], token = pair / ids.ne[0];
    return {slot, token, b.ne[1] == 1 ? 0 : slot};
}
__device__ __forceinline__ int64_t expert_of(const TensorView& ids, int64_t slot, int64_t token) {
    return *reinterpret_cast<const int32_t*>(ids.data + slot * ids.nb[0] + token * ids.nb[1]);
}

// Row m of expert e times NC columns of b at once; column j is b[:, at[j].column, at[j].token]
// for j < n. Returns the lane's partial sums; the pieces of the row are decoded once.
template <int TYPE, int NC>
__device__ __forceinline__ void expert_row_dots(const TensorView& as, const TensorView& b, int64_t m,
                                                int64_t e, const PairPlace (&at)[NC], int n,
                                                float (&acc)[NC]) {
    const int lane = int(threadIdx.x) % 32;
    const int64_t K = as.ne[0];
    const char* col[NC];
#pragma unroll
    for (int j = 0; j < NC; ++j) {
        acc[j] = 0.0f;
        col[j] = b.data + (j < n ? at[j].column * b.nb[1] + at[j].token * b.nb[2] : 0);
    }
    auto input = [&](int j, int64_t k) { return *reinterpret_cast<const float*>(col[j] + k * b.nb[0]); };
    if constexpr (TYPE < 0) {
        for (int64_t k = lane; k < K; k += 32) {
            const float w = load_any(as, k, m, e, 0);
#pragma unroll
            for (int j = 0; j < NC; ++j)
                if (j < n) acc[j] += w * input(j, k);
        }
    } else {
        const char* row = as.data + m * as.nb[1] + e * as.nb[2];
        for (int64_t chunk = lane; chunk < K / 8; chunk += 32) {
            float w[8];
            dequantize_row_chunk<TYPE>(row, K, chunk, w); // 8 values, decoded exactly
#pragma unroll
            for (int j = 0; j < NC; ++j)
                if (j < n)
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[j] += w[i] * input(j, 8 * chunk + i);
        }
    }
}

// dst[:, i, t] = as[:, :, ids[i, t]]^T b[:, i or 0, t], pairs as they come: grid.x over row
// blocks, grid.y over (slot, token) pairs (grid-stride beyond the launch limit). TYPE < 0:
// f32/f16/bf16 weights read element by element (any strides); else a block type with packed
// rows.
template <int TYPE>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    mul_mat_id_kernel(TensorView as, TensorView b, TensorView ids, TensorView dst, int32_t* error) {
    const int lane = int(threadIdx.x) % 32;
    const int64_t m = int64_t(blockIdx.x) * kRowsPerBlock + int(threadIdx.x) / 32;
    const int64_t n_pairs = ids.ne[0] * ids.ne[1];
    if (m >= as.ne[1]) return;
    for (int64_t pair = blockIdx.y; pair < n_pairs; pair += gridDim.y) {
        const PairPlace at[1] = {pair_place(pair, ids, b)};
        const int64_t e = expert_of(ids, at[0].slot, at[0].token);
        float* out = f32_ptr(dst, m, at[0].slot, at[0].token, 0);
        if (e < 0 || e >= as.ne[2]) { // the row stays defined; the backend raises the error
            if (lane == 0) {
                report_error(error, kExpertOutOfRange, int32_t(e), int32_t(at[0].token), int32_t(as.ne[2]));
                *out = 0.0f;
            }
            continue;
        }
        float acc[1];
        expert_row_dots<TYPE, 1>(as, b, m, e, at, 1, acc);
        acc[0] = warp_sum(acc[0]);
        if (lane == 0) *out = acc[0];
    }
}

// ---- pairs grouped by expert ----

constexpr int kChunkPairs = 8;          // pairs per chunk of the warp kernel
constexpr int kGemmChunk = 64;          // columns per chunk of the tensor-core route
constexpr int kGemmPairsPerExpert = 32; // average pairs per expert from which it is taken

// The pairs sorted by expert (each expert's run in pair order), cut into chunks of up to
// `chunk_pairs` pairs of one expert.
struct ExpertChunks {
    int32_t* count;    // [E + 1] pairs per expert; [E]: the chunks made
    int32_t* order;    // [n_pairs] pair indices, expert by expert
    int4* chunk;       // [max_chunks] (expert, first place in order, pairs, 0)
    int64_t n_experts; // E
    int chunk_pairs;
};

size_t align16(size_t x) {
    return (x + 15) / 16 * 16;
}

// Scratch for the groups: returns the bytes needed, and with `at` lays them out there.
size_t expert_chunks_bytes(int64_t E, int64_t pairs, int64_t max_chunks, char* at, ExpertChunks* g) {
    const size_t count_bytes = align16(size_t(E + 1) * 4), order_bytes = align16(size_t(pairs) * 4);
    if (at) {
        g->count = reinterpret_cast<int32_t*>(at);
        g->order = reinterpret_cast<int32_t*>(at + count_bytes);
        g->chunk = reinterpret_cast<int4*>(at + count_bytes + order_bytes);
    }
    return count_bytes + order_bytes + align16(size_t(max_chunks) * sizeof(int4));
}

// One block; thread e (and e + blockDim, ...) walks all pairs for expert e, twice: to count
// them, then (once the runs are placed) to write them into its run in pair order, so the
// grouping is the same on every run. Out-of-range ids are reported and their outputs zeroed
// here; they join no run.
__global__ void group_pairs_kernel(TensorView ids, TensorView dst, ExpertChunks g, int32_t* error) {
    const int64_t n_pairs = ids.ne[0] * ids.ne[1], E = g.n_experts;
    auto expert_at = [&](int64_t p) { return expert_of(ids, p % ids.ne[0], p / ids.ne[0]); };
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
        int32_t c = 0;
        for (int64_t p = 0; p < n_pairs; ++p) c += expert_at(p) == e;
        g.count[e] = c;
    }
    for (int64_t p = threadIdx.x; p < n_pairs; p += blockDim.x) {
        const int64_t e = expert_at(p), slot = p % ids.ne[0], token = p / ids.ne[0];
        if (e < 0 || e >= E) {
            report_error(error, kExpertOutOfRange, int32_t(e), int32_t(token), int32_t(E));
            for (int64_t m = 0; m < dst.ne[0]; ++m) *f32_ptr(dst, m, slot, token, 0) = 0.0f;
        }
    }
    __syncthreads();
    __shared__ int32_t chunks;
    if (threadIdx.x == 0) { // E is a router's width: a few hundred at most
        int32_t place = 0;
        chunks = 0;
        for (int64_t e = 0; e < E; ++e) {
            const int32_t c = g.count[e];
            for (int32_t first = 0; first < c; first += g.chunk_pairs)
                g.chunk[chunks++] = make_int4(int32_t(e), place + first, min(g.chunk_pairs, c - first), 0);
            g.count[e] = place; // from here on: where the run starts
            place += c;
        }
        g.count[E] = chunks;
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
        int32_t place = g.count[e];
        for (int64_t p = 0; p < n_pairs; ++p)
            if (expert_at(p) == e) g.order[place++] = int32_t(p);
    }
}

// The warp route: grid.x over row blocks, grid.y over chunks (grid-stride; chunks past the
// count exit).
template <int TYPE>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    mul_mat_id_chunks_kernel(TensorView as, TensorView b, TensorView ids, TensorView dst, ExpertChunks g) {
    const int lane = int(threadIdx.x) % 32;
    const int64_t m = int64_t(blockIdx.x) * kRowsPerBlock + int(threadIdx.x) / 32;
    if (m >= as.ne[1]) return;
    const int n_chunks = g.count[g.n_experts];
    for (int c = blockIdx.y; c < n_chunks; c += gridDim.y) {
        const int4 ch = g.chunk[c];
        PairPlace at[kChunkPairs];
#pragma unroll
        for (int j = 0; j < kChunkPairs; ++j) at[j] = pair_place(j < ch.z ? g.order[ch.y + j] : 0, ids, b);
        float acc[kChunkPairs];
        expert_row_dots<TYPE, kChunkPairs>(as, b, m, ch.x, at, ch.z, acc);
#pragma unroll
        for (int j = 0; j < kChunkPairs; ++j) {
            if (j >= ch.z) break;
            const float sum = warp_sum(acc[j]);
            if (lane == 0) *f32_ptr(dst, m, at[j].slot, at[j].token, 0) = sum;
        }
    }
}

// ---- the tensor-core route ----

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) {
    return v;
}
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
    return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Chunk c's inputs as columns [K, kGemmChunk] of `cols` (zero past its pairs, and for chunks
// past the count, which the batched product still multiplies), and the product's pointers:
// A the chunk's expert, B its columns, C its [M, kGemmChunk] result. grid.x: chunks (every
// slot of the batch), 256 threads.
template <class T>
__global__ void gather_columns_kernel(TensorView b, TensorView ids, ExpertChunks g, T* cols, float* results,
                                      const char* weights, int64_t expert_stride, int64_t M,
                                      const void** a_ptr, const void** b_ptr, void** c_ptr) {
    const int c = blockIdx.x;
    const int64_t K = b.ne[0];
    const int n_chunks = g.count[g.n_experts];
    const int4 ch = c < n_chunks ? g.chunk[c] : make_int4(0, 0, 0, 0);
    T* out = cols + int64_t(c) * kGemmChunk * K;
    if (threadIdx.x == 0) {
        a_ptr[c] = weights + int64_t(ch.x) * expert_stride;
        b_ptr[c] = out;
        c_ptr[c] = results + int64_t(c) * kGemmChunk * M;
    }
    for (int j = 0; j < kGemmChunk; ++j) {
        const bool used = j < ch.z;
        const PairPlace at = pair_place(used ? g.order[ch.y + j] : 0, ids, b);
        for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
            out[j * K + k] = from_float<T>(used ? load_f32(b, k, at.column, at.token, 0) : 0.0f);
    }
}

// dst's columns from the chunks' results. grid.x: chunks, 256 threads.
__global__ void scatter_results_kernel(TensorView ids, TensorView b, TensorView dst, ExpertChunks g,
                                       const float* results) {
    const int c = blockIdx.x;
    if (c >= g.count[g.n_experts]) return;
    const int4 ch = g.chunk[c];
    const int64_t M = dst.ne[0];
    for (int j = 0; j < ch.z; ++j) {
        const PairPlace at = pair_place(g.order[ch.y + j], ids, b);
        const float* r = results + (int64_t(c) * kGemmChunk + j) * M;
        for (int64_t m = threadIdx.x; m < M; m += blockDim.x) *f32_ptr(dst, m, at.slot, at.token, 0) = r[m];
    }
}

// Calls launch with the block type of the weights as they lie on the device, or -1 for float weights.
template <class F> void dispatch_weight_type(const TensorView& as, F&& launch) {
    if (is_scales_last_id(as.type) || is_cuda_quant_type(Type(as.type)))
        dispatch_quant_view(as.type,
                            [&](auto tag) { launch(std::integral_constant<int, decltype(tag)::value>{}); });
    else
        launch(std::integral_constant<int, -1>{});
}

// cuBLAS's limits (int sizes, element-aligned leading dimensions) and a layout it reads: rows
// of the experts packed with element-sized strides (block types are decoded into that).
bool gemm_route_applies(const Tensor* dst) {
    const Tensor *as = dst->src[0], *ids = dst->src[2];
    const int64_t K = as->ne[0], M = as->ne[1], E = as->ne[2];
    const int64_t max_chunks = ids->ne[0] * ids->ne[1] / kGemmChunk + E;
    if (K > INT32_MAX || M > INT32_MAX || max_chunks > INT32_MAX) return false;
    if (is_cuda_quant_type(as->type)) return true;
    const size_t elem = type_traits(as->type).type_size;
    return row_is_packed(as) && as->nb[1] % elem == 0 && as->nb[2] % elem == 0 &&
           reinterpret_cast<uintptr_t>(as->data) % elem == 0 && int64_t(as->nb[1] / elem) <= INT32_MAX;
}

// The tensor-core route (see the file comment).
void gemm_route(const ComputeCtx& ctx, Tensor* dst, int64_t max_chunks) {
    const Tensor *as = dst->src[0], *b = dst->src[1], *ids = dst->src[2];
    const int64_t K = as->ne[0], M = as->ne[1], E = as->ne[2], pairs = ids->ne[0] * ids->ne[1];
    const bool quantized = is_cuda_quant_type(as->type);
    const Type compute = quantized ? Type::F16 : as->type; // the product's input type
    const size_t elem = type_traits(compute).type_size;
    const size_t groups_bytes = expert_chunks_bytes(E, pairs, max_chunks, nullptr, nullptr);
    const size_t cols_bytes = align16(size_t(max_chunks) * kGemmChunk * K * elem);
    const size_t results_bytes = align16(size_t(max_chunks) * kGemmChunk * M * 4);
    const size_t ptr_bytes = align16(size_t(max_chunks) * sizeof(void*));
    const size_t weights_bytes = quantized ? align16(size_t(K * M * E) * 2) : 0;
    char* scratch = static_cast<char*>(
        ctx.scratch->get(groups_bytes + cols_bytes + results_bytes + 3 * ptr_bytes + weights_bytes,
                         ctx.stream, ctx.device_name));
    ExpertChunks g;
    expert_chunks_bytes(E, pairs, max_chunks, scratch, &g);
    g.n_experts = E;
    g.chunk_pairs = kGemmChunk;
    char* at = scratch + groups_bytes;
    void* cols = at;
    auto* results = reinterpret_cast<float*>(at + cols_bytes);
    auto** a_ptr = reinterpret_cast<const void**>(at + cols_bytes + results_bytes);
    auto** b_ptr = reinterpret_cast<const void**>(at + cols_bytes + results_bytes + ptr_bytes);
    auto** c_ptr = reinterpret_cast<void**>(at + cols_bytes + results_bytes + 2 * ptr_bytes);
    // The experts as the product reads them: [K, M] column-major per expert, lda in elements.
    const char* weights = static_cast<const char*>(as->data);
    int64_t expert_stride = int64_t(as->nb[2]), lda = int64_t(as->nb[1] / elem);
    if (quantized) {
        char* decoded = at + cols_bytes + results_bytes + 3 * ptr_bytes;
        dequantize_to_f16(view_of(as), decoded, ctx.stream);
        weights = decoded, expert_stride = K * M * 2, lda = K;
    }
    const TensorView vb = view_of(b), vids = view_of(ids), vdst = view_of(dst);
    group_pairs_kernel<<<1, 1024, 0, ctx.stream>>>(vids, vdst, g, ctx.error_flag);
    GFA_CUDA_CHECK_LAUNCH();
    auto gather = [&](auto* typed) {
        using T = std::remove_pointer_t<decltype(typed)>;
        gather_columns_kernel<T><<<unsigned(max_chunks), 256, 0, ctx.stream>>>(
            vb, vids, g, static_cast<T*>(cols), results, weights, expert_stride, M, a_ptr, b_ptr, c_ptr);
        GFA_CUDA_CHECK_LAUNCH();
    };
    cudaDataType data_type = CUDA_R_32F;
    if (compute == Type::F16)
        gather(static_cast<__half*>(nullptr)), data_type = CUDA_R_16F;
    else if (compute == Type::BF16)
        gather(static_cast<__nv_bfloat16*>(nullptr)), data_type = CUDA_R_16BF;
    else
        gather(static_cast<float*>(nullptr));
    const cublasComputeType_t compute_type =
        compute == Type::F32 && matmul_precision(dst) >= MatMulPrecision::TF32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                               : CUBLAS_COMPUTE_32F;
    const float one = 1.0f, zero = 0.0f;
    GFA_CUBLAS_CHECK(cublasGemmBatchedEx(ctx.cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(M), kGemmChunk, int(K),
                                         &one, a_ptr, data_type, int(lda), b_ptr, data_type, int(K), &zero,
                                         c_ptr, CUDA_R_32F, int(M), int(max_chunks), compute_type,
                                         CUBLAS_GEMM_DEFAULT));
    scatter_results_kernel<<<unsigned(max_chunks), 256, 0, ctx.stream>>>(vids, vb, vdst, g, results);
    GFA_CUDA_CHECK_LAUNCH();
}

void run_mul_mat_id(const ComputeCtx& ctx, Tensor* dst) {
    const Tensor *as = dst->src[0], *b = dst->src[1], *ids = dst->src[2];
    const int64_t pairs = ids->ne[0] * ids->ne[1], E = as->ne[2];
    if (pairs == 0 || as->ne[1] == 0) return;
    const unsigned row_blocks = unsigned((as->ne[1] + kRowsPerBlock - 1) / kRowsPerBlock);
    const TensorView va = view_of(as), vb = view_of(b), vids = view_of(ids), vdst = view_of(dst);
    // GFA_CUDA_MOE_GROUPS=0 takes every product's pairs as they come, 1 keeps prompts off the
    // tensor cores (both for measuring).
    static const int grouping = [] {
        const char* v = std::getenv("GFA_CUDA_MOE_GROUPS");
        return v && *v ? std::atoi(v) : 2;
    }();
    if (pairs <= E || grouping == 0) { // decoding: an expert rarely serves two pairs
        const dim3 grid(row_blocks, unsigned(std::min<int64_t>(pairs, 65535)));
        dispatch_weight_type(va, [&](auto type) {
            mul_mat_id_kernel<decltype(type)::value>
                <<<grid, kRowsPerBlock * 32, 0, ctx.stream>>>(va, vb, vids, vdst, ctx.error_flag);
            GFA_CUDA_CHECK_LAUNCH();
        });
        return;
    }
    if (grouping >= 2 && pairs >= kGemmPairsPerExpert * E && gemm_route_applies(dst)) {
        gemm_route(ctx, dst, pairs / kGemmChunk + E);
        return;
    }
    const int64_t max_chunks = pairs / kChunkPairs + E;
    ExpertChunks g;
    char* scratch = static_cast<char*>(ctx.scratch->get(
        expert_chunks_bytes(E, pairs, max_chunks, nullptr, nullptr), ctx.stream, ctx.device_name));
    expert_chunks_bytes(E, pairs, max_chunks, scratch, &g);
    g.n_experts = E;
    g.chunk_pairs = kChunkPairs;
    group_pairs_kernel<<<1, 1024, 0, ctx.stream>>>(vids, vdst, g, ctx.error_flag);
    GFA_CUDA_CHECK_LAUNCH();
    const dim3 grid(row_blocks, unsigned(std::min<int64_t>(max_chunks, 65535)));
    dispatch_weight_type(va, [&](auto type) {
        mul_mat_id_chunks_kernel<decltype(type)::value>
            <<<grid, kRowsPerBlock * 32, 0, ctx.stream>>>(va, vb, vids, vdst, g);
        GFA_CUDA_CHECK_LAUNCH();
    });
}

bool supports_mul_mat_id(const Tensor* dst) {
    const Tensor *as = dst->src[0], *b = dst->src[1], *ids = dst->src[2];
    if (!as || !b || !ids || b->type != Type::F32 || ids->type != Type::I32 || dst->type != Type::F32 ||
        !dst->is_contiguous() || as->ne[1] > int64_t(INT32_MAX) * kRowsPerBlock ||
        ids->ne[0] * ids->ne[1] > INT32_MAX)
        return false;
    if (is_float_type(as->type)) return true;
    // Block types: whole blocks per packed row (the op's rule), read 8 values at a time.
    return is_cuda_quant_type(as->type) && row_is_packed(as) &&
           as->ne[0] % type_traits(as->type).block_size == 0 && as->nb[1] % 2 == 0 && as->nb[2] % 2 == 0;
}

} // namespace

void register_moe_kernels(KernelTable& t) {
    t[size_t(Op::TopK)] = {run_top_k, supports_top_k};
    t[size_t(Op::MulMatId)] = {run_mul_mat_id, supports_mul_mat_id};
}

} // namespace gfa::cuda
