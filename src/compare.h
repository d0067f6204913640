// Numerics comparison: runs a graph on a backend (through the scheduler, so unsupported ops
// fall back visibly) and on the double-precision reference evaluator with the same random
// inputs, and reports ||x - ref|| / ||ref|| for every computed node. Used by the tests and
// by tools/compare, which runs a built-in suite of small graphs against each device.
#pragma once

#include <ggml-fa/backend.h>
#include <ggml-fa/graph.h>
#include <ggml-fa/model.h>

#include <functional>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

namespace gfa::compare {

// ||out - ref|| / ||ref|| (the absolute norm when ref is ~0). Infinity when out is NaN or
// infinite where ref is finite, or differs from a non-finite ref.
double normalized_error(const std::vector<float>& out, const std::vector<double>& ref);

// Every element of a computed tensor as float, row-major, following its strides.
std::vector<float> read_values(const Tensor* t);

// "#index op type[shape] 'name'": how reports name node `index` of a graph.
std::string node_label(size_t index, const Tensor* n);

// Gives a leaf its values; the default fills f32/f16/bf16 leaves uniformly in [-1, 1).
using LeafInit = std::function<void(Tensor* leaf, std::mt19937& rng)>;

struct NodeResult {
    const Tensor* node;
    std::string label;   // "#12 add f32[17,5,1,1] 'name'"
    std::string backend; // where it ran
    double error;        // normalized error, infinity for NaN
};

struct Report {
    std::vector<NodeResult> nodes;
    double worst = 0.0;
    int worst_index = -1;
    int n_splits = 0, n_copies = 0;
    std::vector<std::string> log; // scheduler fallbacks
    bool ok(double tol) const { return worst_index >= 0 && worst <= tol; }
};

// Runs `graph` on `backend` (with `fallback` for ops it lacks, may be null) and on the
// reference. Leaves without data get memory from the scheduler and values from `inits`
// (by tensor) or the default. Every computed node is kept (marked as an output for the
// run) so each can be compared; the graph's flags are restored afterwards.
Report run(Graph& graph, Backend& backend, Backend* fallback, std::mt19937& rng,
           const std::unordered_map<const Tensor*, LeafInit>& inits = {});

// ---- a model, node by node -----------------------------------------------------------------

// The traced nodes of one graph run twice, compared node by node: the error of each of
// `got`'s nodes against the same node of `want` (NodeResult::node is null). Throws when the
// two are not the same graph (labels or sizes differ).
Report compare_traces(const std::vector<TracedNode>& got, const std::vector<TracedNode>& want);

// One forward pass of a llama-family GGUF model over `prompt`, then `decode_steps` single
// tokens (the decoding graphs: attention windows under a mask), run once with the whole
// model on `device` and once on the CPU, every node compared with the CPU's (one report per
// eval). The weights are loaded twice.
struct ModelComparison {
    std::vector<std::string> evals; // "prompt (N tokens)", "decode step 1", ...
    std::vector<Report> reports;
};
ModelComparison compare_model(const std::string& path, Device* device, const std::vector<int32_t>& prompt,
                              int decode_steps, Type kv_type, int n_threads);

// ---- the built-in suite ------------------------------------------------------------------

// What a suite case uses to make its leaves.
class CaseBuilder {
  public:
    explicit CaseBuilder(Context& ctx) : ctx(ctx) {}
    Context& ctx;
    // A leaf with uniform values in [lo, hi) (converted to its type).
    Tensor* input(std::initializer_list<int64_t> ne, float lo = -1.0f, float hi = 1.0f,
                  Type type = Type::F32);
    // A trainable leaf (the case's output is then a loss and its backward pass is run).
    Tensor* param(std::initializer_list<int64_t> ne, float lo = -1.0f, float hi = 1.0f);
    // A mask [Skv, Sq] as graphs give causal attention: 0 where query i sees key j
    // (j <= i + Skv - Sq), -inf after, and random values in [-2, 0) on the `band` keys up to
    // the diagonal. Its tiles are hidden, zero and mixed at once.
    Tensor* causal_mask(int64_t Skv, int64_t Sq, int64_t band, Type type);
    // An f32 leaf holding exactly these values.
    Tensor* constant(std::vector<float> values);
    // i32 row indices in [0, limit).
    Tensor* indices(std::initializer_list<int64_t> ne, int32_t limit);
    // A shape only (the target of repeat), never read.
    Tensor* shape(std::initializer_list<int64_t> ne);
    const std::unordered_map<const Tensor*, LeafInit>& inits() const { return inits_; }
    bool has_params() const { return has_params_; }

  private:
    std::unordered_map<const Tensor*, LeafInit> inits_;
    bool has_params_ = false;
};

struct Case {
    const char* name;
    double tol;
    std::function<Tensor*(CaseBuilder&)> build; // returns the output (a scalar loss if params)
    // Bound for GPU devices where it differs: their attention kernels round f32 inputs to
    // 16 bits for the tensor cores, so f32 graphs through attention carry 16-bit error.
    double gpu_tol = 0.0;
};

const std::vector<Case>& builtin_suite();

struct CaseResult {
    std::string name;
    double tol = 0.0;
    Report report;
    std::string error; // an exception from building or running the case
    bool passed() const { return error.empty() && report.ok(tol); }
};

CaseResult run_case(const Case& c, Backend& backend, Backend* fallback, uint32_t seed);

} // namespace gfa::compare
