// The switch for early kernel launches (early_launch.cuh), for host code that does not
// compile device code.
#pragma once

namespace gfa::cuda {

// GFA_CUDA_EARLY_LAUNCH: on unless it is 0; read at every launch.
bool early_launch_enabled();

} // namespace gfa::cuda
