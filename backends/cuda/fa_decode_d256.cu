// Decode kernels of head dim 256 (f16, bf16, q8_0 and q4_0 K/V).
#include "fa_decode.cuh"

namespace gfa::cuda::fa {
KernelInfo decode_info_d256(const DecodeSel& sel) {
    return decode_info_tile<256>(sel);
}
void decode_launch_d256(const DecodeSel& sel, const FwdArgs& a, int split_begin, dim3 grid, cudaStream_t st) {
    decode_launch_tile<256>(sel, a, split_begin, grid, st);
}
} // namespace gfa::cuda::fa
