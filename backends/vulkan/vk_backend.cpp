// The Vulkan device: one per physical device the loader reports ("Vulkan0", ...), buffers
// in its memory, and a backend that records a compute() call's dispatches into one command
// buffer. Which ops run here is decided by the kernel table (attention in vk_flash_attn.cpp,
// the rest in vk_ops.cpp and vk_matmul.cpp); the scheduler sends the others to the CPU.
#include "vk_context.h"
#include "vk_ops.h"

#include "op_def.h"

#include <cstring>

namespace gfa {

namespace vulkan {

const Kernel* find_kernel(Op op) {
    static const std::map<Op, Kernel> table = [] {
        std::map<Op, Kernel> t;
        register_attention_kernels(t);
        register_elementwise_kernels(t);
        register_row_kernels(t);
        register_matmul_kernels(t);
        return t;
    }();
    auto it = table.find(op);
    return it == table.end() ? nullptr : &it->second;
}

} // namespace vulkan

namespace {

using vulkan::Context;

class VulkanBuffer final : public Buffer {
  public:
    VulkanBuffer(BufferType* type, Context& ctx, Context::Allocation a)
        : Buffer(type, reinterpret_cast<void*>(a.base), a.size), ctx_(ctx), alloc_(a) {}
    ~VulkanBuffer() override {
        try {
            ctx_.wait_idle(); // queued work may still use this memory
        } catch (...) {
            // a lost device has nobody to report to here; the memory is freed regardless
        }
        ctx_.release(alloc_);
    }
    void set(Tensor* t, const void* src, size_t offset, size_t size) override {
        ctx_.upload(alloc_, byte_offset(t, offset, size, "set"), src, size);
    }
    void get(const Tensor* t, void* dst, size_t offset, size_t size) const override {
        ctx_.download(alloc_, byte_offset(t, offset, size, "get"), dst, size);
    }
    void fill(uint8_t value) override { ctx_.fill(alloc_, value); }

  private:
    // Where t's bytes [offset, offset + size) are in this buffer, checked.
    size_t byte_offset(const Tensor* t, size_t offset, size_t size, const char* what) const {
        const auto at = reinterpret_cast<uintptr_t>(t->data) - alloc_.base + offset;
        if (reinterpret_cast<uintptr_t>(t->data) < alloc_.base || at + size > alloc_.size)
            throw Error(ctx_.name() + ": " + what + " of " + std::to_string(size) + " bytes of tensor '" +
                        t->name + "' falls outside its buffer of " + std::to_string(alloc_.size) + " bytes");
        return size_t(at);
    }

    Context& ctx_;
    Context::Allocation alloc_;
};

class VulkanBufferType final : public BufferType {
  public:
    VulkanBufferType(Device* dev, Context& ctx) : device_(dev), ctx_(ctx) {}
    const char* name() const override { return device_->name(); }
    std::unique_ptr<Buffer> allocate(size_t size) override {
        return std::make_unique<VulkanBuffer>(this, ctx_, ctx_.allocate(size, false));
    }
    // Tensors start where a storage-buffer binding may start, so most bind at offset 0 of
    // their own range.
    size_t alignment() const override {
        return std::max<size_t>(256, ctx_.limits().minStorageBufferOffsetAlignment);
    }
    bool is_host() const override { return false; }
    Device* device() const override { return device_; }

  private:
    Device* device_;
    Context& ctx_;
};

class VulkanBackend final : public Backend {
  public:
    VulkanBackend(Device* dev, Context& ctx) : device_(dev), recorder_(ctx) {}
    ~VulkanBackend() override {
        try {
            recorder_.wait();
        } catch (...) {
        }
    }
    const char* name() const override { return device_->name(); }
    Device* device() const override { return device_; }

