// Tensors and contexts.
//
// A tensor is metadata (type, up to 4 dims `ne`, byte strides `nb`, the op that makes it,
// its sources, an optional view link) plus a data pointer into a backend buffer. A context
// owns tensor metadata; it owns data too when created with `alloc_data`, which is the easy
// way to run small graphs on the CPU. Graph contexts usually hold metadata only, and the
// graph allocator places the data.
#pragma once

#include <ggml-fa/error.h>
#include <ggml-fa/types.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace gfa {

inline constexpr int kMaxDims = 4;
inline constexpr int kMaxSrc = 8;
inline constexpr size_t kMaxParamBytes = 64;

class Buffer;

// Every operation a graph node can have. Semantics, shape rules, validation and gradients
// are defined once per op in src/ops/; backends register kernels for the ops they support.
enum class Op : uint16_t {
    None, // a leaf: data set by the user or loaded from a file
    // data movement and views
    Fill,
    Cpy,
    Cont,
    Reshape,
    View,
    Permute,
    Transpose,
    GetRows,
    GetRowsBack,
    SetRows,
    Concat,
    Repeat,
    RepeatBack,
    // element-wise arithmetic (row broadcasting) and unary math
    Add,
    Sub,
    Mul,
    Div,
    Scale,
    Sqr,
    Sqrt,
    Exp,
    Log,
    Neg,
    Tanh,
    // reductions
    Sum,
    SumRows,
    Mean,
    TopK,
    SampleToken,
    // matrix products
    MulMat,
    MulMatId,
    OutProd,
    // normalization, position encoding, softmax
    Norm,
    NormBack,
    RmsNorm,
    RmsNormBack,
    Rope,
    RopeBack,
    SoftMax,
    SoftMaxBack,
    DiagMaskInf,
    // activations
    Silu,
    SiluBack,
    Gelu,
    GeluBack,
    Relu,
    Step,
    Swiglu,
    // losses and optimizers
    CrossEntropyLoss,
    CrossEntropyLossBack,
    AdamW,
    // attention
    FlashAttnExt,
    FlashAttnBack,
    Count
};

const char* op_name(Op op);

enum TensorFlag : uint32_t {
    kFlagInput = 1u << 0,  // data provided by the user before compute
    kFlagOutput = 1u << 1, // read by the user after compute: never overwritten by the allocator
    kFlagParam = 1u << 2,  // trainable: autodiff computes its gradient
    kFlagLoss = 1u << 3,   // the scalar the backward pass differentiates
    // Never written while graphs run (a loaded model's weights): a backend may read it
    // before the kernels in front of its reader have finished.
    kFlagConstant = 1u << 4,
};

struct Tensor {
    Type type = Type::F32;
    std::array<int64_t, kMaxDims> ne{1, 1, 1, 1}; // elements per dim (dim 0 is contiguous)
    std::array<size_t, kMaxDims> nb{0, 0, 0, 0};  // byte stride per dim

    Op op = Op::None;
    std::array<Tensor*, kMaxSrc> src{};
    alignas(8) std::array<std::byte, kMaxParamBytes> params_storage{};

    Tensor* view_src = nullptr; // a view shares memory with view_src at view_offs
    size_t view_offs = 0;
    size_t extra_bytes = 0; // secondary outputs stored after the main one (see flash_attn_ext)

    void* data = nullptr;
    Buffer* buffer = nullptr;
    uint32_t flags = 0;
    std::string name;

    // ---- shape helpers
    int64_t nelements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
    int64_t nrows() const { return ne[1] * ne[2] * ne[3]; }
    int n_dims() const; // 1 + index of the last dim > 1
    size_t element_size() const { return type_traits(type).type_size; }
    size_t nbytes() const; // bytes spanned by the strided elements
    size_t alloc_bytes() const { return nbytes() + extra_bytes; }
    bool is_contiguous() const; // rows packed with no gaps, dims in order
    bool is_view() const { return view_src != nullptr; }
    bool has_flag(TensorFlag f) const { return (flags & f) != 0; }
    std::string shape_str() const; // e.g. "f32[64,17,3,1]"

    // ---- typed op parameters (each op defines its own struct)
    template <class P> void set_params(const P& p) {
        static_assert(std::is_trivially_copyable_v<P> && sizeof(P) <= kMaxParamBytes);
        std::memcpy(params_storage.data(), &p, sizeof(P));
    }
    template <class P> P params() const {
        static_assert(std::is_trivially_copyable_v<P> && sizeof(P) <= kMaxParamBytes);
        P p;
        std::memcpy(&p, params_storage.data(), sizeof(P));
        return p;
    }
};

bool same_shape(const Tensor* a, const Tensor* b);
// b can be broadcast to a by repeating it along each dim (ne[i] divides a's ne[i])
bool can_repeat(const Tensor* b, const Tensor* a);

// Contiguous byte strides for a shape.
std::array<size_t, kMaxDims> contiguous_strides(Type type, const std::array<int64_t, kMaxDims>& ne);

struct ContextParams {
    bool alloc_data = false; // true: every new non-view tensor gets zeroed host memory
};

class Context {
  public:
    explicit Context(ContextParams params = {});
    ~Context();
    Context(const Context&) = delete;
    Context& operator=(const Context&) = delete;

    // A new leaf tensor (no op). ne beyond the given dims is 1.
    Tensor* new_tensor(Type type, std::initializer_list<int64_t> ne);
    Tensor* new_tensor(Type type, const std::array<int64_t, kMaxDims>& ne);
    // A new tensor with a's type and shape (a leaf).
    Tensor* dup_tensor(const Tensor* a);
    // Internal: a node with the given shape, produced by an op (used by op builders).
    Tensor* new_node(Op op, Type type, const std::array<int64_t, kMaxDims>& ne);
    // Internal: a node with `extra` bytes of secondary outputs after its main data.
    Tensor* new_node_with_extra(Op op, Type type, const std::array<int64_t, kMaxDims>& ne, size_t extra);
    // Internal: a view of a (op View unless given), sharing its memory.
    Tensor* new_view(Tensor* a, Type type, const std::array<int64_t, kMaxDims>& ne,
                     const std::array<size_t, kMaxDims>& nb, size_t offset, Op op = Op::View);

    bool alloc_data() const { return params_.alloc_data; }
    size_t n_tensors() const { return tensors_.size(); }
    // Every tensor of the context, in creation order.
    std::vector<Tensor*> tensors();

  private:
    Tensor* allocate(Tensor t);
    ContextParams params_;
    std::deque<Tensor> tensors_;
    std::vector<std::unique_ptr<Buffer>> host_buffers_;
};

// ---- data access (any backend: goes through the tensor's buffer) ------------------------

void tensor_set(Tensor* t, const void* data, size_t offset, size_t size);
void tensor_get(const Tensor* t, void* data, size_t offset, size_t size);
// Whole-tensor float access with conversion from/to the tensor's type (contiguous tensors).
void tensor_set_f32(Tensor* t, const std::vector<float>& values);
std::vector<float> tensor_get_f32(const Tensor* t);

} // namespace gfa
