// Benchmark of the CUDA FlashAttention kernels on the FlashAttention benchmark grid and on
// decoding, timed with CUDA events (median of several repetitions after warm-up).
//
//   bench_attn_cuda [--quick] [--no-decode] [--label NAME] [--csv FILE]
//                   [--d D] [--s S] [--causal 0|1] [--reps N] [--no-fa] [--f32]
//                   [--decode-detail] [--mask]
//
// --d/--s/--causal keep only the matching cases of the grid (for profiling one kernel);
// --reps sets the timed repetitions; --no-fa runs only the decoding table.
// --f32 gives the grid f32 Q, K, V, dO and outputs, as a training graph in f32 does (the
// kernels then compute in f16).
// --mask gives the causal cases an explicit f16 mask of 0 and -inf, shared by heads and batch,
// instead of the causal flag: the way ggml-style graphs ask for causal attention (and the
// way ANCHORS.md's ggml figures were measured). The kernels then run every tile, reading the
// mask, and the FLOPs are still counted halved.
// --decode-detail also times each decoding case as 20 calls back to back (host launches
// overlap the GPU's work) and as a CUDA graph of one call replayed (no host work at all),
// to tell the kernels' time from the host's.
// --label names the implementation in the output (default "ours"), to tell apart builds or
// kernel variants timed into one comparison.
//
// Grid: bf16, 16k tokens per batch (B * S = 16384), hidden 2048 (H = 2048 / D), D = 64, 128,
// 256, S = 512 .. 16384, causal or not; forward FLOPs 4 * B * H * S^2 * D (halved when
// causal), backward 2.5 x forward. Decode: one query token, 32 query / 8 KV heads, D = 128,
// f16, q8_0 and q4_0 K/V; GB/s of K + V bytes read (q8_0: 34 bytes per 32 values, q4_0: 18).
#include <cstdio>

#if GFA_HAVE_CUDA
#include "../backends/cuda/flash_attn_cuda.h"
#include "quants.h"

#include <ggml-fa/error.h>
#include <ggml-fa/types.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

using namespace gfa;
using attn::View;

namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
        std::exit(1);
    }
}

