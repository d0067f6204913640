// Matrix products: mul_mat (weights of any type that converts to float, times f32
// activations) and out_prod (the f32 product that mul_mat's gradients are made of).
//
// Batch broadcasting follows ggml: when b has r2 = B2 / A2 times as many matrices along
// dim 2 as a, b's matrix i2 is multiplied with a's matrix i2 / r2 (and likewise for dim 3).
// Consecutive b matrices therefore share one a matrix, which is how grouped-query attention
// lays out its heads.
#include "op_def.h"
#include "reference.h"

#include <vector>

namespace gfa {

namespace {

void check_batches(Op op, const Tensor* a, const Tensor* b) {
    if (a->ne[2] == 0 || a->ne[3] == 0 || b->ne[2] % a->ne[2] != 0 || b->ne[3] % a->ne[3] != 0)
        op_error(op,
                 "b's dims 2 and 3 (" + std::to_string(b->ne[2]) + ", " + std::to_string(b->ne[3]) +
                     ") must be multiples of a's (" + std::to_string(a->ne[2]) + ", " +
                     std::to_string(a->ne[3]) + ") so that a can be broadcast over b",
                 {a, b});
}

// ---- batch broadcasting helpers for the gradients ----------------------------------------
//
// Both work on contiguous tensors by splitting a batch dim into (group member, group) and
// using repeat / repeat_back on the member dim, which has extent 1 on the small side.

// A tensor that only carries a shape for repeat / repeat_back (they read `like`'s dims,
// never its data): a view of t with stride 0 along the dims that change, so it needs no
// memory of its own and stays inside t.
Tensor* shape_of(Context& ctx, Tensor* t, std::array<int64_t, kMaxDims> ne) {
    std::array<size_t, kMaxDims> nb = t->nb;
    for (int i = 0; i < kMaxDims; ++i)
        if (ne[i] != t->ne[i]) nb[i] = 0;
    return ctx.new_view(t, t->type, ne, nb, 0);
}

// Sums t [X, Y, B2, B3] (contiguous) over the members of each broadcast group -> [X, Y, A2, A3].
Tensor* reduce_batches(Context& ctx, Tensor* t, int64_t a2, int64_t a3) {
    const int64_t x = t->ne[0], y = t->ne[1], b2 = t->ne[2], b3 = t->ne[3];
    if (b3 != a3) { // batch i3 = g3 * (b3 / a3) + j3: sum over j3
        Tensor* split = reshape(ctx, t, {x * y * b2, b3 / a3, a3, 1});
        t = reshape(ctx, repeat_back(ctx, split, shape_of(ctx, split, {x * y * b2, 1, a3, 1})),
                    {x, y, b2, a3});
    }
    if (b2 != a2) { // batch i2 = g2 * (b2 / a2) + j2: sum over j2
        Tensor* split = reshape(ctx, t, {x * y, b2 / a2, a2, a3});
        t = reshape(ctx, repeat_back(ctx, split, shape_of(ctx, split, {x * y, 1, a2, a3})), {x, y, a2, a3});
    }
    return t;
}

// Repeats each matrix of t [X, Y, A2, A3] -> [X, Y, B2, B3] in the broadcast order above.
Tensor* expand_batches(Context& ctx, Tensor* t, int64_t b2, int64_t b3) {
    const int64_t x = t->ne[0], y = t->ne[1], a2 = t->ne[2], a3 = t->ne[3];
    if (a2 == b2 && a3 == b3) return t;
    if (!t->is_contiguous()) t = cont(ctx, t);
    if (b3 != a3) {
        Tensor* split = reshape(ctx, t, {x * y * a2, 1, a3, 1});
        t = reshape(ctx, repeat(ctx, split, shape_of(ctx, split, {x * y * a2, b3 / a3, a3, 1})),
                    {x, y, a2, b3});
    }
    if (b2 != a2) {
        Tensor* split = reshape(ctx, t, {x * y, 1, a2, b3});
        t = reshape(ctx, repeat(ctx, split, shape_of(ctx, split, {x * y, b2 / a2, a2, b3})), {x, y, b2, b3});
    }
    return t;
}

Tensor* to_f32(Context& ctx, Tensor* t) {
    return t->type == Type::F32 ? t : cast(ctx, t, Type::F32);
}

// C = mul_mat(a, b), C[m, n] = sum_k a[k, m] b[k, n]:
//   dL/da[k, m] = sum_n b[k, n] G[m, n]  = out_prod(b, G), summed over broadcast groups
//   dL/db[k, n] = sum_m a[k, m] G[m, n]  = out_prod(a, G^T) (a broadcast as in the forward)
// A gradient's product, as precise as the forward product it comes from.
Tensor* product_like(GradCtx& g, const Tensor* forward, Tensor* a, Tensor* b) {
    Tensor* t = out_prod(g.ctx, a, b);
    set_matmul_precision(t, matmul_precision(forward));
    return t;
}

void mul_mat_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    Tensor *a = node->src[0], *b = node->src[1];
    if (g.needs_grad(a)) {
        if (a->type != Type::F32)
            op_error(Op::MulMat, "the gradient with respect to a is only available for f32 a", {a, b});
        Tensor* da = product_like(g, node, b, grad); // [K, M, B2, B3]
        g.accumulate(a, reduce_batches(g.ctx, da, a->ne[2], a->ne[3]));
    }
    if (g.needs_grad(b)) g.accumulate(b, product_like(g, node, to_f32(g.ctx, a), transpose(g.ctx, grad)));
}

// C = out_prod(a, b), C[m, n] = sum_k a[m, k] b[n, k]:
//   dL/da[m, k] = sum_n G[m, n] b[n, k] = out_prod(G, b^T), summed over broadcast groups
//   dL/db[n, k] = sum_m G[m, n] a[m, k] = out_prod(G^T, a^T) with a expanded to b's batches
void out_prod_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    Tensor *a = node->src[0], *b = node->src[1];
    if (g.needs_grad(a)) {
        Tensor* da = product_like(g, node, grad, transpose(g.ctx, b)); // [M, K, B2, B3]
        g.accumulate(a, reduce_batches(g.ctx, da, a->ne[2], a->ne[3]));
    }
    if (g.needs_grad(b)) {
        Tensor* a_full = expand_batches(g.ctx, a, b->ne[2], b->ne[3]);
        g.accumulate(b, product_like(g, node, transpose(g.ctx, grad), transpose(g.ctx, a_full)));
    }
}

