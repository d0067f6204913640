// Data movement and views: fill, cpy, cast, cont, reshape, view, permute, transpose,
// get_rows, set_rows, concat, repeat.
#include "op_def.h"
#include "reference.h"

#include <algorithm>

namespace gfa {

namespace {

std::array<int64_t, kMaxDims> dims(std::initializer_list<int64_t> ne, Op op) {
    if (ne.size() == 0 || ne.size() > size_t(kMaxDims))
        op_error(op, "expected 1 to 4 dims, got " + std::to_string(ne.size()), {});
    std::array<int64_t, kMaxDims> out{1, 1, 1, 1};
    std::copy(ne.begin(), ne.end(), out.begin());
    return out;
}

bool is_float_type(Type t) {
    return t == Type::F32 || t == Type::F16 || t == Type::BF16;
}

} // namespace

Tensor* fill(Context& ctx, Type type, std::initializer_list<int64_t> ne, float value) {
    if (!is_float_type(type))
        op_error(Op::Fill, "type must be f32, f16 or bf16, got " + std::string(type_name(type)), {});
    Tensor* t = ctx.new_node(Op::Fill, type, dims(ne, Op::Fill));
    t->set_params(FillParams{value});
    return t;
}

Tensor* cpy(Context& ctx, Tensor* a, Tensor* b) {
    require_not_null(Op::Cpy, {a, b});
    if (a->nelements() != b->nelements()) op_error(Op::Cpy, "element counts differ", {a, b});
    if (!type_traits(b->type).from_float && b->type != a->type)
        op_error(Op::Cpy, "cannot convert to " + std::string(type_name(b->type)), {a, b});
    Tensor* t = ctx.new_view(b, b->type, b->ne, b->nb, 0, Op::Cpy);
    set_sources(t, {a, b});
    return t;
}

Tensor* cast(Context& ctx, Tensor* a, Type type) {
    require_not_null(Op::Cpy, {a});
    if (!type_traits(type).from_float && type != a->type)
        op_error(Op::Cpy, "cannot convert to " + std::string(type_name(type)), {a});
    Tensor* t = ctx.new_node(Op::Cont, type, a->ne);
    set_sources(t, {a});
    return t;
}

Tensor* cont(Context& ctx, Tensor* a) {
    return cast(ctx, a, a->type);
}

Tensor* reshape(Context& ctx, Tensor* a, std::initializer_list<int64_t> ne_list) {
    require_not_null(Op::Reshape, {a});
    const auto ne = dims(ne_list, Op::Reshape);
    if (!a->is_contiguous()) op_error(Op::Reshape, "source must be contiguous (use cont)", {a});
    if (ne[0] * ne[1] * ne[2] * ne[3] != a->nelements())
        op_error(Op::Reshape,
                 "element count " + std::to_string(ne[0] * ne[1] * ne[2] * ne[3]) +
                     " differs from the source's",
                 {a});
    return ctx.new_view(a, a->type, ne, contiguous_strides(a->type, ne), 0, Op::Reshape);
}

Tensor* view(Context& ctx, Tensor* a, std::initializer_list<int64_t> ne_list,
             std::initializer_list<size_t> nb_list, size_t offset) {
    require_not_null(Op::View, {a});
    const auto ne = dims(ne_list, Op::View);
    if (nb_list.size() + 1 != ne_list.size())
        op_error(Op::View,
                 "give one stride for each dim after the first (" + std::to_string(ne_list.size() - 1) + ")",
                 {a});
    auto nb = contiguous_strides(a->type, ne);
    std::copy(nb_list.begin(), nb_list.end(), nb.begin() + 1);
    for (int i = int(nb_list.size()) + 1; i < kMaxDims; ++i) nb[i] = nb[i - 1] * size_t(ne[i - 1]);
    return ctx.new_view(a, a->type, ne, nb, offset, Op::View);
}

Tensor* permute(Context& ctx, Tensor* a, int ax0, int ax1, int ax2, int ax3) {
    require_not_null(Op::Permute, {a});
    const int axes[kMaxDims] = {ax0, ax1, ax2, ax3};
    bool seen[kMaxDims] = {};
    for (int ax : axes) {
        if (ax < 0 || ax >= kMaxDims || seen[ax])
            op_error(Op::Permute,
                     "axes must be a permutation of 0..3, got " + std::to_string(ax0) + "," +
                         std::to_string(ax1) + "," + std::to_string(ax2) + "," + std::to_string(ax3),
                     {a});
        seen[ax] = true;
    }
    std::array<int64_t, kMaxDims> ne{};
    std::array<size_t, kMaxDims> nb{};
    for (int i = 0; i < kMaxDims; ++i) {
        ne[axes[i]] = a->ne[i];
        nb[axes[i]] = a->nb[i];
    }
    Tensor* t = ctx.new_view(a, a->type, ne, nb, 0, Op::Permute);
    t->set_params(PermuteParams{{ax0, ax1, ax2, ax3}});
    return t;
}

Tensor* transpose(Context& ctx, Tensor* a) {
    require_not_null(Op::Transpose, {a});
    std::array<int64_t, kMaxDims> ne = a->ne;
    std::array<size_t, kMaxDims> nb = a->nb;
    std::swap(ne[0], ne[1]);
    std::swap(nb[0], nb[1]);
    return ctx.new_view(a, a->type, ne, nb, 0, Op::Transpose);
}

Tensor* get_rows(Context& ctx, Tensor* a, Tensor* rows) {
    require_not_null(Op::GetRows, {a, rows});
    if (rows->type != Type::I32) op_error(Op::GetRows, "row indices must be i32", {a, rows});
    if (rows->ne[2] != 1 || rows->ne[3] != 1 || a->ne[3] != 1 ||
        (rows->ne[1] != 1 && rows->ne[1] != a->ne[2]))
        op_error(Op::GetRows, "rows must be [n] or [n, a.ne2]; a must be at most 3-d", {a, rows});
    if (!type_traits(a->type).to_float) op_error(Op::GetRows, "cannot read rows of this type", {a, rows});
    Tensor* t =
        ctx.new_node(Op::GetRows, Type::F32, {a->ne[0], rows->ne[0], rows->ne[1] == 1 ? 1 : a->ne[2], 1});
    set_sources(t, {a, rows});
    return t;
}

Tensor* set_rows(Context& ctx, Tensor* a, Tensor* b, Tensor* rows) {
    require_not_null(Op::SetRows, {a, b, rows});
    if (rows->type != Type::I32 && rows->type != Type::I64)
        op_error(Op::SetRows, "row indices must be i32 or i64", {a, b, rows});
    if (b->ne[0] != a->ne[0] || b->ne[1] != rows->ne[0] || b->ne[2] != a->ne[2] || b->ne[3] != a->ne[3])
        op_error(Op::SetRows, "b must be [a.ne0, n_rows, a.ne2, a.ne3]", {a, b, rows});
    if (rows->ne[1] != 1 || rows->ne[2] != 1 || rows->ne[3] != 1)
        op_error(Op::SetRows, "rows must be 1-d", {a, b, rows});
    if (b->type != Type::F32) op_error(Op::SetRows, "b must be f32", {a, b, rows});
    if (!type_traits(a->type).from_float)
        op_error(Op::SetRows, "cannot write rows of this type", {a, b, rows});
    Tensor* t = ctx.new_view(a, a->type, a->ne, a->nb, 0, Op::SetRows);
    set_sources(t, {a, b, rows});
    return t;
}

Tensor* concat(Context& ctx, Tensor* a, Tensor* b, int dim) {
    require_not_null(Op::Concat, {a, b});
    if (dim < 0 || dim >= kMaxDims)
        op_error(Op::Concat, "dim must be 0..3, got " + std::to_string(dim), {a, b});
    if (a->type != b->type || a->type != Type::F32) op_error(Op::Concat, "both inputs must be f32", {a, b});
    auto ne = a->ne;
    for (int i = 0; i < kMaxDims; ++i)
        if (i != dim && a->ne[i] != b->ne[i])
            op_error(Op::Concat, "shapes differ outside dim " + std::to_string(dim), {a, b});
    ne[dim] += b->ne[dim];
    Tensor* t = ctx.new_node(Op::Concat, Type::F32, ne);
    t->set_params(ConcatParams{dim});
    set_sources(t, {a, b});
    return t;
}

Tensor* repeat(Context& ctx, Tensor* a, Tensor* like) {
    require_not_null(Op::Repeat, {a, like});
    if (!can_repeat(a, like)) op_error(Op::Repeat, "each dim of a must divide the target's", {a, like});
    if (a->type != Type::F32) op_error(Op::Repeat, "a must be f32", {a, like});
    Tensor* t = ctx.new_node(Op::Repeat, Type::F32, like->ne);
    set_sources(t, {a});
    return t;
}

// Sums a tensor broadcast by repeat() back to the shape of `like` (internal).
Tensor* repeat_back(Context& ctx, Tensor* grad, Tensor* like) {
    if (grad->ne == like->ne) return grad;
    Tensor* t = ctx.new_node(Op::RepeatBack, Type::F32, like->ne);
    set_sources(t, {grad});
    return t;
}

// Scatter-adds grad rows back into a tensor shaped like `like` (internal).
Tensor* get_rows_back(Context& ctx, Tensor* grad, Tensor* rows, Tensor* like) {
    Tensor* t = ctx.new_node(Op::GetRowsBack, Type::F32, like->ne);
    set_sources(t, {grad, rows});
    return t;
}

namespace {

void cpy_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    Tensor* a = node->src[0];
    g.accumulate(a, reshape(g.ctx, cont(g.ctx, grad), {a->ne[0], a->ne[1], a->ne[2], a->ne[3]}));
}
void cont_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], grad);
}
void reshape_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    Tensor* a = node->src[0];
    g.accumulate(a, reshape(g.ctx, cont(g.ctx, grad), {a->ne[0], a->ne[1], a->ne[2], a->ne[3]}));
}
void permute_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    const PermuteParams p = node->params<PermuteParams>();
    // Result dim axes[i] came from source dim i, so the inverse sends dim axes[i] back to i.
    int inv[kMaxDims];
    for (int i = 0; i < kMaxDims; ++i) inv[p.axes[i]] = i;
    g.accumulate(node->src[0], permute(g.ctx, grad, inv[0], inv[1], inv[2], inv[3]));
}
void transpose_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], transpose(g.ctx, grad));
}
void get_rows_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], get_rows_back(g.ctx, grad, node->src[1], node->src[0]));
}
void concat_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    const int dim = node->params<ConcatParams>().dim;
    Tensor* a = node->src[0];
    Tensor* b = node->src[1];
    auto part = [&](Tensor* like, size_t offset) {
        Tensor* v = g.ctx.new_view(grad, Type::F32, like->ne, grad->nb, offset, Op::View);
        return cont(g.ctx, v);
    };
    g.accumulate(a, part(a, 0));
    g.accumulate(b, part(b, size_t(a->ne[dim]) * grad->nb[dim]));
}
void repeat_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], repeat_back(g.ctx, grad, node->src[0]));
}
void repeat_back_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    g.accumulate(node->src[0], repeat(g.ctx, grad, node->src[0]));
}

