// simple-graph: a causal attention layer whose q, k, v are trained toward a target with one
// AdamW step. Builds the graph, differentiates it, and runs it through the scheduler.
#include <ggml-fa/alloc.h>
#include <ggml-fa/backend.h>
#include <ggml-fa/graph.h>
#include <ggml-fa/ops.h>
#include <ggml-fa/scheduler.h>

#include <cstdio>
#include <random>

int main() {
    using namespace gfa;
    const int64_t D = 16, S = 8, H = 2; // head size, tokens, heads
    Context data, graph_ctx;            // tensors with values; the graph's nodes (placed later)
    Tensor* q = set_name(data.new_tensor(Type::F32, {D, S, H}), "q");
    Tensor* k = set_name(data.new_tensor(Type::F32, {D, S, H}), "k");
    Tensor* v = set_name(data.new_tensor(Type::F32, {D, S, H}), "v");
    Tensor* target = data.new_tensor(Type::F32, {D, H, S}); // the attention output we want

    Tensor* out = flash_attn_ext(graph_ctx, q, k, v, nullptr, {.scale = 0.25f, .causal = true});
    Tensor* loss = scale(graph_ctx, sum(graph_ctx, sqr(graph_ctx, sub(graph_ctx, out, target))),
                         1.0f / float(D * S * H));
    for (Tensor* p : {q, k, v}) set_param(p);
    Graph step = build_forward(loss);
    build_backward(graph_ctx, step, loss); // dloss/dq, dk, dv (the FlashAttention-2 backward)
    build_optimizer_step(data, step, {.lr = 0.05f}, nullptr);

    auto values = allocate_context_tensors(data, cpu_device().buffer_type()); // optimizer state starts at 0
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (Tensor* t : {q, k, v, target}) {
        std::vector<float> x(size_t(t->nelements()));
        for (float& e : x) e = uniform(rng);
        tensor_set_f32(t, x);
    }

    std::unique_ptr<Backend> cpu = make_cpu_backend();
    Scheduler sched({cpu.get()}); // more backends go first in this list; the CPU catches the rest
    sched.compute(step);          // forward, backward, then the update of q, k and v
    std::printf("graph: %zu nodes, planned memory %zu bytes (%zu without reuse)\n", step.nodes().size(),
                sched.allocator(0).peak_bytes(), sched.allocator(0).planned_total_bytes());
    std::printf("loss before the AdamW step: %.6f\n", tensor_get_f32(loss)[0]);

    Graph forward = build_forward(loss); // the same loss, on the updated q, k, v
    sched.compute(forward);
    std::printf("loss after the AdamW step:  %.6f\n", tensor_get_f32(loss)[0]);
    return 0;
}