// ---- reference semantics ----

// Gathers a tensor's values as [i3][i2][i1][i0] (the evaluator's row-major order), so the
// triple loops below do not go through the evaluator for every product.
struct Dense {
    std::vector<double> v;
    std::array<int64_t, kMaxDims> ne;
    double at(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
        return v[size_t(((i3 * ne[2] + i2) * ne[1] + i1) * ne[0] + i0)];
    }
};
Dense dense(const ref::Evaluator& ev, const Tensor* t) {
    return {ev.values(t), t->ne};
}

void mul_mat_reference(ref::Evaluator& ev, const Tensor* n) {
    const Dense a = dense(ev, n->src[0]), b = dense(ev, n->src[1]);
    const int64_t r2 = b.ne[2] / a.ne[2], r3 = b.ne[3] / a.ne[3], K = a.ne[0];
    ref::for_each_index(n, [&](int64_t m, int64_t j, int64_t i2, int64_t i3) {
        double acc = 0.0;
        for (int64_t k = 0; k < K; ++k) acc += a.at(k, m, i2 / r2, i3 / r3) * b.at(k, j, i2, i3);
        ev.set(n, acc, m, j, i2, i3);
    });
}

void mul_mat_id_reference(ref::Evaluator& ev, const Tensor* n) {
    const Dense as = dense(ev, n->src[0]), b = dense(ev, n->src[1]), ids = dense(ev, n->src[2]);
    const int64_t K = as.ne[0], E = as.ne[2];
    ref::for_each_index(n, [&](int64_t m, int64_t i, int64_t t, int64_t) {
        const double e = ids.at(i, t, 0, 0);
        if (e < 0 || e >= double(E))
            fail("mul_mat_id: expert " + std::to_string(int64_t(e)) + " of token " + std::to_string(t) +
                 " is outside [0, " + std::to_string(E) + ")");
        double acc = 0.0;
        for (int64_t k = 0; k < K; ++k)
            acc += as.at(k, m, int64_t(e), 0) * b.at(k, b.ne[1] == 1 ? 0 : i, t, 0);
        ev.set(n, acc, m, i, t, 0);
    });
}

void out_prod_reference(ref::Evaluator& ev, const Tensor* n) {
    const Dense a = dense(ev, n->src[0]), b = dense(ev, n->src[1]);
    const int64_t r2 = b.ne[2] / a.ne[2], r3 = b.ne[3] / a.ne[3], K = a.ne[1];
    ref::for_each_index(n, [&](int64_t m, int64_t j, int64_t i2, int64_t i3) {
        double acc = 0.0;
        for (int64_t k = 0; k < K; ++k) acc += a.at(m, k, i2 / r2, i3 / r3) * b.at(j, k, i2, i3);
        ev.set(n, acc, m, j, i2, i3);
    });
}

} // namespace

