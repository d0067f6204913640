#include "attention/layout.h"

#include <ggml-fa/ops.h>

namespace gfa::attn {

namespace {

View view_of(const Tensor* t) {
    View v;
    if (!t) return v;
    v.type = t->type;
    v.data = t->data;
    for (int i = 0; i < 4; ++i) {
        v.ne[i] = t->ne[i];
        v.nb[i] = int64_t(t->nb[i]);
    }
    return v;
}

View f32_view_at(const Tensor* owner, size_t offset, std::array<int64_t, 4> ne) {
    View v;
    v.type = Type::F32;
    v.data = static_cast<char*>(owner->data) + offset;
    const auto nb = contiguous_strides(Type::F32, ne);
    for (int i = 0; i < 4; ++i) {
        v.ne[i] = ne[i];
        v.nb[i] = int64_t(nb[i]);
    }
    return v;
}

// The inputs of an attention problem from the sources q, k, v, mask, sinks (src[0..4] of a
// forward node and of its backward node alike).
Problem inputs_of(const Tensor* node, const Params& params) {
    const Tensor *q = node->src[0], *k = node->src[1], *v = node->src[2];
    Problem p;
    p.Dk = q->ne[0];
    p.Dv = v->ne[0];
    p.Sq = q->ne[1];
    p.Skv = k->ne[1];
    p.Hq = q->ne[2];
    p.Hkv = k->ne[2];
    p.B = q->ne[3];
    p.params = params;
    p.q = view_of(q);
    p.k = view_of(k);
    p.v = view_of(v);
    p.mask = view_of(node->src[3]);
    p.sinks = view_of(node->src[4]);
    return p;
}

} // namespace

Problem forward_problem(const Tensor* node) {
    const FlashAttnNodeParams np = node->params<FlashAttnNodeParams>();
    Problem p = inputs_of(node, np.attn);
    p.o = view_of(node);
    if (np.options.with_lse) p.lse = f32_view_at(node, lse_offset(node->nbytes()), {p.Sq, p.Hq, p.B, 1});
    return p;
}

// Everything comes from the backward node itself: its src[5] holds the forward's output
// values but may be a copy of them (the scheduler copies inputs computed on another
// backend), which has neither the forward's sources nor its parameters.
BackwardProblem backward_problem(const Tensor* back) {
    const Tensor* fwd = back->src[5];
    BackwardProblem bp;
    bp.fwd = inputs_of(back, back->params<FlashAttnBackParams>().attn);
    bp.fwd.o = view_of(fwd);
    bp.fwd.lse = view_of(back->src[7]);
    bp.dO = view_of(back->src[6]);
    const BackOffsets off = back_offsets(back);
    const Tensor *q = back->src[0], *k = back->src[1], *v = back->src[2], *sinks = back->src[4];
    bp.dq = f32_view_at(back, 0, q->ne);
    bp.dk = f32_view_at(back, off.dk, k->ne);
    bp.dv = f32_view_at(back, off.dv, v->ne);
    if (sinks) bp.dsinks = f32_view_at(back, off.dsinks, sinks->ne);
    bp.deterministic = back->params<FlashAttnBackParams>().deterministic;
    return bp;
}

} // namespace gfa::attn
