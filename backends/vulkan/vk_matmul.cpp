// mul_mat, mul_mat_id and out_prod on Vulkan: weights of every type the library reads (f32, f16, bf16
// and the GGUF blocks, decoded while tiles load), activations f32/f16/bf16, results f32. Products
// of a few columns (decoding) take the matrix-vector shader, a subgroup per weight row that
// decodes each weight once for all columns, on devices with subgroup arithmetic; wider
// ones (and every product elsewhere) the tiled shader. mul_mat_id (a mixture's experts) has
// only a matrix-vector shader, a column per (slot, token), so it needs subgroup arithmetic.
// The precision a product asks for (MatMulPrecision) is not looked at: every product here
// reads the activations as stored and sums in f32, at least as precise as any it may ask for.
#include "vk_ops.h"

#include <algorithm>

namespace gfa::vulkan {

namespace {

constexpr int64_t kVectorColumns = 8; // NCOLS in shaders/mul_mat_vec.comp
constexpr uint32_t kTile = 64;        // BM = BN in shaders/mul_mat.comp

// Whether the tiled shader's grid for this result (tiles in x and y, matrices in z; the
// matrix-vector shader's grid is smaller) fits the device, and every operand can be bound.
bool fits_device(const Context& ctx, const Tensor* node) {
    const auto& limit = ctx.limits().maxComputeWorkGroupCount;
    const uint64_t batches = uint64_t(node->ne[2] * node->ne[3]);
    return batches <= limit[1] && batches <= limit[2] &&
           uint64_t(node->ne[0] + kTile - 1) / kTile <= limit[0] &&
           uint64_t(node->ne[1] + kTile - 1) / kTile <= limit[1] && bindable(ctx, node->src[0]) &&
           bindable(ctx, node->src[1]) && bindable(ctx, node);
}

bool supports_mul_mat(const Context& ctx, const Tensor* node) {
    const Tensor *a = node->src[0], *b = node->src[1];
    const Type bt = b->type;
    if (bt != Type::F32 && bt != Type::F16 && bt != Type::BF16) return false;
    if (a->type == Type::I32 || a->type == Type::I64 || node->type != Type::F32) return false;
    return fits_device(ctx, node);
}

// The operands and result of a product bound, with b's matrices per matrix of a.
OpDispatch product(Recorder& rec, const Tensor* node) {
    const Tensor *a = node->src[0], *b = node->src[1];
    OpDispatch d;
    bind_tensor(rec, d, 0, a, "the first operand");
    bind_tensor(rec, d, 1, b, "the second operand");
    bind_tensor(rec, d, 3, node, "the result");
    d.params.iarg[0] = uint32_t(b->ne[2] / a->ne[2]);
    d.params.iarg[1] = uint32_t(b->ne[3] / a->ne[3]);
    return d;
}

// The tiled shader: a workgroup per 64 x 64 block of the result and matrix.
void dispatch_tiled(Recorder& rec, OpDispatch& d, const Tensor* node) {
    dispatch_op(rec, "mul_mat", d, uint32_t((node->ne[0] + kTile - 1) / kTile),
                uint32_t((node->ne[1] + kTile - 1) / kTile), uint32_t(node->ne[2] * node->ne[3]));
}

void record_mul_mat(Recorder& rec, const Tensor* node) {
    const Tensor *a = node->src[0], *b = node->src[1];
    OpDispatch d = product(rec, node);
    const uint32_t batches = uint32_t(node->ne[2] * node->ne[3]);
    const Context& ctx = rec.context();
    if (b->ne[1] <= kVectorColumns && ctx.has_subgroup_arithmetic()) {
        const uint32_t rows_per_group =
            std::max<uint32_t>(1, 128 / ctx.subgroup_size()); // a row per subgroup
        dispatch_op(rec, "mul_mat_vec", d, capped_groups(uint64_t(a->ne[1]), rows_per_group), batches);
        return;
    }
    dispatch_tiled(rec, d, node);
}

// mul_mat_id(as [K, M, E], b [K, Nb, T], ids [k, T]) -> [M, k, T]: experts of any type mul_mat
// reads, b f32, ids i32. Both grid dimensions are capped and walked grid-stride by the shader,
// so only the bindings limit the sizes.
bool supports_mul_mat_id(const Context& ctx, const Tensor* node) {
    const Tensor *as = node->src[0], *b = node->src[1], *ids = node->src[2];
    if (!ctx.has_subgroup_arithmetic()) return false; // the shader sums with subgroupAdd
    if (as->type == Type::I32 || as->type == Type::I64 || b->type != Type::F32 || ids->type != Type::I32 ||
        node->type != Type::F32)
        return false;
    return bindable(ctx, as) && bindable(ctx, b) && bindable(ctx, ids) && bindable(ctx, node);
}

void record_mul_mat_id(Recorder& rec, const Tensor* node) {
    OpDispatch d;
    bind_tensor(rec, d, 0, node->src[0], "the experts");
    bind_tensor(rec, d, 1, node->src[1], "the inputs");
    bind_tensor(rec, d, 2, node->src[2], "the expert ids");
    bind_tensor(rec, d, 3, node, "the result");
    const uint32_t rows_per_group = std::max<uint32_t>(1, 128 / rec.context().subgroup_size());
    const uint64_t columns = uint64_t(node->ne[1] * node->ne[2]); // (slot, token) pairs
    dispatch_op(rec, "mul_mat_id", d, capped_groups(uint64_t(node->ne[0]), rows_per_group),
                capped_groups(columns, 1));
}

// out_prod(a [M, K], b [N, K]) = the mul_mat of a and b with dims 0 and 1 of both swapped:
// the same shaders, given descriptors that read a(m, k) as element (k, m).
bool supports_out_prod(const Context& ctx, const Tensor* node) {
    return node->src[0]->type == Type::F32 && node->src[1]->type == Type::F32 && fits_device(ctx, node);
}

void swap_dims01(TensorDesc& t) {
    std::swap(t.ne[0], t.ne[1]);
    std::swap(t.nb[0], t.nb[1]);
}

void record_out_prod(Recorder& rec, const Tensor* node) {
    OpDispatch d = product(rec, node);
    swap_dims01(d.params.src0);
    swap_dims01(d.params.src1);
    dispatch_tiled(rec, d, node);
}

} // namespace

void register_matmul_kernels(std::map<Op, Kernel>& table) {
    table[Op::MulMat] = {supports_mul_mat, record_mul_mat};
    table[Op::MulMatId] = {supports_mul_mat_id, record_mul_mat_id};
    table[Op::OutProd] = {supports_out_prod, record_out_prod};
}

} // namespace gfa::vulkan