// ---- reference semantics ----

void fill_reference(ref::Evaluator& ev, const Tensor* n) {
    const double v = n->params<FillParams>().value;
    ref::for_each_index(
        n, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) { ev.set(n, v, i0, i1, i2, i3); });
}

// Element k of the source (row-major) goes to element k of the destination.
void copy_reference(ref::Evaluator& ev, const Tensor* from, const Tensor* to) {
    const std::vector<double> v = ev.values(from);
    size_t k = 0;
    ref::for_each_index(
        to, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) { ev.set(to, v[k++], i0, i1, i2, i3); });
}
void cpy_reference(ref::Evaluator& ev, const Tensor* n) {
    copy_reference(ev, n->src[0], n);
}
void cont_reference(ref::Evaluator& ev, const Tensor* n) {
    copy_reference(ev, n->src[0], n);
}

int64_t checked_row(double r, int64_t limit, const char* op) {
    if (r < 0 || r >= double(limit))
        fail(std::string(op) + ": row index " + std::to_string(int64_t(r)) + " out of range");
    return int64_t(r);
}

void get_rows_reference(ref::Evaluator& ev, const Tensor* n) {
    const Tensor *a = n->src[0], *rows = n->src[1];
    ref::for_each_index(n, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        const int64_t r = checked_row(ev.get(rows, i1, rows->ne[1] == 1 ? 0 : i2), a->ne[1], "get_rows");
        ev.set(n, ev.get(a, i0, r, i2, i3), i0, i1, i2, i3);
    });
}
void get_rows_back_reference(ref::Evaluator& ev, const Tensor* n) {
    const Tensor *g = n->src[0], *rows = n->src[1];
    std::vector<double> acc(size_t(n->nelements()), 0.0);
    ref::for_each_index(g, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        const int64_t r = checked_row(ev.get(rows, i1, rows->ne[1] == 1 ? 0 : i2), n->ne[1], "get_rows_back");
        acc[size_t(((i3 * n->ne[2] + i2) * n->ne[1] + r) * n->ne[0] + i0)] += ev.get(g, i0, i1, i2, i3);
    });
    size_t k = 0;
    ref::for_each_index(
        n, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) { ev.set(n, acc[k++], i0, i1, i2, i3); });
}
void set_rows_reference(ref::Evaluator& ev, const Tensor* n) {
    const Tensor *b = n->src[1], *rows = n->src[2];
    ref::for_each_index(b, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        const int64_t r = checked_row(ev.get(rows, i1), n->ne[1], "set_rows");
        ev.set(n, ev.get(b, i0, i1, i2, i3), i0, r, i2, i3);
    });
}
void concat_reference(ref::Evaluator& ev, const Tensor* n) {
    const Tensor *a = n->src[0], *b = n->src[1];
    const int dim = n->params<ConcatParams>().dim;
    ref::for_each_index(n, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        int64_t idx[4] = {i0, i1, i2, i3};
        const Tensor* s = a;
        if (idx[dim] >= a->ne[dim]) idx[dim] -= a->ne[dim], s = b;
        ev.set(n, ev.get(s, idx[0], idx[1], idx[2], idx[3]), i0, i1, i2, i3);
    });
}
void repeat_reference(ref::Evaluator& ev, const Tensor* n) {
    const Tensor* a = n->src[0];
    ref::for_each_index(n, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        ev.set(n, ev.get(a, i0 % a->ne[0], i1 % a->ne[1], i2 % a->ne[2], i3 % a->ne[3]), i0, i1, i2, i3);
    });
}
void repeat_back_reference(ref::Evaluator& ev, const Tensor* n) {
    const Tensor* g = n->src[0];
    std::vector<double> acc(size_t(n->nelements()), 0.0);
    ref::for_each_index(g, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
        const int64_t j0 = i0 % n->ne[0], j1 = i1 % n->ne[1], j2 = i2 % n->ne[2], j3 = i3 % n->ne[3];
        acc[size_t(((j3 * n->ne[2] + j2) * n->ne[1] + j1) * n->ne[0] + j0)] += ev.get(g, i0, i1, i2, i3);
    });
    size_t k = 0;
    ref::for_each_index(
        n, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) { ev.set(n, acc[k++], i0, i1, i2, i3); });
}

} // namespace

