// flash_attn_ext on the CPU: the FlashAttention-2 kernels of flash_attn_cpu.h, fed by the
// shared tensor-to-problem translation.
#include "attention/layout.h"
#include "cpu_kernels.h"
#include "flash_attn_cpu.h"

namespace gfa::cpu {

namespace {

void run_flash_attn(const ComputeCtx& ctx, Tensor* dst) {
    flash_attn_forward(attn::forward_problem(dst), ctx.pool);
}
void run_flash_attn_back(const ComputeCtx& ctx, Tensor* dst) {
    flash_attn_backward(attn::backward_problem(dst), ctx.pool);
}
// dO arrives as an f32 gradient; the kernels read every layout the builder accepts.
bool supports_back(const Tensor* dst) {
    return dst->src[6]->type == Type::F32 && dst->src[6]->nb[0] == 4;
}

} // namespace

void register_attention_kernels(KernelTable& t) {
    t[size_t(Op::FlashAttnExt)] = {run_flash_attn, nullptr};
    t[size_t(Op::FlashAttnBack)] = {run_flash_attn_back, supports_back};
}

} // namespace gfa::cpu
