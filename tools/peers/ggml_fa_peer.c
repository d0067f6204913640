// ggml_fa_peer: ggml's own CPU flash_attn_ext timed on the shapes of bench_attn_cpu, so
// the two can be compared in one run on one machine. Built and run by ggml_cpu_peer.sh
// against a ggml checkout; not part of the normal build.
//
// Prints the same columns as bench_attn_cpu: forward GFLOP/s (4*B*H*Sq*Skv*D, halved when
// causal) and decode GB/s (bytes of K+V read per second). Each point is the median of
// --reps timed runs after one warm-up run. Before timing, a few output rows of every graph
// are checked against a double-precision softmax(QK^T)V so a broken setup cannot pass as
// a fast one.
//
// usage: ggml_fa_peer [--reps N] [--quick] [--decode-only] [--cpu-time]
#include "ggml-cpu.h"
#include "ggml.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

// Wall clock, or with --cpu-time the process's CPU time (as in bench_attn_cpu).
static int use_cpu_time = 0;
static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(use_cpu_time ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int compare_doubles(const void* a, const void* b) {
    const double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

// Deterministic uniform values in [-1, 1) (xorshift), so every run times the same data.
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float uniform_pm1(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((double)(rng_state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

// One attention problem built as a ggml graph with its inputs filled.
struct fa_case {
    struct ggml_context* ctx;
    struct ggml_cgraph* graph;
    struct ggml_tensor *q, *k, *v, *mask, *out;
    float *q_f32, *k_f32, *v_f32; // the values before conversion, for the check
    int64_t D, Sq, Skv, Hq, Hkv;
    int causal;
};

// Stores n floats into a tensor of type t (f32, f16 or a quantized block type).
static void store_values(struct ggml_tensor* t, const float* x, int64_t rows, int64_t n_per_row) {
    if (t->type == GGML_TYPE_F32) {
        memcpy(t->data, x, (size_t)(rows * n_per_row) * sizeof(float));
    } else if (t->type == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(x, (ggml_fp16_t*)t->data, rows * n_per_row);
    } else {
        ggml_quantize_chunk(t->type, x, t->data, 0, rows, n_per_row, NULL);
    }
}

static float* random_floats(int64_t n) {
    float* x = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; ++i) x[i] = uniform_pm1();
    return x;
}

static void build_case(struct fa_case* c, int64_t D, int64_t Sq, int64_t Skv, int64_t Hq, int64_t Hkv,
                       enum ggml_type kv_type, int causal) {
    memset(c, 0, sizeof *c);
    c->D = D, c->Sq = Sq, c->Skv = Skv, c->Hq = Hq, c->Hkv = Hkv, c->causal = causal;
    const size_t data_bytes = (size_t)(D * Sq * Hq) * 4 * 2 +
                              2 * ggml_row_size(kv_type, D) * (size_t)(Skv * Hkv) + (size_t)(Skv * Sq) * 2 +
                              64 * 1024;
    struct ggml_init_params ip = {
        .mem_size = data_bytes + 16 * ggml_tensor_overhead() + ggml_graph_overhead(),
        .mem_buffer = NULL,
        .no_alloc = false,
    };
    c->ctx = ggml_init(ip);
    c->q = ggml_new_tensor_3d(c->ctx, GGML_TYPE_F32, D, Sq, Hq);
    c->k = ggml_new_tensor_3d(c->ctx, kv_type, D, Skv, Hkv);
    c->v = ggml_new_tensor_3d(c->ctx, kv_type, D, Skv, Hkv);
    c->q_f32 = random_floats(D * Sq * Hq);
    c->k_f32 = random_floats(D * Skv * Hkv);
    c->v_f32 = random_floats(D * Skv * Hkv);
    store_values(c->q, c->q_f32, Sq * Hq, D);
    store_values(c->k, c->k_f32, Skv * Hkv, D);
    store_values(c->v, c->v_f32, Skv * Hkv, D);
    // Quantized K/V: the check compares against the values as stored.
    if (kv_type != GGML_TYPE_F32) {
        const struct ggml_type_traits* tr = ggml_get_type_traits(kv_type);
        tr->to_float(c->k->data, c->k_f32, D * Skv * Hkv);
        tr->to_float(c->v->data, c->v_f32, D * Skv * Hkv);
    }
    if (causal) {
        // ggml has no causal flag: an explicit f16 mask, 0 where visible and -inf elsewhere
        // (bottom-right aligned, the same rule as our causal flag).
        c->mask = ggml_new_tensor_2d(c->ctx, GGML_TYPE_F16, Skv, Sq);
        ggml_fp16_t* m = (ggml_fp16_t*)c->mask->data;
        const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), neg_inf = ggml_fp32_to_fp16(-INFINITY);
        for (int64_t i = 0; i < Sq; ++i)
            for (int64_t j = 0; j < Skv; ++j) m[i * Skv + j] = j <= i + Skv - Sq ? zero : neg_inf;
    }
    c->out = ggml_flash_attn_ext(c->ctx, c->q, c->k, c->v, c->mask, 1.0f / sqrtf((float)D), 0.0f, 0.0f);
    c->graph = ggml_new_graph(c->ctx);
    ggml_build_forward_expand(c->graph, c->out);
}

static void free_case(struct fa_case* c) {
    free(c->q_f32), free(c->k_f32), free(c->v_f32);
    ggml_free(c->ctx);
}

// Relative error of output rows (i, h) for a few (i, h) against a double-precision
// softmax(q k^T / sqrt(D)) v over the visible keys.
static double check_rows(const struct fa_case* c) {
    const int64_t probes[3][2] = {{0, 0}, {c->Sq / 2, c->Hq - 1}, {c->Sq - 1, c->Hq / 2}};
    double err2 = 0.0, ref2 = 0.0;
    double* s = malloc((size_t)c->Skv * sizeof(double));
    for (int t = 0; t < 3; ++t) {
        const int64_t i = probes[t][0], h = probes[t][1], g = h / (c->Hq / c->Hkv);
        const int64_t n_vis = c->causal ? i + c->Skv - c->Sq + 1 : c->Skv;
        const float* q = c->q_f32 + (h * c->Sq + i) * c->D;
        double mx = -INFINITY, sum = 0.0;
        for (int64_t j = 0; j < n_vis; ++j) {
            const float* k = c->k_f32 + (g * c->Skv + j) * c->D;
            double dot = 0.0;
            for (int64_t d = 0; d < c->D; ++d) dot += (double)q[d] * (double)k[d];
            s[j] = dot / sqrt((double)c->D);
            if (s[j] > mx) mx = s[j];
        }
        for (int64_t j = 0; j < n_vis; ++j) sum += (s[j] = exp(s[j] - mx));
        const float* o = (const float*)c->out->data + (i * c->Hq + h) * c->D;
        for (int64_t d = 0; d < c->D; ++d) {
            double ref = 0.0;
            for (int64_t j = 0; j < n_vis; ++j) ref += s[j] * (double)c->v_f32[(g * c->Skv + j) * c->D + d];
            ref /= sum;
            err2 += ((double)o[d] - ref) * ((double)o[d] - ref);
            ref2 += ref * ref;
        }
    }
    free(s);
    return sqrt(err2 / ref2);
}

// Median seconds of ggml_graph_compute over `reps` runs, after a warm-up run.
static double time_graph(struct fa_case* c, int n_threads, int reps, double* check_error) {
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
    struct ggml_threadpool* pool = ggml_threadpool_new(&tpp);
    struct ggml_cplan plan = ggml_graph_plan(c->graph, n_threads, pool);
    plan.work_data = plan.work_size ? malloc(plan.work_size) : NULL;
    if (ggml_graph_compute(c->graph, &plan) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "ggml_graph_compute failed\n");
        exit(1);
    }
    *check_error = check_rows(c);
    double* t = malloc((size_t)reps * sizeof(double));
    for (int r = 0; r < reps; ++r) {
        const double t0 = now_seconds();
        ggml_graph_compute(c->graph, &plan);
        t[r] = now_seconds() - t0;
    }
    qsort(t, (size_t)reps, sizeof(double), compare_doubles);
    const double median = t[reps / 2];
    free(t);
    free(plan.work_data);
    ggml_threadpool_free(pool);
    return median;
}

int main(int argc, char** argv) {
    int reps = 7, quick = 0, decode_only = 0;
    for (int a = 1; a < argc; ++a) {
        if (!strcmp(argv[a], "--reps") && a + 1 < argc) reps = atoi(argv[++a]) > 0 ? atoi(argv[a]) : 1;
        if (!strcmp(argv[a], "--quick")) quick = 1;
        if (!strcmp(argv[a], "--decode-only")) decode_only = 1;
        if (!strcmp(argv[a], "--cpu-time")) use_cpu_time = 1;
    }
    ggml_cpu_init();
    const int64_t dims_full[] = {64, 128, 256}, seqs_full[] = {512, 1024, 2048};
    const int64_t dims_quick[] = {128}, seqs_quick[] = {2048};
    const int64_t* dims = quick ? dims_quick : dims_full;
    const int64_t* seqs = quick ? seqs_quick : seqs_full;
    const int n_dims = quick ? 1 : 3, n_seqs = quick ? 1 : 3;
    const int64_t heads = 2;
    const double max_error = 2e-2; // f16/quantized Q (ggml converts Q to K's dot type)

    printf("# timer: %s\n", use_cpu_time ? "process CPU time" : "wall clock");
    printf("# ggml CPU flash_attn_ext forward, B=1, H=%lld, f32 Q, median of %d runs\n", (long long)heads,
           reps);
    printf("%-4s %-5s %-4s %-7s %-6s | %9s %9s\n", "D", "S", "thr", "K/V", "causal", "fwd GF/s", "rel err");
    for (int nth = 1; nth <= 2 && !decode_only; ++nth)
        for (int di = 0; di < n_dims; ++di)
            for (int si = 0; si < n_seqs; ++si)
                for (int kv = 0; kv < 2; ++kv)
                    for (int causal = 0; causal < 2; ++causal) {
                        const int64_t D = dims[di], S = seqs[si];
                        const enum ggml_type t = kv ? GGML_TYPE_F16 : GGML_TYPE_F32;
                        if (causal && !(D == 128 && S == 2048)) continue;
                        struct fa_case c;
                        build_case(&c, D, S, S, heads, heads, t, causal);
                        double err;
                        const double sec = time_graph(&c, nth, reps, &err);
                        const double flops =
                            4.0 * (double)heads * (double)S * (double)S * (double)D * (causal ? 0.5 : 1.0);
                        printf("%-4lld %-5lld %-4d %-7s %-6d | %9.1f %9.1e%s\n", (long long)D, (long long)S,
                               nth, ggml_type_name(t), causal, flops / sec * 1e-9, err,
                               err < max_error ? "" : "  CHECK FAILED");
                        fflush(stdout);
                        free_case(&c);
                    }

    printf("\n# ggml decode: 1 query x 4096 keys, GQA 32/8, D=128, median of %d runs\n", reps * 3);
    printf("%-4s %-7s | %9s %9s %9s\n", "thr", "K/V", "us", "GB/s K+V", "rel err");
    for (int nth = 1; nth <= 2; ++nth)
        for (int kv = 0; kv < 3; ++kv) {
            const enum ggml_type types[3] = {GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0};
            const enum ggml_type t = types[kv];
            struct fa_case c;
            build_case(&c, 128, 1, 4096, 32, 8, t, 0);
            double err;
            const double sec = time_graph(&c, nth, reps * 3, &err);
            const double bytes = (double)(ggml_nbytes(c.k) + ggml_nbytes(c.v));
            printf("%-4d %-7s | %9.1f %9.2f %9.1e%s\n", nth, ggml_type_name(t), sec * 1e6, bytes / sec * 1e-9,
                   err, err < max_error ? "" : "  CHECK FAILED");
            fflush(stdout);
            free_case(&c);
        }
    return 0;
}
