// Hopper warpgroup products through the primitives of backends/cuda/wgmma.cuh on their own,
// so that a wrong assumption about an operand layout shows apart from the attention kernel
// built on them.
#pragma once

#include <cstdint>
#include <vector>

namespace gfa::test {

// Whether this build has the sm_90a code the probes need (and the device is sm_90).
bool wgmma_probe_available();

// c [64 x n] = a [64 x 128] times b^T, b [n x 128] (both K-major in shared memory, as Q and K
// in S = Q K^T), n = 64 or 128; f16 bits in, f32 out.
std::vector<float> wgmma_probe_shared(int n, const std::vector<uint16_t>& a, const std::vector<uint16_t>& b);
// c [64 x n] = a [64 x 128] times b [128 x n], a in registers (built by the A fragment layout)
// and b MN-major in shared memory (as P and V in O = P V).
std::vector<float> wgmma_probe_registers(int n, const std::vector<uint16_t>& a,
                                         const std::vector<uint16_t>& b);
// c [64 x n] = at^T times b, at [128 x 64] and b [128 x n] both MN-major in shared memory (as
// dS^T and K in the backward's dQ = dS K).
std::vector<float> wgmma_probe_transposed(int n, const std::vector<uint16_t>& at,
                                          const std::vector<uint16_t>& b);

} // namespace gfa::test
