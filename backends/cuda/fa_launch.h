// Internal: the instantiated kernels of each head-dim tile, behind plain functions so the
// dispatch code never includes the kernel templates (and each tile compiles in its own
// translation unit).
#pragma once

#include "fa_args.h"

#include <cuda_runtime.h>

#include <optional>

namespace gfa::cuda::fa {

struct KernelInfo {
    int bm = 0, bn = 0;        // rows per block, keys per tile
    int threads = 0, smem = 0; // block size, dynamic shared memory (bytes)
    int blocks_per_sm = 0;     // occupancy on the current device
};

// Forward: `decode` selects the 16-row split-KV variant.
KernelInfo fwd_info_d64(bool decode);
KernelInfo fwd_info_d128(bool decode);
KernelInfo fwd_info_d256(bool decode);
void fwd_launch_d64(bool bf16, bool decode, const FwdArgs& a, dim3 grid, cudaStream_t st);
void fwd_launch_d128(bool bf16, bool decode, const FwdArgs& a, dim3 grid, cudaStream_t st);
void fwd_launch_d256(bool bf16, bool decode, const FwdArgs& a, dim3 grid, cudaStream_t st);

// Whether the build has sm_90a code and the current device is an sm_90 one (the wgmma kernels).
bool hopper_kernels_usable();

// Forward on Hopper's warpgroup tensor cores (head-dim tiles 64 and 128, problems without an
// explicit mask or softcap): the schedule to use on this device for a head-dim tile and a
// causal or full problem, or none where the mma.sync kernel is faster, the device is not sm_90
// or the build has no sm_90a code. GFA_CUDA_FA_HOPPER=0|1|2 forces mma.sync, plain, overlapped.
enum class HopperSchedule { Plain, Overlap };
std::optional<HopperSchedule> hopper_forward_schedule(int tile, bool causal);
KernelInfo fwd_hopper_info(int tile, HopperSchedule sched);
void fwd_hopper_launch(int tile, bool bf16, HopperSchedule sched, const FwdArgs& a, dim3 grid,
                       cudaStream_t st);

// Backward: the 4-warp dK/dV kernel (bn keys per block, bm queries per step, dsplit column
// blocks), the deterministic dQ kernel (bm queries per block) and the 8-warp dK/dV kernel
// (wide_bn keys per block, no column split, no softcap).
struct BwdInfo {
    int bm = 0, bn = 0, dsplit = 1, threads = 0, smem_kv = 0, smem_softcap = 0, smem_q = 0;
    int wide_bn = 0, wide_bm = 0, wide_threads = 0, wide_smem = 0;
};
enum class BwdKernel { KeyTile, KeyTileWide, QueryTile };

// Backward dK/dV kernel on Hopper's warpgroup tensor cores (fa_backward_hopper.cuh): head-dim
// tiles 64 and 128, problems without an explicit mask or softcap. Whether to use it for a head-dim tile
// (an sm_90 device, sm_90a code, and GFA_CUDA_FA_HOPPER_BWD, read on every call, not 0), its
// keys per block, threads and shared memory.
bool hopper_backward_wanted(int tile);
struct BwdHopperInfo {
    int bn = 0, threads = 0, smem = 0;
};
BwdHopperInfo bwd_hopper_info(int tile);
void bwd_hopper_launch(int tile, bool bf16, const BwdArgs& a, dim3 grid, cudaStream_t st);
BwdInfo bwd_info_d64();
BwdInfo bwd_info_d128();
BwdInfo bwd_info_d256();
void bwd_launch_d64(bool bf16, BwdKernel which, const BwdArgs& a, dim3 grid, cudaStream_t st);
void bwd_launch_d128(bool bf16, BwdKernel which, const BwdArgs& a, dim3 grid, cudaStream_t st);
void bwd_launch_d256(bool bf16, BwdKernel which, const BwdArgs& a, dim3 grid, cudaStream_t st);

} // namespace gfa::cuda::fa
