// Test helpers: random inputs, poisoned outputs, comparison with the reference evaluator,
// and gradient checks against central finite differences of the double-precision reference.
#pragma once

#include <catch2/catch.hpp>

#include <ggml-fa/backend.h>
#include <ggml-fa/graph.h>
#include <ggml-fa/ops.h>

#include <random>
#include <vector>

namespace gfa::test {

// A generator seeded from std::random_device (or GFA_TEST_SEED); the seed is printed when a
// test fails.
std::mt19937& rng();
uint32_t seed();

// Uniform values in [lo, hi) written in the tensor's type (contiguous tensors).
void fill_uniform(Tensor* t, float lo = -1.0f, float hi = 1.0f);
std::vector<float> random_values(size_t n, float lo = -1.0f, float hi = 1.0f);

// Writes i32 values into a contiguous i32 tensor (the counts must match).
void set_i32(Tensor* t, const std::vector<int32_t>& v);
// n indices drawn uniformly from [0, limit).
std::vector<int32_t> random_indices(size_t n, int32_t limit);
// A router's choice for mul_mat_id: for each of T tokens, k distinct experts out of E in
// random order; with `crowded`, every token's first choice is expert 0, so one expert serves
// every token (and gets many columns) while others get one or two.
std::vector<int32_t> expert_choices(int64_t E, int64_t k, int64_t T, bool crowded);
// mul_mat_id's inputs with random values: experts as [K, M, E] of `type`, b [K, Nb, T] f32 and
// ids [k, T] from expert_choices(E, k, T, crowded).
struct ExpertInputs {
    Tensor *as, *b, *ids;
};
ExpertInputs expert_inputs(Context& ctx, Type type, int64_t K, int64_t M, int64_t E, int64_t Nb, int64_t k,
                           int64_t T, bool crowded);

// The GGUF block types the library reads and writes, and which every device backend decodes.
inline constexpr Type kQuantTypes[] = {Type::Q8_0, Type::Q4_0, Type::Q4_1, Type::Q5_0,
                                       Type::Q5_1, Type::Q4_K, Type::Q5_K, Type::Q6_K};
// The low-bit formats of llama.cpp's Q2_K, Q3_K and IQ4 presets: the CPU and Vulkan decode
// them, and so does CUDA unless GFA_CUDA_LOW_BIT=0.
inline constexpr Type kLowBitQuantTypes[] = {Type::Q2_K, Type::Q3_K, Type::IQ4_NL, Type::IQ4_XS};
inline std::vector<Type> all_quant_types() {
    std::vector<Type> all(std::begin(kQuantTypes), std::end(kQuantTypes));
    all.insert(all.end(), std::begin(kLowBitQuantTypes), std::end(kLowBitQuantTypes));
    return all;
}
// Every row of a packed quantized tensor in host memory, decoded by the CPU's decoder.
std::vector<float> cpu_dequantized(const Tensor* a);

// Fills every computed node's memory with NaN bytes (0xFF) except nodes that write into
// existing memory, so an element a kernel forgets to write shows up as NaN.
void poison_nodes(const Graph& g);
// Runs the graph on a CPU backend after poisoning.
void compute_cpu(const Graph& g, int n_threads = 2);

// Runs g on `dev`: every tensor of the graph is placed in one buffer of the device, the
// leaves' host values uploaded, the nodes poisoned with NaN, and `out` read back. The
// tensors' host placements are restored afterwards, so the reference can still read them.
// With `constants_as_weights`, leaves flagged kFlagConstant go to a second buffer declared
// BufferUsage::Weights, as a loaded model's weights do (the device may lay them out its way).
std::vector<float> run_on_device(Device* dev, const Graph& g, Tensor* out, bool constants_as_weights = false);
// Requires every node of out's graph to be supported by `dev`, runs the graph there and
// compares `out` with the reference evaluator (relative error at most `tol`).
void check_on_device(Device* dev, Tensor* out, double tol);

// ||out - ref|| / ||ref|| (or the absolute norm when ref is ~0); infinity if out has a NaN
// or infinity where ref is finite.
double rel_error(const std::vector<float>& out, const std::vector<double>& ref);

// Computes `out`'s graph on the CPU backend and compares with the reference evaluator.
double check_forward(Tensor* out, double tol, int n_threads = 2); // returns the relative error

// Fourth-order central differences of the reference evaluator's `loss` (a scalar, double precision) with
// respect to the given elements (row-major indices) of `param`, a leaf of the loss's graph.
std::vector<double> reference_gradient(Tensor* loss, Tensor* param, const std::vector<size_t>& elements,
                                       double eps = 1e-3);

// Differentiates `loss` (a scalar) with respect to `params` on the CPU backend and compares
// each gradient with central finite differences of the reference evaluator in double
// precision (at most `max_elements` sampled elements per parameter).
void check_gradients(Context& ctx, Tensor* loss, const std::vector<Tensor*>& params, double tol,
                     double eps = 1e-3, int max_elements = 48);

} // namespace gfa::test
