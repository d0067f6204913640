// The Vulkan device context (queue, memory, pipelines) and the recorder of dispatches.
#include "vk_context.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

namespace gfa::vulkan {

namespace {

const char* result_name(VkResult r) {
    switch (r) {
    case VK_ERROR_OUT_OF_HOST_MEMORY:
        return "VK_ERROR_OUT_OF_HOST_MEMORY";
    case VK_ERROR_OUT_OF_DEVICE_MEMORY:
        return "VK_ERROR_OUT_OF_DEVICE_MEMORY";
    case VK_ERROR_INITIALIZATION_FAILED:
        return "VK_ERROR_INITIALIZATION_FAILED";
    case VK_ERROR_DEVICE_LOST:
        return "VK_ERROR_DEVICE_LOST";
    case VK_ERROR_MEMORY_MAP_FAILED:
        return "VK_ERROR_MEMORY_MAP_FAILED";
    case VK_ERROR_OUT_OF_POOL_MEMORY:
        return "VK_ERROR_OUT_OF_POOL_MEMORY";
    case VK_ERROR_FRAGMENTED_POOL:
        return "VK_ERROR_FRAGMENTED_POOL";
    case VK_ERROR_INVALID_SHADER_NV:
        return "VK_ERROR_INVALID_SHADER_NV";
    case VK_TIMEOUT:
        return "VK_TIMEOUT";
    default:
        return "VkResult";
    }
}

// Made-up base addresses, unique across every Vulkan device of the process, so a pointer
// from one device's buffer can never be taken for another's. Far above user-space memory a
// CPU pointer could hold, with a gap after each buffer.
std::atomic<uintptr_t> g_next_base{uintptr_t(1) << 56};

constexpr size_t kParamsChunkBytes = 64 << 10;
constexpr uint32_t kStatusRowOutOfRange = 1;    // STATUS_ROW_OUT_OF_RANGE in shaders/op_common.glsl
constexpr uint32_t kStatusClassOutOfRange = 2;  // STATUS_CLASS_OUT_OF_RANGE
constexpr uint32_t kStatusExpertOutOfRange = 4; // STATUS_EXPERT_OUT_OF_RANGE (details in words 1..3)
constexpr size_t kScratchChunkBytes = 1 << 20;
constexpr uint32_t kSetsPerPool = 256;
constexpr uint32_t kMaxBindings = 16;

bool env_is(const char* name, const char* value) {
    const char* v = std::getenv(name);
    return v && std::strcmp(v, value) == 0;
}

} // namespace

void check(VkResult result, const char* call, const std::string& device_name) {
    if (result == VK_SUCCESS) return;
    const std::string msg = device_name + ": " + call + " failed with " + result_name(result) + " (" +
                            std::to_string(int(result)) + ")";
    if (result == VK_ERROR_OUT_OF_DEVICE_MEMORY || result == VK_ERROR_OUT_OF_HOST_MEMORY)
        throw OutOfMemory(msg);
    throw Error(msg);
}

// ---- Context ---------------------------------------------------------------------------

Context::Context(VkInstance instance, VkPhysicalDevice physical, std::string name)
    : instance_(instance), physical_(physical), name_(std::move(name)),
      staging_forced_(env_is("GFA_VULKAN_STAGING", "1")) {
    vkGetPhysicalDeviceProperties(physical_, &props_);
    vkGetPhysicalDeviceMemoryProperties(physical_, &mem_props_);
    VkPhysicalDeviceMaintenance3Properties m3{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES};
    VkPhysicalDeviceSubgroupProperties sg{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES};
    m3.pNext = &sg;
    VkPhysicalDeviceProperties2 p2{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2};
    p2.pNext = &m3;
    vkGetPhysicalDeviceProperties2(physical_, &p2);
    max_allocation_ = m3.maxMemoryAllocationSize;
    subgroup_size_ = sg.subgroupSize;
    subgroup_arithmetic_ = (sg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) &&
                           (sg.supportedOperations & VK_SUBGROUP_FEATURE_ARITHMETIC_BIT) &&
                           sg.subgroupSize > 0;

    uint32_t n = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(physical_, &n, nullptr);
    std::vector<VkQueueFamilyProperties> families(n);
    vkGetPhysicalDeviceQueueFamilyProperties(physical_, &n, families.data());
    family_ = n;
    for (uint32_t i = 0; i < n && family_ == n; ++i)
        if (families[i].queueFlags & VK_QUEUE_COMPUTE_BIT) family_ = i;
    if (family_ == n) throw Error(name_ + ": the device has no compute queue");

    const float priority = 1.0f;
    VkDeviceQueueCreateInfo qi{VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO};
    qi.queueFamilyIndex = family_;
    qi.queueCount = 1;
    qi.pQueuePriorities = &priority;
    // Double precision is enabled where offered: rope forms its angles in it (and is left to
    // the CPU elsewhere).
    VkPhysicalDeviceFeatures offered{}, wanted{};
    vkGetPhysicalDeviceFeatures(physical_, &offered);
    wanted.shaderFloat64 = offered.shaderFloat64;
    float64_ = offered.shaderFloat64 == VK_TRUE;
    VkDeviceCreateInfo di{VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO};
    di.queueCreateInfoCount = 1;
    di.pQueueCreateInfos = &qi;
    di.pEnabledFeatures = &wanted;
    GFA_VK_CHECK(vkCreateDevice(physical_, &di, nullptr, &device_), name_);
    vkGetDeviceQueue(device_, family_, 0, &queue_);

    VkCommandPoolCreateInfo pi{VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO};
    pi.flags = VK_COMMAND_POOL_CREATE_TRANSIENT_BIT;
    pi.queueFamilyIndex = family_;
    GFA_VK_CHECK(vkCreateCommandPool(device_, &pi, nullptr, &one_shot_pool_), name_);
    VkFenceCreateInfo fi{VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
    GFA_VK_CHECK(vkCreateFence(device_, &fi, nullptr, &one_shot_fence_), name_);
    dummy_ = allocate(16, false);
}

Context::~Context() {
    if (!device_) return;
    vkDeviceWaitIdle(device_);
    release(dummy_);
    for (auto& [key, p] : pipelines_) {
        vkDestroyPipeline(device_, p.pipeline, nullptr);
        vkDestroyPipelineLayout(device_, p.layout, nullptr);
        vkDestroyDescriptorSetLayout(device_, p.set_layout, nullptr);
    }
    for (auto& [key, m] : modules_) vkDestroyShaderModule(device_, m, nullptr);
    vkDestroyFence(device_, one_shot_fence_, nullptr);
    vkDestroyCommandPool(device_, one_shot_pool_, nullptr);
    vkDestroyDevice(device_, nullptr);
}

std::string Context::description() const {
    const char* kind = props_.deviceType == VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU     ? "discrete GPU"
                       : props_.deviceType == VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU ? "integrated GPU"
                       : props_.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU            ? "CPU (software)"
                                                                                     : "other";
    return std::string(props_.deviceName) + ", Vulkan " +
           std::to_string(VK_API_VERSION_MAJOR(props_.apiVersion)) + "." +
           std::to_string(VK_API_VERSION_MINOR(props_.apiVersion)) + ", " + kind + ", " +
           std::to_string(props_.limits.maxComputeSharedMemorySize / 1024) + " KiB shared memory";
}

DeviceMemory Context::memory() const {
    DeviceMemory m;
    for (uint32_t i = 0; i < mem_props_.memoryHeapCount; ++i)
        if (mem_props_.memoryHeaps[i].flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT)
            m.total = std::max<size_t>(m.total, mem_props_.memoryHeaps[i].size);
    size_t used = 0;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const auto& [base, a] : live_) used += a.size;
    }
    m.free = m.total > used ? m.total - used : 0; // what this process has not taken
    return m;
}

