// The op cases every device backend must pass (device_op_cases.h), run on the CPU device
// through the same device path (its own buffers, poisoned outputs) as CUDA and Vulkan.
#include "device_op_cases.h"

#include <ggml-fa/backend.h>

using namespace gfa;

namespace {
void check_cpu(Tensor* out, double tol) {
    test::check_on_device(&cpu_device(), out, tol);
}
} // namespace

TEST_CASE("CPU device: element-wise ops, reductions and activations", "[ops][device]") {
    test::device_cases::binary_broadcast(check_cpu);
    test::device_cases::unary_and_reductions(check_cpu);
    test::device_cases::activations_and_backward(check_cpu);
}

TEST_CASE("CPU device: norms, rope and softmax with their backward ops", "[ops][device]") {
    test::device_cases::norms_with_backward(check_cpu);
    test::device_cases::rope_and_back(check_cpu);
    test::device_cases::softmax_and_backward(check_cpu);
}

TEST_CASE("CPU device: out_prod, the loss, AdamW and autodiff gradients", "[ops][device]") {
    test::device_cases::out_prod_batches(check_cpu);
    test::device_cases::loss_and_adamw(check_cpu);
    test::device_cases::autodiff_gradients(check_cpu, 1e-5);
}

TEST_CASE("CPU device: top_k, ties by position, NaN with -inf, k = 1 over long rows", "[ops][device][moe]") {
    test::device_cases::top_k_ranks(check_cpu);
}

TEST_CASE("CPU device: sample_token draws the reference's token", "[ops][device][sampling]") {
    test::device_cases::sample_token_draws(check_cpu);
}
