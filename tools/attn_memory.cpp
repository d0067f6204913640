// attn_memory: flash_attn_ext forward + backward at long sequence lengths through the
// scheduler, reporting time and memory, to show that attention memory grows as O(S):
// nothing of size S x S is ever stored. A few output rows are checked against a
// double-precision computation on the host.
//
//   attn_memory [--seq 131072] [--heads 16] [--dim 128] [--causal] [--device CUDA0]
#include <ggml-fa/alloc.h>
#include <ggml-fa/backend.h>
#include <ggml-fa/graph.h>
#include <ggml-fa/ops.h>
#include <ggml-fa/scheduler.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace gfa;

namespace {

// Uniform values in [-1, 1) from a cheap generator: billions of elements must fill fast.
std::vector<uint16_t> random_bf16(size_t n, uint64_t seed) {
    std::vector<uint16_t> out(n);
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (uint16_t& x : out) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        x = fp32_to_bf16(float(int64_t(s >> 40) - (int64_t(1) << 23)) / float(1 << 23));
    }
    return out;
}

double gib(size_t bytes) {
    return double(bytes) / double(1ull << 30);
}

} // namespace

int main(int argc, char** argv) {
    int64_t S = 131072, H = 16, D = 128;
    bool causal = false;
    std::string device_name = find_device("CUDA0") ? "CUDA0" : "CPU";
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
        if (a == "--seq")
            S = std::stoll(next());
        else if (a == "--heads")
            H = std::stoll(next());
        else if (a == "--dim")
            D = std::stoll(next());
        else if (a == "--causal")
            causal = true;
        else if (a == "--device")
            device_name = next();
        else {
            std::fprintf(stderr,
                         "usage: attn_memory [--seq N] [--heads H] [--dim D] [--causal] [--device NAME]\n");
            return 2;
        }
    }
    try {
        Device* dev = find_device(device_name);
        if (!dev) fail("no device named " + device_name);
        const DeviceMemory before = dev->memory();

        Context weights, graph_ctx;
        Tensor* q = weights.new_tensor(Type::BF16, {D, S, H, 1});
        Tensor* k = weights.new_tensor(Type::BF16, {D, S, H, 1});
        Tensor* v = weights.new_tensor(Type::BF16, {D, S, H, 1});
        Tensor* w = weights.new_tensor(Type::F32, {D, H, S, 1}); // loss = sum(O * w)
        for (Tensor* t : {q, k, v}) set_param(t);
        auto buffer = allocate_context_tensors(weights, dev->buffer_type());
        uint64_t seed = 1;
        for (Tensor* t : {q, k, v}) {
            const auto x = random_bf16(size_t(t->nelements()), seed++);
            tensor_set(t, x.data(), 0, x.size() * 2);
        }
        {
            std::vector<float> x(size_t(w->nelements()));
            const auto r = random_bf16(x.size(), seed++);
            for (size_t i = 0; i < x.size(); ++i) x[i] = bf16_to_fp32(r[i]);
            tensor_set(w, x.data(), 0, x.size() * 4);
        }

        FlashAttnParams p;
        p.scale = 1.0f / std::sqrt(float(D));
        p.causal = causal;
        Tensor* o = flash_attn_ext(graph_ctx, q, k, v, nullptr, p, nullptr, {.out_type = Type::BF16});
        Tensor* loss = sum(graph_ctx, mul(graph_ctx, cast(graph_ctx, o, Type::F32), w));
        set_output(o);
        Graph g = build_forward(loss);
        build_backward(graph_ctx, g, loss);

        auto backend = dev->create_backend();
        Scheduler sched({backend.get()});
        sched.reserve(g);
        sched.compute(g); // warm-up and allocation
        backend->synchronize();
        const auto t0 = std::chrono::steady_clock::now();
        sched.compute(g);
        backend->synchronize();
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const DeviceMemory after = dev->memory();

        // Check sampled output rows against double precision on the host.
        std::vector<uint16_t> hq(size_t(q->nelements())), hk(hq.size()), hv(hq.size()),
            ho(size_t(o->nelements()));
        tensor_get(q, hq.data(), 0, hq.size() * 2);
        tensor_get(k, hk.data(), 0, hk.size() * 2);
        tensor_get(v, hv.data(), 0, hv.size() * 2);
        tensor_get(o, ho.data(), 0, ho.size() * 2);
        double num = 0, den = 0;
        for (int64_t sample = 0; sample < 4; ++sample) {
            const int64_t h = sample % H, i = (S - 1) * sample / 3;
            const int64_t n_keys = causal ? i + 1 : S;
            std::vector<double> s(static_cast<size_t>(n_keys));
            double m = -INFINITY;
            for (int64_t j = 0; j < n_keys; ++j) {
                double dot = 0;
                for (int64_t d = 0; d < D; ++d)
                    dot += double(bf16_to_fp32(hq[size_t((h * S + i) * D + d)])) *
                           bf16_to_fp32(hk[size_t((h * S + j) * D + d)]);
                s[size_t(j)] = dot * p.scale;
                m = std::max(m, s[size_t(j)]);
            }
            std::vector<double> acc(static_cast<size_t>(D), 0.0);
            double l = 0;
            for (int64_t j = 0; j < n_keys; ++j) {
                const double e = std::exp(s[size_t(j)] - m);
                l += e;
                for (int64_t d = 0; d < D; ++d)
                    acc[size_t(d)] += e * bf16_to_fp32(hv[size_t((h * S + j) * D + d)]);
            }
            for (int64_t d = 0; d < D; ++d) {
                const double ref = acc[size_t(d)] / l;
                const double got = bf16_to_fp32(ho[size_t((i * H + h) * D + d)]);
                num += (got - ref) * (got - ref);
                den += ref * ref;
            }
        }
        const double err = std::sqrt(num / den);

        const double flops = 4.0 * double(H) * double(S) * double(S) * double(D) * (causal ? 0.5 : 1.0) * 3.5;
        std::printf("device %s (%s)\n", dev->name(), dev->description().c_str());
        std::printf("flash_attn_ext forward + backward: B 1, H %lld, S %lld, D %lld, %s, bf16\n",
                    (long long)H, (long long)S, (long long)D, causal ? "causal" : "full");
        std::printf("time %.3f s (%.2f TFLOP/s counting forward + backward as 3.5x the forward)\n", seconds,
                    flops / seconds / 1e12);
        std::printf("inputs and loss weights: %.3f GiB; graph memory planned by the allocator: %.3f GiB\n",
                    gib(buffer->size()), gib(sched.allocator(0).peak_bytes()));
        std::printf("device memory in use by this run: %.3f GiB (free before %.3f GiB, after %.3f GiB)\n",
                    gib(before.free - after.free), gib(before.free), gib(after.free));
        std::printf("a materialized S x S score matrix would need %.1f GiB per head in f32\n",
                    gib(size_t(S) * size_t(S) * 4));
        std::printf("sampled output rows vs double precision: relative error %.2e %s\n", err,
                    err < 1e-2 ? "ok" : "FAIL");
        return err < 1e-2 ? 0 : 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "attn_memory: %s\n", e.what());
        return 1;
    }
}