uint32_t Context::memory_type(uint32_t allowed, bool host_visible) const {
    const VkMemoryPropertyFlags mappable =
        VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    // Preference order: host-visible needs first; otherwise device-local (mappable too if
    // the device offers it, as integrated and software devices do), then anything allowed.
    const VkMemoryPropertyFlags wanted[] = {
        host_visible ? mappable : VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT | mappable,
        host_visible ? mappable : VkMemoryPropertyFlags(VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT),
        host_visible ? mappable : VkMemoryPropertyFlags(0),
    };
    for (VkMemoryPropertyFlags w : wanted)
        for (uint32_t i = 0; i < mem_props_.memoryTypeCount; ++i)
            if ((allowed & (1u << i)) && (mem_props_.memoryTypes[i].propertyFlags & w) == w) return i;
    throw Error(name_ + ": no memory type for a " + (host_visible ? "host-visible" : "device") + " buffer");
}

Context::Allocation Context::allocate(size_t size, bool host_visible_only) {
    Allocation a;
    a.size = size;
    VkBufferCreateInfo bi{VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO};
    bi.size = (std::max<size_t>(size, 1) + 15) / 16 * 16; // fills and bindings run in words
    bi.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
               VK_BUFFER_USAGE_TRANSFER_DST_BIT;
    bi.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
    // Out of memory, from any of the calls below, names the device and the size.
    auto out_of_memory = [&](VkResult r) {
        const DeviceMemory m = memory();
        return OutOfMemory(name_ + ": cannot allocate " + std::to_string(size) + " bytes of device memory (" +
                           std::to_string(m.free) + " of " + std::to_string(m.total) +
                           " bytes not taken by this process; " + result_name(r) + ")");
    };
    auto is_oom = [](VkResult r) {
        return r == VK_ERROR_OUT_OF_DEVICE_MEMORY || r == VK_ERROR_OUT_OF_HOST_MEMORY;
    };
    if (const VkResult r = vkCreateBuffer(device_, &bi, nullptr, &a.buffer); r != VK_SUCCESS) {
        if (is_oom(r)) throw out_of_memory(r);
        check(r, "vkCreateBuffer", name_);
    }
    VkMemoryRequirements req;
    vkGetBufferMemoryRequirements(device_, a.buffer, &req);
    VkMemoryAllocateInfo ai{VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO};
    ai.allocationSize = req.size;
    try {
        ai.memoryTypeIndex = memory_type(req.memoryTypeBits, host_visible_only);
        if (req.size > max_allocation_) throw out_of_memory(VK_ERROR_OUT_OF_DEVICE_MEMORY);
        const VkResult r = vkAllocateMemory(device_, &ai, nullptr, &a.memory);
        if (is_oom(r)) throw out_of_memory(r);
        GFA_VK_CHECK(r, name_);
        GFA_VK_CHECK(vkBindBufferMemory(device_, a.buffer, a.memory, 0), name_);
        const VkMemoryPropertyFlags flags = mem_props_.memoryTypes[ai.memoryTypeIndex].propertyFlags;
        if ((flags & VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT) && (host_visible_only || !staging_forced_))
            GFA_VK_CHECK(vkMapMemory(device_, a.memory, 0, VK_WHOLE_SIZE, 0, &a.mapped), name_);
    } catch (...) {
        if (a.memory) vkFreeMemory(device_, a.memory, nullptr);
        vkDestroyBuffer(device_, a.buffer, nullptr);
        throw;
    }
    const uintptr_t gap = uintptr_t(1) << 20;
    a.base = g_next_base.fetch_add((bi.size + 2 * gap - 1) / gap * gap);
    std::lock_guard<std::mutex> lock(mutex_);
    live_[a.base] = a;
    return a;
}

