// Early launch: Hopper's programmatic dependent launch for the kernels of a decoding step.
//
// A decoding step is a chain of a few hundred short kernels, and each one normally starts
// only after the one before it has finished and drained: the GPU idles for the launch and
// the ramp-up of every kernel. A kernel launched with launch_early() may instead start
// while the kernel in front of it still runs. Its blocks do what needs nothing from earlier
// kernels (a matrix-vector product issues the loads of its weights, which never change),
// then wait in await_inputs() until the kernel in front has finished and its writes are
// visible. Each kernel calls allow_next_launch() once it is past that wait, so the next
// kernel starts while this one computes, and never more than one kernel ahead waits.
//
// Rules for a kernel launched with launch_early():
//  - every thread calls await_inputs() before it reads anything another kernel writes and
//    before it writes anything (an earlier kernel may still read that memory);
//  - allow_next_launch() goes after await_inputs(), in every thread that gets there.
// A kernel launched the plain way may call both: they do nothing then. Because every kernel
// launched early waits for the one in front, and that one waited for its own predecessor,
// the stream order still holds: nothing reads a result before it is complete.
//
// GFA_CUDA_EARLY_LAUNCH=0 launches every kernel the plain way (for measuring and testing;
// results are the same bit for bit).
#pragma once

#include "early_launch.h"

#include <ggml-fa/error.h>

#include <cuda_runtime.h>

#include <string>
#include <utility>

namespace gfa::cuda {

__device__ __forceinline__ void await_inputs() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
}

__device__ __forceinline__ void allow_next_launch() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// A warp asks L2 for `bytes` bytes from p (one request per 128-byte line, spread over the
// lanes) without waiting for them or holding registers: for constant data a kernel launched
// early will read once its inputs are ready.
__device__ __forceinline__ void warp_prefetch_l2(const char* p, int64_t bytes, int lane) {
    for (int64_t offset = int64_t(lane) * 128; offset < bytes; offset += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p + offset));
}

template <class... Params, class... Args>
void launch_early(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                  Args&&... args) {
    cudaLaunchAttribute early{};
    early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    early.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem_bytes;
    config.stream = stream;
    config.attrs = &early;
    config.numAttrs = early_launch_enabled() ? 1 : 0;
    const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
    if (err != cudaSuccess) fail(std::string("CUDA: launching a kernel failed: ") + cudaGetErrorString(err));
}

} // namespace gfa::cuda
