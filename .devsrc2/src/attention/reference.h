// The obviously-correct flash_attn_ext: every score row is materialized in double and
// every sum is accumulated in double. Slow (O(Sq*Skv) per head, no tiling) and meant
// only as ground truth for the tests of every backend.
#pragma once

#include "attention/problem.h"

#include <vector>

namespace gfa::attn {

// Writes o (and lse when present). Throws gfa::Error for an invalid problem.
void reference_forward(const Problem& p);

// The same forward kept in double: returns O densely packed as [B][Sq][Hq][Dv] and, when
// lse is given, fills it as [B][Hq][Sq]. The o and lse views of p are validated but not
// written. Used for finite-difference gradient checks.
std::vector<double> reference_forward_f64(const Problem& p, std::vector<double>* lse = nullptr);

// Writes dq, dk, dv (dK/dV summed over the query heads of each group) and dsinks when
// present. The gradient is computed from q, k, v, mask and sinks alone, in double: the
// o and lse passed in are validated but not read, so the result is the exact gradient
// of the forward rather than of whatever rounded o/lse a kernel produced.
void reference_backward(const BackwardProblem& bp);

} // namespace gfa::attn
