// Forward kernels of head-dim tile 256 (prefill and split-KV decode, f16 and bf16).
#include "fa_instantiate.cuh"

namespace gfa::cuda::fa {
KernelInfo fwd_info_d256(bool decode) {
    return fwd_info_tile<256>(decode);
}
void fwd_launch_d256(bool bf16, bool decode, const FwdArgs& a, dim3 grid, cudaStream_t st) {
    fwd_launch_tile<256>(bf16, decode, a, grid, st);
}
} // namespace gfa::cuda::fa