Tensor* mul_mat(Context& ctx, Tensor* a, Tensor* b) {
    require_not_null(Op::MulMat, {a, b});
    const TypeTraits& ta = type_traits(a->type);
    if (!ta.to_float)
        op_error(Op::MulMat, "a's type " + std::string(ta.name) + " cannot be converted to float", {a, b});
    if (b->type != Type::F32) op_error(Op::MulMat, "b must be f32 (use cast)", {a, b});
    if (a->ne[0] != b->ne[0])
        op_error(Op::MulMat,
                 "inner dims differ: a.ne[0] = " + std::to_string(a->ne[0]) +
                     ", b.ne[0] = " + std::to_string(b->ne[0]),
                 {a, b});
    if (ta.block_size > 1 && a->nb[0] != ta.type_size)
        op_error(Op::MulMat, "rows of a quantized a must be stored whole (no transposed views)", {a, b});
    check_batches(Op::MulMat, a, b);
    Tensor* t = ctx.new_node(Op::MulMat, Type::F32, {a->ne[1], b->ne[1], b->ne[2], b->ne[3]});
    set_sources(t, {a, b});
    return t;
}

Tensor* out_prod(Context& ctx, Tensor* a, Tensor* b) {
    require_not_null(Op::OutProd, {a, b});
    if (a->type != Type::F32 || b->type != Type::F32)
        op_error(Op::OutProd, "a and b must be f32 (use cast)", {a, b});
    if (a->ne[1] != b->ne[1])
        op_error(Op::OutProd,
                 "shared dims differ: a.ne[1] = " + std::to_string(a->ne[1]) +
                     ", b.ne[1] = " + std::to_string(b->ne[1]),
                 {a, b});
    check_batches(Op::OutProd, a, b);
    Tensor* t = ctx.new_node(Op::OutProd, Type::F32, {a->ne[0], b->ne[0], b->ne[2], b->ne[3]});
    set_sources(t, {a, b});
    return t;
}

Tensor* mul_mat_id(Context& ctx, Tensor* as, Tensor* b, Tensor* ids) {
    require_not_null(Op::MulMatId, {as, b, ids});
    const TypeTraits& ta = type_traits(as->type);
    if (!ta.to_float)
        op_error(Op::MulMatId, "the experts' type " + std::string(ta.name) + " cannot be converted to float",
                 {as, b, ids});
    if (b->type != Type::F32) op_error(Op::MulMatId, "b must be f32 (use cast)", {as, b, ids});
    if (ids->type != Type::I32) op_error(Op::MulMatId, "ids must be i32", {as, b, ids});
    if (as->ne[3] != 1 || b->ne[3] != 1 || ids->ne[2] != 1 || ids->ne[3] != 1)
        op_error(Op::MulMatId, "as must be [K, M, E], b [K, Nb, T] and ids [k, T]", {as, b, ids});
    if (as->ne[0] != b->ne[0])
        op_error(Op::MulMatId,
                 "inner dims differ: as.ne[0] = " + std::to_string(as->ne[0]) +
                     ", b.ne[0] = " + std::to_string(b->ne[0]),
                 {as, b, ids});
    if (ids->ne[1] != b->ne[2])
        op_error(Op::MulMatId,
                 "ids has " + std::to_string(ids->ne[1]) + " tokens, b " + std::to_string(b->ne[2]),
                 {as, b, ids});
    if (b->ne[1] != 1 && b->ne[1] != ids->ne[0])
        op_error(Op::MulMatId,
                 "b.ne[1] must be 1 or the experts per token (" + std::to_string(ids->ne[0]) + "), not " +
                     std::to_string(b->ne[1]),
                 {as, b, ids});
    if (ta.block_size > 1 && as->nb[0] != ta.type_size)
        op_error(Op::MulMatId, "rows of quantized experts must be stored whole", {as, b, ids});
    Tensor* t = ctx.new_node(Op::MulMatId, Type::F32, {as->ne[1], ids->ne[0], ids->ne[1], 1});
    set_sources(t, {as, b, ids});
    t->set_params(MatMulParams{MatMulPrecision::F32});
    return t;
}

void set_matmul_precision(Tensor* product, MatMulPrecision precision) {
    require_not_null(Op::MulMat, {product});
    if (product->op != Op::MulMat && product->op != Op::MulMatId && product->op != Op::OutProd)
        fail(std::string("set_matmul_precision: ") + op_name(product->op) +
             " is not a mul_mat, mul_mat_id or out_prod node");
    if (precision != MatMulPrecision::F32 && precision != MatMulPrecision::TF32 &&
        precision != MatMulPrecision::Q8 && precision != MatMulPrecision::BF16)
        fail("set_matmul_precision: unknown precision " + std::to_string(int(precision)));
    product->set_params(MatMulParams{precision});
}

MatMulPrecision matmul_precision(const Tensor* product) {
    return product->params<MatMulParams>().precision;
}

void define_matmul_ops(OpTable& t) {
    t[size_t(Op::MulMat)] = {.name = "mul_mat", .backward = mul_mat_backward, .reference = mul_mat_reference};
    t[size_t(Op::MulMatId)] = {.name = "mul_mat_id", .reference = mul_mat_id_reference};
    t[size_t(Op::OutProd)] = {
        .name = "out_prod", .backward = out_prod_backward, .reference = out_prod_reference};
}

} // namespace gfa
