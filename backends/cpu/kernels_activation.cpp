#include "cpu_kernels.h"

namespace gfa::cpu {

void register_activation_kernels(KernelTable&) {}

} // namespace gfa::cpu
