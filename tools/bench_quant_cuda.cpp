// Benchmark of mul_mat with quantized weights on CUDA, timed with CUDA events.
//
//   bench_quant_cuda [--quick] [--model-1b] [--types T,T..] [--reps N] [--peak GBPS] [--csv FILE]
//
// Decoding (N = 1), for every block type (and q8_0L, q4_0L, q5_0L, q6_KL, iq4_nlL: those formats with the
// scales last, as the GPU keeps a model's weights; --types picks some) and the weight shapes M x K = 4096 x
// 4096, 14336 x 4096, 4096 x 14336 and the 32000 x 2048 LM head (--model-1b: the products of
// tools/bench_model.py's 1.1B model instead):
//   op      quantize b to int8 + matrix-vector kernel (what mul_mat runs)
//   kernel  the matrix-vector kernel alone
// each as GB/s of weight bytes read, percent of --peak (default 4800, an H200's HBM3e), and
// beside them cuBLAS's f16 GEMV (cublasGemmEx, N = 1, f16 weights of the same shape, f32
// result) in the same run: its GB/s of its own (2 bytes per weight) and the time ratio
// cuBLAS / op (above 1: the quantized op is faster).
// Prefill (N = 512, q4_K and q8_0, 4096 x 4096 and 14336 x 4096): dequantize to f16 + cuBLAS
// GEMM (what mul_mat runs, less the conversion of b, which f16 weights need too) against
// cuBLAS GEMM on f16 weights, in TFLOP/s.
//
// Every timed repetition walks through enough copies of the weights (>= 256 MB) that none is
// still in the 50 MB L2 cache; the time of one product is the repetition's time / copies, and
// the reported time the median over repetitions after warm-up.
//
// CSV (--csv): kind,type,M,K,N,op_us,op_rate,part_us,part_rate,peer_us,peer_rate,ratio with,
// for kind "decode", rates in GB/s and part = the matrix-vector kernel alone; for "prefill",
// op and peer rates in TFLOP/s and part = the dequantization (GB/s read + written). ratio is
// always peer time / op time.
#include <cstdio>

#if GFA_HAVE_CUDA
#include "../backends/cuda/quant_matmul.h"
#include "../src/quants.h"

#include <ggml-fa/error.h>
#include <ggml-fa/types.h>

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

using namespace gfa;

namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        std::fprintf(stderr, "bench_quant_cuda: %s: %s\n", what, cudaGetErrorString(e));
        std::exit(1);
    }
}
void check_blas(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS) {
        std::fprintf(stderr, "bench_quant_cuda: %s: cuBLAS status %d\n", what, int(s));
        std::exit(1);
    }
}

