// Backward kernels of head-dim tile 256 (dK/dV with dQ atomics, deterministic dQ; f16 and bf16).
#include "fa_instantiate.cuh"

namespace gfa::cuda::fa {
BwdInfo bwd_info_d256() {
    return bwd_info_tile<256>();
}
void bwd_launch_d256(bool bf16, BwdKernel which, const BwdArgs& a, dim3 grid, cudaStream_t st) {
    bwd_launch_tile<256>(bf16, which, a, grid, st);
}
} // namespace gfa::cuda::fa
