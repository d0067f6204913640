// The backward dK/dV kernel on Hopper's warpgroup tensor cores (fa_backward_hopper.cuh) for
// head-dim tiles 64 and 128, f16 and bf16.
#include "fa_backward_hopper.cuh"
#include "fa_instantiate.cuh"

#include <cstdlib>
#include <cstring>

namespace gfa::cuda::fa {
namespace {

template <int D, class T> using HopperBwdTr = HopperBwdTraits<D, T>;

template <class Tr> void launch_one(const BwdArgs& a, dim3 grid, cudaStream_t st) {
    static const bool ready = (set_smem(reinterpret_cast<const void*>(bwd_hopper_kernel<Tr>), Tr::kSmem,
                                        "the Hopper backward dK/dV kernel"),
                               true);
    (void)ready;
    bwd_hopper_kernel<Tr><<<grid, Tr::kThreads, Tr::kSmem, st>>>(a);
    check_launch("the Hopper backward dK/dV kernel");
}

} // namespace

bool hopper_backward_wanted(int tile) {
    if ((tile != 64 && tile != 128) || !hopper_kernels_usable()) return false;
    const char* v = std::getenv("GFA_CUDA_FA_HOPPER_BWD");
    return !(v && std::strcmp(v, "0") == 0);
}

BwdHopperInfo bwd_hopper_info(int tile) {
    if (tile == 64)
        return {HopperBwdTr<64, __half>::BN, HopperBwdTr<64, __half>::kThreads,
                HopperBwdTr<64, __half>::kSmem};
    return {HopperBwdTr<128, __half>::BN, HopperBwdTr<128, __half>::kThreads,
            HopperBwdTr<128, __half>::kSmem};
}

void bwd_hopper_launch(int tile, bool bf16, const BwdArgs& a, dim3 grid, cudaStream_t st) {
    if (tile == 64)
        bf16 ? launch_one<HopperBwdTr<64, __nv_bfloat16>>(a, grid, st)
             : launch_one<HopperBwdTr<64, __half>>(a, grid, st);
    else
        bf16 ? launch_one<HopperBwdTr<128, __nv_bfloat16>>(a, grid, st)
             : launch_one<HopperBwdTr<128, __half>>(a, grid, st);
}

} // namespace gfa::cuda::fa
