#include "reference.h"

#include "op_def.h"

#include <cmath>
#include <limits>

namespace gfa::ref {

namespace {
const Tensor* owner_of(const Tensor* t) {
    return t->view_src ? t->view_src : t;
}
bool is_block_type(Type t) {
    return type_traits(t).block_size > 1;
}
} // namespace

// Memory model: plain types are addressed in 2-byte slots (so views of another plain type at
// any even byte offset, like the f32 LSE behind a bf16 attention output, resolve to one
// slot); quantized tensors are stored dequantized, one slot per element.
size_t Evaluator::slot(const Tensor* t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
    const Tensor* owner = owner_of(t);
    const size_t base = t->view_src ? t->view_offs : 0;
    if (is_block_type(owner->type)) {
        if (owner->type != t->type)
            fail("reference: a view changes the type of quantized tensor '" + owner->name + "'");
        const size_t row_bytes = row_size(owner->type, owner->ne[0]);
        const size_t row_offset =
            base + size_t(i1) * t->nb[1] + size_t(i2) * t->nb[2] + size_t(i3) * t->nb[3];
        return row_offset / row_bytes * size_t(owner->ne[0]) + size_t(i0);
    }
    const size_t byte =
        base + size_t(i0) * t->nb[0] + size_t(i1) * t->nb[1] + size_t(i2) * t->nb[2] + size_t(i3) * t->nb[3];
    return byte / 2;
}

Evaluator::Storage& Evaluator::storage(const Tensor* t) {
    const Tensor* owner = owner_of(t);
    auto it = memory_.find(owner);
    if (it != memory_.end()) return it->second;
    Storage s;
    const size_t n = is_block_type(owner->type) ? size_t(owner->nelements()) : (owner->alloc_bytes() + 1) / 2;
    s.slots.assign(n, std::numeric_limits<double>::quiet_NaN());
    return memory_.emplace(owner, std::move(s)).first->second;
}

const Evaluator::Storage& Evaluator::storage(const Tensor* t) const {
    auto it = memory_.find(owner_of(t));
    if (it == memory_.end())
        fail("reference: tensor '" + t->name + "' " + t->shape_str() + " has no value yet");
    return it->second;
}

double Evaluator::get(const Tensor* t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
    return storage(t).slots.at(slot(t, i0, i1, i2, i3));
}

void Evaluator::set(const Tensor* t, double v, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    Storage& s = storage(t);
    // 16-bit tensors hold what their type can hold, as on every backend; f32 values stay in
    // double so finite differences of the reference are accurate.
    double stored = v;
    switch (t->type) {
    case Type::F16:
        stored = double(fp16_to_fp32(fp32_to_fp16(float(v))));
        break;
    case Type::BF16:
        stored = double(bf16_to_fp32(fp32_to_bf16(float(v))));
        break;
    default:
        break;
    }
    s.slots.at(slot(t, i0, i1, i2, i3)) = stored;
}

double Evaluator::get_at(const Tensor* t, size_t byte_offset) const {
    return storage(t).slots.at(((t->view_src ? t->view_offs : 0) + byte_offset) / 2);
}

void Evaluator::set_at(const Tensor* t, size_t byte_offset, double v) {
    storage(t).slots.at(((t->view_src ? t->view_offs : 0) + byte_offset) / 2) = v;
}

std::vector<double> Evaluator::values(const Tensor* t) const {
    std::vector<double> out;
    out.reserve(size_t(t->nelements()));
    for (int64_t i3 = 0; i3 < t->ne[3]; ++i3)
        for (int64_t i2 = 0; i2 < t->ne[2]; ++i2)
            for (int64_t i1 = 0; i1 < t->ne[1]; ++i1)
                for (int64_t i0 = 0; i0 < t->ne[0]; ++i0) out.push_back(get(t, i0, i1, i2, i3));
    return out;
}

void Evaluator::set_values(const Tensor* leaf, const std::vector<double>& v) {
    if (int64_t(v.size()) != leaf->nelements())
        fail("reference: set_values: wrong element count for " + leaf->shape_str());
    size_t k = 0;
    Storage& s = storage(leaf);
    for (int64_t i3 = 0; i3 < leaf->ne[3]; ++i3)
        for (int64_t i2 = 0; i2 < leaf->ne[2]; ++i2)
            for (int64_t i1 = 0; i1 < leaf->ne[1]; ++i1)
                for (int64_t i0 = 0; i0 < leaf->ne[0]; ++i0) s.slots.at(slot(leaf, i0, i1, i2, i3)) = v[k++];
}

void Evaluator::load_leaf(const Tensor* leaf) {
    const Tensor* owner = owner_of(leaf);
    if (memory_.count(owner)) return;
    Storage& s = storage(owner);
    if (!owner->data) return; // no data: values stay NaN, so reading them poisons results
    std::vector<std::byte> bytes(owner->alloc_bytes());
    tensor_get(owner, bytes.data(), 0, bytes.size());
    const TypeTraits& tt = type_traits(owner->type);
    if (tt.block_size > 1) {
        std::vector<float> row(size_t(owner->ne[0]));
        const size_t rb = row_size(owner->type, owner->ne[0]);
        for (int64_t r = 0; r < owner->nrows(); ++r) {
            tt.to_float(bytes.data() + size_t(r) * rb, row.data(), owner->ne[0]);
            for (int64_t i = 0; i < owner->ne[0]; ++i) s.slots[size_t(r * owner->ne[0] + i)] = row[size_t(i)];
        }
        return;
    }
    // Plain types: decode every element the tensor's strides reach.
    for (int64_t i3 = 0; i3 < owner->ne[3]; ++i3)
        for (int64_t i2 = 0; i2 < owner->ne[2]; ++i2)
            for (int64_t i1 = 0; i1 < owner->ne[1]; ++i1)
                for (int64_t i0 = 0; i0 < owner->ne[0]; ++i0) {
                    const size_t byte = size_t(i0) * owner->nb[0] + size_t(i1) * owner->nb[1] +
                                        size_t(i2) * owner->nb[2] + size_t(i3) * owner->nb[3];
                    const std::byte* p = bytes.data() + byte;
                    double v;
                    switch (owner->type) {
                    case Type::F32:
                        v = *reinterpret_cast<const float*>(p);
                        break;
                    case Type::F16:
                        v = fp16_to_fp32(*reinterpret_cast<const uint16_t*>(p));
                        break;
                    case Type::BF16:
                        v = bf16_to_fp32(*reinterpret_cast<const uint16_t*>(p));
                        break;
                    case Type::F64:
                        v = *reinterpret_cast<const double*>(p);
                        break;
                    case Type::I32:
                        v = *reinterpret_cast<const int32_t*>(p);
                        break;
                    case Type::I64:
                        v = double(*reinterpret_cast<const int64_t*>(p));
                        break;
                    case Type::I16:
                        v = *reinterpret_cast<const int16_t*>(p);
                        break;
                    default:
                        fail("reference: cannot read leaf of type " + std::string(type_name(owner->type)));
                    }
                    s.slots[byte / 2] = v;
                }
}

// A quantized tensor holds what its blocks can represent: round every row through the
// format, as a backend writing the tensor would.
void Evaluator::quantize_rows(const Tensor* owner) {
    const TypeTraits& tt = type_traits(owner->type);
    Storage& s = storage(owner);
    std::vector<float> row(size_t(owner->ne[0]));
    std::vector<std::byte> blocks(row_size(owner->type, owner->ne[0]));
    for (int64_t r = 0; r < owner->nrows(); ++r) {
        double* slots = s.slots.data() + size_t(r * owner->ne[0]);
        for (int64_t i = 0; i < owner->ne[0]; ++i) row[size_t(i)] = float(slots[i]);
        tt.from_float(row.data(), blocks.data(), owner->ne[0]);
        tt.to_float(blocks.data(), row.data(), owner->ne[0]);
        for (int64_t i = 0; i < owner->ne[0]; ++i) slots[i] = row[size_t(i)];
    }
}

Evaluator::Evaluator(const Graph& graph) : graph_(graph) {
    for (const Tensor* l : graph.leafs()) load_leaf(l);
    // Nodes that write into a leaf (cpy, set_rows) need that leaf's current values too.
    for (const Tensor* n : graph.nodes())
        if (n->view_src && n->view_src->op == Op::None) load_leaf(n->view_src);
}

void Evaluator::run() {
    for (const Tensor* node : graph_.nodes()) {
        const OpDef& def = op_def(node->op);
        if (def.is_view) continue;
        if (!def.reference)
            fail(std::string("reference: op '") + def.name + "' has no reference implementation");
        storage(node); // make sure the node's memory exists even if the kernel writes nothing
        def.reference(*this, node);
        if (is_block_type(node->type)) quantize_rows(owner_of(node));
    }
}

std::vector<double> evaluate(const Graph& graph, const Tensor* t) {
    Evaluator ev(graph);
    ev.run();
    return ev.values(t);
}

} // namespace gfa::ref