    void compute(std::span<Tensor* const> nodes) override {
        // Every node is checked before anything is recorded, so a bad node leaves no work
        // half-queued.
        work_.clear();
        for (Tensor* node : nodes) {
            if (node->op == Op::None || op_def(node->op).is_view || node->nelements() == 0) continue;
            if (!device_->supports_op(node))
                fail(std::string(device_->name()) + " backend: no kernel for " + op_name(node->op) + " on " +
                     node->shape_str());
            if (!node->data)
                fail(std::string(device_->name()) + " backend: node '" + node->name + "' (" +
                     op_name(node->op) + ") has no memory");
            work_.push_back(node);
        }
        if (work_.empty()) return;
        recorder_.begin();
        for (size_t i = 0; i < work_.size(); ++i) {
            if (i > 0) recorder_.barrier(); // a node may read what the one before wrote
            vulkan::find_kernel(work_[i]->op)->record(recorder_, work_[i]);
        }
        recorder_.submit();
        ++submissions_;
    }

    void synchronize() override { recorder_.wait(); }

    std::vector<std::pair<std::string, int64_t>> counters() const override {
        return {{"submissions", submissions_}, {"dispatches", recorder_.dispatches()}};
    }

  private:
    Device* device_;
    vulkan::Recorder recorder_;
    std::vector<Tensor*> work_;
    int64_t submissions_ = 0;
};

class VulkanDevice final : public Device {
  public:
    VulkanDevice(VkInstance instance, VkPhysicalDevice physical, int index)
        : ctx_(instance, physical, "Vulkan" + std::to_string(index)), buffer_type_(this, ctx_) {}
    const char* name() const override { return ctx_.name().c_str(); }
    std::string description() const override { return ctx_.description(); }
    DeviceKind kind() const override { return DeviceKind::GPU; }
    DeviceMemory memory() const override { return ctx_.memory(); }
    BufferType* buffer_type() override { return &buffer_type_; }
    std::unique_ptr<Backend> create_backend() override { return std::make_unique<VulkanBackend>(this, ctx_); }
    bool supports_op(const Tensor* node) const override {
        if (node->op == Op::None || op_def(node->op).is_view) return true;
        const vulkan::Kernel* k = vulkan::find_kernel(node->op);
        return k && k->supports(ctx_, node);
    }

  private:
    Context ctx_;
    VulkanBufferType buffer_type_;
};

// The process's Vulkan instance, or null when there is no loader or driver.
VkInstance vulkan_instance() {
    static VkInstance instance = [] {
        VkApplicationInfo app{VK_STRUCTURE_TYPE_APPLICATION_INFO};
        app.pApplicationName = "ggml-fa";
        app.pEngineName = "ggml-fa";
        app.apiVersion = VK_API_VERSION_1_2;
        VkInstanceCreateInfo ci{VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO};
        ci.pApplicationInfo = &app;
        VkInstance inst = VK_NULL_HANDLE;
        if (vkCreateInstance(&ci, nullptr, &inst) != VK_SUCCESS) return VkInstance(VK_NULL_HANDLE);
        return inst;
    }();
    return instance;
}

} // namespace

// Adds one device per physical device with a compute queue that supports Vulkan 1.2. No
// loader, no driver, or a device that fails to start all mean fewer devices, not an error:
// the CPU still works. GFA_VULKAN_DEVICES=0 hides them all.
void append_vulkan_devices(std::vector<Device*>& out) {
    static std::vector<std::unique_ptr<VulkanDevice>> owned = [] {
        std::vector<std::unique_ptr<VulkanDevice>> list;
        if (const char* v = std::getenv("GFA_VULKAN_DEVICES"); v && std::strcmp(v, "0") == 0) return list;
        VkInstance instance = vulkan_instance();
        if (!instance) return list;
        uint32_t n = 0;
        if (vkEnumeratePhysicalDevices(instance, &n, nullptr) != VK_SUCCESS) return list;
        std::vector<VkPhysicalDevice> physical(n);
        if (vkEnumeratePhysicalDevices(instance, &n, physical.data()) != VK_SUCCESS) return list;
        for (VkPhysicalDevice p : physical) {
            VkPhysicalDeviceProperties props;
            vkGetPhysicalDeviceProperties(p, &props);
            if (props.apiVersion < VK_API_VERSION_1_2) continue;
            try {
                list.push_back(std::make_unique<VulkanDevice>(instance, p, int(list.size())));
            } catch (const Error&) {
                // a device that cannot start is left out
            }
        }
        return list;
    }();
    for (auto& d : owned) out.push_back(d.get());
}

} // namespace gfa
