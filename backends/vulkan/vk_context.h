// The Vulkan backend's internals: one logical device per physical device, its memory, the
// compute pipelines built from the embedded SPIR-V, and the recorder through which an op's
// kernels queue their dispatches. Ops (vk_flash_attn.cpp, vk_ops.cpp, vk_matmul.cpp) see only
// Recorder and Binding.
//
// Memory model: a Buffer's base() is a made-up address (never dereferenced; the device
// memory is a VkBuffer), so tensors get data pointers as on any device, and a dispatch
// turns a pointer back into (VkBuffer, offset) through the device's table of live buffers.
#pragma once

#include <ggml-fa/backend.h>
#include <ggml-fa/error.h>

#include <vulkan/vulkan.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

namespace gfa::vulkan {

// Throws gfa::Error (gfa::OutOfMemory for the out-of-memory results) naming the call.
void check(VkResult result, const char* call, const std::string& device_name);
#define GFA_VK_CHECK(call, device_name) ::gfa::vulkan::check((call), #call, (device_name))

// SPIR-V compiled from backends/vulkan/shaders at build time (generated source).
struct ShaderCode {
    const char* name;
    const uint32_t* words;
    size_t size_bytes;
};
std::span<const ShaderCode> embedded_shaders();

// A range of one VkBuffer bound to a shader's storage-buffer slot.
struct Binding {
    VkBuffer buffer = VK_NULL_HANDLE;
    VkDeviceSize offset = 0, range = 0;
};

// Where a tensor's bytes are: a binding that covers them, starting at an offset aligned for
// storage buffers, and the tensor's first byte counted from the binding's start.
struct Located {
    Binding binding;
    VkDeviceSize first_byte = 0;
};

class Context;

// A compute pipeline with its specialization constants; every pipeline of the backend
// takes storage buffers only, bindings 0..n_bindings-1 (binding 0 the parameters).
struct Pipeline {
    VkPipeline pipeline = VK_NULL_HANDLE;
    VkPipelineLayout layout = VK_NULL_HANDLE;
    VkDescriptorSetLayout set_layout = VK_NULL_HANDLE;
    uint32_t n_bindings = 0;
    uint32_t shared_bytes = 0; // shared memory the specialization needs (checked at build)
};

// One Vulkan device: instance-level handles shared by its backends, its queue, memory,
// pipelines and the table of live buffers.
class Context {
  public:
    Context(VkInstance instance, VkPhysicalDevice physical, std::string name);
    ~Context();
    Context(const Context&) = delete;
    Context& operator=(const Context&) = delete;

    const std::string& name() const { return name_; }
    std::string description() const;
    VkDevice device() const { return device_; }
    const VkPhysicalDeviceLimits& limits() const { return props_.limits; }
    DeviceMemory memory() const;

    // Device memory: a VkBuffer over its own allocation. `base` gets the made-up address
    // the tensors placed in it use. Throws gfa::OutOfMemory naming the device and size.
    struct Allocation {
        VkBuffer buffer = VK_NULL_HANDLE;
        VkDeviceMemory memory = VK_NULL_HANDLE;
        void* mapped = nullptr; // host pointer when the memory is host-visible and mapped
        size_t size = 0;
        uintptr_t base = 0;
    };
    Allocation allocate(size_t size, bool host_visible_only);
    void release(Allocation& a);

    // Copies between host memory and a device allocation (after all queued work finishes).
    void upload(const Allocation& a, size_t offset, const void* src, size_t size);
    void download(const Allocation& a, size_t offset, void* dst, size_t size);
    void fill(const Allocation& a, uint8_t value);

    // The allocation holding address p, or nullptr.
    const Allocation* find(const void* p) const;

    // The pipeline for an embedded shader with these specialization constants (built once).
    // shared_bytes is what the specialization declares; exceeding the device's limit throws.
    const Pipeline& pipeline(const char* shader, std::span<const uint32_t> constants, uint32_t n_bindings,
                             uint32_t shared_bytes);
    bool fits_shared(uint32_t shared_bytes) const {
        return shared_bytes <= limits().maxComputeSharedMemorySize;
    }
    // Whether shaders may use double precision (enabled at device creation when offered).
    bool has_float64() const { return float64_; }
    // Invocations per subgroup, and whether compute shaders have subgroup arithmetic
    // (subgroupAdd and the like); 0 / false where the device does not say.
    uint32_t subgroup_size() const { return subgroup_size_; }
    bool has_subgroup_arithmetic() const { return subgroup_arithmetic_; }

    // Submits a recorded command buffer that signals `fence`; thread-safe.
    void submit(VkCommandBuffer cb, VkFence fence);
    void wait_idle();
    uint32_t queue_family() const { return family_; }
    VkBuffer dummy() const { return dummy_.buffer; }

