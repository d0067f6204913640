#include "cpu_kernels.h"

namespace gfa::cpu {

void register_reduce_kernels(KernelTable&) {}

} // namespace gfa::cpu
