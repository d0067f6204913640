// flash_attn_ext on CUDA: the FlashAttention-2 kernels of flash_attn_cuda.h, fed by the
// shared tensor-to-problem translation, with their workspace taken from the backend's
// scratch memory.
#include "attention/layout.h"
#include "cuda_common.h"
#include "flash_attn_cuda.h"
#include "quant_matmul.h"

namespace gfa::cuda {

namespace {

void run_flash_attn(const ComputeCtx& ctx, Tensor* dst) {
    const attn::Problem p = attn::forward_problem(dst);
    const size_t bytes = flash_attn_forward_workspace_size(p);
    void* workspace = bytes ? ctx.scratch->get(bytes, ctx.stream, ctx.device_name) : nullptr;
    flash_attn_forward(p, ctx.stream, workspace, bytes);
}

// flash_attn_ext, then the quantized matrix-vector product that reads its output (decoding's
// output projection): where the forward splits the keys, its combine kernel also writes the
// product's int8 columns, so the product needs no rounding launch of its own; elsewhere the
// product rounds them as it would alone. One scratch block holds the attention's workspace,
// then the columns.
void run_attention_matvec(const ComputeCtx& ctx, Tensor* product) {
    const std::span<Tensor* const> nodes = ctx.fused;
    if (nodes.size() != 2 || nodes[1] != product)
        fail("CUDA: the fused attention -> product launch lost its nodes");
    const attn::Problem p = attn::forward_problem(nodes[0]);
    const size_t workspace_bytes = flash_attn_forward_workspace_size(p);
    const size_t columns_at = (workspace_bytes + 255) / 256 * 256;
    const TensorView b = view_of(product->src[1]);
    char* scratch = static_cast<char*>(
        ctx.scratch->get(columns_at + quantized_columns_bytes(b), ctx.stream, ctx.device_name));
    const ColumnBlocks columns = column_blocks_in(b, scratch + columns_at);
    const bool rounded =
        flash_attn_forward(p, ctx.stream, workspace_bytes ? scratch : nullptr, workspace_bytes,
                           Int8Columns{columns.q, reinterpret_cast<float*>(columns.ds)});
    if (!rounded) quantize_columns(b, scratch + columns_at, ctx.stream);
    compute_mul_mat(ctx, product, nullptr, scratch + columns_at);
}

void run_flash_attn_back(const ComputeCtx& ctx, Tensor* dst) {
    const attn::BackwardProblem bp = attn::backward_problem(dst);
    const size_t bytes = flash_attn_backward_workspace_size(bp);
    flash_attn_backward(bp, ctx.stream, ctx.scratch->get(bytes, ctx.stream, ctx.device_name), bytes);
}

// The kernels cover everything the op's builder accepts; the gradient dO must be f32 or
// 16-bit with packed rows, which autodiff always produces.
bool supports_back(const Tensor* dst) {
    const Tensor* dO = dst->src[6];
    return (dO->type == Type::F32 || dO->type == Type::F16 || dO->type == Type::BF16) && row_is_packed(dO);
}

} // namespace

Fusion find_attention_fusion(std::span<Tensor* const> nodes, size_t i) {
    if (nodes.size() - i < 2 || nodes[i]->op != Op::FlashAttnExt) return {};
    const Tensor *attention = nodes[i], *product = nodes[i + 1];
    // The product reads the whole output, packed, as its columns (a reshape of it, which
    // launches nothing): the layout the combine kernel writes the int8 blocks in.
    const Tensor* b = product->op == Op::MulMat ? product->src[1] : nullptr;
    if (!b || attention->type != Type::F32 || !attention->is_contiguous() || !takes_quant_matvec(product) ||
        b->data != attention->data || !b->is_contiguous() ||
        b->ne[0] != attention->ne[0] * attention->ne[1] || b->nelements() != attention->nelements())
        return {};
    return {2, run_attention_matvec};
}

void register_attention_kernels(KernelTable& t) {
    t[size_t(Op::FlashAttnExt)] = {run_flash_attn, nullptr};
    t[size_t(Op::FlashAttnBack)] = {run_flash_attn_back, supports_back};
}

} // namespace gfa::cuda
