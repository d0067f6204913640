// Forward kernels of head-dim tile 128 (prefill and split-KV decode, f16 and bf16).
#include "fa_instantiate.cuh"

namespace gfa::cuda::fa {
KernelInfo fwd_info_d128(bool decode) {
    return fwd_info_tile<128>(decode);
}
void fwd_launch_d128(bool bf16, bool decode, const FwdArgs& a, dim3 grid, cudaStream_t st) {
    fwd_launch_tile<128>(bf16, decode, a, grid, st);
}
} // namespace gfa::cuda::fa
