#include "cpu_kernels.h"

namespace gfa::cpu {

void register_attention_kernels(KernelTable&) {}

} // namespace gfa::cpu
