// Forward kernels on Hopper's warpgroup tensor cores (fa_forward_hopper.cuh) for head-dim
// tiles 64 and 128, f16 and bf16, both schedules.
#include "fa_forward_hopper.cuh"
#include "fa_instantiate.cuh"

#include <cstdlib>
#include <cstring>

namespace gfa::cuda::fa {
namespace {

// Tiles: 2 warpgroups x 64 rows (BM = 128) against 128-key tiles at both head dims, so that
// a block's K/V copies feed 128 rows, as in FlashAttention-3's forward at these head dims.
template <int D, class T, bool OVERLAP> using HopperTr = HopperFwdTraits<D, T, 2, 128, OVERLAP>;

template <class Tr> const void* kernel_of() {
    return reinterpret_cast<const void*>(fwd_hopper_kernel<Tr>);
}

template <class Tr> KernelInfo info_of() {
    KernelInfo info{Tr::BM, Tr::BN, Tr::kThreads, Tr::kSmemBytes, 0};
    set_smem(kernel_of<Tr>(), Tr::kSmemBytes, "the Hopper forward kernel");
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.blocks_per_sm, fwd_hopper_kernel<Tr>, Tr::kThreads,
                                                  Tr::kSmemBytes);
    return info;
}

template <class Tr> void launch_one(const FwdArgs& a, dim3 grid, cudaStream_t st) {
    static const bool ready = (set_smem(kernel_of<Tr>(), Tr::kSmemBytes, "the Hopper forward kernel"), true);
    (void)ready;
    fwd_hopper_kernel<Tr><<<grid, Tr::kThreads, Tr::kSmemBytes, st>>>(a);
    check_launch("the Hopper forward kernel");
}

template <int D>
void launch_tile(bool bf16, HopperSchedule sched, const FwdArgs& a, dim3 grid, cudaStream_t st) {
    const bool overlap = sched == HopperSchedule::Overlap;
    if (bf16)
        overlap ? launch_one<HopperTr<D, __nv_bfloat16, true>>(a, grid, st)
                : launch_one<HopperTr<D, __nv_bfloat16, false>>(a, grid, st);
    else
        overlap ? launch_one<HopperTr<D, __half, true>>(a, grid, st)
                : launch_one<HopperTr<D, __half, false>>(a, grid, st);
}

} // namespace

bool hopper_kernels_usable() {
#if defined(GFA_CUDA_SM90A)
    static const bool device_is_sm90 = [] {
        int dev = 0, major = 0, minor = 0;
        if (cudaGetDevice(&dev) != cudaSuccess) return false;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        return major == 9 && minor == 0;
    }();
    return device_is_sm90;
#else
    return false;        // no sm_90a code in this build
#endif
}

std::optional<HopperSchedule> hopper_forward_schedule(int tile, bool causal) {
#if defined(GFA_CUDA_SM90A)
    if (!hopper_kernels_usable()) return std::nullopt;
    // GFA_CUDA_FA_HOPPER, read on every call, overrides the choice: 0 = the mma.sync kernel,
    // 1 = the plain schedule, 2 = the overlapped one, for every tile the kernel takes.
    const char* v = std::getenv("GFA_CUDA_FA_HOPPER");
    if (v && std::strcmp(v, "0") == 0) return std::nullopt;
    if (v && std::strcmp(v, "1") == 0) return HopperSchedule::Plain;
    if (v && std::strcmp(v, "2") == 0) return HopperSchedule::Overlap;
    // Measured on an H100 (docs/BENCHMARKS.md): at head dim 128 the warpgroup kernel is 1.07-1.19x
    // the mma.sync one; at 64 it is 0.93-0.99x (two 64-row warpgroups leave too little work per
    // key tile), so 64 keeps mma.sync. Causal problems gain from the overlapped schedule (short
    // rows leave the softmax exposed), full rows from the plain one (fewer registers).
    if (tile != 128) return std::nullopt;
    return causal ? HopperSchedule::Overlap : HopperSchedule::Plain;
#else
    return std::nullopt; // no sm_90a code in this build
#endif
}

KernelInfo fwd_hopper_info(int tile, HopperSchedule sched) {
    const bool overlap = sched == HopperSchedule::Overlap;
    if (tile == 64)
        return overlap ? info_of<HopperTr<64, __half, true>>() : info_of<HopperTr<64, __half, false>>();
    return overlap ? info_of<HopperTr<128, __half, true>>() : info_of<HopperTr<128, __half, false>>();
}

void fwd_hopper_launch(int tile, bool bf16, HopperSchedule sched, const FwdArgs& a, dim3 grid,
                       cudaStream_t st) {
    if (tile == 64)
        launch_tile<64>(bf16, sched, a, grid, st);
    else
        launch_tile<128>(bf16, sched, a, grid, st);
}

} // namespace gfa::cuda::fa
