// The Vulkan kernels of every op besides attention and the matrix products: element-wise
// math and activations, copies between types, fill / repeat / concat / diag_mask, get_rows /
// set_rows, the normalizations, softmax, sums and rope, the backward ops of all of these,
// top_k (a mixture's router), the cross-entropy loss and AdamW. Each op is a shader op code
// plus the tensors it binds; the semantics are the op's definition in src/ops/, and tests
// compare every kernel with the double-precision reference.
#include "vk_ops.h"

#include "op_def.h"

#include <ggml-fa/ops.h>

#include <bit>
#include <cmath>
#include <limits>
#include <vector>

namespace gfa::vulkan {

// ---- binding tensors ---------------------------------------------------------------------

namespace {

bool readable_type(Type t) {
    switch (t) {
    case Type::F32:
    case Type::F16:
    case Type::BF16:
    case Type::I32:
    case Type::I64:
    case Type::Q4_0:
    case Type::Q4_1:
    case Type::Q5_0:
    case Type::Q5_1:
    case Type::Q8_0:
    case Type::Q4_K:
    case Type::Q5_K:
    case Type::Q6_K:
    case Type::Q2_K:
    case Type::Q3_K:
    case Type::IQ4_NL:
    case Type::IQ4_XS:
        return true;
    default:
        return false;
    }
}

// The alignment the shaders' word reads need of an element's (or a block row's) bytes.
size_t needed_alignment(Type t) {
    return t == Type::F32 || t == Type::I32 || t == Type::I64 ? 4 : 2;
}

} // namespace

bool bindable(const Context& ctx, const Tensor* t) {
    if (!readable_type(t->type)) return false;
    const uint64_t limit = ctx.limits().maxStorageBufferRange;
    // The binding starts up to one offset alignment before the tensor.
    if (uint64_t(t->nbytes()) + ctx.limits().minStorageBufferOffsetAlignment + 4 > limit) return false;
    const bool blocks = type_traits(t->type).block_size > 1;
    for (int d = 0; d < kMaxDims; ++d) {
        if (uint64_t(t->ne[d]) > std::numeric_limits<uint32_t>::max() || t->nb[d] > limit) return false;
        if (t->ne[d] > 1 && !(blocks && d == 0) && t->nb[d] % needed_alignment(t->type) != 0) return false;
    }
    return uint64_t(t->nelements()) <= std::numeric_limits<uint32_t>::max();
}

void bind_tensor(const Recorder& rec, OpDispatch& d, int slot, const Tensor* t, const char* what) {
    const Located l = rec.locate(t->data, t->nbytes(), what);
    if (l.first_byte % needed_alignment(t->type) != 0)
        throw Error(rec.context().name() + ": " + what + " (" + t->shape_str() +
                    ") starts at a byte offset that is not a multiple of " +
                    std::to_string(needed_alignment(t->type)));
    TensorDesc desc;
    for (int i = 0; i < kMaxDims; ++i) {
        desc.ne[i] = uint32_t(t->ne[i]);
        desc.nb[i] = uint32_t(t->nb[i]);
    }
    desc.off = uint32_t(l.first_byte);
    desc.type = uint32_t(t->type);
    TensorDesc* slots[] = {&d.params.src0, &d.params.src1, &d.params.src2, &d.params.dst};
    *slots[slot] = desc;
    d.buffers[size_t(slot)] = l.binding;
}

uint32_t capped_groups(uint64_t items, uint32_t per_group) {
    constexpr uint64_t kMaxGroups = 65535; // every device allows this many in x
    return uint32_t(std::clamp<uint64_t>((items + per_group - 1) / per_group, 1, kMaxGroups));
}

void dispatch_op(Recorder& rec, const char* shader, OpDispatch& d, uint32_t gx, uint32_t gy, uint32_t gz) {
    d.buffers[kStatusSlot] = rec.status();
    const Pipeline& p = rec.context().pipeline(shader, {}, kOpBindings, 0);
    rec.dispatch(p, &d.params, sizeof d.params, d.buffers, gx, gy, gz);
}

namespace {

bool all_bindable(const Context& ctx, const Tensor* node) {
    if (!bindable(ctx, node)) return false;
    for (const Tensor* s : node->src)
        if (s && !bindable(ctx, s)) return false;
    return true;
}

// ---- element-wise ------------------------------------------------------------------------

// Op codes of shaders/elementwise.comp.
enum ElementwiseOp : uint32_t {
    kCopy,
    kScale,
    kSqr,
    kSqrt,
    kExp,
    kLog,
    kNeg,
    kSilu,
    kGeluTanh,
    kGeluErf,
    kRelu,
    kStep,
    kTanh,
    kAdd,
    kSub,
    kMul,
    kDiv,
    kSwiglu,
    kSiluBack,
    kGeluTanhBack,
    kGeluErfBack,
    kFill,
    kRepeat,
    kRepeatBack,
    kConcat,
    kDiagMask,
};

uint32_t elementwise_code(const Tensor* node) {
    switch (node->op) {
    case Op::Cpy:
    case Op::Cont:
        return kCopy;
    case Op::Scale:
        return kScale;
    case Op::Sqr:
        return kSqr;
    case Op::Sqrt:
        return kSqrt;
    case Op::Exp:
        return kExp;
    case Op::Log:
        return kLog;
    case Op::Neg:
        return kNeg;
    case Op::Tanh:
        return kTanh;
    case Op::Silu:
        return kSilu;
    case Op::Gelu:
        return node->params<GeluParams>().approx == GeluApprox::Erf ? kGeluErf : kGeluTanh;
    case Op::Relu:
        return kRelu;
    case Op::Step:
        return kStep;
    case Op::Add:
        return kAdd;
    case Op::Sub:
        return kSub;
    case Op::Mul:
        return kMul;
    case Op::Div:
        return kDiv;
    case Op::Swiglu:
        return kSwiglu;
    case Op::SiluBack:
        return kSiluBack;
    case Op::Fill:
        return kFill;
    case Op::Repeat:
        return kRepeat;
    case Op::RepeatBack:
        return kRepeatBack;
    case Op::Concat:
        return kConcat;
    case Op::DiagMaskInf:
        return kDiagMask;
    default: // Op::GeluBack
        return node->params<GeluParams>().approx == GeluApprox::Erf ? kGeluErfBack : kGeluTanhBack;
    }
}

bool is_binary(uint32_t code) {
    return (code >= kAdd && code < kFill) || code == kConcat;
}

bool supports_elementwise(const Context& ctx, const Tensor* node) {
    return node->type == Type::F32 && all_bindable(ctx, node);
}

bool supports_fill(const Context& ctx, const Tensor* node) {
    const Type t = node->type;
    return (t == Type::F32 || t == Type::F16 || t == Type::BF16) && bindable(ctx, node);
}

// cpy / cont / cast: any readable type to f32, f16 or bf16; i32 to i32; float types to q8_0
// in the same shape (encoded block by block).
bool supports_copy(const Context& ctx, const Tensor* node) {
    const Type from = node->src[0]->type, to = node->type;
    if (to == Type::Q8_0)
        return (from == Type::F32 || from == Type::F16 || from == Type::BF16) &&
               node->src[0]->ne == node->ne && all_bindable(ctx, node);
    const bool to_float = to == Type::F32 || to == Type::F16 || to == Type::BF16;
    const bool ok = to == Type::I32 ? from == Type::I32 : to_float && from != Type::I32 && from != Type::I64;
    return ok && all_bindable(ctx, node);
}

void record_encode_q8_0(Recorder& rec, const Tensor* node);

void record_elementwise(Recorder& rec, const Tensor* node) {
    if (node->type == Type::Q8_0) return record_encode_q8_0(rec, node);
    OpDispatch d;
    d.params.op = elementwise_code(node);
    d.params.n = uint32_t(node->nelements());
    if (node->op != Op::Fill) bind_tensor(rec, d, 0, node->src[0], "the first input");
    if (is_binary(d.params.op)) bind_tensor(rec, d, 1, node->src[1], "the second input");
    bind_tensor(rec, d, 3, node, "the result");
    switch (node->op) {
    case Op::Scale: {
        const ScaleParams p = node->params<ScaleParams>();
        d.params.farg[0] = p.scale;
        d.params.farg[1] = p.bias;
        break;
    }
    case Op::Fill:
        d.params.farg[0] = node->params<FillParams>().value;
        break;
    case Op::Concat:
        d.params.iarg[0] = uint32_t(node->params<ConcatParams>().dim);
        break;
    case Op::DiagMaskInf: {
        const DiagMaskNodeParams p = node->params<DiagMaskNodeParams>();
        d.params.iarg[0] = uint32_t(p.n_past);
        d.params.farg[0] = p.fill;
        break;
    }
    default:
        break;
    }
    dispatch_op(rec, "elementwise", d, capped_groups(d.params.n, 256));
}

// ---- rows: normalizations, softmax, sums -------------------------------------------------

enum RowOp : uint32_t {
    kNorm,
    kRmsNorm,
    kSoftMax,
    kSumRows,
    kMean,
    kSum,
    kNormBack,
    kRmsNormBack,
    kSoftMaxBack,
    kCrossEntropy,
    kCrossEntropyBack
};

bool supports_rows(const Context& ctx, const Tensor* node) {
    if (node->op == Op::SoftMax && node->src[1]) {
        const Type m = node->src[1]->type;
        if (m != Type::F32 && m != Type::F16) return false;
    }
    if (node->op == Op::CrossEntropyLossBack) {
        const Type l = node->src[2]->type;
        if (node->src[1]->type != Type::F32 || (l != Type::F32 && l != Type::I32)) return false;
    }
    return node->type == Type::F32 && all_bindable(ctx, node);
}

// The loss: f32 logits, f32 labels or i32 classes.
bool supports_cross_entropy(const Context& ctx, const Tensor* node) {
    const Type l = node->src[1]->type;
    return node->src[0]->type == Type::F32 && (l == Type::F32 || l == Type::I32) && node->type == Type::F32 &&
           all_bindable(ctx, node);
}

void record_rows(Recorder& rec, const Tensor* node) {
    OpDispatch d;
    const Tensor* a = node->src[0];
    bind_tensor(rec, d, 0, a, "the input");
    bind_tensor(rec, d, 3, node, "the result");
    switch (node->op) {
    case Op::Norm:
    case Op::RmsNorm:
        d.params.op = node->op == Op::Norm ? kNorm : kRmsNorm;
        d.params.farg[0] = node->params<NormParams>().eps;
        break;
    case Op::SoftMax: {
        const SoftMaxParams p = node->params<SoftMaxParams>();
        d.params.op = kSoftMax;
        d.params.farg[0] = p.scale;
        if (const Tensor* mask = node->src[1]) {
            bind_tensor(rec, d, 1, mask, "the mask");
            d.params.iarg[2] = 1;
        }
        if (p.max_bias > 0.0f) { // per-head slopes, exactly as the CPU computes them
            std::vector<float> slopes(size_t(a->ne[2]));
            for (size_t h = 0; h < slopes.size(); ++h)
                slopes[h] = attn::alibi_slope(p.max_bias, int64_t(h), a->ne[2]);
            d.buffers[kTableSlot] = rec.constants(slopes.data(), slopes.size() * sizeof(float));
            d.params.iarg[1] = 1;
        }
        break;
    }
    case Op::NormBack:
    case Op::RmsNormBack:
        d.params.op = node->op == Op::NormBack ? kNormBack : kRmsNormBack;
        d.params.farg[0] = node->params<NormParams>().eps;
        bind_tensor(rec, d, 1, node->src[1], "the forward's input");
        break;
    case Op::SoftMaxBack:
        d.params.op = kSoftMaxBack;
        d.params.farg[0] = node->params<SoftMaxParams>().scale;
        bind_tensor(rec, d, 1, node->src[1], "the forward's output");
        break;
    case Op::CrossEntropyLossBack:
        d.params.op = kCrossEntropyBack;
        bind_tensor(rec, d, 1, node->src[1], "the logits");
        bind_tensor(rec, d, 2, node->src[2], "the labels");
        break;
    default:
        d.params.op = node->op == Op::Mean ? kMean : kSumRows;
        break;
    }
    const int64_t rows = node->ne[1] * node->ne[2] * node->ne[3];
    dispatch_op(rec, "rows", d, capped_groups(uint64_t(rows), 1));
}

// sum and the cross-entropy loss: the whole input in one workgroup.
void record_total(Recorder& rec, const Tensor* node) {
    OpDispatch d;
    bind_tensor(rec, d, 3, node, "the result");
    if (node->op == Op::Sum) {
        d.params.op = kSum;
        d.params.n = uint32_t(node->src[0]->nelements());
        bind_tensor(rec, d, 0, node->src[0], "the input");
    } else {
        d.params.op = kCrossEntropy;
        bind_tensor(rec, d, 1, node->src[0], "the logits");
        bind_tensor(rec, d, 2, node->src[1], "the labels");
    }
    dispatch_op(rec, "rows", d, 1);
}

// top_k: f32 rows, i32 positions; a workgroup per row, rows walked grid-stride.
bool supports_top_k(const Context& ctx, const Tensor* node) {
    return node->src[0]->type == Type::F32 && node->type == Type::I32 && all_bindable(ctx, node);
}

void record_top_k(Recorder& rec, const Tensor* node) {
    OpDispatch d;
    bind_tensor(rec, d, 0, node->src[0], "the input");
    bind_tensor(rec, d, 3, node, "the result");
    const int64_t rows = node->ne[1] * node->ne[2] * node->ne[3];
    dispatch_op(rec, "top_k", d, capped_groups(uint64_t(rows), 1));
}

// ---- rope ------------------------------------------------------------------------------------

bool supports_rope(const Context& ctx, const Tensor* node) {
    return ctx.has_float64() && all_bindable(ctx, node);
}

void record_rope(Recorder& rec, const Tensor* node) {
    const RopeParams p = node->params<RopeParams>();
    OpDispatch d;
    bind_tensor(rec, d, 0, node->src[0], "the input");
    bind_tensor(rec, d, 1, node->src[1], "the positions");
    bind_tensor(rec, d, 3, node, "the result");
    // The frequencies in double, as the CPU forms them.
    std::vector<double> inv_freq(size_t(p.n_dims / 2));
    for (size_t i = 0; i < inv_freq.size(); ++i)
        inv_freq[i] = double(p.freq_scale) * std::pow(double(p.freq_base), -2.0 * double(i) / p.n_dims);
    d.buffers[kTableSlot] = rec.constants(inv_freq.data(), inv_freq.size() * sizeof(double));
    if (const Tensor* factors = node->src[2]) { // Llama 3.1 style divisors of the angles
        bind_tensor(rec, d, 2, factors, "the frequency factors");
        d.params.iarg[2] = 1;
    }
    d.params.iarg[0] = uint32_t(p.n_dims);
    d.params.iarg[1] = p.mode == RopeMode::NeoX;
    d.params.farg[0] = node->op == Op::RopeBack ? -1.0f : 1.0f;
    d.params.n = uint32_t(node->nelements());
    dispatch_op(rec, "rope", d, capped_groups(d.params.n, 256));
}

// ---- get_rows / set_rows -----------------------------------------------------------------

enum GetSetOp : uint32_t { kGetRows, kSetRows, kGetRowsBack, kEncodeQ8_0 };

bool supports_get_rows(const Context& ctx, const Tensor* node) {
    return all_bindable(ctx, node);
}

// Rows of f32, f16, bf16 or q8_0 (the cache types a session offers).
bool supports_set_rows(const Context& ctx, const Tensor* node) {
    const Type t = node->type;
    return (t == Type::F32 || t == Type::F16 || t == Type::BF16 || t == Type::Q8_0) &&
           all_bindable(ctx, node);
}

void record_encode_q8_0(Recorder& rec, const Tensor* node) {
    OpDispatch d;
    d.params.op = kEncodeQ8_0;
    d.params.n = uint32_t(node->nelements() / QK8_0);
    bind_tensor(rec, d, 1, node->src[0], "the input");
    bind_tensor(rec, d, 3, node, "the result");
    dispatch_op(rec, "get_set_rows", d, capped_groups(d.params.n, 256));
}

bool supports_get_rows_back(const Context& ctx, const Tensor* node) {
    return node->src[0]->type == Type::F32 && node->src[1]->type == Type::I32 && all_bindable(ctx, node);
}

void record_get_rows_back(Recorder& rec, const Tensor* node) {
    OpDispatch d;
    d.params.op = kGetRowsBack;
    d.params.n = uint32_t(node->nelements());
    bind_tensor(rec, d, 0, node->src[0], "the gradient");
    bind_tensor(rec, d, 1, node->src[1], "the row indices");
    bind_tensor(rec, d, 3, node, "the result");
    dispatch_op(rec, "get_set_rows", d, capped_groups(d.params.n, 256));
}

// ---- AdamW -------------------------------------------------------------------------------

void record_adamw(Recorder& rec, const Tensor* node) {
    OpDispatch d;
    d.params.n = uint32_t(node->nelements());
    bind_tensor(rec, d, 0, node->src[1], "the gradient");
    bind_tensor(rec, d, 1, node->src[2], "the first moment");
    bind_tensor(rec, d, 2, node->src[3], "the second moment");
    bind_tensor(rec, d, 3, node, "the parameter");
    // The step's values (adamw_values) stay in device memory, bound as the table; the
    // gradient norm grad_clip bounds, in the extra slot.
    const Tensor* values = node->src[4];
    const Located at = rec.locate(values->data, values->nbytes(), "the AdamW values");
    d.buffers[kTableSlot] = at.binding;
    d.params.iarg[0] = uint32_t(at.first_byte / sizeof(float));
    if (const Tensor* norm_sq = node->src[5]) {
        const Located n = rec.locate(norm_sq->data, norm_sq->nbytes(), "the gradient norm");
        d.buffers[kExtraSlot] = n.binding;
        d.params.iarg[1] = uint32_t(n.first_byte / sizeof(float));
        d.params.iarg[2] = 1;
    }
    dispatch_op(rec, "adamw", d, capped_groups(d.params.n, 256));
}

// Every tensor the step reads or writes is f32 (the builder checks).
bool supports_all_f32(const Context& ctx, const Tensor* node) {
    for (const Tensor* s : node->src)
        if (s && s->type != Type::F32) return false;
    return node->type == Type::F32 && all_bindable(ctx, node);
}

void record_get_rows(Recorder& rec, const Tensor* node) {
    OpDispatch d;
    d.params.op = kGetRows;
    d.params.n = uint32_t(node->nelements());
    bind_tensor(rec, d, 0, node->src[0], "the table");
    bind_tensor(rec, d, 1, node->src[1], "the row indices");
    bind_tensor(rec, d, 3, node, "the result");
    dispatch_op(rec, "get_set_rows", d, capped_groups(d.params.n, 256));
}

void record_set_rows(Recorder& rec, const Tensor* node) {
    OpDispatch d;
    d.params.op = kSetRows;
    // One invocation per element, or per block of 32 when encoding q8_0.
    d.params.n = uint32_t(node->src[1]->nelements() / type_traits(node->type).block_size);
    bind_tensor(rec, d, 1, node->src[1], "the new rows");
    bind_tensor(rec, d, 2, node->src[2], "the row indices");
    bind_tensor(rec, d, 3, node, "the destination");
    dispatch_op(rec, "get_set_rows", d, capped_groups(d.params.n, 256));
}

} // namespace

void register_elementwise_kernels(std::map<Op, Kernel>& table) {
    for (Op op : {Op::Add, Op::Sub, Op::Mul, Op::Div, Op::Scale, Op::Sqr, Op::Sqrt, Op::Exp, Op::Log, Op::Neg,
                  Op::Tanh, Op::Silu, Op::Gelu, Op::Relu, Op::Step, Op::Swiglu, Op::SiluBack, Op::GeluBack})
        table[op] = {supports_elementwise, record_elementwise};
    for (Op op : {Op::Repeat, Op::RepeatBack, Op::Concat, Op::DiagMaskInf})
        table[op] = {supports_elementwise, record_elementwise};
    table[Op::Fill] = {supports_fill, record_elementwise};
    table[Op::Cpy] = {supports_copy, record_elementwise};
    table[Op::Cont] = {supports_copy, record_elementwise};
    table[Op::GetRows] = {supports_get_rows, record_get_rows};
    table[Op::SetRows] = {supports_set_rows, record_set_rows};
    table[Op::GetRowsBack] = {supports_get_rows_back, record_get_rows_back};
    table[Op::AdamW] = {supports_all_f32, record_adamw};
}

void register_row_kernels(std::map<Op, Kernel>& table) {
    for (Op op : {Op::Norm, Op::RmsNorm, Op::SoftMax, Op::SumRows, Op::Mean, Op::NormBack, Op::RmsNormBack,
                  Op::SoftMaxBack, Op::CrossEntropyLossBack})
        table[op] = {supports_rows, record_rows};
    table[Op::Sum] = {supports_all_f32, record_total};
    table[Op::CrossEntropyLoss] = {supports_cross_entropy, record_total};
    table[Op::TopK] = {supports_top_k, record_top_k};
    table[Op::Rope] = {supports_rope, record_rope};
    table[Op::RopeBack] = {supports_rope, record_rope};
}

} // namespace gfa::vulkan
