#include "op_def.h"

namespace gfa {

namespace {
OpTable build_table() {
    OpTable t{};
    t[size_t(Op::None)].name = "none";
    define_movement_ops(t);
    define_elementwise_ops(t);
    define_reduce_ops(t);
    define_matmul_ops(t);
    define_norm_ops(t);
    define_activation_ops(t);
    define_training_ops(t);
    define_attention_ops(t);
    for (size_t i = 0; i < t.size(); ++i)
        if (!t[i].name) t[i].name = "undefined-op";
    return t;
}
} // namespace

const OpDef& op_def(Op op) {
    static const OpTable table = build_table();
    if (size_t(op) >= table.size()) fail("op id " + std::to_string(size_t(op)) + " is out of range");
    return table[size_t(op)];
}

const char* op_name(Op op) {
    return op_def(op).name;
}

void op_error(Op op, const std::string& message, std::initializer_list<const Tensor*> tensors) {
    std::string text = std::string(op_name(op)) + ": " + message;
    if (tensors.size()) {
        text += " (";
        const char* sep = "";
        char name = 'a';
        for (const Tensor* t : tensors) {
            text += sep;
            text += name++;
            text += " = ";
            text += t ? t->shape_str() : std::string("null");
            sep = ", ";
        }
        text += ")";
    }
    throw Error(text);
}

void require_not_null(Op op, std::initializer_list<const Tensor*> tensors) {
    for (const Tensor* t : tensors)
        if (!t) op_error(op, "a required input is null", {});
}

void set_sources(Tensor* node, std::initializer_list<Tensor*> srcs) {
    int i = 0;
    for (Tensor* s : srcs) node->src[i++] = s;
}

} // namespace gfa
