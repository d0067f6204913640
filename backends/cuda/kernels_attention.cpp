// flash_attn_ext on CUDA: the FlashAttention-2 kernels of flash_attn_cuda.h, fed by the
// shared tensor-to-problem translation, with their workspace taken from the backend's
// scratch memory.
#include "attention/layout.h"
#include "cuda_common.h"
#include "flash_attn_cuda.h"

namespace gfa::cuda {

namespace {

void run_flash_attn(const ComputeCtx& ctx, Tensor* dst) {
    const attn::Problem p = attn::forward_problem(dst);
    const size_t bytes = flash_attn_forward_workspace_size(p);
    void* workspace = bytes ? ctx.scratch->get(bytes, ctx.stream, ctx.device_name) : nullptr;
    flash_attn_forward(p, ctx.stream, workspace, bytes);
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

void register_attention_kernels(KernelTable& t) {
    t[size_t(Op::FlashAttnExt)] = {run_flash_attn, nullptr};
    t[size_t(Op::FlashAttnBack)] = {run_flash_attn_back, supports_back};
}

} // namespace gfa::cuda
