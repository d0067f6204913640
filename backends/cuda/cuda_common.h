// CUDA backend internals shared by the host code (cuda_backend.cpp) and the kernel files
// (kernels_*.cu): error checking, the compute context a kernel gets, the kernel table, and
// the plain strided view of a tensor that kernels take by value.
#pragma once

#include <ggml-fa/backend.h>
#include <ggml-fa/error.h>
#include <ggml-fa/tensor.h>

#include "quants.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <span>
#include <string>

namespace gfa::cuda {

// ---- error checking ---------------------------------------------------------------------

[[noreturn]] void raise_cuda_error(const char* call, cudaError_t err, const char* file, int line);
[[noreturn]] void raise_cublas_error(const char* call, cublasStatus_t st, const char* file, int line);

// Every CUDA runtime call goes through this: a failure becomes a gfa::Error naming the
// call, the error, and where it was made.
#define GFA_CUDA_CHECK(call)                                                                                 \
    do {                                                                                                     \
        const cudaError_t gfa_err_ = (call);                                                                 \
        if (gfa_err_ != cudaSuccess) ::gfa::cuda::raise_cuda_error(#call, gfa_err_, __FILE__, __LINE__);     \
    } while (0)

#define GFA_CUBLAS_CHECK(call)                                                                               \
    do {                                                                                                     \
        const cublasStatus_t gfa_st_ = (call);                                                               \
        if (gfa_st_ != CUBLAS_STATUS_SUCCESS)                                                                \
            ::gfa::cuda::raise_cublas_error(#call, gfa_st_, __FILE__, __LINE__);                             \
    } while (0)

// After a kernel launch: launch-configuration errors show up here, not at the launch.
#define GFA_CUDA_CHECK_LAUNCH() GFA_CUDA_CHECK(cudaGetLastError())

// ---- the compute context ----------------------------------------------------------------

// Device-side error codes a kernel can report (bad row indices and the like); the backend
// turns a non-zero code into a gfa::Error at the next synchronize. The flag is
// kErrorWords words: the code, then up to three numbers the message names.
enum KernelError : int32_t {
    kNoError = 0,
    kRowIndexOutOfRange = 1,
    kClassOutOfRange = 2,
    kExpertOutOfRange = 3
};
inline constexpr int kErrorWords = 4;

// Scratch memory that lives as long as the backend. Growing it waits for queued work first,
// because kernels still in flight may read the old block; while the stream is being captured
// into a graph, get() throws CaptureAborted instead of growing.
class Scratch {
  public:
    Scratch() = default;
    ~Scratch();
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    void* get(size_t bytes, cudaStream_t stream, const char* device_name);
    // Counts the blocks handed out so far: graphs captured before the last growth refer to
    // freed memory.
    uint64_t generation() const { return generation_; }

  private:
    void* ptr_ = nullptr;
    size_t size_ = 0;
    uint64_t generation_ = 0;
};

// The int8 form of b that the last quantized matrix-vector product left in scratch memory
// (quant_matmul.h). Products that read the same b one after another (the q/k/v or gate/up
// projections of one input) reuse it instead of quantizing b again; any other node in
// between clears it (it may write scratch memory).
struct QuantizedColumns {
    const Tensor* b = nullptr;
    const void* columns = nullptr;
};

struct ComputeCtx {
    int device = 0;
    const char* device_name = "CUDA";
    cudaStream_t stream = nullptr;
    cublasHandle_t cublas = nullptr;
    Scratch* scratch = nullptr;
    int32_t* error_flag = nullptr; // device-visible, host-mapped
    int sm_count = 1;
    QuantizedColumns* last_columns = nullptr; // null: no reuse (set by the backend)
    // A fused launch's nodes in graph order (the last is the node its run gets); empty for
    // a plain launch.
    std::span<Tensor* const> fused;
};

using Kernel = void (*)(const ComputeCtx& ctx, Tensor* dst);
// Exact check that the kernel handles this node (types, layouts); nullptr means "always".
using Supports = bool (*)(const Tensor* dst);
struct KernelEntry {
    Kernel run = nullptr;
    Supports supports = nullptr;
};
using KernelTable = std::array<KernelEntry, size_t(Op::Count)>;

const KernelTable& kernels();

// Fused launches: a run of consecutive nodes that one kernel computes, writing every node's
// result (so readers of the intermediate nodes still find them). `run` gets the last node.
struct Fusion {
    size_t n_nodes = 0; // 0: no fusion starts here
    Kernel run = nullptr;
};
// rms_norm -> mul by a row of weights, and add -> rms_norm -> mul (a transformer block's
// residual add and pre-norm), starting at nodes[i].
Fusion find_norm_fusion(std::span<Tensor* const> nodes, size_t i);
// A merged gate/up matrix-vector product and the swiglu of its two halves, starting at
// nodes[i]: the product's rows in gate/up pairs, swiglu written by the same kernel.
Fusion find_glu_fusion(std::span<Tensor* const> nodes, size_t i);
// A rope and the two set_rows behind it (a step's rope over q and k, then the cache writes
// of k and v), starting at nodes[i]; the run reads its nodes from ComputeCtx::fused.
Fusion find_rope_fusion(std::span<Tensor* const> nodes, size_t i);
// flash_attn_ext and the quantized matrix-vector product reading its output, starting at
// nodes[i]: the attention also writes the product's int8 columns.
Fusion find_attention_fusion(std::span<Tensor* const> nodes, size_t i);

// The matrix-vector product with quantized weights (quant_matmul.h) computes this mul_mat:
// a of a block type, at most kQuantMatvecMaxColumns columns of f32 b.
bool takes_quant_matvec(const Tensor* mul_mat);
// Computes a mul_mat node (and the fused swiglu `glu` behind it, else null). Where b's
// columns were already written in their int8 form (quant_matmul.h) at `quantized_b`, the
// quantized matrix-vector product reads them there instead of rounding b itself.
void compute_mul_mat(const ComputeCtx& ctx, Tensor* dst, const Tensor* glu,
                     const void* quantized_b = nullptr);

// Two quantized matrix-vector products on the same b (first, then second, as the graph has
// them) in one launch (quant_matvec_pair), from b's int8 columns at quantized_b.
// takes_matvec_pair: whether the pair has such a launch.
bool takes_matvec_pair(const Tensor* first, const Tensor* second);
void compute_mul_mat_pair(const ComputeCtx& ctx, Tensor* first, Tensor* second, const void* quantized_b);

// A kernel that does nothing in the place of a launch GFA_CUDA_SKIP_OPS leaves out.
void launch_in_place_of(const ComputeCtx& ctx);

void register_movement_kernels(KernelTable& t);
void register_elementwise_kernels(KernelTable& t);
void register_reduce_kernels(KernelTable& t);
void register_matmul_kernels(KernelTable& t);
void register_norm_kernels(KernelTable& t);
void register_activation_kernels(KernelTable& t);
void register_training_kernels(KernelTable& t);
void register_attention_kernels(KernelTable& t);
void register_moe_kernels(KernelTable& t);
void register_sample_kernels(KernelTable& t);

// Shared launchers (kernels_reduce.cu): *out = factor * sum of n contiguous floats, in one
// block, deterministic.
void launch_sum_to_scalar(const ComputeCtx& ctx, const float* values, int64_t n, float factor, float* out);

// ---- tensors as kernels see them ----------------------------------------------------------

// A strided 4-d view: kernels take it by value. Strides are in bytes.
struct TensorView {
    char* data;
    int32_t type; // gfa::Type as an integer
    int64_t ne[4];
    int64_t nb[4];
};

// ---- weights laid out for the GPU ------------------------------------------------------------
//
// Weights in a weights buffer (BufferUsage::Weights) whose format has one f16 scale per block
// (q8_0, q4_0, q5_0, iq4_nl, q6_K: quant::scales_last_block) are kept with each row's scales last
// (quant::rows_to_scales_last): the file's 34-, 18-, 22- or 210-byte blocks allow no load
// wider than 2 bytes, the blocks' other bytes alone are 16-byte aligned (q5_0's 4-byte), so
// the matrix-vector product reads them with a quarter of the load instructions or fewer (q5_0:
// about half). The buffer's set and
// get translate. Kernels see such a tensor with the type id scales_last_id(type) in its
// TensorView; only the kernels that read weights know it (the matrix-vector product, the
// dequantization in front of cuBLAS, get_rows, mul_mat_id), and the supports predicate sends
// every other reader to a backend that reads it through get.
inline constexpr int kScalesLastIds = 256; // beyond every gfa::Type value
constexpr int scales_last_id(int type) {
    return kScalesLastIds + type;
}
constexpr bool is_scales_last_id(int id) {
    return id >= kScalesLastIds;
}
// The block format of a TensorView's type id, in either layout.
constexpr int block_type_of(int id) {
    return id >= kScalesLastIds ? id - kScalesLastIds : id;
}
inline constexpr int kQ8_0ScalesLast = scales_last_id(int(Type::Q8_0));
inline constexpr int kQ4_0ScalesLast = scales_last_id(int(Type::Q4_0));
inline constexpr int kQ5_0ScalesLast = scales_last_id(int(Type::Q5_0));
inline constexpr int kIQ4_NLScalesLast = scales_last_id(int(Type::IQ4_NL));
inline constexpr int kQ6_KScalesLast = scales_last_id(int(Type::Q6_K));

inline const Tensor* memory_owner(const Tensor* t) {
    return t->view_src ? t->view_src : t;
}
// t's bytes on the device are in the scales-last layout.
inline bool has_scales_last(const Tensor* t) {
    const Tensor* owner = memory_owner(t);
    return quant::scales_last_block(owner->type) != nullptr && owner->buffer &&
           owner->buffer->usage() == BufferUsage::Weights;
}
// ... and t is whole rows of its owner at the owner's row stride, so that kernels find each
// row's scales where the layout puts them.
inline bool scales_last_readable(const Tensor* t) {
    const Tensor* owner = memory_owner(t);
    const size_t row = owner->nb[1];
    return t->type == owner->type && t->ne[0] == owner->ne[0] && t->nb[0] == owner->nb[0] &&
           t->view_offs % row == 0 && t->nb[1] % row == 0 && t->nb[2] % row == 0 && t->nb[3] % row == 0;
}

inline TensorView view_of(const Tensor* t) {
    TensorView v{};
    v.data = static_cast<char*>(t->data);
    v.type = int32_t(t->type);
    if (has_scales_last(t)) {
        if (!scales_last_readable(t))
            fail("CUDA: " + t->name + " " + t->shape_str() + " views part of the rows of a " +
                 std::string(type_name(t->type)) + " weight, which the GPU keeps with the scales last");
        v.type = scales_last_id(int(t->type));
    }
    for (int i = 0; i < 4; ++i) {
        v.ne[i] = t->ne[i];
        v.nb[i] = int64_t(t->nb[i]);
    }
    return v;
}

// A tensor (or the source of a view) that no kernel writes while graphs run: kernels
// launched early (early_launch.cuh) may read it before they wait for the kernel in front.
inline bool is_constant(const Tensor* t) {
    for (; t; t = t->view_src)
        if (t->has_flag(kFlagConstant)) return true;
    return false;
}

// Host-side layout checks used by the supports predicates.
inline bool row_is_packed(const Tensor* t) {
    return t->ne[0] == 1 || t->nb[0] == t->element_size();
}
inline bool is_float_type(Type t) {
    return t == Type::F32 || t == Type::F16 || t == Type::BF16;
}

// Blocks for a launch of n threads in blocks of `threads`, capped for grid-stride loops.
inline unsigned grid_for(int64_t n, int threads) {
    const int64_t blocks = (n + threads - 1) / threads;
    return unsigned(blocks < 1 ? 1 : (blocks > (1 << 20) ? (1 << 20) : blocks));
}

} // namespace gfa::cuda
