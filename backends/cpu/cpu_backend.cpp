// The CPU device: host memory buffers, a backend with its own thread pool, and the kernel
// table that decides which ops run here.
#include <ggml-fa/backend.h>

#include "cpu_kernels.h"
#include "op_def.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <thread>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gfa {

namespace {

constexpr size_t kHostAlignment = 64;

// Host memory, zero-filled. Large buffers (model weights, KV caches, compute buffers) are
// anonymous mappings in 2 MiB huge pages where the kernel offers them (Linux transparent
// huge pages, on request); the OS hands them out zeroed. A decoding step streams every
// weight, and over huge pages it misses the TLB 512 times less often: a 1.1B model on two
// cores generated 0-10% faster and ran its prompt 2-6% faster (docs/BENCHMARKS.md).
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMapAtLeast = 4 * kHugePage;

struct HostMemory {
    void* base = nullptr;
    void* mapping = nullptr; // the mapping to unmap (huge-page aligned base inside it), or null
    size_t mapped = 0;
};

HostMemory allocate_host(size_t size) {
    const size_t rounded = (std::max<size_t>(size, 1) + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (rounded >= kMapAtLeast) {
        // One huge page extra, so that the buffer can start on a huge-page boundary.
        const size_t mapped = (rounded + kHugePage - 1) / kHugePage * kHugePage + kHugePage;
        void* m = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m != MAP_FAILED) {
            const uintptr_t aligned =
                (reinterpret_cast<uintptr_t>(m) + kHugePage - 1) / kHugePage * kHugePage;
            void* base = reinterpret_cast<void*>(aligned);
            (void)madvise(base, mapped - (aligned - reinterpret_cast<uintptr_t>(m)), MADV_HUGEPAGE); // a hint
            return {base, m, mapped};
        }
        // No mapping (address space, limits): fall back to the heap below.
    }
#endif
    void* p = std::aligned_alloc(kHostAlignment, rounded);
    if (!p) return {};
    std::memset(p, 0, rounded);
    return {p, nullptr, 0};
}

class HostBuffer final : public Buffer {
  public:
    HostBuffer(BufferType* type, const HostMemory& memory, size_t size)
        : Buffer(type, memory.base, size), memory_(memory) {}
    ~HostBuffer() override {
#if defined(__linux__)
        if (memory_.mapping) {
            munmap(memory_.mapping, memory_.mapped);
            return;
        }
#endif
        std::free(base());
    }
    void set(Tensor* t, const void* src, size_t offset, size_t size) override {
        std::memcpy(static_cast<char*>(t->data) + offset, src, size);
    }
    void get(const Tensor* t, void* dst, size_t offset, size_t size) const override {
        std::memcpy(dst, static_cast<const char*>(t->data) + offset, size);
    }
    void fill(uint8_t value) override {
        std::memset(base(), value, size());
    }

  private:
    HostMemory memory_;
};

class HostBufferType final : public BufferType {
  public:
    explicit HostBufferType(Device* dev) : device_(dev) {}
    const char* name() const override { return "CPU"; }
    std::unique_ptr<Buffer> allocate(size_t size) override {
        const HostMemory memory = allocate_host(size);
        if (!memory.base)
            throw OutOfMemory("CPU: cannot allocate " + std::to_string(size) + " bytes of host memory");
        return std::make_unique<HostBuffer>(this, memory, size);
    }
    size_t alignment() const override { return kHostAlignment; }
    bool is_host() const override { return true; }
    Device* device() const override { return device_; }

  private:
    Device* device_;
};

// GFA_CPU_OP_TIMES=1: the backend adds up the time each op's kernels take, reported by
// counters() as "us.<op>" (ggml-fa-run --profile, train --profile).
bool op_times_by_environment() {
    const char* v = std::getenv("GFA_CPU_OP_TIMES");
    return v && std::strcmp(v, "1") == 0;
}

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
            if (!op_times_) {
                k.run(ctx, node);
                continue;
            }
            const auto t0 = std::chrono::steady_clock::now();
            k.run(ctx, node);
            op_ns_[size_t(node->op)] += (std::chrono::steady_clock::now() - t0).count();
        }
    }
    void set_threads(int n) { pool_ = std::make_unique<ThreadPool>(n); }
    std::vector<std::pair<std::string, int64_t>> counters() const override {
        std::vector<std::pair<std::string, int64_t>> list;
        for (size_t op = 0; op < op_ns_.size(); ++op)
            if (op_ns_[op] > 0) list.emplace_back(std::string("us.") + op_name(Op(op)), op_ns_[op] / 1000);
        return list;
    }

  private:
    Device* device_;
    std::unique_ptr<ThreadPool> pool_;
    bool op_times_ = op_times_by_environment();
    std::array<int64_t, size_t(Op::Count)> op_ns_{};
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