// Median time in milliseconds of fn over reps runs, after warm runs.
double time_ms(const std::function<void()>& fn, int reps, int warm) {
    for (int i = 0; i < warm; ++i) fn();
    check(cudaDeviceSynchronize(), "warm-up");
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    std::vector<float> ms;
    for (int i = 0; i < reps; ++i) {
        cudaEventRecord(a);
        fn();
        cudaEventRecord(b);
        check(cudaEventSynchronize(b), "timed run");
        float t = 0.0f;
        cudaEventElapsedTime(&t, a, b);
        ms.push_back(t);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

// Fills device memory with random floats in [-1, 1) (f32, bf16 or f16), or q8_0 / q4_0 blocks.
void fill_random(void* dst, Type type, size_t elements, uint64_t seed) {
    std::vector<uint8_t> host(row_size(type, int64_t(elements)));
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    auto next = [&]() {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        return x;
    };
    if (type == Type::Q8_0) {
        auto* blocks = reinterpret_cast<block_q8_0*>(host.data());
        for (size_t bi = 0; bi < elements / 32; ++bi) {
            blocks[bi].d = fp32_to_fp16(1.0f / 127.0f);
            const uint64_t r0 = next(), r1 = next(), r2 = next(), r3 = next();
            std::memcpy(blocks[bi].qs, &r0, 8), std::memcpy(blocks[bi].qs + 8, &r1, 8);
            std::memcpy(blocks[bi].qs + 16, &r2, 8), std::memcpy(blocks[bi].qs + 24, &r3, 8);
        }
    } else if (type == Type::Q4_0) {
        auto* blocks = reinterpret_cast<block_q4_0*>(host.data());
        for (size_t bi = 0; bi < elements / 32; ++bi) {
            blocks[bi].d = fp32_to_fp16(1.0f / 8.0f);
            const uint64_t r0 = next(), r1 = next();
            std::memcpy(blocks[bi].qs, &r0, 8), std::memcpy(blocks[bi].qs + 8, &r1, 8);
        }
    } else if (type == Type::F32) {
        auto* h = reinterpret_cast<float*>(host.data());
        for (size_t i = 0; i < elements; ++i)
            h[i] = float(int32_t(next() >> 40) - (1 << 23)) / float(1 << 23);
    } else {
        auto* h = reinterpret_cast<uint16_t*>(host.data());
        for (size_t i = 0; i < elements; ++i) {
            const float f = float(int32_t(next() >> 40) - (1 << 23)) / float(1 << 23);
            h[i] = type == Type::BF16 ? fp32_to_bf16(f) : fp32_to_fp16(f);
        }
    }
    check(cudaMemcpy(dst, host.data(), host.size(), cudaMemcpyHostToDevice), "upload");
}

View make_view(Type type, void* data, int64_t n0, int64_t n1, int64_t n2, int64_t n3) {
    View v;
    v.type = type;
    v.data = data;
    v.ne[0] = n0, v.ne[1] = n1, v.ne[2] = n2, v.ne[3] = n3;
    v.nb[0] = int64_t(type_traits(type).type_size);
    v.nb[1] = int64_t(row_size(type, n0));
    v.nb[2] = v.nb[1] * n1;
    v.nb[3] = v.nb[2] * n2;
    return v;
}

} // namespace

int main(int argc, char** argv) {
    bool quick = false, decode = true, fa = true, f32 = false, decode_detail = false, explicit_mask = false;
    bool backward = true;
    int64_t only_d = 0, only_s = 0;
    int only_causal = -1, reps_arg = 0;
    const char* label = "ours";
    FILE* csv = nullptr;
    for (int i = 1; i < argc; ++i) {
        if (std::strcmp(argv[i], "--quick") == 0)
            quick = true;
        else if (std::strcmp(argv[i], "--no-decode") == 0)
            decode = false;
        else if (std::strcmp(argv[i], "--label") == 0 && i + 1 < argc)
            label = argv[++i];
        else if (std::strcmp(argv[i], "--csv") == 0 && i + 1 < argc)
            csv = std::fopen(argv[++i], "w");
        else if (std::strcmp(argv[i], "--d") == 0 && i + 1 < argc)
            only_d = std::atoll(argv[++i]);
        else if (std::strcmp(argv[i], "--s") == 0 && i + 1 < argc)
            only_s = std::atoll(argv[++i]);
        else if (std::strcmp(argv[i], "--causal") == 0 && i + 1 < argc)
            only_causal = std::atoi(argv[++i]);
        else if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc)
            reps_arg = std::atoi(argv[++i]);
        else if (std::strcmp(argv[i], "--no-fa") == 0)
            fa = false;
        else if (std::strcmp(argv[i], "--f32") == 0)
            f32 = true;
        else if (std::strcmp(argv[i], "--decode-detail") == 0)
            decode_detail = true;
        else if (std::strcmp(argv[i], "--mask") == 0)
            explicit_mask = true;
        else if (std::strcmp(argv[i], "--no-bwd") == 0)
            backward = false;
        else {
            std::fprintf(stderr, "bench_attn_cuda: unknown argument '%s'\n", argv[i]);
            return 2;
        }
    }
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        std::printf("no CUDA device\n");
        return 0;
    }
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    if (csv) std::fprintf(csv, "kind,impl,dtype,d,s,b,h,causal,fwd_ms,fwd_tflops,bwd_ms,bwd_tflops\n");

    try {
        // ---- the FlashAttention grid: every case has 16k tokens x hidden 2048 ----
        const int64_t tokens = 16384, hidden = 2048;
        const size_t elems = size_t(tokens * hidden);
        const Type et = f32 ? Type::F32 : Type::BF16;
        void *q, *k, *v, *o, *dO, *dq, *dk, *dv, *lse;
        for (void** p : {&q, &k, &v, &o, &dO, &dq, &dk, &dv})
            check(cudaMalloc(p, elems * type_traits(et).type_size), "cudaMalloc");
        check(cudaMalloc(&lse, size_t(tokens) * 32 * 4), "cudaMalloc");
        fill_random(q, et, elems, 1), fill_random(k, et, elems, 2), fill_random(v, et, elems, 3);
        fill_random(dO, et, elems, 4);
        void* ws = nullptr;
        size_t ws_bytes = 0;

        std::printf("%-6s %4s %6s %3s %3s %6s %9s %7s %9s %7s\n", "impl", "d", "s", "b", "h", "causal",
                    "fwd_ms", "fwdTF", "bwd_ms", "bwdTF");
        std::vector<int64_t> seqs =
            quick ? std::vector<int64_t>{2048} : std::vector<int64_t>{512, 2048, 8192, 16384};
        if (only_s && std::find(seqs.begin(), seqs.end(), only_s) == seqs.end()) seqs.push_back(only_s);
        for (int64_t D : {64, 128, 256})
            for (bool causal : {false, true})
                for (int64_t S : seqs) {
                    if (!fa || (only_d && D != only_d) || (only_s && S != only_s) ||
                        (only_causal >= 0 && int(causal) != only_causal))
                        continue;
                    const int64_t B = tokens / S, H = hidden / D;
                    attn::BackwardProblem bp;
                    attn::Problem& p = bp.fwd;
                    p.Dk = p.Dv = D, p.Sq = p.Skv = S, p.Hq = p.Hkv = H, p.B = B;
                    p.params.scale = 1.0f / std::sqrt(float(D));
                    p.params.causal = causal && !explicit_mask;
                    void* mask = nullptr;
                    if (causal && explicit_mask) {
                        // row i (query) sees keys 0..i: 0 there, -inf after
                        std::vector<uint16_t> host(size_t(S * S), 0xFC00u);
                        for (int64_t i = 0; i < S; ++i) std::fill_n(host.begin() + i * S, i + 1, uint16_t(0));
                        check(cudaMalloc(&mask, host.size() * 2), "cudaMalloc");
                        check(cudaMemcpy(mask, host.data(), host.size() * 2, cudaMemcpyHostToDevice),
                              "mask copy");
                        p.mask = make_view(Type::F16, mask, S, S, 1, 1);
                    }
                    p.q = make_view(et, q, D, S, H, B);
                    p.k = make_view(et, k, D, S, H, B);
                    p.v = make_view(et, v, D, S, H, B);
                    p.o = make_view(et, o, D, H, S, B);
                    p.lse = make_view(Type::F32, lse, S, H, B, 1);
                    bp.dO = make_view(et, dO, D, H, S, B);
                    bp.dq = make_view(et, dq, D, S, H, B);
                    bp.dk = make_view(et, dk, D, S, H, B);
                    bp.dv = make_view(et, dv, D, S, H, B);
                    const size_t need = std::max(cuda::flash_attn_backward_workspace_size(bp),
                                                 cuda::flash_attn_forward_workspace_size(p));
                    if (need > ws_bytes) {
                        if (ws) cudaFree(ws);
                        check(cudaMalloc(&ws, need), "workspace");
                        ws_bytes = need;
                    }
                    const double flops =
                        4.0 * double(B * H) * double(S) * double(S) * double(D) / (causal ? 2.0 : 1.0);
                    const int reps = reps_arg > 0 ? reps_arg : quick ? 5 : 15;
                    const double fwd =
                        time_ms([&] { cuda::flash_attn_forward(p, nullptr, ws, ws_bytes); }, reps, 3);
                    const double bwd =
                        backward
                            ? time_ms([&] { cuda::flash_attn_backward(bp, nullptr, ws, ws_bytes); }, reps, 2)
                            : 0.0;
                    const double fwd_tf = flops / fwd / 1e9,
                                 bwd_tf = backward ? 2.5 * flops / bwd / 1e9 : 0.0;
                    if (mask) cudaFree(mask);
                    std::printf("%-6s %4lld %6lld %3lld %3lld %6d %9.3f %7.0f %9.3f %7.0f  (%s forward)\n",
                                label, (long long)D, (long long)S, (long long)B, (long long)H, int(causal),
                                fwd, fwd_tf, bwd, bwd_tf,
                                cuda::flash_attn_forward_uses_hopper_kernel(p) ? "wgmma" : "mma.sync");
                    std::fflush(stdout);
                    if (csv)
                        std::fprintf(csv, "fa,%s,%s,%lld,%lld,%lld,%lld,%d,%.4f,%.1f,%.4f,%.1f\n", label,
                                     std::string(type_name(et)).c_str(), (long long)D, (long long)S,
                                     (long long)B, (long long)H, int(causal), fwd, fwd_tf, bwd, bwd_tf);
                }
        for (void* p : {q, k, v, o, dO, dq, dk, dv, lse, ws}) cudaFree(p);
        if (!decode) {
            if (csv) std::fclose(csv);
            return 0;
        }

        // ---- decoding: one query token, GQA 32/8, D = 128 ----
        std::printf("decode (GQA 32/8, d=128), GB/s of K+V:\n");
        const int64_t Hq = 32, Hkv = 8, D = 128;
        const std::pair<int64_t, int64_t> shapes[] = {{1, 4096}, {1, 65536}, {8, 16384}, {8, 65536}};
        for (Type kv_type : {Type::F16, Type::Q8_0, Type::Q4_0})
            for (auto [B, KV] : shapes) {
                const size_t kv_elems = size_t(B * Hkv * KV * D);
                const size_t kv_bytes = row_size(kv_type, int64_t(kv_elems));
                void *dk_, *dv_, *dq_, *do_;
                check(cudaMalloc(&dk_, kv_bytes), "cudaMalloc"),
                    check(cudaMalloc(&dv_, kv_bytes), "cudaMalloc");
                check(cudaMalloc(&dq_, size_t(B * Hq * D) * 2), "cudaMalloc");
                check(cudaMalloc(&do_, size_t(B * Hq * D) * 2), "cudaMalloc");
                fill_random(dk_, kv_type, kv_elems, 5), fill_random(dv_, kv_type, kv_elems, 6);
                fill_random(dq_, Type::F16, size_t(B * Hq * D), 7);
                attn::Problem p;
                p.Dk = p.Dv = D, p.Sq = 1, p.Skv = KV, p.Hq = Hq, p.Hkv = Hkv, p.B = B;
                p.params.scale = 1.0f / std::sqrt(float(D));
                p.q = make_view(Type::F16, dq_, D, 1, Hq, B);
                p.k = make_view(kv_type, dk_, D, KV, Hkv, B);
                p.v = make_view(kv_type, dv_, D, KV, Hkv, B);
                p.o = make_view(Type::F16, do_, D, Hq, 1, B);
                const size_t need = cuda::flash_attn_forward_workspace_size(p);
                void* w = nullptr;
                if (need) check(cudaMalloc(&w, need), "workspace");
                const double ms = time_ms([&] { cuda::flash_attn_forward(p, nullptr, w, need); }, 50, 10);
                const double gbps = 2.0 * double(kv_bytes) / ms / 1e6;
                std::printf("  %-5s batch %2lld kv %6lld %8.4f ms %7.0f GB/s  (%s kernel)\n",
                            std::string(type_name(kv_type)).c_str(), (long long)B, (long long)KV, ms, gbps,
                            cuda::flash_attn_forward_uses_decode_kernel(p) ? "decode" : "tiled");
                if (decode_detail) {
                    constexpr int kBurst = 20;
                    const double burst = time_ms(
                        [&] {
                            for (int r = 0; r < kBurst; ++r) cuda::flash_attn_forward(p, nullptr, w, need);
                        },
                        20, 3);
                    cudaStream_t cs;
                    check(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking), "stream");
                    cudaGraph_t graph;
                    cudaGraphExec_t exec;
                    check(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal), "capture");
                    for (int r = 0; r < kBurst; ++r) cuda::flash_attn_forward(p, cs, w, need);
                    check(cudaStreamEndCapture(cs, &graph), "capture end");
                    check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
                    const double replay =
                        time_ms([&] { check(cudaGraphLaunch(exec, nullptr), "replay"); }, 20, 3);
                    std::printf(
                        "        %d calls back to back %8.4f ms each (%7.0f GB/s); graph of %d %8.4f ms each "
                        "(%7.0f GB/s)\n",
                        kBurst, burst / kBurst, 2.0 * double(kv_bytes) / (burst / kBurst) / 1e6, kBurst,
                        replay / kBurst, 2.0 * double(kv_bytes) / (replay / kBurst) / 1e6);
                    cudaGraphExecDestroy(exec);
                    cudaGraphDestroy(graph);
                    cudaStreamDestroy(cs);
                }
                std::fflush(stdout);
                if (csv)
                    std::fprintf(csv, "decode,ours,%s,%lld,%lld,%lld,%lld,0,%.5f,%.1f,0,0\n",
                                 std::string(type_name(kv_type)).c_str(), (long long)D, (long long)KV,
                                 (long long)B, (long long)Hq, ms, gbps);
                for (void* ptr : {dk_, dv_, dq_, do_, w}) cudaFree(ptr);
            }
    } catch (const gfa::Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    if (csv) std::fclose(csv);
    return 0;
}

#else
int main() {
    std::printf("bench_attn_cuda: built without CUDA\n");
    return 0;
}
#endif
