// The probes of wgmma_probe.h: one warpgroup, tiles copied into 128-byte-swizzled shared
// memory by plain stores, products by wgmma, accumulators written out by the layout the
// attention kernel assumes (d[4 n + 2 r + c] is row 16 w + 8 r + g, column 8 n + 2 t + c).
#include "wgmma_probe.h"

#include "../../backends/cuda/wgmma.cuh"

#include <ggml-fa/error.h>

#include <cuda_runtime.h>

#include <string>

namespace gfa::test {

namespace {

using namespace gfa::cuda::fa;

constexpr int kK = 128; // the depth of every probe: two 64-column blocks

__device__ uint32_t aligned_base(void* smem) {
    return (smem_addr(smem) + 1023u) & ~1023u;
}

// Rows x 128 f16 values (row-major in global memory) into a swizzled tile.
template <int ROWS, int COLS> __device__ void copy_tile(SwizzledTile128<ROWS, COLS> t, const __half* src) {
    for (int idx = int(threadIdx.x); idx < ROWS * COLS / 8; idx += 128) {
        const int r = idx / (COLS / 8), ch = idx % (COLS / 8);
        st_shared_v4(t.chunk_addr(r, ch), reinterpret_cast<const uint4*>(src)[idx]);
    }
}

template <int N> __device__ void write_out(const float (&d)[N / 2], float* c) {
    const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int n = 0; n < N / 8; ++n)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int cc = 0; cc < 2; ++cc)
                c[(16 * warp + 8 * r + g) * N + 8 * n + 2 * t + cc] = d[4 * n + 2 * r + cc];
}

template <int N> __global__ void probe_shared_kernel(const __half* a, const __half* b, float* c) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ uint4 smem[];
    const SwizzledTile128<64, kK> sa{aligned_base(smem)};
    const SwizzledTile128<N, kK> sb{sa.base + SwizzledTile128<64, kK>::kBytes};
    copy_tile(sa, a);
    copy_tile(sb, b);
    fence_proxy_async();
    __syncthreads();
    float d[N / 2];
#pragma unroll
    for (int e = 0; e < N / 2; ++e) d[e] = 0.0f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk)
        wgmma_ss<__half, N>(d, wgmma_desc(sa.base + uint32_t((kk >> 2) * sa.kBlockBytes + (kk & 3) * 32), 0),
                            wgmma_desc(sb.base + uint32_t((kk >> 2) * sb.kBlockBytes + (kk & 3) * 32), 0),
                            kk);
    wgmma_commit();
    wgmma_wait<0>();
    write_out<N>(d, c);
#endif
}

template <int N> __global__ void probe_registers_kernel(const __half* a, const __half* b, float* c) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ uint4 smem[];
    const SwizzledTile128<kK, N> sb{aligned_base(smem)};
    copy_tile(sb, b);
    fence_proxy_async();
    __syncthreads();
    // The A fragment of the warp's 16 rows (the mma.sync m16n8k16 layout).
    const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
    auto pair = [&](int row, int k) {
        const __half2 h = __halves2half2(a[row * kK + k], a[row * kK + k + 1]);
        return *reinterpret_cast<const uint32_t*>(&h);
    };
    uint32_t frag[kK / 16][4];
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
        const int row = 16 * warp + g, k = 16 * kk + 2 * t;
        frag[kk][0] = pair(row, k);
        frag[kk][1] = pair(row + 8, k);
        frag[kk][2] = pair(row, k + 8);
        frag[kk][3] = pair(row + 8, k + 8);
    }
    float d[N / 2];
#pragma unroll
    for (int e = 0; e < N / 2; ++e) d[e] = 0.0f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk)
        wgmma_rs<__half, N, true>(d, frag[kk],
                                  wgmma_desc(sb.base + uint32_t(kk * 2048), uint32_t(sb.kBlockBytes)));
    wgmma_commit();
    wgmma_wait<0>();
    write_out<N>(d, c);
#endif
}

template <int N> __global__ void probe_transposed_kernel(const __half* at, const __half* b, float* c) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ uint4 smem[];
    const SwizzledTile128<kK, 64> sa{aligned_base(smem)};
    const SwizzledTile128<kK, N> sb{sa.base + SwizzledTile128<kK, 64>::kBytes};
    copy_tile(sa, at);
    copy_tile(sb, b);
    fence_proxy_async();
    __syncthreads();
    float d[N / 2];
#pragma unroll
    for (int e = 0; e < N / 2; ++e) d[e] = 0.0f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk)
        wgmma_ss<__half, N, true, true>(
            d, wgmma_desc(sa.base + uint32_t(kk * 2048), uint32_t(sa.kBlockBytes)),
            wgmma_desc(sb.base + uint32_t(kk * 2048), uint32_t(sb.kBlockBytes)), kk);
    wgmma_commit();
    wgmma_wait<0>();
    write_out<N>(d, c);
#endif
}

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) fail(std::string("wgmma probe: ") + what + ": " + cudaGetErrorString(e));
}

template <class Kernel>
std::vector<float> run(Kernel kernel, int n, const std::vector<uint16_t>& a, const std::vector<uint16_t>& b,
                       size_t smem) {
    void *da = nullptr, *db = nullptr, *dc = nullptr;
    check(cudaMalloc(&da, a.size() * 2), "cudaMalloc");
    check(cudaMalloc(&db, b.size() * 2), "cudaMalloc");
    check(cudaMalloc(&dc, size_t(64 * n) * 4), "cudaMalloc");
    check(cudaMemcpy(da, a.data(), a.size() * 2, cudaMemcpyHostToDevice), "copy a");
    check(cudaMemcpy(db, b.data(), b.size() * 2, cudaMemcpyHostToDevice), "copy b");
    check(cudaMemset(dc, 0xff, size_t(64 * n) * 4), "poison c"); // NaN where nothing is written
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "smem limit");
    kernel<<<1, 128, smem>>>(static_cast<const __half*>(da), static_cast<const __half*>(db),
                             static_cast<float*>(dc));
    check(cudaGetLastError(), "launch");
    check(cudaDeviceSynchronize(), "run");
    std::vector<float> c(size_t(64 * n));
    check(cudaMemcpy(c.data(), dc, c.size() * 4, cudaMemcpyDeviceToHost), "copy c");
    cudaFree(da), cudaFree(db), cudaFree(dc);
    return c;
}

} // namespace

bool wgmma_probe_available() {
#if defined(GFA_CUDA_SM90A)
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    return major == 9 && minor == 0;
#else
    return false;
#endif
}

std::vector<float> wgmma_probe_shared(int n, const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
    const size_t smem = size_t(64 + n) * kK * 2 + 1024;
    return n == 64 ? run(probe_shared_kernel<64>, n, a, b, smem)
                   : run(probe_shared_kernel<128>, n, a, b, smem);
}

std::vector<float> wgmma_probe_registers(int n, const std::vector<uint16_t>& a,
                                         const std::vector<uint16_t>& b) {
    const size_t smem = size_t(kK) * n * 2 + 1024;
    return n == 64 ? run(probe_registers_kernel<64>, n, a, b, smem)
                   : run(probe_registers_kernel<128>, n, a, b, smem);
}

std::vector<float> wgmma_probe_transposed(int n, const std::vector<uint16_t>& at,
                                          const std::vector<uint16_t>& b) {
    const size_t smem = size_t(kK) * (64 + n) * 2 + 1024;
    return n == 64 ? run(probe_transposed_kernel<64>, n, at, b, smem)
                   : run(probe_transposed_kernel<128>, n, at, b, smem);
}

} // namespace gfa::test
