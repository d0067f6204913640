#include <ggml-fa/backend.h>
#include <ggml-fa/ops.h>
#include <ggml-fa/tensor.h>

#include "op_def.h"

#include <algorithm>

namespace gfa {

int Tensor::n_dims() const {
    for (int i = kMaxDims - 1; i > 0; --i)
        if (ne[i] > 1) return i + 1;
    return 1;
}

size_t Tensor::nbytes() const {
    if (nelements() == 0) return 0;
    const TypeTraits& tt = type_traits(type);
    if (tt.block_size == 1) {
        // One element plus the stride distance to the last element along every dim, so
        // transposed and permuted views (nb[0] > element size) are measured correctly.
        size_t bytes = tt.type_size;
        for (int i = 0; i < kMaxDims; ++i) bytes += size_t(ne[i] - 1) * nb[i];
        return bytes;
    }
    // Quantized rows are stored whole: the first row plus the distance to the last row.
    size_t bytes = size_t(ne[0] / tt.block_size) * tt.type_size;
    for (int i = 1; i < kMaxDims; ++i) bytes += size_t(ne[i] - 1) * nb[i];
    return bytes;
}

bool Tensor::is_contiguous() const {
    const auto expect = contiguous_strides(type, ne);
    for (int i = 0; i < kMaxDims; ++i)
        if (ne[i] > 1 && nb[i] != expect[i]) return false;
    return true;
}

std::string Tensor::shape_str() const {
    std::string s(type_name(type));
    s += "[";
    for (int i = 0; i < kMaxDims; ++i) s += std::to_string(ne[i]) + (i + 1 < kMaxDims ? "," : "]");
    return s;
}

bool same_shape(const Tensor* a, const Tensor* b) {
    return a->ne == b->ne;
}

bool can_repeat(const Tensor* b, const Tensor* a) {
    for (int i = 0; i < kMaxDims; ++i)
        if (b->ne[i] == 0 || a->ne[i] % b->ne[i] != 0) return false;
    return true;
}

std::array<size_t, kMaxDims> contiguous_strides(Type type, const std::array<int64_t, kMaxDims>& ne) {
    const TypeTraits& tt = type_traits(type);
    std::array<size_t, kMaxDims> nb{};
    nb[0] = tt.type_size;
    nb[1] = size_t(ne[0] / tt.block_size) * tt.type_size;
    for (int i = 2; i < kMaxDims; ++i) nb[i] = nb[i - 1] * size_t(ne[i - 1]);
    return nb;
}

// ---- Context -------------------------------------------------------------------------

Context::Context(ContextParams params) : params_(params) {}
Context::~Context() = default;

Tensor* Context::allocate(Tensor t) {
    tensors_.push_back(std::move(t));
    Tensor* out = &tensors_.back();
    if (params_.alloc_data && !out->view_src && out->alloc_bytes() > 0) {
        host_buffers_.push_back(cpu_device().buffer_type()->allocate(out->alloc_bytes()));
        host_buffers_.back()->place(out, 0);
    }
    return out;
}

Tensor* Context::new_tensor(Type type, std::initializer_list<int64_t> ne) {
    if (ne.size() == 0 || ne.size() > size_t(kMaxDims))
        fail("new_tensor: 1 to 4 dims, got " + std::to_string(ne.size()));
    std::array<int64_t, kMaxDims> full{1, 1, 1, 1};
    std::copy(ne.begin(), ne.end(), full.begin());
    return new_tensor(type, full);
}

Tensor* Context::new_tensor(Type type, const std::array<int64_t, kMaxDims>& ne) {
    return new_node(Op::None, type, ne);
}

Tensor* Context::dup_tensor(const Tensor* a) {
    return new_tensor(a->type, a->ne);
}

Tensor* Context::new_node(Op op, Type type, const std::array<int64_t, kMaxDims>& ne) {
    return new_node_with_extra(op, type, ne, 0);
}

Tensor* Context::new_node_with_extra(Op op, Type type, const std::array<int64_t, kMaxDims>& ne,
                                     size_t extra) {
    const TypeTraits& tt = type_traits(type);
    for (int i = 0; i < kMaxDims; ++i)
        if (ne[i] < 0) fail(std::string(op_name(op)) + ": negative dimension " + std::to_string(ne[i]));
    if (ne[0] % tt.block_size != 0)
        fail(std::string(op_name(op)) + ": dim 0 (" + std::to_string(ne[0]) + ") is not a multiple of the " +
             std::string(tt.name) + " block size " + std::to_string(tt.block_size));
    Tensor t;
    t.type = type;
    t.ne = ne;
    t.nb = contiguous_strides(type, ne);
    t.op = op;
    t.extra_bytes = extra;
    return allocate(std::move(t));
}

Tensor* Context::new_view(Tensor* a, Type type, const std::array<int64_t, kMaxDims>& ne,
                          const std::array<size_t, kMaxDims>& nb, size_t offset, Op op) {
    Tensor t;
    t.type = type;
    t.ne = ne;
    t.nb = nb;
    t.op = op;
    t.src[0] = a;
    // A view of a view points at the memory owner directly.
    t.view_src = a->view_src ? a->view_src : a;
    t.view_offs = (a->view_src ? a->view_offs : 0) + offset;
    if (t.nelements() > 0 && t.view_offs + t.nbytes() > t.view_src->alloc_bytes())
        fail(std::string(op_name(op)) + ": view " + t.shape_str() + " at offset " +
             std::to_string(t.view_offs) + " extends past the end of its source " + t.view_src->shape_str());
    Tensor* out = allocate(std::move(t));
    if (out->view_src->data) place_view(out);
    return out;
}

std::vector<Tensor*> Context::tensors() {
    std::vector<Tensor*> out;
    out.reserve(tensors_.size());
    for (Tensor& t : tensors_) out.push_back(&t);
    return out;
}

// ---- data access -----------------------------------------------------------------------

namespace {
void check_access(const Tensor* t, size_t offset, size_t size, const char* what) {
    if (!t->data || !t->buffer)
        fail(std::string(what) + ": tensor '" + t->name + "' " + t->shape_str() + " has no data");
    if (offset + size > t->alloc_bytes())
        fail(std::string(what) + ": range [" + std::to_string(offset) + ", " + std::to_string(offset + size) +
             ") is outside tensor '" + t->name + "' of " + std::to_string(t->alloc_bytes()) + " bytes");
}
} // namespace

void tensor_set(Tensor* t, const void* data, size_t offset, size_t size) {
    check_access(t, offset, size, "tensor_set");
    t->buffer->set(t, data, offset, size);
}

void tensor_get(const Tensor* t, void* data, size_t offset, size_t size) {
    check_access(t, offset, size, "tensor_get");
    t->buffer->get(t, data, offset, size);
}

void tensor_set_f32(Tensor* t, const std::vector<float>& values) {
    if (int64_t(values.size()) != t->nelements())
        fail("tensor_set_f32: " + std::to_string(values.size()) + " values for " + t->shape_str());
    if (!t->is_contiguous()) fail("tensor_set_f32: tensor " + t->shape_str() + " is not contiguous");
    const TypeTraits& tt = type_traits(t->type);
    if (!tt.from_float) fail("tensor_set_f32: cannot convert float to " + std::string(tt.name));
    std::vector<std::byte> bytes(t->nbytes());
    tt.from_float(values.data(), bytes.data(), t->nelements());
    tensor_set(t, bytes.data(), 0, bytes.size());
}

std::vector<float> tensor_get_f32(const Tensor* t) {
    if (!t->is_contiguous()) fail("tensor_get_f32: tensor " + t->shape_str() + " is not contiguous");
    const TypeTraits& tt = type_traits(t->type);
    std::vector<std::byte> bytes(t->nbytes());
    tensor_get(t, bytes.data(), 0, bytes.size());
    std::vector<float> out(size_t(t->nelements()));
    if (t->type == Type::I32) {
        const int32_t* v = reinterpret_cast<const int32_t*>(bytes.data());
        for (size_t i = 0; i < out.size(); ++i) out[i] = float(v[i]);
        return out;
    }
    if (!tt.to_float) fail("tensor_get_f32: cannot convert " + std::string(tt.name) + " to float");
    tt.to_float(bytes.data(), out.data(), t->nelements());
    return out;
}

void Buffer::place(Tensor* t, size_t offset) {
    if (t->view_src) fail("Buffer::place: '" + t->name + "' is a view; place its source instead");
    if (offset + t->alloc_bytes() > size_)
        fail("Buffer::place: tensor " + t->shape_str() + " at offset " + std::to_string(offset) +
             " does not fit in a buffer of " + std::to_string(size_) + " bytes");
    t->data = static_cast<char*>(base_) + offset;
    t->buffer = this;
}

void place_view(Tensor* view) {
    Tensor* owner = view->view_src;
    if (!owner || !owner->data) fail("place_view: the source of view '" + view->name + "' has no data");
    view->data = static_cast<char*>(owner->data) + view->view_offs;
    view->buffer = owner->buffer;
}

// The queued transfers of a backend that keeps no queue of its own: wait, then transfer.
void Backend::write_async(Tensor* t, const void* src, size_t offset, size_t size) {
    synchronize();
    tensor_set(t, src, offset, size);
}
void Backend::copy_async(const Tensor* from, size_t from_offset, Tensor* to, size_t to_offset, size_t size) {
    synchronize();
    check_access(from, from_offset, size, "copy_async");
    check_access(to, to_offset, size, "copy_async");
    std::vector<std::byte> bytes(size);
    from->buffer->get(from, bytes.data(), from_offset, size);
    to->buffer->set(to, bytes.data(), to_offset, size);
}
Backend::Ticket Backend::read_async(const Tensor* t, void* dst, size_t offset, size_t size) {
    synchronize();
    tensor_get(t, dst, offset, size);
    return 0;
}
void Backend::wait_for(Ticket) {}

// ---- marking ---------------------------------------------------------------------------

void set_param(Tensor* t) {
    t->flags |= kFlagParam;
}
void set_input(Tensor* t) {
    t->flags |= kFlagInput;
}
void set_output(Tensor* t) {
    t->flags |= kFlagOutput;
}
void set_loss(Tensor* t) {
    if (t->nelements() != 1) fail("set_loss: the loss must have one element, got " + t->shape_str());
    t->flags |= kFlagLoss;
}
Tensor* set_name(Tensor* t, std::string name) {
    t->name = std::move(name);
    return t;
}

} // namespace gfa
