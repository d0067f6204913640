// simple-graph: a causal attention layer whose q, k, v are trained toward a target with one
// AdamW step. Builds the graph, differentiates it, and runs it through the scheduler: on the
// CPU, then on every other device found (CUDA, Vulkan) with the same starting values, and
// compares the gradients element by element with the CPU's.
#include <ggml-fa/alloc.h>
#include <ggml-fa/backend.h>
#include <ggml-fa/graph.h>
#include <ggml-fa/ops.h>
#include <ggml-fa/scheduler.h>

#include <cmath>
#include <cstdio>
#include <random>

namespace {

using namespace gfa;

struct StepResult {
    size_t nodes = 0, planned_bytes = 0, unshared_bytes = 0;
    float loss_before = 0, loss_after = 0;
    std::vector<float> grads; // dloss/dq, dk, dv, one after another
    std::string placement;    // the scheduler's splits
};

// One training step with the values (and the optimizer state) in `dev`'s memory, the graph
// run there with the CPU catching any op `dev` lacks.
StepResult train_step(Device* dev) {
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
    const Optimizer adamw = build_optimizer_step(data, graph_ctx, step);

    auto values = allocate_context_tensors(data, dev->buffer_type());
    adamw.reset();            // the moments start at zero (device memory starts undefined)
    adamw.set({.lr = 0.05f}); // step 1
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (Tensor* t : {q, k, v, target}) {
        std::vector<float> x(size_t(t->nelements()));
        for (float& e : x) e = uniform(rng);
        tensor_set_f32(t, x);
    }

    std::unique_ptr<Backend> cpu = make_cpu_backend();
    std::unique_ptr<Backend> own = dev == &cpu_device() ? nullptr : dev->create_backend();
    std::vector<Backend*> backends{cpu.get()}; // the preferred backend first, the CPU last
    if (own) backends.insert(backends.begin(), own.get());
    Scheduler sched(backends);
    sched.set_log({}); // fallbacks show in the placement printed below
    StepResult r;
    sched.compute(step); // forward, backward, then the update of q, k and v
    r.nodes = step.nodes().size();
    r.planned_bytes = sched.allocator(0).peak_bytes();
    r.unshared_bytes = sched.allocator(0).planned_total_bytes();
    r.placement = sched.describe();
    r.loss_before = tensor_get_f32(loss)[0];
    for (Tensor* p : {q, k, v}) {
        const std::vector<float> g = tensor_get_f32(step.grad(p));
        r.grads.insert(r.grads.end(), g.begin(), g.end());
    }

    Graph forward = build_forward(loss); // the same loss, on the updated q, k, v
    sched.compute(forward);
    r.loss_after = tensor_get_f32(loss)[0];
    return r;
}

} // namespace

int main() {
    const StepResult on_cpu = train_step(&cpu_device());
    std::printf("graph: %zu nodes, planned memory %zu bytes (%zu without reuse)\n", on_cpu.nodes,
                on_cpu.planned_bytes, on_cpu.unshared_bytes);
    std::printf("loss before the AdamW step: %.6f\n", on_cpu.loss_before);
    std::printf("loss after the AdamW step:  %.6f\n", on_cpu.loss_after);

    // The same step on every other device, compared with the CPU element by element.
    for (Device* dev : devices()) {
        if (dev == &cpu_device()) continue;
        const StepResult r = train_step(dev);
        double num = 0.0, den = 0.0; // ||g - g_cpu|| / ||g_cpu||
        for (size_t i = 0; i < r.grads.size(); ++i) {
            num += double(r.grads[i] - on_cpu.grads[i]) * double(r.grads[i] - on_cpu.grads[i]);
            den += double(on_cpu.grads[i]) * double(on_cpu.grads[i]);
        }
        std::printf("on %s (%s): loss %.6f -> %.6f, gradients %.2e (relative) from the CPU's\n%s",
                    dev->name(), dev->description().c_str(), r.loss_before, r.loss_after,
                    std::sqrt(num / den), r.placement.c_str());
    }
    return 0;
}
