// Op cases every device backend must pass, shared by the CUDA and Vulkan tests: each case
// builds small graphs with random inputs and odd shapes and hands each result to `check`,
// which runs it on the device and compares it with the double-precision reference at the
// given tolerance (relative error).
#pragma once

#include "op_check.h"

#include <functional>

namespace gfa::test::device_cases {

using Check = std::function<void(Tensor* out, double tol)>;

void binary_broadcast(const Check& check);
void unary_and_reductions(const Check& check);
void out_prod_batches(const Check& check);
void norms_with_backward(const Check& check);
void rope_and_back(const Check& check);
void softmax_and_backward(const Check& check);
void activations_and_backward(const Check& check);
void loss_and_adamw(const Check& check);
void autodiff_gradients(const Check& check, double tol);
void top_k_ranks(const Check& check);
void sample_token_draws(const Check& check);
void mul_mat_id_experts(const Check& check, double tol);

} // namespace gfa::test::device_cases
