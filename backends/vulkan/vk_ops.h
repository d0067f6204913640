// What the Vulkan kernels of the ops other than attention share with their shaders
// (shaders/op_common.glsl): the parameter block, tensor descriptors in bytes, and the checks
// that decide whether a tensor can be bound at all.
#pragma once

#include "vk_context.h"

#include <array>

namespace gfa::vulkan {

// Mirrors TensorDesc in op_common.glsl (std430: 48 bytes, 16-byte aligned).
struct TensorDesc {
    uint32_t ne[4] = {1, 1, 1, 1};
    uint32_t nb[4] = {0, 0, 0, 0}; // bytes
    uint32_t off = 0;              // byte offset of element 0 from the binding's start
    uint32_t type = 0;             // gfa::Type
    uint32_t pad0 = 0, pad1 = 0;
};
// Mirrors ParamsBlock in op_common.glsl.
struct OpParams {
    TensorDesc src0, src1, src2, dst;
    uint32_t iarg[4] = {0, 0, 0, 0};
    float farg[4] = {0, 0, 0, 0};
    uint32_t op = 0, n = 0, pad0 = 0, pad1 = 0;
};
static_assert(sizeof(TensorDesc) == 48 && sizeof(OpParams) == 240, "must match shaders/op_common.glsl");

// Binding slots after the parameters: src0, src1, src2, dst, status, a table the host
// computed (rope's frequencies, ALiBi slopes; Recorder::constants) or that a tensor holds
// (AdamW's values), and one more tensor for the ops with four inputs (AdamW's gradient norm).
// Unused slots hold a dummy buffer.
inline constexpr uint32_t kOpBindings = 8;
inline constexpr size_t kStatusSlot = 4, kTableSlot = 5, kExtraSlot = 6;

// A dispatch's parameters and buffers, filled tensor by tensor.
struct OpDispatch {
    OpParams params;
    std::array<Binding, kOpBindings - 1> buffers{};
};

// Whether the shaders can address t: a type they read, element strides and (at record time)
// offsets aligned to the element's size, every byte offset within 32 bits and one binding.
bool bindable(const Context& ctx, const Tensor* t);
// Binds t to slot (0..2 sources, 3 destination) and fills its descriptor; throws naming `what`
// when t is not in this device's memory or not aligned as its type needs.
void bind_tensor(const Recorder& rec, OpDispatch& d, int slot, const Tensor* t, const char* what);
// Workgroups for `items` work items of `per_group` each, capped for grid-stride loops.
uint32_t capped_groups(uint64_t items, uint32_t per_group);
// Queues the dispatch of an op shader (its status word bound in the last slot).
void dispatch_op(Recorder& rec, const char* shader, OpDispatch& d, uint32_t gx, uint32_t gy = 1,
                 uint32_t gz = 1);

void register_elementwise_kernels(std::map<Op, Kernel>& table); // vk_ops.cpp
void register_row_kernels(std::map<Op, Kernel>& table);         // vk_ops.cpp
void register_matmul_kernels(std::map<Op, Kernel>& table);      // vk_matmul.cpp

} // namespace gfa::vulkan