// Median milliseconds of one call of fn(copy), each repetition calling it once per copy.
double time_ms(const std::function<void(int)>& fn, int copies, int reps) {
    for (int w = 0; w < 3; ++w)
        for (int c = 0; c < copies; ++c) fn(c);
    check(cudaDeviceSynchronize(), "warm-up");
    cudaEvent_t start, stop;
    check(cudaEventCreate(&start), "event");
    check(cudaEventCreate(&stop), "event");
    std::vector<float> ms;
    for (int r = 0; r < reps; ++r) {
        check(cudaEventRecord(start), "record");
        for (int c = 0; c < copies; ++c) fn(c);
        check(cudaEventRecord(stop), "record");
        check(cudaEventSynchronize(stop), "timed run");
        float t = 0.0f;
        check(cudaEventElapsedTime(&t, start, stop), "elapsed");
        ms.push_back(t / float(copies));
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

uint64_t g_state = 0x9E3779B97F4A7C15ull;
uint64_t next_random() {
    g_state ^= g_state << 13, g_state ^= g_state >> 7, g_state ^= g_state << 17;
    return g_state;
}

// Random blocks of `type` with small finite f16 scales (the timing does not depend on the
// values, but NaN or infinity in the scales would make the output useless for a glance).
std::vector<uint8_t> random_blocks(Type type, int64_t n_values) {
    std::vector<uint8_t> bytes(row_size(type, n_values));
    for (size_t i = 0; i + 8 <= bytes.size(); i += 8) {
        const uint64_t r = next_random();
        std::memcpy(bytes.data() + i, &r, 8);
    }
    const TypeTraits& tt = type_traits(type);
    const uint16_t scale = fp32_to_fp16(0.01f);
    std::vector<size_t> scale_offsets = {0};
    if (type == Type::Q4_1 || type == Type::Q5_1 || type == Type::Q4_K || type == Type::Q5_K)
        scale_offsets.push_back(2);
    if (type == Type::Q6_K) scale_offsets = {208};
    for (size_t b = 0; b < bytes.size() / tt.type_size; ++b)
        for (size_t off : scale_offsets) std::memcpy(bytes.data() + b * tt.type_size + off, &scale, 2);
    return bytes;
}

// Device memory holding `copies` copies of `host`, each starting 256-byte aligned.
struct Copies {
    char* base = nullptr;
    size_t stride = 0;
    int count = 0;
    Copies(const void* host, size_t bytes, int n) : stride((bytes + 255) / 256 * 256), count(n) {
        check(cudaMalloc(&base, stride * size_t(n)), "cudaMalloc weights");
        for (int i = 0; i < n; ++i)
            check(cudaMemcpy(base + stride * size_t(i), host, bytes, cudaMemcpyHostToDevice), "upload");
    }
    ~Copies() { cudaFree(base); }
    Copies(const Copies&) = delete;
    Copies& operator=(const Copies&) = delete;
    char* at(int i) const { return base + stride * size_t(i); }
};

int copies_for(size_t bytes) {
    const size_t target = size_t(256) << 20;
    return int(std::max<size_t>(2, (target + bytes - 1) / bytes));
}

// One way weights lie in memory: a GGUF type, or (scales_last) a type as a weights buffer
// keeps it on the GPU.
struct Layout {
    Type type;
    bool scales_last = false;
    std::string name() const { return std::string(type_name(type)) + (scales_last ? "L" : ""); }
};

gfa::cuda::TensorView view(void* data, Type type, int64_t ne0, int64_t ne1, bool scales_last = false) {
    gfa::cuda::TensorView v{};
    v.data = static_cast<char*>(data);
    v.type = scales_last ? gfa::cuda::scales_last_id(int(type)) : int32_t(type);
    v.ne[0] = ne0, v.ne[1] = ne1, v.ne[2] = 1, v.ne[3] = 1;
    const size_t row = row_size(type, ne0);
    v.nb[0] = int64_t(type_traits(type).type_size);
    v.nb[1] = int64_t(row), v.nb[2] = int64_t(row) * ne1, v.nb[3] = v.nb[2];
    return v;
}

struct Shape {
    int64_t M, K;
};

} // namespace

int main(int argc, char** argv) {
    bool quick = false, decode_only = false;
    int reps = 30;
    std::string only_types; // ",q8_0,q8_0L," from --types q8_0,q8_0L
    std::vector<Shape> shapes = {{4096, 4096}, {14336, 4096}, {4096, 14336}, {32000, 2048}};
    double peak = 4800.0;
    FILE* csv = nullptr;
    for (int i = 1; i < argc; ++i) {
        if (std::strcmp(argv[i], "--quick") == 0)
            quick = true;
        else if (std::strcmp(argv[i], "--decode-only") == 0) // no N = 512 section
            decode_only = true;
        else if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc)
            reps = std::max(1, std::atoi(argv[++i]));
        else if (std::strcmp(argv[i], "--types") == 0 && i + 1 < argc)
            only_types.append(",").append(argv[++i]).append(",");
        else if (std::strcmp(argv[i], "--model-1b") == 0) // the products of bench_model.py's 1.1B model
            shapes = {{2560, 2048}, {2048, 2048}, {11264, 2048}, {2048, 5632}, {32000, 2048}};
        else if (std::strcmp(argv[i], "--peak") == 0 && i + 1 < argc)
            peak = std::atof(argv[++i]);
        else if (std::strcmp(argv[i], "--csv") == 0 && i + 1 < argc) {
            csv = std::fopen(argv[++i], "w");
            if (!csv) {
                std::fprintf(stderr, "bench_quant_cuda: cannot write '%s'\n", argv[i]);
                return 1;
            }
        } else {
            std::fprintf(
                stderr,
                "bench_quant_cuda: unknown argument '%s'\n"
                "usage: bench_quant_cuda [--quick] [--decode-only] [--model-1b] [--types T,T..] [--reps N] [--peak GBPS] "
                "[--csv FILE]\n",
                argv[i]);
            return 2;
        }
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        std::fprintf(stderr, "bench_quant_cuda: no CUDA device\n");
        return 1;
    }
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, 0), "device properties");
    std::printf("device: %s, peak for %% columns: %.0f GB/s\n", prop.name, peak);
    cublasHandle_t blas;
    check_blas(cublasCreate(&blas), "cublasCreate");
    if (csv) std::fprintf(csv, "kind,type,M,K,N,op_us,op_rate,part_us,part_rate,peer_us,peer_rate,ratio\n");

    std::vector<Layout> layouts = {
        {Type::Q8_0}, {Type::Q8_0, true}, {Type::Q4_0},   {Type::Q4_0, true},   {Type::Q4_1},
        {Type::Q5_0}, {Type::Q5_0, true}, {Type::Q5_1},   {Type::Q4_K},         {Type::Q5_K},
        {Type::Q6_K}, {Type::Q6_K, true}, {Type::IQ4_NL}, {Type::IQ4_NL, true}, {Type::IQ4_XS}};
    if (!only_types.empty())
        std::erase_if(layouts, [&](const Layout& l) {
            std::string key(",");
            key += l.name();
            key += ',';
            return only_types.find(key) == std::string::npos;
        });
    if (quick) shapes = {{4096, 4096}, {14336, 4096}};

    // ---- decoding: N = 1 ---------------------------------------------------------------------
    std::printf("\nN = 1: GB/s of weight bytes; cuBLAS f16 GEMV reads 2 bytes a weight; ratio = cuBLAS time "
                "/ op time\n");
    std::printf("%-5s %13s %8s | %8s %8s %5s | %8s %8s %5s | %8s %8s %6s\n", "type", "M x K", "MB", "op us",
                "GB/s", "%pk", "kern us", "GB/s", "%pk", "f16 us", "GB/s", "ratio");
    for (const Shape& s : shapes) {
        // The peer: f16 weights, f16 x, f32 y.
        const size_t f16_bytes = size_t(s.M * s.K) * 2;
        std::vector<uint16_t> f16_host(size_t(s.M * s.K));
        for (auto& h : f16_host) h = fp32_to_fp16(float(int(next_random() % 2001) - 1000) * 1e-5f);
        const int f16_copies = copies_for(f16_bytes);
        Copies f16_weights(f16_host.data(), f16_bytes, f16_copies);
        f16_host = {};
        std::vector<float> x_host(size_t(s.K));
        std::vector<uint16_t> x16_host(size_t(s.K));
        for (int64_t k = 0; k < s.K; ++k) {
            x_host[size_t(k)] = float(int(next_random() % 2001) - 1000) * 1e-3f;
            x16_host[size_t(k)] = fp32_to_fp16(x_host[size_t(k)]);
        }
        float *x = nullptr, *y = nullptr;
        void* x16 = nullptr;
        check(cudaMalloc(&x, size_t(s.K) * 4), "cudaMalloc x");
        check(cudaMalloc(&x16, size_t(s.K) * 2), "cudaMalloc x16");
        check(cudaMalloc(&y, size_t(s.M) * 4), "cudaMalloc y");
        check(cudaMemcpy(x, x_host.data(), size_t(s.K) * 4, cudaMemcpyHostToDevice), "upload x");
        check(cudaMemcpy(x16, x16_host.data(), size_t(s.K) * 2, cudaMemcpyHostToDevice), "upload x16");
        const float one = 1.0f, zero = 0.0f;
        const double peer_ms = time_ms(
            [&](int c) {
                check_blas(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(s.M), 1, int(s.K), &one,
                                        f16_weights.at(c), CUDA_R_16F, int(s.K), x16, CUDA_R_16F, int(s.K),
                                        &zero, y, CUDA_R_32F, int(s.M), CUBLAS_COMPUTE_32F,
                                        CUBLAS_GEMM_DEFAULT),
                           "cublasGemmEx");
            },
            f16_copies, reps);
        const double peer_gbs = double(f16_bytes) / (peer_ms * 1e-3) / 1e9;

        const gfa::cuda::TensorView b = view(x, Type::F32, s.K, 1), dst = view(y, Type::F32, s.M, 1);
        void* scratch = nullptr;
        check(cudaMalloc(&scratch, gfa::cuda::quantized_columns_bytes(b)), "cudaMalloc scratch");
        for (const Layout& layout : layouts) {
            const Type t = layout.type;
            std::vector<uint8_t> host = random_blocks(t, s.M * s.K);
            if (layout.scales_last) {
                std::vector<uint8_t> rows(host.size());
                gfa::quant::rows_to_scales_last(t, host.data(), rows.data(), s.K, s.M);
                host.swap(rows);
            }
            const int n_copies = copies_for(host.size());
            Copies weights(host.data(), host.size(), n_copies);
            auto weights_at = [&](int c) { return view(weights.at(c), t, s.K, s.M, layout.scales_last); };
            const double op_ms = time_ms(
                [&](int c) {
                    gfa::cuda::quantize_columns(b, scratch, nullptr);
                    gfa::cuda::quant_matvec(weights_at(c), b, dst, scratch, true, {}, 0, nullptr);
                },
                n_copies, reps);
            const double kernel_ms = time_ms(
                [&](int c) { gfa::cuda::quant_matvec(weights_at(c), b, dst, scratch, true, {}, 0, nullptr); },
                n_copies, reps);
            const double mb = double(host.size()) / 1e6;
            const double op_gbs = mb / 1e3 / (op_ms * 1e-3), kernel_gbs = mb / 1e3 / (kernel_ms * 1e-3);
            char shape[32];
            std::snprintf(shape, sizeof shape, "%lld x %lld", (long long)s.M, (long long)s.K);
            std::printf("%-5s %13s %8.1f | %8.2f %8.0f %4.0f%% | %8.2f %8.0f %4.0f%% | %8.2f %8.0f %6.2f\n",
                        layout.name().c_str(), shape, mb, op_ms * 1e3, op_gbs, 100.0 * op_gbs / peak,
                        kernel_ms * 1e3, kernel_gbs, 100.0 * kernel_gbs / peak, peer_ms * 1e3, peer_gbs,
                        peer_ms / op_ms);
            if (csv)
                std::fprintf(csv, "decode,%s,%lld,%lld,1,%.3f,%.1f,%.3f,%.1f,%.3f,%.1f,%.3f\n",
                             layout.name().c_str(), (long long)s.M, (long long)s.K, op_ms * 1e3, op_gbs,
                             kernel_ms * 1e3, kernel_gbs, peer_ms * 1e3, peer_gbs, peer_ms / op_ms);
        }
        check(cudaDeviceSynchronize(), "decode");
        cudaFree(scratch);
        cudaFree(x);
        cudaFree(x16);
        cudaFree(y);
    }

    // ---- prefill: N = 512 ----------------------------------------------------------------------
    if (decode_only) {
        if (csv) std::fclose(csv);
        return 0;
    }
    const int64_t N = 512;
    std::printf("\nN = %lld: dequantize to f16 + cuBLAS GEMM vs cuBLAS GEMM on f16 weights (TFLOP/s); "
                "dequant GB/s = quantized bytes read + f16 bytes written\n",
                (long long)N);
    std::printf("%-5s %13s | %9s %8s | %9s %8s | %9s %8s | %6s\n", "type", "M x K", "deq us", "GB/s",
                "total us", "TFLOP/s", "f16 us", "TFLOP/s", "ratio");
    for (const Shape& s : {Shape{4096, 4096}, Shape{14336, 4096}}) {
        void *bh = nullptr, *wh = nullptr;
        float* c = nullptr;
        check(cudaMalloc(&bh, size_t(s.K * N) * 2), "cudaMalloc b");
        check(cudaMalloc(&wh, size_t(s.K * s.M) * 2), "cudaMalloc f16 weights");
        check(cudaMalloc(&c, size_t(s.M * N) * 4), "cudaMalloc c");
        check(cudaMemset(bh, 0, size_t(s.K * N) * 2), "memset b");
        check(cudaMemset(wh, 0, size_t(s.K * s.M) * 2), "memset f16 weights");
        const float one = 1.0f, zero = 0.0f;
        auto gemm = [&]() {
            check_blas(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(s.M), int(N), int(s.K), &one, wh,
                                    CUDA_R_16F, int(s.K), bh, CUDA_R_16F, int(s.K), &zero, c, CUDA_R_32F,
                                    int(s.M), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "cublasGemmEx");
        };
        const double flop = 2.0 * double(s.M) * double(s.K) * double(N);
        const double gemm_ms = time_ms([&](int) { gemm(); }, 4, reps);
        for (Type t : {Type::Q4_K, Type::Q8_0}) {
            const std::vector<uint8_t> host = random_blocks(t, s.M * s.K);
            const int n_copies = copies_for(host.size());
            Copies weights(host.data(), host.size(), n_copies);
            const double deq_ms = time_ms(
                [&](int i) { gfa::cuda::dequantize_to_f16(view(weights.at(i), t, s.K, s.M), wh, nullptr); },
                n_copies, reps);
            const double total_ms = time_ms(
                [&](int i) {
                    gfa::cuda::dequantize_to_f16(view(weights.at(i), t, s.K, s.M), wh, nullptr);
                    gemm();
                },
                n_copies, reps);
            const double deq_gbs = double(host.size() + size_t(s.M * s.K) * 2) / (deq_ms * 1e-3) / 1e9;
            char shape[32];
            std::snprintf(shape, sizeof shape, "%lld x %lld", (long long)s.M, (long long)s.K);
            std::printf("%-5s %13s | %9.2f %8.0f | %9.2f %8.1f | %9.2f %8.1f | %6.2f\n",
                        std::string(type_name(t)).c_str(), shape, deq_ms * 1e3, deq_gbs, total_ms * 1e3,
                        flop / (total_ms * 1e-3) / 1e12, gemm_ms * 1e3, flop / (gemm_ms * 1e-3) / 1e12,
                        gemm_ms / total_ms);
            if (csv)
                std::fprintf(csv, "prefill,%s,%lld,%lld,%lld,%.3f,%.2f,%.3f,%.1f,%.3f,%.2f,%.3f\n",
                             std::string(type_name(t)).c_str(), (long long)s.M, (long long)s.K, (long long)N,
                             total_ms * 1e3, flop / (total_ms * 1e-3) / 1e12, deq_ms * 1e3, deq_gbs,
                             gemm_ms * 1e3, flop / (gemm_ms * 1e-3) / 1e12, gemm_ms / total_ms);
        }
        check(cudaDeviceSynchronize(), "prefill");
        cudaFree(bh);
        cudaFree(wh);
        cudaFree(c);
    }
    cublasDestroy(blas);
    if (csv) std::fclose(csv);
    return 0;
}

#else
int main() {
    std::fprintf(stderr, "bench_quant_cuda: built without CUDA\n");
    return 1;
}
#endif
