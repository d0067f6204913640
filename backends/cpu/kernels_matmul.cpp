#include "cpu_kernels.h"

namespace gfa::cpu {

void register_matmul_kernels(KernelTable&) {}

} // namespace gfa::cpu