void Context::release(Allocation& a) {
    if (!a.buffer) return;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        live_.erase(a.base);
    }
    if (a.mapped) vkUnmapMemory(device_, a.memory);
    vkDestroyBuffer(device_, a.buffer, nullptr);
    vkFreeMemory(device_, a.memory, nullptr);
    a = Allocation{};
}

const Context::Allocation* Context::find(const void* p) const {
    const auto addr = reinterpret_cast<uintptr_t>(p);
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.upper_bound(addr);
    if (it == live_.begin()) return nullptr;
    --it;
    return addr < it->first + it->second.size ? &it->second : nullptr;
}

void Context::wait_idle() {
    std::lock_guard<std::mutex> lock(mutex_);
    GFA_VK_CHECK(vkQueueWaitIdle(queue_), name_);
}

void Context::one_shot(const std::function<void(VkCommandBuffer)>& record) {
    std::lock_guard<std::mutex> lock(mutex_);
    GFA_VK_CHECK(vkQueueWaitIdle(queue_), name_);
    GFA_VK_CHECK(vkResetCommandPool(device_, one_shot_pool_, 0), name_);
    VkCommandBufferAllocateInfo ai{VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO};
    ai.commandPool = one_shot_pool_;
    ai.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
    ai.commandBufferCount = 1;
    VkCommandBuffer cb;
    GFA_VK_CHECK(vkAllocateCommandBuffers(device_, &ai, &cb), name_);
    VkCommandBufferBeginInfo bi{VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
    bi.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
    GFA_VK_CHECK(vkBeginCommandBuffer(cb, &bi), name_);
    record(cb);
    GFA_VK_CHECK(vkEndCommandBuffer(cb), name_);
    VkSubmitInfo si{VK_STRUCTURE_TYPE_SUBMIT_INFO};
    si.commandBufferCount = 1;
    si.pCommandBuffers = &cb;
    GFA_VK_CHECK(vkResetFences(device_, 1, &one_shot_fence_), name_);
    GFA_VK_CHECK(vkQueueSubmit(queue_, 1, &si, one_shot_fence_), name_);
    GFA_VK_CHECK(vkWaitForFences(device_, 1, &one_shot_fence_, VK_TRUE, UINT64_MAX), name_);
}

void Context::upload(const Allocation& a, size_t offset, const void* src, size_t size) {
    if (size == 0) return;
    if (a.mapped) {
        wait_idle(); // queued work may still read the old contents
        std::memcpy(static_cast<char*>(a.mapped) + offset, src, size);
        return;
    }
    Allocation staging = allocate(size, true);
    std::memcpy(staging.mapped, src, size);
    try {
        one_shot([&](VkCommandBuffer cb) {
            const VkBufferCopy region{0, offset, size};
            vkCmdCopyBuffer(cb, staging.buffer, a.buffer, 1, &region);
        });
    } catch (...) {
        release(staging);
        throw;
    }
    release(staging);
}

void Context::download(const Allocation& a, size_t offset, void* dst, size_t size) {
    if (size == 0) return;
    if (a.mapped) {
        wait_idle();
        std::memcpy(dst, static_cast<const char*>(a.mapped) + offset, size);
        return;
    }
    Allocation staging = allocate(size, true);
    try {
        one_shot([&](VkCommandBuffer cb) {
            const VkBufferCopy region{offset, 0, size};
            vkCmdCopyBuffer(cb, a.buffer, staging.buffer, 1, &region);
        });
        std::memcpy(dst, staging.mapped, size);
    } catch (...) {
        release(staging);
        throw;
    }
    release(staging);
}

void Context::fill(const Allocation& a, uint8_t value) {
    const uint32_t word = uint32_t(value) * 0x01010101u;
    one_shot([&](VkCommandBuffer cb) { vkCmdFillBuffer(cb, a.buffer, 0, VK_WHOLE_SIZE, word); });
}

void Context::submit(VkCommandBuffer cb, VkFence fence) {
    VkSubmitInfo si{VK_STRUCTURE_TYPE_SUBMIT_INFO};
    si.commandBufferCount = 1;
    si.pCommandBuffers = &cb;
    std::lock_guard<std::mutex> lock(mutex_);
    GFA_VK_CHECK(vkResetFences(device_, 1, &fence), name_);
    GFA_VK_CHECK(vkQueueSubmit(queue_, 1, &si, fence), name_);
}

const Pipeline& Context::pipeline(const char* shader, std::span<const uint32_t> constants,
                                  uint32_t n_bindings, uint32_t shared_bytes) {
    std::string key = shader;
    for (uint32_t c : constants) {
        key += ',';
        key += std::to_string(c);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (auto it = pipelines_.find(key); it != pipelines_.end()) return it->second;
    if (!fits_shared(shared_bytes))
        throw Error(name_ + ": shader " + key + " needs " + std::to_string(shared_bytes) +
                    " bytes of shared memory, the device has " +
                    std::to_string(limits().maxComputeSharedMemorySize));
    if (n_bindings > kMaxBindings) throw Error(name_ + ": too many bindings for " + key);

    VkShaderModule& module = modules_[shader];
    if (!module) {
        const ShaderCode* code = nullptr;
        for (const ShaderCode& c : embedded_shaders())
            if (std::strcmp(c.name, shader) == 0) code = &c;
        if (!code) throw Error(name_ + ": no embedded shader named " + shader);
        VkShaderModuleCreateInfo mi{VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO};
        mi.codeSize = code->size_bytes;
        mi.pCode = code->words;
        GFA_VK_CHECK(vkCreateShaderModule(device_, &mi, nullptr, &module), name_);
    }

    Pipeline p;
    p.n_bindings = n_bindings;
    p.shared_bytes = shared_bytes;
    // What was made before a failure is destroyed again, and the error names the shader.
    try {
        std::vector<VkDescriptorSetLayoutBinding> bindings(n_bindings);
        for (uint32_t i = 0; i < n_bindings; ++i)
            bindings[i] = {i, VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 1, VK_SHADER_STAGE_COMPUTE_BIT, nullptr};
        VkDescriptorSetLayoutCreateInfo li{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO};
        li.bindingCount = n_bindings;
        li.pBindings = bindings.data();
        GFA_VK_CHECK(vkCreateDescriptorSetLayout(device_, &li, nullptr, &p.set_layout), name_);
        VkPipelineLayoutCreateInfo pli{VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO};
        pli.setLayoutCount = 1;
        pli.pSetLayouts = &p.set_layout;
        GFA_VK_CHECK(vkCreatePipelineLayout(device_, &pli, nullptr, &p.layout), name_);

        std::vector<VkSpecializationMapEntry> entries(constants.size());
        for (uint32_t i = 0; i < constants.size(); ++i)
            entries[i] = {i, uint32_t(i * sizeof(uint32_t)), sizeof(uint32_t)};
        VkSpecializationInfo spec{uint32_t(entries.size()), entries.data(), constants.size_bytes(),
                                  constants.data()};
        VkComputePipelineCreateInfo ci{VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO};
        ci.stage = {VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO};
        ci.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
        ci.stage.module = module;
        ci.stage.pName = "main";
        ci.stage.pSpecializationInfo = constants.empty() ? nullptr : &spec;
        ci.layout = p.layout;
        GFA_VK_CHECK(vkCreateComputePipelines(device_, VK_NULL_HANDLE, 1, &ci, nullptr, &p.pipeline), name_);
    } catch (const Error& e) {
        if (p.layout) vkDestroyPipelineLayout(device_, p.layout, nullptr);
        if (p.set_layout) vkDestroyDescriptorSetLayout(device_, p.set_layout, nullptr);
        throw Error(name_ + ": cannot build the pipeline of shader " + key + ": " + e.what());
    }
    return pipelines_.emplace(key, p).first->second;
}

// ---- Recorder --------------------------------------------------------------------------

Recorder::Recorder(Context& ctx) : ctx_(ctx) {
    VkCommandPoolCreateInfo pi{VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO};
    pi.flags = VK_COMMAND_POOL_CREATE_TRANSIENT_BIT;
    pi.queueFamilyIndex = ctx_.queue_family();
    GFA_VK_CHECK(vkCreateCommandPool(ctx_.device(), &pi, nullptr, &pool_), ctx_.name());
    VkCommandBufferAllocateInfo ai{VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO};
    ai.commandPool = pool_;
    ai.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
    ai.commandBufferCount = 1;
    GFA_VK_CHECK(vkAllocateCommandBuffers(ctx_.device(), &ai, &cb_), ctx_.name());
    VkFenceCreateInfo fi{VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
    GFA_VK_CHECK(vkCreateFence(ctx_.device(), &fi, nullptr, &fence_), ctx_.name());
    status_ = ctx_.allocate(16, true);
    std::memset(status_.mapped, 0, 16);
}

Recorder::~Recorder() {
    if (in_flight_) vkWaitForFences(ctx_.device(), 1, &fence_, VK_TRUE, UINT64_MAX);
    for (VkDescriptorPool p : descriptor_pools_) vkDestroyDescriptorPool(ctx_.device(), p, nullptr);
    for (auto* chunks : {&params_, &scratch_})
        for (Chunk& c : *chunks) ctx_.release(c.alloc);
    ctx_.release(status_);
    vkDestroyFence(ctx_.device(), fence_, nullptr);
    vkDestroyCommandPool(ctx_.device(), pool_, nullptr);
}

void Recorder::wait() {
    if (!in_flight_) return;
    GFA_VK_CHECK(vkWaitForFences(ctx_.device(), 1, &fence_, VK_TRUE, UINT64_MAX), ctx_.name());
    in_flight_ = false;
    // The memory is host-coherent; the fence made the shaders' writes available.
    auto* word = static_cast<volatile uint32_t*>(status_.mapped);
    const uint32_t bits = word[0], expert_token = word[1], expert = word[2], experts = word[3];
    for (int i = 0; i < 4; ++i) word[i] = 0;
    if (bits & kStatusRowOutOfRange)
        throw Error(ctx_.name() +
                    ": get_rows, get_rows_back or set_rows was given a row index out of range (NaN "
                    "was written for rows it could not read; rows it could not write were skipped)");
    if (bits & kStatusClassOutOfRange)
        throw Error(ctx_.name() +
                    ": cross_entropy_loss was given a class out of range (its row was left out)");
    if (bits & kStatusExpertOutOfRange)
        throw Error(ctx_.name() + ": mul_mat_id: expert " + std::to_string(int32_t(expert)) + " of token " +
                    std::to_string(expert_token - 1) + " is outside [0, " + std::to_string(experts) +
                    ") (NaN was written for its products)");
}

void Recorder::begin() {
    wait();
    GFA_VK_CHECK(vkResetCommandPool(ctx_.device(), pool_, 0), ctx_.name());
    for (VkDescriptorPool p : descriptor_pools_)
        GFA_VK_CHECK(vkResetDescriptorPool(ctx_.device(), p, 0), ctx_.name());
    descriptor_pool_ = 0;
    for (auto* chunks : {&params_, &scratch_})
        for (Chunk& c : *chunks) c.used = 0;
    params_chunk_ = scratch_chunk_ = 0;
    VkCommandBufferBeginInfo bi{VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
    bi.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
    GFA_VK_CHECK(vkBeginCommandBuffer(cb_, &bi), ctx_.name());
    recording_ = true;
}

void Recorder::submit() {
    GFA_VK_CHECK(vkEndCommandBuffer(cb_), ctx_.name());
    recording_ = false;
    ctx_.submit(cb_, fence_);
    in_flight_ = true;
}

Located Recorder::locate(const void* data, size_t bytes, const char* what) const {
    const Context::Allocation* a = ctx_.find(data);
    if (!a)
        throw Error(ctx_.name() + ": " + what +
                    " is not in this device's memory (a tensor placed elsewhere)");
    const size_t offset = size_t(reinterpret_cast<uintptr_t>(data) - a->base);
    if (offset + bytes > a->size)
        throw Error(ctx_.name() + ": " + what + " runs past the end of its buffer (" +
                    std::to_string(offset) + " + " + std::to_string(bytes) + " > " + std::to_string(a->size) +
                    " bytes)");
    const VkDeviceSize align = ctx_.limits().minStorageBufferOffsetAlignment;
    Located l;
    l.binding.buffer = a->buffer;
    l.binding.offset = offset / align * align;
    l.first_byte = offset - l.binding.offset;
    l.binding.range = (l.first_byte + bytes + 3) / 4 * 4;
    if (l.binding.range > ctx_.limits().maxStorageBufferRange)
        throw Error(ctx_.name() + ": " + what + " spans " + std::to_string(l.binding.range) +
                    " bytes, more than one storage buffer binding may (" +
                    std::to_string(ctx_.limits().maxStorageBufferRange) + ")");
    return l;
}

std::pair<Recorder::Chunk*, size_t> Recorder::take(std::vector<Chunk>& chunks, size_t& current, size_t bytes,
                                                   size_t align, size_t chunk_bytes, bool host_visible) {
    for (; current < chunks.size(); ++current) {
        Chunk& c = chunks[current];
        const size_t at = (c.used + align - 1) / align * align;
        if (at + bytes <= c.alloc.size) {
            c.used = at + bytes;
            return {&c, at};
        }
    }
    Chunk c;
    c.alloc = ctx_.allocate(std::max(bytes, chunk_bytes), host_visible);
    c.used = bytes;
    chunks.push_back(c);
    current = chunks.size() - 1;
    return {&chunks.back(), 0};
}

Binding Recorder::constants(const void* data, size_t bytes) {
    const size_t align = std::max<size_t>(ctx_.limits().minStorageBufferOffsetAlignment, 16);
    auto [chunk, at] = take(params_, params_chunk_, bytes, align, kParamsChunkBytes, true);
    std::memcpy(static_cast<char*>(chunk->alloc.mapped) + at, data, bytes);
    return Binding{chunk->alloc.buffer, at, (bytes + 3) / 4 * 4};
}

Binding Recorder::scratch(size_t bytes) {
    const size_t align = std::max<size_t>(ctx_.limits().minStorageBufferOffsetAlignment, 16);
    auto [chunk, at] =
        take(scratch_, scratch_chunk_, std::max<size_t>(bytes, 16), align, kScratchChunkBytes, false);
    return Binding{chunk->alloc.buffer, at, (std::max<size_t>(bytes, 16) + 3) / 4 * 4};
}

VkDescriptorSet Recorder::descriptor_set(VkDescriptorSetLayout layout) {
    for (;; ++descriptor_pool_) {
        if (descriptor_pool_ == descriptor_pools_.size()) {
            const VkDescriptorPoolSize size{VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, kSetsPerPool * kMaxBindings};
            VkDescriptorPoolCreateInfo pi{VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO};
            pi.maxSets = kSetsPerPool;
            pi.poolSizeCount = 1;
            pi.pPoolSizes = &size;
            VkDescriptorPool pool;
            GFA_VK_CHECK(vkCreateDescriptorPool(ctx_.device(), &pi, nullptr, &pool), ctx_.name());
            descriptor_pools_.push_back(pool);
        }
        VkDescriptorSetAllocateInfo ai{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO};
        ai.descriptorPool = descriptor_pools_[descriptor_pool_];
        ai.descriptorSetCount = 1;
        ai.pSetLayouts = &layout;
        VkDescriptorSet set;
        const VkResult r = vkAllocateDescriptorSets(ctx_.device(), &ai, &set);
        if (r == VK_SUCCESS) return set;
        if (r != VK_ERROR_OUT_OF_POOL_MEMORY && r != VK_ERROR_FRAGMENTED_POOL)
            check(r, "vkAllocateDescriptorSets", ctx_.name());
    }
}

void Recorder::dispatch(const Pipeline& p, const void* params, size_t params_bytes,
                        std::span<const Binding> buffers, uint32_t groups_x, uint32_t groups_y,
                        uint32_t groups_z) {
    if (groups_x == 0 || groups_y == 0 || groups_z == 0) return;
    const auto& lim = ctx_.limits().maxComputeWorkGroupCount;
    if (groups_x > lim[0] || groups_y > lim[1] || groups_z > lim[2])
        throw Error(ctx_.name() + ": a dispatch of " + std::to_string(groups_x) + " x " +
                    std::to_string(groups_y) + " x " + std::to_string(groups_z) +
                    " workgroups exceeds the device's limits (" + std::to_string(lim[0]) + " x " +
                    std::to_string(lim[1]) + " x " + std::to_string(lim[2]) + ")");
    if (buffers.size() + 1 != p.n_bindings)
        throw Error(ctx_.name() + ": a dispatch binds the wrong number of buffers");
    const size_t align = std::max<size_t>(ctx_.limits().minStorageBufferOffsetAlignment, 16);
    auto [chunk, at] = take(params_, params_chunk_, params_bytes, align, kParamsChunkBytes, true);
    std::memcpy(static_cast<char*>(chunk->alloc.mapped) + at, params, params_bytes);

    const VkDescriptorSet set = descriptor_set(p.set_layout);
    VkDescriptorBufferInfo infos[kMaxBindings];
    VkWriteDescriptorSet writes[kMaxBindings];
    infos[0] = {chunk->alloc.buffer, at, (params_bytes + 3) / 4 * 4};
    for (size_t i = 0; i < buffers.size(); ++i)
        infos[i + 1] = buffers[i].buffer
                           ? VkDescriptorBufferInfo{buffers[i].buffer, buffers[i].offset, buffers[i].range}
                           : VkDescriptorBufferInfo{ctx_.dummy(), 0, 16}; // an unused slot
    for (uint32_t i = 0; i < p.n_bindings; ++i) {
        writes[i] = {VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET};
        writes[i].dstSet = set;
        writes[i].dstBinding = i;
        writes[i].descriptorCount = 1;
        writes[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        writes[i].pBufferInfo = &infos[i];
    }
    vkUpdateDescriptorSets(ctx_.device(), p.n_bindings, writes, 0, nullptr);
    vkCmdBindPipeline(cb_, VK_PIPELINE_BIND_POINT_COMPUTE, p.pipeline);
    vkCmdBindDescriptorSets(cb_, VK_PIPELINE_BIND_POINT_COMPUTE, p.layout, 0, 1, &set, 0, nullptr);
    vkCmdDispatch(cb_, groups_x, groups_y, groups_z);
    ++dispatches_;
}

void Recorder::barrier() {
    VkMemoryBarrier mb{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
    mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT;
    mb.dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT;
    vkCmdPipelineBarrier(cb_, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, 0,
                         1, &mb, 0, nullptr, 0, nullptr);
}

} // namespace gfa::vulkan
