// Internal: the decoding kernel (fa_decode.cuh) behind plain functions, one set per head dim,
// so the planning code never includes the kernel templates.
#pragma once

#include "fa_args.h"
#include "fa_launch.h"

#include <cuda_runtime.h>

namespace gfa::cuda::fa {

// The decoding kernel handles at most this many query rows per KV head (Sq * G): one
// 16-row tensor-core tile, so every row shares each K/V byte the block reads.
constexpr int kDecodeMaxRows = 16;
// Keys per chunk: the unit a warp loads and computes (one k-step of the P V product).
constexpr int kDecodeChunk = 16;

// Bytes of one K/V row of head dim d: f16/bf16 (code 1, 2), q8_0 (3: 34-byte blocks of 32),
// q4_0 (4: 18-byte blocks).
constexpr int decode_row_bytes(int kv_code, int d) {
    return kv_code == 3 ? d / 32 * 34 : kv_code == 4 ? d / 32 * 18 : 2 * d;
}
// The widest cp.async piece (16, 8 or 4 bytes) that tiles a row: rows copied this way need
// row addresses aligned to it; rows aligned to 4 only take 4-byte pieces.
constexpr int decode_copy_bytes(int kv_code, int d) {
    const int row = decode_row_bytes(kv_code, d);
    return row % 16 == 0 ? 16 : row % 8 == 0 ? 8 : 4;
}

// Which instantiation: K/V storage code (kF16, kBF16, kQ8_0, kQ4_0; K and V alike), compute
// type (bf16 or f16) and cp.async piece size.
struct DecodeSel {
    int kv = 1;
    bool bf16 = false;
    int copy_bytes = 16;
};

// KernelInfo of a decode kernel: bm = 16 rows, bn = keys per round of all warps (warps x
// chunk), threads, shared memory and occupancy.
KernelInfo decode_info_d64(const DecodeSel& sel);
KernelInfo decode_info_d128(const DecodeSel& sel);
KernelInfo decode_info_d256(const DecodeSel& sel);
// grid = (splits, Hkv, B); split `x` covers keys [split_begin + x * a.split_keys, + a.split_keys).
void decode_launch_d64(const DecodeSel& sel, const FwdArgs& a, int split_begin, dim3 grid, cudaStream_t st);
void decode_launch_d128(const DecodeSel& sel, const FwdArgs& a, int split_begin, dim3 grid, cudaStream_t st);
void decode_launch_d256(const DecodeSel& sel, const FwdArgs& a, int split_begin, dim3 grid, cudaStream_t st);

} // namespace gfa::cuda::fa
