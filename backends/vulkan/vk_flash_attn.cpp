// flash_attn_ext on Vulkan: the forward (shaders/fa_forward.comp) and the backward (prepare,
// dK/dV, dQ, sinks), fed by the shared tensor-to-problem translation. The shaders compute in
// f32 whatever the storage type (f32, f16, bf16; q8_0/q4_0 K/V in the forward, decoded as
// the CPU decodes them), so f32 graphs keep f32 accuracy here.
#include "attention/layout.h"
#include "vk_context.h"

#include <ggml-fa/ops.h>

#include <array>
#include <cmath>

namespace gfa::vulkan {

namespace {

// Mirrors ParamsBlock in shaders/fa_common.glsl (std430: 32-bit fields in order).
struct FaParams {
    uint32_t Dk, Dv, Sq, Skv, Hq, Hkv, B, group_size;
    uint32_t q_type, k_type, v_type, o_type, mask_type, dO_type, has_mask, has_sinks;
    uint32_t has_lse, causal;
    int32_t window_left, window_right;
    float scale, softcap, m0, m1;
    uint32_t n_head_log2, use_alibi, pad0, pad1;
    uint32_t q_off, q_nb1, q_nb2, q_nb3;
    uint32_t k_off, k_nb1, k_nb2, k_nb3;
    uint32_t v_off, v_nb1, v_nb2, v_nb3;
    uint32_t mask_off, mask_nb1, mask_nb2, mask_nb3;
    uint32_t o_off, o_nb1, o_nb2, o_nb3;
    uint32_t dO_off, dO_nb1, dO_nb2, dO_nb3;
    uint32_t lse_off, lse_nb0, lse_nb1, lse_nb2;
    uint32_t sinks_off, sinks_nb0, rowD_off, pad2;
    uint32_t dq_off, dk_off, dv_off, dsinks_off;
};
static_assert(sizeof(FaParams) == 64 * 4, "FaParams must match the shaders' ParamsBlock");

// Binding slots of the FA shaders (after the parameters at 0).
enum Slot { kQ, kK, kV, kMask, kSinks, kO, kDO, kLse, kGrad, kRowD, kSlots };

// Largest head dimension a specialization handles, and its tiles.
struct Tiles {
    uint32_t dmax, br, bc;
};
// Forward: (BR + BC) * DMAX + BR * BC floats of shared memory (+ four per row). Rows are
// (query, head) pairs of a GQA group; a few of them (decoding) take 8-row tiles, so that a
// workgroup does not compute 32 rows for 4.
constexpr std::array<Tiles, 3> kForwardTiles = {{{64, 32, 32}, {128, 16, 32}, {256, 8, 16}}};
constexpr std::array<Tiles, 3> kFewRowTiles = {{{64, 8, 32}, {128, 8, 32}, {256, 8, 16}}};
constexpr int64_t kFewRows = 8;
// Backward (both kernels): 2 (BR + BC) * DMAX + 2 BR * BC floats.
constexpr std::array<Tiles, 3> kBackwardTiles = {{{64, 16, 16}, {128, 8, 16}, {256, 4, 8}}};

uint32_t forward_shared_bytes(const Tiles& t) {
    return 4 * ((t.br + t.bc) * t.dmax + t.br * t.bc + 4 * t.br);
}
uint32_t backward_shared_bytes(const Tiles& t) {
    return 4 * (2 * (t.br + t.bc) * t.dmax + 2 * t.br * t.bc + 2 * t.br);
}

const Tiles* tiles_for(const std::array<Tiles, 3>& table, int64_t d) {
    for (const Tiles& t : table)
        if (d <= int64_t(t.dmax)) return &t;
    return nullptr;
}

uint32_t type_code(Type t) { // the shaders' T_*
    switch (t) {
    case Type::F32:
        return 0;
    case Type::F16:
        return 1;
    case Type::BF16:
        return 2;
    case Type::Q8_0:
        return 3;
    default: // Type::Q4_0
        return 4;
    }
}
bool float_type(Type t) {
    return t == Type::F32 || t == Type::F16 || t == Type::BF16;
}
// K/V caches the forward reads in blocks (rows of whole blocks, addressed in bytes).
bool block_type(Type t) {
    return t == Type::Q8_0 || t == Type::Q4_0;
}

// Bytes from a view's first element to the end of its last.
size_t extent_bytes(const attn::View& v) {
    const TypeTraits& tt = type_traits(v.type);
    size_t bytes = size_t(v.ne[0] / tt.block_size) * tt.type_size; // the first row
    for (int d = 1; d < 4; ++d) bytes += size_t(v.ne[d] - 1) * size_t(v.nb[d]);
    return bytes;
}

// A view bound to a slot: the binding and the view's element offset and strides in its own
// element size (in bytes for block types). Fails (naming the tensor) when a stride or the
// offset is not a whole number of elements, which the word-addressed shaders cannot express.
struct BoundView {
    Binding binding;
    uint32_t off = 0, nb[4] = {0, 0, 0, 0};
};
BoundView bind(const Recorder& rec, const attn::View& v, const char* what) {
    BoundView b;
    if (!v.present()) return b;
    const size_t elem = block_type(v.type) ? 1 : type_traits(v.type).type_size;
    const Located l = rec.locate(v.data, extent_bytes(v), what);
    b.binding = l.binding;
    auto whole = [&](size_t bytes) {
        if (bytes % elem != 0)
            throw Error(std::string("flash_attn_ext (Vulkan): ") + what + " has a stride or offset of " +
                        std::to_string(bytes) + " bytes, not a whole number of elements");
        return uint32_t(bytes / elem);
    };
    b.off = whole(l.first_byte);
    for (int d = 0; d < 4; ++d) b.nb[d] = v.ne[d] == 1 ? 0u : whole(size_t(v.nb[d])); // 0: broadcast
    // Blocks start on 2-byte boundaries (their f16 scale), as the shaders read them.
    if (block_type(v.type) && (l.first_byte % 2 != 0 || (v.ne[1] > 1 && v.nb[1] % 2 != 0)))
        throw Error(std::string("flash_attn_ext (Vulkan): ") + what + " has blocks at odd byte offsets");
    return b;
}

// The parameter block of a problem, with every view's binding.
FaParams make_params(const attn::Problem& p, std::array<Binding, kSlots>& slots, const Recorder& rec) {
    FaParams f{};
    f.Dk = uint32_t(p.Dk);
    f.Dv = uint32_t(p.Dv);
    f.Sq = uint32_t(p.Sq);
    f.Skv = uint32_t(p.Skv);
    f.Hq = uint32_t(p.Hq);
    f.Hkv = uint32_t(p.Hkv);
    f.B = uint32_t(p.B);
    f.group_size = uint32_t(p.Hq / p.Hkv);
    f.q_type = type_code(p.q.type);
    f.k_type = type_code(p.k.type);
    f.v_type = type_code(p.v.type);
    f.o_type = type_code(p.o.type);
    f.has_mask = p.mask.present();
    f.mask_type = p.mask.present() ? type_code(p.mask.type) : 0u;
    f.has_sinks = p.sinks.present();
    f.has_lse = p.lse.present();
    f.causal = p.params.causal;
    f.window_left = p.params.window_left;
    f.window_right = p.params.window_right;
    f.scale = p.params.scale;
    f.softcap = p.params.logit_softcap;
    // ALiBi as attn::alibi_slope computes it: slope(h) = m0^(h+1) or m1^(2(h - n)+1).
    f.use_alibi = p.params.max_bias > 0.0f;
    if (f.use_alibi) {
        const int64_t n = int64_t(1) << int64_t(std::floor(std::log2(double(p.Hq))));
        f.n_head_log2 = uint32_t(n);
        f.m0 = std::pow(2.0f, -p.params.max_bias / float(n));
        f.m1 = std::pow(2.0f, -p.params.max_bias / 2.0f / float(n));
    }

    const BoundView q = bind(rec, p.q, "q"), k = bind(rec, p.k, "k"), v = bind(rec, p.v, "v");
    const BoundView mask = bind(rec, p.mask, "mask"), sinks = bind(rec, p.sinks, "sinks");
    const BoundView o = bind(rec, p.o, "the output");
    slots[kQ] = q.binding;
    slots[kK] = k.binding;
    slots[kV] = v.binding;
    slots[kMask] = mask.binding;
    slots[kSinks] = sinks.binding;
    slots[kO] = o.binding;
    f.q_off = q.off, f.q_nb1 = q.nb[1], f.q_nb2 = q.nb[2], f.q_nb3 = q.nb[3];
    f.k_off = k.off, f.k_nb1 = k.nb[1], f.k_nb2 = k.nb[2], f.k_nb3 = k.nb[3];
    f.v_off = v.off, f.v_nb1 = v.nb[1], f.v_nb2 = v.nb[2], f.v_nb3 = v.nb[3];
    f.mask_off = mask.off, f.mask_nb1 = mask.nb[1], f.mask_nb2 = mask.nb[2], f.mask_nb3 = mask.nb[3];
    f.o_off = o.off, f.o_nb1 = o.nb[1], f.o_nb2 = o.nb[2], f.o_nb3 = o.nb[3];
    f.sinks_off = sinks.off, f.sinks_nb0 = sinks.nb[0];
    return f;
}

// ---- support -----------------------------------------------------------------------------

// Everything the op's builder accepts (q8_0/q4_0 K/V in the forward only) except head dims
// above 256 and problems whose element indices or workgroup counts overflow what the shaders
// use (32-bit word indices, 65535 workgroups per dimension).
bool supports_problem(const Context& ctx, const attn::Problem& p, const std::array<Tiles, 3>& table,
                      uint32_t (*shared)(const Tiles&), bool blocks_allowed) {
    for (const attn::View* v : {&p.q, &p.o})
        if (!float_type(v->type)) return false;
    for (const attn::View* v : {&p.k, &p.v})
        if (!float_type(v->type) && !(blocks_allowed && block_type(v->type))) return false;
    const Tiles* t = tiles_for(table, std::max(p.Dk, p.Dv));
    if (!t || !ctx.fits_shared(shared(*t))) return false;
    const int64_t limit = int64_t(ctx.limits().maxStorageBufferRange);
    for (const attn::View* v : {&p.q, &p.k, &p.v, &p.o, &p.mask})
        if (v->present() && int64_t(extent_bytes(*v)) + 256 > limit) return false;
    const uint64_t groups = ctx.limits().maxComputeWorkGroupCount[0];
    return uint64_t(p.Sq + t->br - 1) / t->br <= groups && uint64_t(p.Skv + t->bc - 1) / t->bc <= groups &&
           uint64_t(p.Hq) <= ctx.limits().maxComputeWorkGroupCount[1] &&
           uint64_t(p.B) <= ctx.limits().maxComputeWorkGroupCount[2];
}

// The forward's tiles for a problem: rows are its queries times the GQA group.
const std::array<Tiles, 3>& forward_tiles(const attn::Problem& p) {
    return p.Sq * (p.Hq / p.Hkv) <= kFewRows ? kFewRowTiles : kForwardTiles;
}

bool supports_forward(const Context& ctx, const Tensor* node) {
    const attn::Problem p = attn::forward_problem(node);
    const std::array<Tiles, 3>& table = forward_tiles(p);
    const Tiles* t = tiles_for(table, std::max(p.Dk, p.Dv));
    return supports_problem(ctx, p, table, forward_shared_bytes, true) &&
           uint64_t(p.Sq * (p.Hq / p.Hkv) + t->br - 1) / t->br <= ctx.limits().maxComputeWorkGroupCount[0];
}

bool supports_backward(const Context& ctx, const Tensor* node) {
    const attn::BackwardProblem bp = attn::backward_problem(node);
    if (!float_type(bp.dO.type)) return false;
    const int64_t rows = bp.fwd.B * bp.fwd.Hq * bp.fwd.Sq;
    return rows / 128 < int64_t(ctx.limits().maxComputeWorkGroupCount[0]) &&
           supports_problem(ctx, bp.fwd, kBackwardTiles, backward_shared_bytes, false);
}

// ---- recording ---------------------------------------------------------------------------

uint32_t groups(int64_t n, uint32_t per_group) {
    return uint32_t((n + per_group - 1) / per_group);
}

void record_forward(Recorder& rec, const Tensor* node) {
    const attn::Problem p = attn::forward_problem(node);
    attn::validate(p, "flash_attn_ext (Vulkan)");
    std::array<Binding, kSlots> slots{};
    FaParams f = make_params(p, slots, rec);
    if (p.lse.present()) {
        // The LSE lives in the output node after O (layout.h); the output's binding covers
        // the node, so its word offset counts from the same start.
        const Located o = rec.locate(p.o.data, node->alloc_bytes(), "the output and its LSE");
        slots[kO] = o.binding;
        f.o_off = uint32_t(o.first_byte / size_t(p.o.nb[0]));
        f.lse_off = uint32_t((o.first_byte + attn::lse_offset(node->nbytes())) / 4);
    }
    const Tiles& t = *tiles_for(forward_tiles(p), std::max(p.Dk, p.Dv));
    const uint32_t constants[] = {t.dmax, t.br, t.bc};
    const Pipeline& pipe =
        rec.context().pipeline("fa_forward", constants, kSlots + 1, forward_shared_bytes(t));
    // A workgroup per BR packed rows of one K/V head's group (shaders/fa_forward.comp).
    rec.dispatch(pipe, &f, sizeof f, slots, groups(p.Sq * (p.Hq / p.Hkv), t.br), uint32_t(p.Hkv),
                 uint32_t(p.B));
}

void record_backward(Recorder& rec, const Tensor* node) {
    const attn::BackwardProblem bp = attn::backward_problem(node);
    attn::validate(bp, "flash_attn_ext backward (Vulkan)");
    const attn::Problem& p = bp.fwd;
    std::array<Binding, kSlots> slots{};
    FaParams f = make_params(p, slots, rec);

    const BoundView dO = bind(rec, bp.dO, "dO");
    slots[kDO] = dO.binding;
    f.dO_type = type_code(bp.dO.type);
    f.dO_off = dO.off, f.dO_nb1 = dO.nb[1], f.dO_nb2 = dO.nb[2], f.dO_nb3 = dO.nb[3];
    const BoundView lse = bind(rec, p.lse, "the forward's LSE");
    slots[kLse] = lse.binding;
    f.lse_off = lse.off, f.lse_nb0 = lse.nb[0], f.lse_nb1 = lse.nb[1], f.lse_nb2 = lse.nb[2];
    f.has_lse = 1;

    // dQ, dK, dV (and dSinks) are dense f32 inside the gradient node (layout.h).
    const Located grads = rec.locate(node->data, node->alloc_bytes(), "the gradients");
    slots[kGrad] = grads.binding;
    const uint32_t first = uint32_t(grads.first_byte / 4);
    const attn::BackOffsets off = attn::back_offsets(node);
    f.dq_off = first;
    f.dk_off = first + uint32_t(off.dk / 4);
    f.dv_off = first + uint32_t(off.dv / 4);
    f.dsinks_off = first + uint32_t(off.dsinks / 4);

    const int64_t rows = p.B * p.Hq * p.Sq;
    slots[kRowD] = rec.scratch(size_t(rows) * sizeof(float));
    f.rowD_off = 0;

    const Tiles& t = *tiles_for(kBackwardTiles, std::max(p.Dk, p.Dv));
    const uint32_t constants[] = {t.dmax, t.br, t.bc};
    Context& ctx = rec.context();
    const uint32_t n = kSlots + 1;
    // 1. D_i = dO_i . O_i; 2. dK, dV per key tile and dQ per query tile (independent of each
    // other, both reading D); 3. the sinks' gradient, also from D.
    rec.dispatch(ctx.pipeline("fa_backward_prepare", {}, n, 0), &f, sizeof f, slots, groups(rows, 128), 1, 1);
    rec.barrier();
    const uint32_t shared = backward_shared_bytes(t);
    rec.dispatch(ctx.pipeline("fa_backward_dkdv", constants, n, shared), &f, sizeof f, slots,
                 groups(p.Skv, t.bc), uint32_t(p.Hkv), uint32_t(p.B));
    rec.dispatch(ctx.pipeline("fa_backward_dq", constants, n, shared), &f, sizeof f, slots,
                 groups(p.Sq, t.br), uint32_t(p.Hq), uint32_t(p.B));
    if (p.sinks.present())
        rec.dispatch(ctx.pipeline("fa_backward_sinks", {}, n, 4 * 128), &f, sizeof f, slots, uint32_t(p.Hq),
                     1, 1);
}

} // namespace

void register_attention_kernels(std::map<Op, Kernel>& table) {
    table[Op::FlashAttnExt] = {supports_forward, record_forward};
    table[Op::FlashAttnBack] = {supports_backward, record_backward};
}

} // namespace gfa::vulkan
