// bench_matmul: CPU mul_mat speed. f32 GEMM (M = N = K = 1024) in GFLOP/s and matrix-vector
// products (4096 x 4096 weights, one column) in GB/s of weight bytes, on 1 and 2 threads,
// beside OpenBLAS cblas_sgemm / cblas_sgemv measured in the same run when the build found
// OpenBLAS. The matrix-vector rows cycle through enough weight matrices (> 96 MiB in all)
// that the weights come from memory, not the last-level cache, as in decoding a model; the
// ceiling for them is the read bandwidth measured here too (and memcpy for reference).
//
// Every point is the median of --reps runs (default 9): the machine may be shared. The
// matrix-vector rows also give GB/s per CPU-second (weight bytes over the process CPU time,
// all threads together), which time slicing by other work on the machine does not lower.
//
// --gemv-quants measures only the matrix-vector products of the quantized weight types the
// decoding path has integer kernels for (q8_0, q4_0, q4_K, q5_K, q6_K, q4_1, q5_0, q5_1),
// without the f32 GEMM and the OpenBLAS peer.
//
// --gemm-types measures only the prompt-sized products: weights 2048 x 2048 of each type the
// models use times 512 f32 columns (a 512-token prompt through one projection), in GFLOP/s.
// The f32 row is the GEMM alone; the others add unpacking their weights into f32 panels, or,
// on CPUs with AVX-512 VNNI, run the 16-bit integer GEMM (every block type but q2_K); the block
// types run once more allowed MatMulPrecision::Q8 (rows marked q8: 8-bit columns where the
// format's codes fit bytes), the f32/f16/bf16 weights allowed MatMulPrecision::BF16 (rows marked
// bf16: bf16 pair products on CPUs with AVX512-BF16).
//
// usage: bench_matmul [--reps N] [--gemv-quants | --gemm-types]
#include <ggml-fa/backend.h>
#include <ggml-fa/graph.h>
#include <ggml-fa/ops.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if GFA_HAVE_BLAS
#include <cblas.h>
#endif

using namespace gfa;

