// Backward kernels of head-dim tile 128 (dK/dV with dQ atomics, deterministic dQ; f16 and bf16).
#include "fa_instantiate.cuh"

namespace gfa::cuda::fa {
BwdInfo bwd_info_d128() {
    return bwd_info_tile<128>();
}
void bwd_launch_d128(bool bf16, BwdKernel which, const BwdArgs& a, dim3 grid, cudaStream_t st) {
    bwd_launch_tile<128>(bf16, which, a, grid, st);
}
} // namespace gfa::cuda::fa
