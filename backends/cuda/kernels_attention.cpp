// flash_attn_ext on CUDA: the FlashAttention-2 kernels of flash_attn_cuda.h, fed by the
// shared tensor-to-problem translation, with their workspace taken from the backend's
// scratch memory.
#include "attention/layout.h"
#include "cuda_common.h"
#include "flash_attn_cuda.h"
#include "quant_matmul.h"

#include <cstdlib>

namespace gfa::cuda {

namespace {

void run_flash_attn(const ComputeCtx& ctx, Tensor* dst) {
    const attn::Problem p = attn::forward_problem(dst);
    const size_t bytes = flash_attn_forward_workspace_size(p);
    void* workspace = bytes ? ctx.scratch->get(bytes, ctx.stream, ctx.device_name) : nullptr;
    flash_attn_forward(p, ctx.stream, workspace, bytes);
}

// The attention node, then the quantized product reading its output (find_attention_matvec_
// fusion): the scratch block holds the attention's workspace, then the product's int8
// columns, which the attention kernel writes where it can; the product rounds its columns
// itself where it could not (a split over the keys, whose combine kernel writes o).
void run_flash_attn_matvec(const ComputeCtx& ctx, Tensor* product) {
    if (ctx.fused.size() != 2 || ctx.fused[1] != product)
        fail("CUDA: the fused attention -> product launch lost its nodes");
    const attn::Problem p = attn::forward_problem(ctx.fused[0]);
    const size_t workspace_bytes = (flash_attn_forward_workspace_size(p) + 255) / 256 * 256;
    const TensorView columns_of = view_of(product->src[1]);
    char* scratch = static_cast<char*>(
        ctx.scratch->get(workspace_bytes + quantized_columns_bytes(columns_of), ctx.stream, ctx.device_name));
    void* columns = scratch + workspace_bytes;
    const ColumnBlocks at = column_blocks_in(columns_of, columns);
    const bool written = flash_attn_forward(p, ctx.stream, workspace_bytes ? scratch : nullptr,
                                            workspace_bytes, Int8Columns{at.q, at.ds});
    compute_mul_mat(ctx, product, nullptr, written ? columns : nullptr);
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

const Tensor* storage_of(const Tensor* t) {
    while (t->view_src) t = t->view_src;
    return t;
}

} // namespace

Fusion find_attention_matvec_fusion(std::span<Tensor* const> nodes, size_t i) {
    if (nodes.size() - i < 2) return {};
    const Tensor *attention = nodes[i], *product = nodes[i + 1];
    if (attention->op != Op::FlashAttnExt || product->op != Op::MulMat || !takes_quant_matvec(product))
        return {};
    if (const char* e = std::getenv("GFA_CUDA_ATTN_COLUMNS"); e && *e == '0') return {}; // TEMPORARY
    // The product's columns are the attention's output, reshaped: o [Dv, Hq, Sq, B], packed,
    // read as [Dv Hq, Sq B].
    const Tensor* b = product->src[1];
    if (storage_of(b) != attention || b->data != attention->data || !b->is_contiguous() ||
        !attention->is_contiguous() || attention->type != Type::F32 || b->type != Type::F32 ||
        b->ne[0] != attention->ne[0] * attention->ne[1] || b->ne[0] % 32 != 0 || b->ne[2] != 1 ||
        b->ne[3] != 1 || b->nelements() != attention->nelements())
        return {};
    return {2, run_flash_attn_matvec};
}

void register_attention_kernels(KernelTable& t) {
    t[size_t(Op::FlashAttnExt)] = {run_flash_attn, nullptr};
    t[size_t(Op::FlashAttnBack)] = {run_flash_attn_back, supports_back};
}

} // namespace gfa::cuda
