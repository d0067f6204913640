#include "op_def.h"

namespace gfa {

void define_attention_ops(OpTable&) {}

} // namespace gfa
