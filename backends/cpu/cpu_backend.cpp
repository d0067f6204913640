// The CPU device: host memory buffers, a backend with its own thread pool, and the kernel
// table that decides which ops run here.
#include <ggml-fa/backend.h>

#include "cpu_kernels.h"
#include "op_def.h"

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <thread>

namespace gfa {

namespace {

constexpr size_t kHostAlignment = 64;

class HostBuffer final : public Buffer {
  public:
    HostBuffer(BufferType* type, void* base, size_t size) : Buffer(type, base, size) {}
    ~HostBuffer() override { std::free(base()); }
    void set(Tensor* t, const void* src, size_t offset, size_t size) override {
        std::memcpy(static_cast<char*>(t->data) + offset, src, size);
    }
    void get(const Tensor* t, void* dst, size_t offset, size_t size) const override {
        std::memcpy(dst, static_cast<const char*>(t->data) + offset, size);
    }
    void fill(uint8_t value) override { std::memset(base(), value, size()); }
};

class HostBufferType final : public BufferType {
  public:
    explicit HostBufferType(Device* dev) : device_(dev) {}
    const char* name() const override { return "CPU"; }
    std::unique_ptr<Buffer> allocate(size_t size) override {
        const size_t rounded =
            (std::max<size_t>(size, 1) + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
        void* p = std::aligned_alloc(kHostAlignment, rounded);
        if (!p) throw OutOfMemory("CPU: cannot allocate " + std::to_string(size) + " bytes of host memory");
        std::memset(p, 0, rounded);
        return std::make_unique<HostBuffer>(this, p, size);
    }
    size_t alignment() const override { return kHostAlignment; }
    bool is_host() const override { return true; }
    Device* device() const override { return device_; }

  private:
    Device* device_;
};

class CpuBackend final : public Backend {
  public:
    CpuBackend(Device* dev, int n_threads) : device_(dev), pool_(std::make_unique<ThreadPool>(n_threads)) {}
    const char* name() const override { return "CPU"; }
    Device* device() const override { return device_; }
    void compute(std::span<Tensor* const> nodes) override {
        const cpu::KernelTable& table = cpu::kernels();
        cpu::ComputeCtx ctx{*pool_};
        for (Tensor* node : nodes) {
            if (node->op == Op::None || op_def(node->op).is_view) continue;
            const cpu::KernelEntry& k = table[size_t(node->op)];
            if (!k.run || (k.supports && !k.supports(node)))
                fail(std::string("CPU backend: no kernel for ") + op_name(node->op) + " on " +
                     node->shape_str());
            if (!node->data)
                fail(std::string("CPU backend: node '") + node->name + "' (" + op_name(node->op) +
                     ") has no memory");
            k.run(ctx, node);
        }
    }
    void set_threads(int n) { pool_ = std::make_unique<ThreadPool>(n); }

  private:
    Device* device_;
    std::unique_ptr<ThreadPool> pool_;
};

std::string cpu_model_name() {
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind("model name", 0) == 0) {
            const size_t colon = line.find(':');
            if (colon != std::string::npos) return line.substr(colon + 2);
        }
    return "CPU";
}

class CpuDevice final : public Device {
  public:
    CpuDevice() : buffer_type_(this) {}
    const char* name() const override { return "CPU"; }
    std::string description() const override {
        return cpu_model_name() + ", " + std::to_string(std::thread::hardware_concurrency()) + " threads";
    }
    DeviceKind kind() const override { return DeviceKind::CPU; }
    DeviceMemory memory() const override {
        DeviceMemory m;
        std::ifstream f("/proc/meminfo");
        std::string key;
        size_t kb;
        std::string unit;
        while (f >> key >> kb >> unit) {
            if (key == "MemTotal:") m.total = kb * 1024;
            if (key == "MemAvailable:") m.free = kb * 1024;
        }
        return m;
    }
    BufferType* buffer_type() override { return &buffer_type_; }
    std::unique_ptr<Backend> create_backend() override { return std::make_unique<CpuBackend>(this, 0); }
    bool supports_op(const Tensor* node) const override {
        if (node->op == Op::None || op_def(node->op).is_view) return true;
        const cpu::KernelEntry& k = cpu::kernels()[size_t(node->op)];
        return k.run && (!k.supports || k.supports(node));
    }
    // The CPU reads any host-visible memory.
    bool can_use(const BufferType* bt) const override { return bt->is_host(); }

  private:
    HostBufferType buffer_type_;
};

} // namespace

namespace cpu {
const KernelTable& kernels() {
    static const KernelTable table = [] {
        KernelTable t{};
        register_movement_kernels(t);
        register_elementwise_kernels(t);
        register_reduce_kernels(t);
        register_matmul_kernels(t);
        register_norm_kernels(t);
        register_activation_kernels(t);
        register_training_kernels(t);
        register_attention_kernels(t);
        return t;
    }();
    return table;
}
} // namespace cpu

Device& cpu_device() {
    static CpuDevice dev;
    return dev;
}

std::unique_ptr<Backend> make_cpu_backend(int n_threads) {
    return std::make_unique<CpuBackend>(&cpu_device(), n_threads);
}

void set_cpu_threads(Backend& backend, int n_threads) {
    auto* cpu = dynamic_cast<CpuBackend*>(&backend);
    if (!cpu) fail(std::string("set_cpu_threads: backend '") + backend.name() + "' is not a CPU backend");
    cpu->set_threads(n_threads);
}

} // namespace gfa
