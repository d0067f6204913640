// FlashAttention-2 on NVIDIA GPUs (sm_90a build; mma.sync tensor-core kernels).
//
// The kernels take the raw attention descriptor (attention/problem.h) whose data pointers
// are device pointers; nothing here needs CUDA headers: a stream is passed as void*
// (a cudaStream_t, or nullptr for the default stream).
//
// Supported: q f32/f16/bf16; k, v f16/bf16/f32/q8_0/q4_0 (the compute type is bf16 when
// k is bf16 or q is bf16 with non-16-bit k, else f16); head dims Dk, Dv multiples of 8 up
// to 256 (multiples of 32 for quantized K/V); additive mask f32/f16; ALiBi, softcap, causal
// and windows, sinks, GQA (Hq % Hkv == 0); o f32/f16/bf16; lse f32 (natural log).
// Anything else raises gfa::Error naming what is not supported.
#pragma once

#include "attention/problem.h"

#include <cstddef>
#include <cstdint>

namespace gfa::cuda {

// Device workspace the forward needs (bytes; 0 when none). The forward needs one only for
// split-KV (few query rows per KV head), where blocks write partial results.
size_t flash_attn_forward_workspace_size(const attn::Problem& p);

// Device memory for o's int8 column blocks (int8_columns.cuh), as a quantized matrix-vector
// product reads them: column i + Sq * b holds the Hq * Dv values of position i, batch b.
struct Int8Columns {
    int8_t* q = nullptr;
    float* ds = nullptr; // (scale, sum) per block of 32
};

// Runs the forward on `stream`. workspace: a 256-byte aligned device pointer (as cudaMalloc
// returns) to at least flash_attn_forward_workspace_size(p) bytes, or nullptr to let the call
// allocate it stream-ordered (cudaMallocAsync / cudaFreeAsync). Asynchronous: returns before
// the kernels finish. Given `columns`, it also writes o as int8 column blocks where it can
// (split-KV, whose combine kernel rounds each row it writes; o f32 and packed, Dv % 32 == 0)
// and returns whether it did.
bool flash_attn_forward(const attn::Problem& p, void* stream, void* workspace = nullptr,
                        size_t workspace_bytes = 0, Int8Columns columns = {});

// Whether the forward of p runs the decoding kernel (at most 16 query rows per KV head, see
// flash_attn_cuda.cu) rather than the tiled one; for tests and benchmarks.
bool flash_attn_forward_uses_decode_kernel(const attn::Problem& p);
// Whether the forward runs on Hopper's warpgroup tensor cores (wgmma): sm_90 devices with a
// build that has sm_90a code, head dims up to 128, no explicit mask or softcap, not decoding.
bool flash_attn_forward_uses_hopper_kernel(const attn::Problem& p);

// Whether the backward's dK/dV kernel runs on Hopper's warpgroup tensor cores: sm_90 devices
// with sm_90a code, head dims up to 128, no explicit mask or softcap.
bool flash_attn_backward_uses_hopper_kernel(const attn::BackwardProblem& p);

// Device workspace the backward needs (bytes, > 0): per-row LSE and rowsum(dO * O), the
// fp32 dQ accumulator (non-deterministic mode) and the per-row terms of dSinks.
size_t flash_attn_backward_workspace_size(const attn::BackwardProblem& p);

// Runs the backward (dQ, dK, dV and dSinks when requested) on `stream`; workspace as in the
// forward. p.deterministic selects bit-reproducible results: dQ from a separate pass over
// the key tiles instead of fp32 atomics.
void flash_attn_backward(const attn::BackwardProblem& p, void* stream, void* workspace = nullptr,
                         size_t workspace_bytes = 0);

} // namespace gfa::cuda