namespace {

struct Timing {
    double wall = 0.0; // median wall-clock seconds
    double cpu = 0.0;  // median process CPU seconds (all threads): robust to time slicing
};

double process_cpu_seconds() {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

Timing measure(int reps, const std::function<void()>& fn) {
    fn(); // warm-up: page faults, thread start
    std::vector<double> wall, cpu;
    for (int r = 0; r < reps; ++r) {
        const double c0 = process_cpu_seconds();
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        wall.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        cpu.push_back(process_cpu_seconds() - c0);
    }
    std::sort(wall.begin(), wall.end());
    std::sort(cpu.begin(), cpu.end());
    return {wall[wall.size() / 2], cpu[cpu.size() / 2]};
}
double median_seconds(int reps, const std::function<void()>& fn) {
    return measure(reps, fn).wall;
}

std::vector<float> random_floats(size_t n) {
    std::mt19937 rng(1234);
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    std::vector<float> v(n);
    for (float& x : v) x = d(rng);
    return v;
}

// Splits [0, bytes) over `threads` std::threads running fn(thread, begin, end).
void on_threads(int threads, size_t bytes, const std::function<void(int, size_t, size_t)>& fn) {
    std::vector<std::thread> pool;
    const size_t per = bytes / size_t(threads) / 64 * 64;
    for (int t = 0; t < threads; ++t) {
        const size_t begin = per * size_t(t), end = t + 1 == threads ? bytes : begin + per;
        pool.emplace_back([&fn, t, begin, end] { fn(t, begin, end); });
    }
    for (std::thread& th : pool) th.join();
}

struct Bandwidth {
    double read_gbs, copy_gbs;
};

// Read bandwidth (sum of 256 MiB of floats) and memcpy bandwidth (bytes read + written).
Bandwidth measure_bandwidth(int threads, int reps) {
    const size_t bytes = size_t(256) << 20;
    std::vector<float> src(bytes / 4, 1.0f), dst(bytes / 4, 0.0f);
    volatile float sink = 0.0f;
    const double t_read = median_seconds(reps, [&] {
        std::vector<float> partial(size_t(threads), 0.0f);
        on_threads(threads, bytes, [&](int t, size_t b, size_t e) {
            // Integer sums vectorize without reassociating floats, so the loop is not the limit.
            uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            const uint64_t* p = reinterpret_cast<const uint64_t*>(src.data()) + b / 8;
            for (size_t i = 0; i + 4 <= (e - b) / 8; i += 4)
                s0 += p[i], s1 += p[i + 1], s2 += p[i + 2], s3 += p[i + 3];
            partial[size_t(t)] = float(s0 + s1 + s2 + s3);
        });
        sink = partial[0];
    });
    const double t_copy = median_seconds(reps, [&] {
        on_threads(threads, bytes, [&](int, size_t b, size_t e) {
            std::memcpy(reinterpret_cast<char*>(dst.data()) + b,
                        reinterpret_cast<const char*>(src.data()) + b, e - b);
        });
    });
    (void)sink;
    return {double(bytes) / t_read * 1e-9, 2.0 * double(bytes) / t_copy * 1e-9};
}

// Time of one forward pass of graph g on a CPU backend with `threads` threads.
Timing time_graph(const Graph& g, int threads, int reps) {
    auto backend = make_cpu_backend(threads);
    return measure(reps, [&] { backend->compute(g.nodes()); });
}

void gemm_point(int threads, int reps) {
    const int64_t n = 1024;
    Context ctx(ContextParams{.alloc_data = true});
    Tensor* a = ctx.new_tensor(Type::F32, {n, n});
    Tensor* b = ctx.new_tensor(Type::F32, {n, n});
    tensor_set_f32(a, random_floats(size_t(n * n)));
    tensor_set_f32(b, random_floats(size_t(n * n)));
    Tensor* c = mul_mat(ctx, a, b);
    const Graph g = build_forward(c);
    const double flops = 2.0 * double(n) * double(n) * double(n);
    const Timing ours = time_graph(g, threads, reps);
    Timing blas;
#if GFA_HAVE_BLAS
    openblas_set_num_threads(threads);
    std::vector<float> out(static_cast<size_t>(n * n));
    // C[n][m] = sum_k b[n][k] a[m][k] in row-major terms: C = B A^T.
    blas = measure(reps, [&] {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(n), int(n), 1.0f,
                    static_cast<const float*>(b->data), int(n), static_cast<const float*>(a->data), int(n),
                    0.0f, out.data(), int(n));
    });
#endif
    auto rate = [&](double seconds) { return seconds > 0 ? flops / seconds * 1e-9 : 0.0; };
    std::printf("gemm   f32    1024^3      %d   | %7.1f GFLOP/s (%6.1f per CPU-s) | openblas %7.1f GFLOP/s "
                "(%6.1f per "
                "CPU-s) | ratio %5.2f (per CPU-s %5.2f)\n",
                threads, rate(ours.wall), rate(ours.cpu), rate(blas.wall), rate(blas.cpu),
                blas.wall > 0 ? blas.wall / ours.wall : 0.0, blas.cpu > 0 ? blas.cpu / ours.cpu : 0.0);
}

void prompt_gemm_point(Type type, int threads, int reps, MatMulPrecision precision = MatMulPrecision::F32) {
    const int64_t k = 2048, m = 2048, n = 512;
    Context ctx(ContextParams{.alloc_data = true});
    Tensor* w = ctx.new_tensor(type, {k, m});
    tensor_set_f32(w, random_floats(size_t(k * m)));
    Tensor* x = ctx.new_tensor(Type::F32, {k, n});
    tensor_set_f32(x, random_floats(size_t(k * n)));
    Tensor* product = mul_mat(ctx, w, x);
    set_matmul_precision(product, precision);
    const Graph g = build_forward(product);
    const Timing t = time_graph(g, threads, reps);
    const double flops = 2.0 * double(k) * double(m) * double(n);
    std::printf("gemm   %-6s 2048x2048 x 512   %d %s | %7.1f GFLOP/s (%6.1f per CPU-s) | %7.2f ms\n",
                std::string(type_name(type)).c_str(), threads,
                precision == MatMulPrecision::Q8     ? "q8  "
                : precision == MatMulPrecision::BF16 ? "bf16"
                                                     : "    ",
                flops / t.wall * 1e-9, flops / t.cpu * 1e-9, t.wall * 1e3);
}

void gemv_point(Type type, int threads, int reps, const Bandwidth& bw, bool with_peer) {
    const int64_t k = 4096, m = 4096;
    const size_t weight_bytes = row_size(type, k) * size_t(m);
    const int copies = int(std::max<size_t>(1, (size_t(96) << 20) / weight_bytes + 1));
    Context ctx(ContextParams{.alloc_data = true});
    const std::vector<float> values = random_floats(size_t(k * m));
    Tensor* x = ctx.new_tensor(Type::F32, {k, 1});
    tensor_set_f32(x, random_floats(size_t(k)));
    Graph g;
    std::vector<Tensor*> weights;
    for (int i = 0; i < copies; ++i) {
        Tensor* w = ctx.new_tensor(type, {k, m});
        tensor_set_f32(w, values);
        weights.push_back(w);
        g.expand(mul_mat(ctx, w, x));
    }
    const Timing timing = time_graph(g, threads, reps);
    const double t = timing.wall / copies;
    const double ours = double(weight_bytes) / t * 1e-9;
    const double per_cpu_s = double(weight_bytes) * copies / timing.cpu * 1e-9;
    double blas_t = 0.0;
#if GFA_HAVE_BLAS
    if (with_peer) {
        openblas_set_num_threads(threads);
        // sgemv on f32 copies of the same size in bytes as ours would be unfair to neither: it
        // streams its own f32 weights (64 MiB each, two of them so they do not stay cached).
        static std::vector<std::vector<float>> f32_weights;
        if (f32_weights.empty()) f32_weights = {values, values};
        std::vector<float> y(static_cast<size_t>(m));
        const float* xv = static_cast<const float*>(x->data);
        blas_t = median_seconds(reps,
                                [&] {
                                    for (const auto& w : f32_weights)
                                        cblas_sgemv(CblasRowMajor, CblasNoTrans, int(m), int(k), 1.0f,
                                                    w.data(), int(k), xv, 1, 0.0f, y.data(), 1);
                                }) /
                 2;
    }
#endif
    std::printf("gemv   %-6s 4096x4096   %d   | %8.1f GB/s (%5.1f per CPU-s) | %5.1f%% of read bw | %7.1f us",
                std::string(type_name(type)).c_str(), threads, ours, per_cpu_s, 100.0 * ours / bw.read_gbs,
                t * 1e6);
    if (with_peer)
        std::printf(" | sgemv f32 %7.1f us (%5.1f GB/s) | speedup %5.2f", blas_t * 1e6,
                    blas_t > 0 ? double(k * m * 4) / blas_t * 1e-9 : 0.0, blas_t > 0 ? blas_t / t : 0.0);
    std::printf("\n");
}

} // namespace

