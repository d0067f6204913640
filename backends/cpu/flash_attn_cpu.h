// FlashAttention-2 on the CPU: tiled forward with an online softmax (and split-KV for
// decoding), and the FA2 backward that recomputes P from the LSE. Memory beyond the
// inputs and outputs is O(Sq + Skv) per head, never O(Sq * Skv).
#pragma once

#include "attention/problem.h"
#include "thread_pool.h"

#include <cstddef>

namespace gfa::cpu {

// Writes o (and lse when present).
void flash_attn_forward(const attn::Problem& p, ThreadPool& pool);
// Writes dq, dk, dv and dsinks when present. Deterministic: the same inputs and the same
// number of threads give bit-identical gradients on every run.
void flash_attn_backward(const attn::BackwardProblem& bp, ThreadPool& pool);

// True when the forward takes the decode path for this problem: Sq * (Hq / Hkv) <= 8 rows
// per kv head, head sizes multiples of 8 and K/V in f32, f16, bf16, q8_0 or q4_0 (AVX2
// builds). The rows of a GQA group share one tile; scores are computed straight from K's
// storage and the keys are split across threads when the kv heads alone do not balance.
bool flash_attn_uses_decode_path(const attn::Problem& p);

// True when this build multiplies bf16 pairs (AVX512-BF16): a forward with precision BF16,
// head dims multiples of 16 and more than the decode path's rows then takes them.
bool flash_attn_has_pair_products();

// Bytes of scratch the kernels allocate for this problem with n_threads workers.
size_t flash_attn_scratch_bytes(const attn::Problem& p, int n_threads);
size_t flash_attn_backward_scratch_bytes(const attn::BackwardProblem& bp, int n_threads);

} // namespace gfa::cpu