  private:
    void one_shot(const std::function<void(VkCommandBuffer)>& record);
    uint32_t memory_type(uint32_t allowed, bool host_visible) const;

    VkInstance instance_;
    VkPhysicalDevice physical_;
    std::string name_;
    VkPhysicalDeviceProperties props_{};
    VkPhysicalDeviceMemoryProperties mem_props_{};
    VkDevice device_ = VK_NULL_HANDLE;
    VkQueue queue_ = VK_NULL_HANDLE;
    uint32_t family_ = 0;
    VkDeviceSize max_allocation_ = 0; // the largest single allocation the driver allows
    bool staging_forced_ = false;     // GFA_VULKAN_STAGING=1: copy through staging even where mappable
    bool float64_ = false;
    uint32_t subgroup_size_ = 0;
    bool subgroup_arithmetic_ = false;
    mutable std::mutex mutex_; // queue, one-shot pool, buffer table, pipelines
    VkCommandPool one_shot_pool_ = VK_NULL_HANDLE;
    VkFence one_shot_fence_ = VK_NULL_HANDLE;
    std::map<uintptr_t, Allocation> live_; // by made-up base address
    uintptr_t next_base_;
    std::map<std::string, Pipeline> pipelines_;
    std::map<std::string, VkShaderModule> modules_;
    Allocation dummy_;
};

// Records the dispatches of one compute() call into a command buffer. Parameters go into a
// host-visible arena and scratch results into device memory, both in chunks that are never
// moved while recorded work may use them; each dispatch gets its own descriptor set. A
// backend owns one Recorder and reuses its chunks and pools from call to call.
class Recorder {
  public:
    explicit Recorder(Context& ctx);
    ~Recorder();
    Recorder(const Recorder&) = delete;
    Recorder& operator=(const Recorder&) = delete;
    Context& context() { return ctx_; }
    const Context& context() const { return ctx_; }

    // The binding that covers `bytes` bytes at `data` (a tensor's data pointer); throws
    // naming `what` when the pointer is not in this device's memory or the range is longer
    // than the device lets one binding be.
    Located locate(const void* data, size_t bytes, const char* what) const;
    // Device memory for intermediate results, valid until the recorded work has run.
    Binding scratch(size_t bytes);
    // A copy of `bytes` bytes (a small table the host computes), readable by the recorded work.
    Binding constants(const void* data, size_t bytes);
    // A word shaders set bits of to report bad data (op_common.glsl's status word), and three
    // words of details for the message; they start at zero in each recording, and wait() turns
    // bits found set into an error.
    Binding status() const { return {status_.buffer, 0, 16}; }
    // Queues one dispatch: `params` (bytes, copied) become binding 0, `buffers` the rest.
    void dispatch(const Pipeline& p, const void* params, size_t params_bytes,
                  std::span<const Binding> buffers, uint32_t groups_x, uint32_t groups_y, uint32_t groups_z);
    // Makes every earlier dispatch's writes visible to every later dispatch.
    void barrier();

    void begin();  // waits for the previous submission, then starts recording
    void submit(); // ends recording and submits (returns before the work is done)
    void wait();   // waits for the last submission; throws if its shaders reported bad data
    int64_t dispatches() const { return dispatches_; }

  private:
    struct Chunk {
        Context::Allocation alloc;
        size_t used = 0;
    };
    // `bytes` from the chunk list, a new chunk of at least `chunk_bytes` when none has room.
    std::pair<Chunk*, size_t> take(std::vector<Chunk>& chunks, size_t& current, size_t bytes, size_t align,
                                   size_t chunk_bytes, bool host_visible);
    VkDescriptorSet descriptor_set(VkDescriptorSetLayout layout);

    Context& ctx_;
    VkCommandPool pool_ = VK_NULL_HANDLE;
    VkCommandBuffer cb_ = VK_NULL_HANDLE;
    VkFence fence_ = VK_NULL_HANDLE;
    bool recording_ = false, in_flight_ = false;
    std::vector<VkDescriptorPool> descriptor_pools_;
    size_t descriptor_pool_ = 0; // the pool sets come from now
    std::vector<Chunk> params_, scratch_;
    Context::Allocation status_; // host-visible, mapped
    size_t params_chunk_ = 0, scratch_chunk_ = 0;
    int64_t dispatches_ = 0;
};

// What the backend runs for one op: whether it can (types, shapes, device limits) and how
// it records the node's dispatches.
struct Kernel {
    bool (*supports)(const Context& ctx, const Tensor* node) = nullptr;
    void (*record)(Recorder& rec, const Tensor* node) = nullptr;
};
const Kernel* find_kernel(Op op);
void register_attention_kernels(std::map<Op, Kernel>& table); // vk_flash_attn.cpp

} // namespace gfa::vulkan
