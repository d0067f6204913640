#include "cpu_kernels.h"

namespace gfa::cpu {

void register_training_kernels(KernelTable&) {}

} // namespace gfa::cpu
