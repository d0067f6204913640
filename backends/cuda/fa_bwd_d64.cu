// Backward kernels of head-dim tile 64 (dK/dV with dQ atomics, deterministic dQ; f16 and bf16).
#include "fa_instantiate.cuh"

namespace gfa::cuda::fa {
BwdInfo bwd_info_d64() {
    return bwd_info_tile<64>();
}
void bwd_launch_d64(bool bf16, BwdKernel which, const BwdArgs& a, dim3 grid, cudaStream_t st) {
    bwd_launch_tile<64>(bf16, which, a, grid, st);
}
} // namespace gfa::cuda::fa
