// bench_attn_cpu: CPU FlashAttention-2 forward/backward GFLOP/s and decode GB/s, with an
// unfused attention on OpenBLAS sgemm (S = QK^T, row softmax, O = PV) measured in the
// same run as the peer when the build found OpenBLAS.
//
// FLOPs: forward 4*B*H*Sq*Skv*D (halved when causal), backward 2.5x forward. Each point
// is run --reps times (default 7) and the median is reported: the machine may be shared.
//
// usage: bench_attn_cpu [--reps N] [--quick] [--decode-only] [--cpu-time]
#include "backends/cpu/flash_attn_cpu.h"
#include "thread_pool.h"

#include "../tests/attn_fixture.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <functional>
#include <string>
#include <vector>

#if GFA_HAVE_BLAS
#include <cblas.h>
#endif

using namespace gfa;
using namespace gfa::attn;
using namespace gfa::attn::testing;

namespace {

// Wall-clock seconds, or with --cpu-time the CPU seconds of the whole process: on a
// machine shared with other work, CPU time of a 1-thread run is close to what the run
// would take alone (it excludes time spent descheduled, not cache interference).
bool use_cpu_time = false;
double now_seconds() {
    if (!use_cpu_time)
        return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

double median_seconds(int reps, const std::function<void()>& fn) {
    fn(); // warm-up: page faults, caches
    std::vector<double> t;
    for (int r = 0; r < reps; ++r) {
        const double t0 = now_seconds();
        fn();
        t.push_back(now_seconds() - t0);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

#if GFA_HAVE_BLAS
// Unfused attention, one head per task: S = Q K^T (sgemm), softmax per row, O = P V
// (sgemm). f32 everywhere; S is materialized (Sq x Skv per worker).
void blas_attention(const Problem& p, ThreadPool& pool) {
    openblas_set_num_threads(1); // the pool parallelizes over heads
    const int64_t n_heads = p.B * p.Hq;
    pool.run([&](int ith, int nth) {
        std::vector<float> s(size_t(p.Sq * p.Skv)), o(size_t(p.Sq * p.Dv));
        for (int64_t bh = ith; bh < n_heads; bh += nth) {
            const int64_t b = bh / p.Hq, h = bh % p.Hq, g = kv_head(p, h);
            const float* q = reinterpret_cast<const float*>(row_at(p.q, 0, h, b));
            const float* k = reinterpret_cast<const float*>(row_at(p.k, 0, g, b));
            const float* v = reinterpret_cast<const float*>(row_at(p.v, 0, g, b));
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(p.Sq), int(p.Skv), int(p.Dk),
                        p.params.scale, q, int(p.Dk), k, int(p.Dk), 0.0f, s.data(), int(p.Skv));
            for (int64_t i = 0; i < p.Sq; ++i) {
                float* row = s.data() + i * p.Skv;
                const int64_t n = p.params.causal ? std::min(p.Skv, i + p.Skv - p.Sq + 1) : p.Skv;
                float m = -INFINITY;
                for (int64_t j = 0; j < n; ++j) m = std::max(m, row[j]);
                float sum = 0.0f;
                for (int64_t j = 0; j < n; ++j) sum += (row[j] = std::exp(row[j] - m));
                const float inv = 1.0f / sum;
                for (int64_t j = 0; j < n; ++j) row[j] *= inv;
                for (int64_t j = n; j < p.Skv; ++j) row[j] = 0.0f;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(p.Sq), int(p.Dv), int(p.Skv), 1.0f,
                        s.data(), int(p.Skv), v, int(p.Dv), 0.0f, o.data(), int(p.Dv));
            for (int64_t i = 0; i < p.Sq; ++i)
                std::memcpy(o_row(p.o, i, h, b), o.data() + i * p.Dv, size_t(p.Dv) * 4);
        }
    });
}
#endif

} // namespace

int main(int argc, char** argv) {
    int reps = 7;
    bool quick = false, decode_only = false;
    for (int a = 1; a < argc; ++a) {
        if (!std::strcmp(argv[a], "--reps") && a + 1 < argc) reps = std::max(1, std::atoi(argv[++a]));
        if (!std::strcmp(argv[a], "--quick")) quick = true;
        if (!std::strcmp(argv[a], "--decode-only")) decode_only = true;
        if (!std::strcmp(argv[a], "--cpu-time")) use_cpu_time = true;
    }
    // The bf16 rows where this build has the pair products (AVX512-BF16).
    const bool pairs = cpu::flash_attn_has_pair_products();
    std::mt19937 rng(1234);
    const std::vector<int64_t> dims = quick ? std::vector<int64_t>{128} : std::vector<int64_t>{64, 128, 256};
    const std::vector<int64_t> seqs =
        quick ? std::vector<int64_t>{2048} : std::vector<int64_t>{512, 1024, 2048};
    const int64_t heads = 2;

    std::printf("# timer: %s\n", use_cpu_time ? "process CPU time" : "wall clock");
    std::printf("# forward/backward, B=1, H=%lld, f32 Q, median of %d runs\n", (long long)heads, reps);
    std::printf("# prec: the forward's products (f32, or bf16 pairs: FlashAttnParams::precision = BF16)\n");
    std::printf("%-4s %-5s %-4s %-7s %-6s %-5s | %9s %9s %9s | %9s %9s\n", "D", "S", "thr", "K/V", "causal",
                "prec", "fwd GF/s", "bwd GF/s", "bwd/fwd", "blas GF/s", "fa2/blas");
    for (int nth : {1, 2}) {
        if (decode_only) break;
        ThreadPool pool(nth);
        for (int64_t D : dims)
            for (int64_t S : seqs)
                for (Type kv : {Type::F32, Type::F16, Type::BF16})
                    for (bool causal : {false, true})
                        for (attn::Precision prec : {attn::Precision::F32, attn::Precision::BF16}) {
                            const bool anchor = D == 128 && S == 2048;
                            if ((kv != Type::F32 || causal) && !anchor) continue;
                            if ((kv == Type::BF16 || prec == attn::Precision::BF16) && (!anchor || !pairs))
                                continue;
                            CaseSpec s;
                            s.Dk = s.Dv = D, s.Sq = s.Skv = S, s.Hq = s.Hkv = heads;
                            s.k_type = s.v_type = kv;
                            s.params.causal = causal;
                            s.params.precision = prec;
                            auto c = make_case(s, rng, true);
                            const double flops = 4.0 * double(heads) * double(S) * double(S) * double(D) *
                                                 (causal ? 0.5 : 1.0);
                            const double tf =
                                median_seconds(reps, [&] { cpu::flash_attn_forward(c->p, pool); });
                            c->bp.fwd = c->p;
                            const double tb =
                                median_seconds(reps, [&] { cpu::flash_attn_backward(c->bp, pool); });
                            const double gf = flops / tf * 1e-9, gb = 2.5 * flops / tb * 1e-9;
                            double blas = NAN;
#if GFA_HAVE_BLAS
                            if (kv == Type::F32)
                                blas =
                                    flops / median_seconds(reps, [&] { blas_attention(c->p, pool); }) * 1e-9;
#endif
                            std::printf(
                                "%-4lld %-5lld %-4d %-7s %-6d %-5s | %9.1f %9.1f %9.2f | %9.1f %9.2f\n",
                                (long long)D, (long long)S, nth, std::string(type_name(kv)).c_str(),
                                int(causal), prec == attn::Precision::BF16 ? "bf16" : "f32", gf, gb, gb / gf,
                                blas, gf / blas);
                            std::fflush(stdout);
                        }
    }

    std::printf("\n# decode: 1 query x 4096 keys, GQA 32/8, D=128, median of %d runs\n", reps * 3);
    std::printf("%-4s %-7s | %9s %9s\n", "thr", "K/V", "us", "GB/s K+V");
    for (int nth : {1, 2}) {
        ThreadPool pool(nth);
        for (Type kv : {Type::F16, Type::Q8_0, Type::Q4_0}) {
            CaseSpec s;
            s.Dk = s.Dv = 128, s.Sq = 1, s.Skv = 4096, s.Hq = 32, s.Hkv = 8;
            s.k_type = s.v_type = kv;
            auto c = make_case(s, rng);
            const double bytes = double(c->k.bytes.size() + c->v.bytes.size());
            const double t = median_seconds(reps * 3, [&] { cpu::flash_attn_forward(c->p, pool); });
            std::printf("%-4d %-7s | %9.1f %9.2f\n", nth, std::string(type_name(kv)).c_str(), t * 1e6,
                        bytes / t * 1e-9);
        }
    }
    return 0;
}
