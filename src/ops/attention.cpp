// flash_attn_ext: fused attention with its gradient (see docs/ARCHITECTURE.md for the
// contract and src/attention/problem.h for the semantics every implementation shares).
//
// Secondary outputs live in the node's own allocation, after the main one, and are reached
// through views: the forward's row log-sum-exp follows O; the backward node holds
// dQ | dK | dV | dSinks (all f32). One node, one allocation, so the allocator and the
// backends need nothing special.
#include "attention/layout.h"
#include "attention/reference.h"
#include "op_def.h"
#include "reference.h"

#include <cmath>
#include <string>

namespace gfa {

namespace {

bool is_float16_or_32(Type t) {
    return t == Type::F32 || t == Type::F16 || t == Type::BF16;
}
bool is_kv_type(Type t) {
    return is_float16_or_32(t) || t == Type::Q8_0 || t == Type::Q4_0;
}

void validate(Tensor* q, Tensor* k, Tensor* v, Tensor* mask, Tensor* sinks, const FlashAttnParams& p,
              const FlashAttnOptions& o) {
    const Op op = Op::FlashAttnExt;
    require_not_null(op, {q, k, v});
    auto err = [&](const std::string& msg) { op_error(op, msg, {q, k, v, mask, sinks}); };
    if (!is_float16_or_32(q->type)) err("q must be f32, f16 or bf16");
    if (!is_kv_type(k->type) || !is_kv_type(v->type)) err("k and v must be f32, f16, bf16, q8_0 or q4_0");
    const int64_t Dk = q->ne[0], Dv = v->ne[0];
    if (k->ne[0] != Dk) err("q and k head dims differ");
    if (v->ne[1] != k->ne[1]) err("k and v sequence lengths differ");
    if (v->ne[2] != k->ne[2]) err("k and v head counts differ");
    if (k->ne[3] != q->ne[3] || v->ne[3] != q->ne[3]) err("batch sizes differ");
    if (k->ne[2] == 0 || q->ne[2] % k->ne[2] != 0)
        err("query heads must be a multiple of key/value heads (GQA)");
    for (int64_t d : {Dk, Dv})
        if (d < 8 || d > 256 || d % 8 != 0) err("head dims must be multiples of 8 from 8 to 256");
    if ((type_traits(k->type).block_size > 1 && Dk % 32) || (type_traits(v->type).block_size > 1 && Dv % 32))
        err("quantized k/v need head dims that are multiples of 32");
    for (const Tensor* t : {q, k, v})
        if (t->nb[0] != t->element_size()) err("q, k and v rows must be contiguous");
    if (mask) {
        if (mask->type != Type::F32 && mask->type != Type::F16) err("the mask must be f32 or f16");
        if (mask->ne[0] != k->ne[1] || mask->ne[1] != q->ne[1]) err("the mask must be [Skv, Sq, 1|Hq, 1|B]");
        if ((mask->ne[2] != 1 && mask->ne[2] != q->ne[2]) || (mask->ne[3] != 1 && mask->ne[3] != q->ne[3]))
            err("the mask must broadcast over heads and batch: [Skv, Sq, 1|Hq, 1|B]");
        if (mask->nb[0] != mask->element_size()) err("mask rows must be contiguous");
    }
    if (sinks) {
        if (sinks->type != Type::F32 || sinks->nelements() != q->ne[2] || !sinks->is_contiguous())
            err("sinks must be contiguous f32 with one value per query head");
    }
    if (!std::isfinite(p.scale)) err("scale must be finite");
    if (!(p.logit_softcap >= 0.0f) || !std::isfinite(p.logit_softcap)) err("logit_softcap must be >= 0");
    if (!(p.max_bias >= 0.0f) || !std::isfinite(p.max_bias)) err("max_bias must be >= 0");
    if (p.max_bias > 0.0f && !mask) err("ALiBi (max_bias > 0) scales the mask, so it needs a mask");
    if (p.window_left < -1 || p.window_right < -1) err("window sizes must be >= 0, or -1 for unlimited");
    if (p.precision != attn::Precision::F32 && p.precision != attn::Precision::BF16)
        err("precision must be F32 or BF16, not " + std::to_string(int(p.precision)));
    if (!is_float16_or_32(o.out_type)) err("the output type must be f32, f16 or bf16");
}

} // namespace

Tensor* flash_attn_ext(Context& ctx, Tensor* q, Tensor* k, Tensor* v, Tensor* mask, const FlashAttnParams& p,
                       Tensor* sinks, FlashAttnOptions options) {
    validate(q, k, v, mask, sinks, p, options);
    // A context that allocates data at once cannot add the LSE later for the gradient.
    if (ctx.alloc_data()) options.with_lse = true;
    const int64_t Dv = v->ne[0], Hq = q->ne[2], Sq = q->ne[1], B = q->ne[3];
    Tensor* t = nullptr;
    {
        // Reserve the LSE behind O before the context allocates anything.
        Tensor shape;
        shape.type = options.out_type;
        shape.ne = {Dv, Hq, Sq, B};
        shape.nb = contiguous_strides(options.out_type, shape.ne);
        const size_t extra = options.with_lse
                                 ? attn::lse_offset(shape.nbytes()) - shape.nbytes() + size_t(Sq * Hq * B) * 4
                                 : 0;
        t = ctx.new_node_with_extra(Op::FlashAttnExt, options.out_type, shape.ne, extra);
    }
    set_sources(t, {q, k, v, mask, sinks});
    t->set_params(FlashAttnNodeParams{p, options});
    return t;
}

void set_attention_precision(Tensor* attn_node, FlashAttnPrecision precision) {
    if (!attn_node || attn_node->op != Op::FlashAttnExt)
        fail("set_attention_precision: the node is not a flash_attn_ext node");
    if (precision != FlashAttnPrecision::F32 && precision != FlashAttnPrecision::BF16)
        fail("set_attention_precision: unknown precision " + std::to_string(int(precision)));
    FlashAttnNodeParams np = attn_node->params<FlashAttnNodeParams>();
    np.attn.precision = precision;
    attn_node->set_params(np);
}

Tensor* flash_attn_lse(Context& ctx, Tensor* attn) {
    if (!attn || attn->op != Op::FlashAttnExt)
        fail("flash_attn_lse: the tensor is not a flash_attn_ext node");
    if (!attn->params<FlashAttnNodeParams>().options.with_lse)
        op_error(Op::FlashAttnExt, "build the node with options.with_lse = true to read its LSE", {attn});
    const std::array<int64_t, kMaxDims> ne{attn->ne[2], attn->ne[1], attn->ne[3], 1}; // [Sq, Hq, B]
    return ctx.new_view(attn, Type::F32, ne, contiguous_strides(Type::F32, ne),
                        attn::lse_offset(attn->nbytes()));
}

namespace {

// dQ | dK | dV | dSinks, each f32 and contiguous, at 16-byte aligned offsets.
struct BackLayout {
    size_t dk, dv, dsinks, total;
};
BackLayout back_layout(const Tensor* q, const Tensor* k, const Tensor* v, const Tensor* sinks) {
    auto f32_bytes = [](const Tensor* t) { return size_t(t->nelements()) * 4; };
    BackLayout l{};
    l.dk = attn::align16(f32_bytes(q));
    l.dv = attn::align16(l.dk + f32_bytes(k));
    l.dsinks = attn::align16(l.dv + f32_bytes(v));
    l.total = l.dsinks + (sinks ? f32_bytes(sinks) : 0);
    return l;
}

Tensor* f32_view(Context& ctx, Tensor* back, const Tensor* like, size_t offset) {
    return ctx.new_view(back, Type::F32, like->ne, contiguous_strides(Type::F32, like->ne), offset);
}

void flash_attn_backward(GradCtx& g, Tensor* node, Tensor* grad) {
    Tensor *q = node->src[0], *k = node->src[1], *v = node->src[2], *mask = node->src[3],
           *sinks = node->src[4];
    if (g.needs_grad(mask))
        fail("flash_attn_ext: the mask has no gradient (mark it as a constant, not a parameter)");
    FlashAttnNodeParams np = node->params<FlashAttnNodeParams>();
    if (!np.options.with_lse) {
        if (node->data)
            fail("flash_attn_ext: node '" + node->name +
                 "' already has memory without room for its LSE; "
                 "build it with options.with_lse = true to differentiate it");
        np.options.with_lse = true;
        node->set_params(np);
        node->extra_bytes = attn::lse_offset(node->nbytes()) - node->nbytes() +
                            size_t(node->ne[1] * node->ne[2] * node->ne[3]) * 4;
    }
    Tensor* lse = flash_attn_lse(g.ctx, node);
    const BackLayout l = back_layout(q, k, v, sinks);
    Tensor* back =
        g.ctx.new_node_with_extra(Op::FlashAttnBack, Type::F32, q->ne, l.total - size_t(q->nelements()) * 4);
    set_sources(back, {q, k, v, mask, sinks, node, grad, lse});
    back->set_params(FlashAttnBackParams{np.attn, false});
    g.accumulate(q, back);
    if (g.needs_grad(k)) g.accumulate(k, f32_view(g.ctx, back, k, l.dk));
    if (g.needs_grad(v)) g.accumulate(v, f32_view(g.ctx, back, v, l.dv));
    if (sinks && g.needs_grad(sinks)) g.accumulate(sinks, f32_view(g.ctx, back, sinks, l.dsinks));
}

// ---- reference semantics: the double-precision attention reference over evaluator values

// Dense f32 copies of tensors' evaluator values, laid out as views the reference reads.
struct DenseInputs {
    std::vector<std::vector<float>> storage;
    attn::View add(const ref::Evaluator& ev, const Tensor* t) {
        attn::View v;
        if (!t) return v;
        const std::vector<double> values = ev.values(t);
        storage.emplace_back(values.begin(), values.end());
        v.type = Type::F32;
        v.data = storage.back().data();
        const auto nb = contiguous_strides(Type::F32, t->ne);
        for (int i = 0; i < 4; ++i) v.ne[i] = t->ne[i], v.nb[i] = int64_t(nb[i]);
        return v;
    }
    attn::View scratch(std::array<int64_t, 4> ne) {
        storage.emplace_back(size_t(ne[0] * ne[1] * ne[2] * ne[3]), 0.0f);
        attn::View v;
        v.data = storage.back().data();
        const auto nb = contiguous_strides(Type::F32, ne);
        for (int i = 0; i < 4; ++i) v.ne[i] = ne[i], v.nb[i] = int64_t(nb[i]);
        return v;
    }
};

attn::Problem dense_problem(const ref::Evaluator& ev, const Tensor* node, DenseInputs& in) {
    attn::Problem p = attn::forward_problem(node);
    p.q = in.add(ev, node->src[0]);
    p.k = in.add(ev, node->src[1]);
    p.v = in.add(ev, node->src[2]);
    p.mask = in.add(ev, node->src[3]);
    p.sinks = in.add(ev, node->src[4]);
    p.o = in.scratch({p.Dv, p.Hq, p.Sq, p.B});
    p.lse = in.scratch({p.Sq, p.Hq, p.B, 1});
    return p;
}

void flash_attn_reference(ref::Evaluator& ev, const Tensor* node) {
    DenseInputs in;
    const attn::Problem p = dense_problem(ev, node, in);
    std::vector<double> lse;
    const std::vector<double> o = attn::reference_forward_f64(p, &lse); // O [B][Sq][Hq][Dv], lse [B][Hq][Sq]
    size_t k = 0;
    ref::for_each_index(
        node, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) { ev.set(node, o[k++], i0, i1, i2, i3); });
    if (node->params<FlashAttnNodeParams>().options.with_lse) {
        const size_t base = attn::lse_offset(node->nbytes());
        for (size_t i = 0; i < lse.size(); ++i) ev.set_at(node, base + i * 4, lse[i]);
    }
}

void flash_attn_back_reference(ref::Evaluator& ev, const Tensor* back) {
    DenseInputs in;
    attn::BackwardProblem bp;
    bp.fwd = dense_problem(ev, back->src[5], in);
    bp.fwd.lse = in.add(ev, back->src[7]);
    bp.dO = in.add(ev, back->src[6]);
    bp.dq = in.scratch(back->src[0]->ne);
    bp.dk = in.scratch(back->src[1]->ne);
    bp.dv = in.scratch(back->src[2]->ne);
    if (back->src[4]) bp.dsinks = in.scratch(back->src[4]->ne);
    attn::reference_backward(bp);
    const attn::BackOffsets off = attn::back_offsets(back);
    auto store = [&](const attn::View& v, size_t offset) {
        if (!v.data) return;
        const float* d = static_cast<const float*>(v.data);
        for (int64_t i = 0; i < v.ne[0] * v.ne[1] * v.ne[2] * v.ne[3]; ++i)
            ev.set_at(back, offset + size_t(i) * 4, d[i]);
    };
    store(bp.dq, 0);
    store(bp.dk, off.dk);
    store(bp.dv, off.dv);
    store(bp.dsinks, off.dsinks);
}

} // namespace

namespace attn {
BackOffsets back_offsets(const Tensor* back) {
    const BackLayout l = back_layout(back->src[0], back->src[1], back->src[2], back->src[4]);
    return {l.dk, l.dv, l.dsinks};
}
} // namespace attn

void define_attention_ops(OpTable& t) {
    t[size_t(Op::FlashAttnExt)] = {
        .name = "flash_attn_ext", .backward = flash_attn_backward, .reference = flash_attn_reference};
    t[size_t(Op::FlashAttnBack)] = {.name = "flash_attn_back", .reference = flash_attn_back_reference};
}

} // namespace gfa