void define_movement_ops(OpTable& t) {
    t[size_t(Op::Fill)] = {.name = "fill", .reference = fill_reference};
    t[size_t(Op::Cpy)] = {
        .name = "cpy", .backward = cpy_backward, .reference = cpy_reference, .writes_view_src = true};
    t[size_t(Op::Cont)] = {.name = "cont", .backward = cont_backward, .reference = cont_reference};
    t[size_t(Op::Reshape)] = {.name = "reshape", .backward = reshape_backward, .is_view = true};
    t[size_t(Op::View)] = {.name = "view", .is_view = true};
    t[size_t(Op::Permute)] = {.name = "permute", .backward = permute_backward, .is_view = true};
    t[size_t(Op::Transpose)] = {.name = "transpose", .backward = transpose_backward, .is_view = true};
    t[size_t(Op::GetRows)] = {
        .name = "get_rows", .backward = get_rows_backward, .reference = get_rows_reference};
    t[size_t(Op::GetRowsBack)] = {.name = "get_rows_back", .reference = get_rows_back_reference};
    t[size_t(Op::SetRows)] = {.name = "set_rows", .reference = set_rows_reference, .writes_view_src = true};
    t[size_t(Op::Concat)] = {.name = "concat", .backward = concat_backward, .reference = concat_reference};
    t[size_t(Op::Repeat)] = {.name = "repeat", .backward = repeat_backward, .reference = repeat_reference};
    t[size_t(Op::RepeatBack)] = {
        .name = "repeat_back", .backward = repeat_back_backward, .reference = repeat_back_reference};
}

} // namespace gfa
