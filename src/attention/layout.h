// Where flash_attn_ext's outputs live inside their nodes, and the translation from graph
// tensors to the kernels' descriptor (internal, shared by every backend).
#pragma once

#include <ggml-fa/tensor.h>

#include "attention/problem.h"

namespace gfa::attn {

inline size_t align16(size_t n) {
    return (n + 15) / 16 * 16;
}
// Byte offset of the LSE [Sq, Hq, B] (f32) inside a flash_attn_ext node.
inline size_t lse_offset(size_t o_bytes) {
    return align16(o_bytes);
}

// Byte offsets of dK, dV and dSinks inside a flash_attn_back node (dQ is at 0).
struct BackOffsets {
    size_t dk, dv, dsinks;
};
BackOffsets back_offsets(const Tensor* back);

// The kernels' view of a flash_attn_ext node (its data and its sources' data must be placed).
Problem forward_problem(const Tensor* node);
// The kernels' view of a flash_attn_back node.
BackwardProblem backward_problem(const Tensor* back);

} // namespace gfa::attn