int main(int argc, char** argv) {
    int reps = 9;
    bool gemv_quants = false, gemm_types = false;
    for (int i = 1; i < argc; ++i) {
        if (std::string(argv[i]) == "--reps" && i + 1 < argc) {
            reps = std::max(1, std::atoi(argv[++i]));
        } else if (std::string(argv[i]) == "--gemv-quants") {
            gemv_quants = true;
        } else if (std::string(argv[i]) == "--gemm-types") {
            gemm_types = true;
        } else {
            std::fprintf(stderr, "usage: bench_matmul [--reps N] [--gemv-quants | --gemm-types]\n");
            return 2;
        }
    }
#if !GFA_HAVE_BLAS
    std::printf("(built without OpenBLAS: the peer columns are empty)\n");
#endif
    std::printf("# %s, median of %d runs\n", cpu_device().description().c_str(), reps);
    if (gemm_types) {
        for (int threads : {1, 2})
            for (Type t : {Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0, Type::Q4_1, Type::Q5_0,
                           Type::Q5_1, Type::Q2_K, Type::Q3_K, Type::Q4_K, Type::Q5_K, Type::Q6_K,
                           Type::IQ4_NL, Type::IQ4_XS})
                for (MatMulPrecision p : {MatMulPrecision::F32, MatMulPrecision::Q8, MatMulPrecision::BF16})
                    if (p == MatMulPrecision::F32 ||
                        (type_traits(t).is_quantized ? p == MatMulPrecision::Q8 : p == MatMulPrecision::BF16))
                        prompt_gemm_point(t, threads, reps, p);
        return 0;
    }
    for (int threads : {1, 2}) {
        const Bandwidth bw = measure_bandwidth(threads, reps);
        std::printf("memory %d thread(s): read %.1f GB/s, memcpy %.1f GB/s (read + write)\n", threads,
                    bw.read_gbs, bw.copy_gbs);
        if (gemv_quants) {
            for (Type t : {Type::Q8_0, Type::Q4_0, Type::Q4_K, Type::Q5_K, Type::Q6_K, Type::Q4_1, Type::Q5_0,
                           Type::Q5_1, Type::Q2_K, Type::Q3_K, Type::IQ4_NL, Type::IQ4_XS})
                gemv_point(t, threads, reps, bw, false);
            continue;
        }
        gemm_point(threads, reps);
        for (Type t : {Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0})
            gemv_point(t, threads, reps, bw, true);
    }
    return 0;
}
