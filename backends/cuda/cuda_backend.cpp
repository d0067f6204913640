// The CUDA device: one per GPU ("CUDA0", "CUDA1", ...), device-memory buffers from a small
// caching pool, and a backend that owns a stream, a cuBLAS handle bound to it, and an event
// to wait on. Which ops run here is decided by the kernel table (kernels_*.cu).
#include <ggml-fa/backend.h>

#include "early_launch.h"
#include "cuda_common.h"
#include "launch_graphs.h"
#include "op_def.h"
#include "quants.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace gfa {

namespace cuda {

void raise_cuda_error(const char* call, cudaError_t err, const char* file, int line) {
    std::string msg = std::string("CUDA error: ") + call + " failed with " + cudaGetErrorName(err) + " (" +
                      cudaGetErrorString(err) + ") at " + file + ":" + std::to_string(line);
    if (err == cudaErrorMemoryAllocation) throw OutOfMemory(msg);
    throw Error(msg);
}

void raise_cublas_error(const char* call, cublasStatus_t st, const char* file, int line) {
    throw Error(std::string("cuBLAS error: ") + call + " failed with " + cublasGetStatusString(st) + " at " +
                file + ":" + std::to_string(line));
}

Scratch::~Scratch() {
    if (ptr_) cudaFree(ptr_); // no check: may run while the process tears the runtime down
}

void* Scratch::get(size_t bytes, cudaStream_t stream, const char* device_name) {
    if (bytes <= size_) return ptr_;
    // Growing waits for the stream and reallocates, neither of which a capture allows: end
    // the capture instead, and the backend runs the work eagerly (growing here then).
    if (stream_is_capturing(stream))
        throw CaptureAborted(std::string(device_name) + ": scratch memory must grow during a graph capture");
    const size_t grown = std::max(bytes, size_ * 2);
    if (ptr_) {
        GFA_CUDA_CHECK(cudaStreamSynchronize(stream));
        GFA_CUDA_CHECK(cudaFree(ptr_));
        ptr_ = nullptr;
        size_ = 0;
    }
    if (cudaMalloc(&ptr_, grown) != cudaSuccess) {
        cudaGetLastError();
        ptr_ = nullptr;
        size_t free_bytes = 0, total = 0;
        cudaMemGetInfo(&free_bytes, &total);
        throw OutOfMemory(std::string(device_name) + ": cannot allocate " + std::to_string(grown) +
                          " bytes of scratch memory (" + std::to_string(free_bytes) + " bytes free)");
    }
    size_ = grown;
    ++generation_;
    return ptr_;
}

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
        register_moe_kernels(t);
        register_sample_kernels(t);
        return t;
    }();
    return table;
}

} // namespace cuda

namespace {

using cuda::ComputeCtx;

// Makes a device current for the scope of a call and restores the previous one.
class DeviceGuard {
  public:
    explicit DeviceGuard(int device) {
        GFA_CUDA_CHECK(cudaGetDevice(&previous_));
        if (previous_ != device) GFA_CUDA_CHECK(cudaSetDevice(device));
    }
    ~DeviceGuard() { cudaSetDevice(previous_); }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

  private:
    int previous_ = 0;
};

constexpr size_t kDeviceAlignment = 256;
// Freed blocks kept for reuse, per device; past this they go back to the driver.
constexpr size_t kPoolCacheLimit = size_t(1) << 30;

// A caching allocator: freed blocks are kept (up to kPoolCacheLimit bytes) and handed out
// again for requests that fit in them without wasting more than half the block.
class MemoryPool {
  public:
    MemoryPool(int device, std::string name) : device_(device), name_(std::move(name)) {}
    ~MemoryPool() { release_cached(); }

    void* allocate(size_t size) {
        const size_t rounded =
            (std::max<size_t>(size, 1) + kDeviceAlignment - 1) / kDeviceAlignment * kDeviceAlignment;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            auto it = free_.lower_bound(rounded);
            if (it != free_.end() && it->first <= rounded * 2) {
                void* p = it->second;
                sizes_[p] = it->first;
                cached_bytes_ -= it->first;
                free_.erase(it);
                return p;
            }
        }
        DeviceGuard guard(device_);
        void* p = nullptr;
        cudaError_t err = cudaMalloc(&p, rounded);
        if (err == cudaErrorMemoryAllocation) {
            cudaGetLastError();
            release_cached(); // cached blocks may be what stands in the way
            err = cudaMalloc(&p, rounded);
        }
        if (err != cudaSuccess) {
            cudaGetLastError();
            size_t free_bytes = 0, total = 0;
            cudaMemGetInfo(&free_bytes, &total);
            const std::string msg = name_ + ": cannot allocate " + std::to_string(size) +
                                    " bytes of device memory (" + std::to_string(free_bytes) + " of " +
                                    std::to_string(total) + " bytes free; " + cudaGetErrorString(err) + ")";
            if (err == cudaErrorMemoryAllocation) throw OutOfMemory(msg);
            throw Error(msg);
        }
        std::lock_guard<std::mutex> lock(mutex_);
        sizes_[p] = rounded;
        return p;
    }

    void release(void* p) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = sizes_.find(p);
        if (it == sizes_.end()) return;
        const size_t size = it->second;
        sizes_.erase(it);
        if (cached_bytes_ + size <= kPoolCacheLimit) {
            free_.emplace(size, p);
            cached_bytes_ += size;
        } else {
            DeviceGuard guard(device_);
            cudaFree(p); // a failure here has nobody to report to
        }
    }

    void release_cached() {
        std::lock_guard<std::mutex> lock(mutex_);
        int previous = 0;
        cudaGetDevice(&previous);
        cudaSetDevice(device_);
        for (auto& [size, p] : free_) cudaFree(p);
        cudaSetDevice(previous);
        free_.clear();
        cached_bytes_ = 0;
    }

  private:
    int device_;
    std::string name_;
    std::mutex mutex_;
    std::multimap<size_t, void*> free_;
    std::map<void*, size_t> sizes_;
    size_t cached_bytes_ = 0;
};

// Device-to-host reads of mid-sized tensors (a step's logits: n_vocab floats) go through one
// block of pinned host memory per device: a copy from pageable memory makes the driver stage
// it in chunks of its own, which took ~40 us for 128 KB of logits. Small reads gain nothing,
// large ones (whole weight matrices) would pin too much. GFA_CUDA_PINNED_READBACK=0 turns it
// off (for measuring).
class ReadbackStaging {
  public:
    static constexpr size_t kMinBytes = size_t(16) << 10, kMaxBytes = size_t(16) << 20;
    ReadbackStaging() = default;
    ReadbackStaging(const ReadbackStaging&) = delete;
    ReadbackStaging& operator=(const ReadbackStaging&) = delete;
    ~ReadbackStaging() {
        if (host_) cudaFreeHost(host_);
    }
    // Copies size bytes at src (device memory of the current device) to dst; false when this
    // read is not for staging (the caller copies it directly).
    bool read(void* dst, const void* src, size_t size) {
        static const bool enabled = [] {
            const char* v = std::getenv("GFA_CUDA_PINNED_READBACK");
            return v == nullptr || std::strcmp(v, "0") != 0;
        }();
        if (!enabled || size < kMinBytes || size > kMaxBytes) return false;
        std::lock_guard<std::mutex> lock(mutex_);
        if (size > capacity_) {
            if (host_) cudaFreeHost(host_);
            host_ = nullptr;
            capacity_ = 0;
            const size_t want = std::max(size, size_t(256) << 10);
            if (cudaHostAlloc(&host_, want, cudaHostAllocDefault) != cudaSuccess) {
                (void)cudaGetLastError(); // no pinned memory to spare: the direct copy still works
                host_ = nullptr;
                return false;
            }
            capacity_ = want;
        }
        GFA_CUDA_CHECK(cudaMemcpy(host_, src, size, cudaMemcpyDeviceToHost));
        std::memcpy(dst, host_, size);
        return true;
    }

  private:
    std::mutex mutex_;
    void* host_ = nullptr;
    size_t capacity_ = 0;
};

class CudaDevice;

// Host <-> device copies go through the legacy default stream: it waits for the work of
// every backend stream on the device (they are created blocking), so a read after compute()
// sees the results without an explicit synchronize.
class CudaBuffer final : public Buffer {
  public:
    CudaBuffer(BufferType* type, void* base, size_t size, MemoryPool& pool, ReadbackStaging& staging,
               int device)
        : Buffer(type, base, size), pool_(pool), staging_(staging), device_(device) {}
    ~CudaBuffer() override {
        // Work still queued may use this memory; wait before it can be handed out again.
        int previous = 0;
        cudaGetDevice(&previous);
        cudaSetDevice(device_);
        cudaDeviceSynchronize();
        cudaSetDevice(previous);
        pool_.release(base());
    }
    // GFA_CUDA_WEIGHT_LAYOUT=0 keeps weights buffers in the file's layout (for measuring).
    void set_usage(BufferUsage usage) override {
        static const bool own_layout = [] {
            const char* v = std::getenv("GFA_CUDA_WEIGHT_LAYOUT");
            return v == nullptr || std::strcmp(v, "0") != 0;
        }();
        if (usage == BufferUsage::Weights && !own_layout) usage = BufferUsage::Compute;
        if (written_ && usage != this->usage())
            throw Error(
                std::string(type()->name()) +
                " buffer: set_usage after tensors were written (their layout would change under them)");
        Buffer::set_usage(usage);
    }
    void set(Tensor* t, const void* src, size_t offset, size_t size) override {
        DeviceGuard guard(device_);
        written_ = true;
        if (cuda::has_scales_last(t)) return set_scales_last(t, src, offset, size);
        GFA_CUDA_CHECK(cudaMemcpy(static_cast<char*>(t->data) + offset, src, size, cudaMemcpyHostToDevice));
    }
    void get(const Tensor* t, void* dst, size_t offset, size_t size) const override {
        DeviceGuard guard(device_);
        if (cuda::has_scales_last(t)) return get_scales_last(t, dst, offset, size);
        const char* src = static_cast<const char*>(t->data) + offset;
        if (staging_.read(dst, src, size)) return;
        GFA_CUDA_CHECK(cudaMemcpy(dst, src, size, cudaMemcpyDeviceToHost));
    }
    void fill(uint8_t value) override {
        DeviceGuard guard(device_);
        GFA_CUDA_CHECK(cudaMemset(base(), value, size()));
        GFA_CUDA_CHECK(cudaDeviceSynchronize());
    }

  private:
    // The whole rows of t's owner that bytes [offset, offset + size) of t fall in: `first` the
    // owner's byte where they start, `span` their bytes; `bytes` holds them in the file's
    // layout once read_rows has run.
    struct OwnerRows {
        const Tensor* owner;
        size_t row_bytes, first, begin, span; // begin: where the range starts, from `first`
        std::vector<uint8_t> bytes;
    };
    static OwnerRows owner_rows(const Tensor* t, size_t offset, size_t size) {
        const Tensor* owner = cuda::memory_owner(t);
        const size_t row = owner->nb[1];
        const size_t at = t->view_offs + offset; // t->view_offs is 0 for the owner itself
        const size_t first = at / row * row, last = (at + size + row - 1) / row * row;
        return {owner, row, first, at - first, last - first, {}};
    }
    // Reads rows r (in the owner's layout on the device) and returns them in the file's layout.
    void read_rows(OwnerRows& r) const {
        r.bytes.resize(r.span);
        std::vector<uint8_t> laid_out(r.span);
        GFA_CUDA_CHECK(cudaMemcpy(laid_out.data(), static_cast<const char*>(r.owner->data) + r.first,
                                  laid_out.size(), cudaMemcpyDeviceToHost));
        quant::rows_from_scales_last(r.owner->type, laid_out.data(), r.bytes.data(), r.owner->ne[0],
                                     int64_t(r.bytes.size() / r.row_bytes));
    }
    // Writes bytes of t as the file has them: whole rows are rearranged on the host and copied
    // over; a range that starts or ends inside a row merges with the row's present bytes.
    void set_scales_last(const Tensor* t, const void* src, size_t offset, size_t size) {
        OwnerRows r = owner_rows(t, offset, size);
        const void* rows = src; // whole rows (a file's tensor): rearranged straight from src
        if (r.begin != 0 || size != r.span) {
            read_rows(r);
            std::memcpy(r.bytes.data() + r.begin, src, size);
            rows = r.bytes.data();
        }
        std::vector<uint8_t> laid_out(r.span);
        quant::rows_to_scales_last(r.owner->type, rows, laid_out.data(), r.owner->ne[0],
                                   int64_t(r.span / r.row_bytes));
        GFA_CUDA_CHECK(cudaMemcpy(static_cast<char*>(r.owner->data) + r.first, laid_out.data(),
                                  laid_out.size(), cudaMemcpyHostToDevice));
    }
    void get_scales_last(const Tensor* t, void* dst, size_t offset, size_t size) const {
        OwnerRows r = owner_rows(t, offset, size);
        read_rows(r);
        std::memcpy(dst, r.bytes.data() + r.begin, size);
    }

    MemoryPool& pool_;
    ReadbackStaging& staging_;
    int device_;
    bool written_ = false;
};

class CudaBufferType final : public BufferType {
  public:
    CudaBufferType(Device* dev, int device, const std::string& name)
        : device_(dev), id_(device), pool_(device, name) {}
    const char* name() const override { return device_->name(); }
    std::unique_ptr<Buffer> allocate(size_t size) override {
        void* p = pool_.allocate(size);
        return std::make_unique<CudaBuffer>(this, p, size, pool_, staging_, id_);
    }
    size_t alignment() const override { return kDeviceAlignment; }
    bool is_host() const override { return false; }
    Device* device() const override { return device_; }

  private:
    Device* device_;
    int id_;
    MemoryPool pool_;
    ReadbackStaging staging_;
};

// Node lists shorter than this run eagerly: a graph saves little there, and small lists are
// what tests and one-off computations run.
constexpr size_t kMinGraphNodes = 16;

// Ops of training graphs (gradients, losses, the optimizer). Lists holding them run eagerly:
// training steps keep exactly the behaviour they had; graphs are for inference, where the
// same small node lists repeat token after token.
bool training_op(Op op) {
    switch (op) {
    case Op::GetRowsBack:
    case Op::RepeatBack:
    case Op::OutProd:
    case Op::NormBack:
    case Op::RmsNormBack:
    case Op::RopeBack:
    case Op::SoftMaxBack:
    case Op::SiluBack:
    case Op::GeluBack:
    case Op::CrossEntropyLoss:
    case Op::CrossEntropyLossBack:
    case Op::AdamW:
    case Op::FlashAttnBack:
        return true;
    default:
        return false;
    }
}

// CUDA graphs are on unless GFA_CUDA_GRAPHS is 0 (or off/false/no). With them, a node list
// that repeats exactly (a decoding step whose graph the session reused) is replayed as one
// graph launch; see launch_graphs.h for when calls are captured.
bool graphs_enabled_by_environment() {
    const char* v = std::getenv("GFA_CUDA_GRAPHS");
    if (!v) return true;
    for (const char* off : {"0", "off", "false", "no", "OFF", "FALSE", "NO"})
        if (std::strcmp(v, off) == 0) return false;
    return true;
}

// Fused launches (cuda::Fusion) are on unless GFA_CUDA_FUSION is 0: results are bit for bit
// the same either way, so turning them off is for measuring and testing.
bool fusion_by_environment() {
    const char* v = std::getenv("GFA_CUDA_FUSION");
    return !(v && std::strcmp(v, "0") == 0);
}

} // namespace

// Early launch (early_launch.cuh) is on unless GFA_CUDA_EARLY_LAUNCH is 0: results are the
// same bit for bit. Read at every launch (a few hundred ns against a launch's microseconds)
// so tests can compare both ways in one process.
bool cuda::early_launch_enabled() {
    const char* v = std::getenv("GFA_CUDA_EARLY_LAUNCH");
    return !(v && std::strcmp(v, "0") == 0);
}

namespace {

// GFA_CUDA_OP_TIMES=1: the backend adds up the host time it spends enqueueing each op
// (eager runs only) and reports it in counters() as host_us.<op>, for finding host overhead.
bool op_times_by_environment() {
    const char* v = std::getenv("GFA_CUDA_OP_TIMES");
    return v && std::strcmp(v, "1") == 0;
}

// GFA_CUDA_SKIP_OPS=op,op,...: for measuring where a step's GPU time goes, the backend
// launches an empty kernel in place of every launch whose (last) node is one of these ops, so
// a timed run without them, against one with them, gives their share of the chain. An entry
// mul_mat:KxM names only the products whose weights are K x M (a launch that fuses one with
// other ops is left out whole): one projection's share. Results are then wrong, and the
// backend says so once.
struct SkippedLaunches {
    std::vector<bool> ops = std::vector<bool>(size_t(Op::Count), false);
    std::vector<std::array<int64_t, 2>> product_weights; // (K, M) of the weights of products left out

    bool covers(const Tensor* node, std::span<Tensor* const> fused) const {
        if (ops[size_t(node->op)]) return true;
        auto listed_product = [&](const Tensor* t) {
            return t->op == Op::MulMat &&
                   std::ranges::find(product_weights, std::array{t->src[0]->ne[0], t->src[0]->ne[1]}) !=
                       product_weights.end();
        };
        return !product_weights.empty() &&
               (listed_product(node) || std::ranges::any_of(fused, listed_product));
    }
};

// "KxM" as two positive integers, or nothing.
std::optional<std::array<int64_t, 2>> parse_weight_shape(std::string_view text) {
    const size_t x = text.find('x');
    if (x == std::string_view::npos) return std::nullopt;
    std::array<int64_t, 2> shape{};
    for (int i = 0; i < 2; ++i) {
        const std::string_view part = i == 0 ? text.substr(0, x) : text.substr(x + 1);
        const auto [end, ec] = std::from_chars(part.data(), part.data() + part.size(), shape[size_t(i)]);
        if (ec != std::errc{} || end != part.data() + part.size() || shape[size_t(i)] <= 0)
            return std::nullopt;
    }
    return shape;
}

SkippedLaunches skipped_launches_by_environment() {
    SkippedLaunches skip;
    const char* v = std::getenv("GFA_CUDA_SKIP_OPS");
    if (!v || !*v) return skip;
    const std::string_view list(v);
    for (size_t at = 0; at <= list.size();) {
        const size_t end = std::min(list.find(',', at), list.size());
        const std::string_view entry = list.substr(at, end - at);
        at = end + 1;
        if (entry.empty()) continue;
        const size_t colon = entry.find(':');
        const std::string_view name = entry.substr(0, colon);
        size_t op = 0;
        while (op < size_t(Op::Count) && name != op_name(Op(op))) ++op;
        if (op == size_t(Op::Count)) fail("GFA_CUDA_SKIP_OPS: no op named '" + std::string(name) + "'");
        if (colon == std::string_view::npos) {
            skip.ops[op] = true;
            continue;
        }
        const auto shape = Op(op) == Op::MulMat ? parse_weight_shape(entry.substr(colon + 1)) : std::nullopt;
        if (!shape)
            fail("GFA_CUDA_SKIP_OPS: '" + std::string(entry) +
                 "' is not an op name or mul_mat:KxM (the product's weights, K x M)");
        skip.product_weights.push_back(*shape);
    }
    std::fprintf(stderr,
                 "CUDA backend: GFA_CUDA_SKIP_OPS=%s: those launches are left out, results are wrong "
                 "(for timing only)\n",
                 v);
    return skip;
}

// A 64-bit hash of a sequence of words, taken four at a time by four independent chains of
// multiply and fold (every input bit reaches every output bit), folded together at the end.
// With one chain, a decoding step's fingerprint (~25k words) was a serial run of dependent
// multiplies, some 30-50 us of host time before every graph launch; four chains overlap.
class Hash {
  public:
    void add(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
        h_[0] = mix(h_[0] ^ a);
        h_[1] = mix(h_[1] ^ b);
        h_[2] = mix(h_[2] ^ c);
        h_[3] = mix(h_[3] ^ d);
    }
    template <class T> void add(const std::array<T, 4>& a) {
        add(uint64_t(a[0]), uint64_t(a[1]), uint64_t(a[2]), uint64_t(a[3]));
    }
    uint64_t value() const { return mix(mix(mix(mix(h_[0]) ^ h_[1]) ^ h_[2]) ^ h_[3]); } // order matters

  private:
    static uint64_t mix(uint64_t h) {
        h *= 0x9E3779B97F4A7C15ull;
        return h ^ (h >> 29);
    }
    uint64_t h_[4] = {0x243F6A8885A308D3ull, 0x13198A2E03707344ull, 0xA4093822299F31D0ull,
                      0x082EFA98EC4E6C89ull};
};

uint64_t word_of(const void* p) {
    return uint64_t(reinterpret_cast<uintptr_t>(p));
}

using WorkList = std::span<const std::pair<Tensor*, cuda::Kernel>>;

// The shape of a call: its ops and result types and shapes. Calls of one shape can share an
// executable graph, updated in place when pointers or source shapes (the KV length) differ.
uint64_t shape_of(WorkList work) {
    Hash h;
    h.add(work.size(), 0, 0, 0);
    for (const auto& [node, run] : work) {
        h.add(uint64_t(node->op), uint64_t(node->type), 0, 0);
        h.add(node->ne);
    }
    return h.value();
}

// Adds a node's memory, type, shape, strides, flags and parameters and those of its sources.
// kFlagConstant (in flags) lets kernels read a tensor early. `slot` tells a node's words from
// its sources' and each source's place, so that a missing source changes the hash.
void add_node(Hash& h, const Tensor* node) {
    constexpr size_t kParamWords = kMaxParamBytes / sizeof(uint64_t);
    static_assert(kParamWords % 4 == 0);
    auto tensor = [&h](const Tensor* t, uint64_t slot) {
        h.add(word_of(t->data), uint64_t(t->flags), uint64_t(t->type), slot);
        h.add(t->ne);
        h.add(t->nb);
    };
    tensor(node, uint64_t(node->op) << 8);
    uint64_t params[kParamWords];
    std::memcpy(params, node->params_storage.data(), sizeof(params));
    for (size_t i = 0; i < kParamWords; i += 4) h.add(params[i], params[i + 1], params[i + 2], params[i + 3]);
    for (size_t i = 0; i < node->src.size(); ++i)
        if (const Tensor* s = node->src[i]) tensor(s, 1 + i);
}

// Everything the launchers of a call read from its nodes: each node's and source's memory,
// type, shape and strides, and the op parameters. Equal fingerprints (with the same scratch
// block, which LaunchGraphs::run checks) launch the same kernels with the same arguments, so
// a graph captured from one call replays the other.
uint64_t fingerprint_of(WorkList work) {
    Hash h;
    h.add(work.size(), uint64_t(cuda::early_launch_enabled()), 0, 0); // launches with and without it differ
    for (const auto& [node, run] : work) add_node(h, node);
    return h.value();
}

// The node list a compute() call was given, as far as anything compute() derives from it
// depends on it: the fingerprint's words for every node (views and leaves too) and the
// nodes' own addresses (the work list keeps pointers to them). A call whose list hashes as
// the last call's can reuse that call's checks, fusions and fingerprints.
uint64_t list_fingerprint_of(std::span<Tensor* const> nodes) {
    Hash h;
    h.add(nodes.size(), 0, 0, 0);
    for (const Tensor* node : nodes) {
        h.add(word_of(node), uint64_t(node->nelements()), 0, 0);
        add_node(h, node);
    }
    return h.value();
}

// GFA_CUDA_REUSE_CHECKS=0: check and fuse every call's nodes anew (for measuring).
bool reuse_checks_by_environment() {
    const char* v = std::getenv("GFA_CUDA_REUSE_CHECKS");
    return v == nullptr || std::strcmp(v, "0") != 0;
}

// cuBLAS's default workspace sizes (32 MiB from Hopper on, 4 MiB before). Given explicitly,
// because cuBLAS must not allocate its own while a graph is being captured.
size_t cublas_workspace_bytes(int cc_major) {
    return cc_major >= 9 ? size_t(32) << 20 : size_t(4) << 20;
}

// Host <-> device copies queued on a backend's stream (Backend::write_async, read_async).
// They go through slots of pinned host memory: a copy from pageable memory is staged by the
// driver synchronously, and a queued copy must not read memory the caller reuses at once.
// Each slot's last copy is marked by an event; a slot is taken again once that copy is done,
// and a read's bytes move from its slot to the caller's memory when it is waited for (or
// when its slot is needed again, whichever comes first).
class QueuedTransfers {
  public:
    static constexpr int kSlots = 16;
    static constexpr size_t kSlotBytes = size_t(64) << 10;

    explicit QueuedTransfers(cudaStream_t stream) : stream_(stream) {
        try {
            for (Slot& s : slots_) {
                GFA_CUDA_CHECK(cudaHostAlloc(&s.host, kSlotBytes, cudaHostAllocDefault));
                GFA_CUDA_CHECK(cudaEventCreateWithFlags(&s.event, cudaEventDisableTiming));
            }
        } catch (...) {
            release();
            throw;
        }
    }
    QueuedTransfers(const QueuedTransfers&) = delete;
    QueuedTransfers& operator=(const QueuedTransfers&) = delete;
    ~QueuedTransfers() { release(); }

    void write(void* device_dst, const void* src, size_t size) {
        for (size_t done = 0; done < size;) {
            const size_t n = std::min(kSlotBytes, size - done);
            Slot& s = take();
            std::memcpy(s.host, static_cast<const char*>(src) + done, n);
            GFA_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(device_dst) + done, s.host, n,
                                           cudaMemcpyHostToDevice, stream_));
            GFA_CUDA_CHECK(cudaEventRecord(s.event, stream_));
            s.busy = true;
            done += n;
        }
    }

    Backend::Ticket read(void* dst, const void* device_src, size_t size) {
        const Backend::Ticket ticket = ++last_ticket_;
        for (size_t done = 0; done < size;) {
            const size_t n = std::min(kSlotBytes, size - done);
            Slot& s = take();
            GFA_CUDA_CHECK(cudaMemcpyAsync(s.host, static_cast<const char*>(device_src) + done, n,
                                           cudaMemcpyDeviceToHost, stream_));
            GFA_CUDA_CHECK(cudaEventRecord(s.event, stream_));
            s.busy = true;
            s.read_to = static_cast<char*>(dst) + done;
            s.read_bytes = n;
            s.ticket = ticket;
            done += n;
        }
        return ticket;
    }

    // Lands every read up to `ticket` (those already landed, or unknown, need nothing).
    void wait_for(Backend::Ticket ticket) {
        for (Slot& s : slots_)
            if (s.busy && s.read_to && s.ticket <= ticket) settle(s);
    }

  private:
    struct Slot {
        void* host = nullptr;
        cudaEvent_t event = nullptr;
        bool busy = false;       // a copy through it was queued and has not been settled
        char* read_to = nullptr; // a read's destination, until its bytes are delivered
        size_t read_bytes = 0;
        Backend::Ticket ticket = 0;
    };

    // The next slot in turn, free: its last copy done and a read's bytes delivered.
    Slot& take() {
        Slot& s = slots_[next_];
        next_ = (next_ + 1) % kSlots;
        if (s.busy) settle(s);
        return s;
    }
    void settle(Slot& s) {
        GFA_CUDA_CHECK(cudaEventSynchronize(s.event));
        if (s.read_to) std::memcpy(s.read_to, s.host, s.read_bytes);
        s.busy = false;
        s.read_to = nullptr;
    }

    void release() {
        for (Slot& s : slots_) {
            if (s.event) cudaEventDestroy(s.event);
            if (s.host) cudaFreeHost(s.host);
            s = Slot{};
        }
    }

    cudaStream_t stream_;
    std::array<Slot, kSlots> slots_{};
    int next_ = 0;
    Backend::Ticket last_ticket_ = 0;
};

class CudaBackend final : public Backend {
  public:
    CudaBackend(Device* dev, int device, int sm_count, int cc_major)
        : device_(dev), graphs_(std::make_unique<cuda::LaunchGraphs>(graphs_enabled_by_environment())) {
        DeviceGuard guard(device);
        ctx_.device = device;
        ctx_.device_name = dev->name();
        ctx_.sm_count = sm_count;
        ctx_.scratch = &scratch_;
        ctx_.last_columns = &last_columns_;
        GFA_CUDA_CHECK(cudaStreamCreate(&ctx_.stream));
        GFA_CUBLAS_CHECK(cublasCreate(&ctx_.cublas));
        GFA_CUBLAS_CHECK(cublasSetStream(ctx_.cublas, ctx_.stream));
        // After cublasSetStream, which resets the workspace to cuBLAS's own.
        cublas_workspace_size_ = cublas_workspace_bytes(cc_major);
        GFA_CUDA_CHECK(cudaMalloc(&cublas_workspace_, cublas_workspace_size_));
        GFA_CUBLAS_CHECK(cublasSetWorkspace(ctx_.cublas, cublas_workspace_, cublas_workspace_size_));
        GFA_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
        GFA_CUDA_CHECK(cudaHostAlloc(&error_host_, cuda::kErrorWords * sizeof(int32_t), cudaHostAllocMapped));
        *error_host_ = cuda::kNoError;
        GFA_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&ctx_.error_flag), error_host_, 0));
    }
    ~CudaBackend() override {
        int previous = 0;
        cudaGetDevice(&previous);
        cudaSetDevice(ctx_.device);
        cudaStreamSynchronize(ctx_.stream);
        transfers_.reset();
        graphs_.reset();
        cublasDestroy(ctx_.cublas);
        cudaFree(cublas_workspace_);
        cudaEventDestroy(done_);
        cudaStreamDestroy(ctx_.stream);
        cudaFreeHost(error_host_);
        cudaSetDevice(previous);
    }

    const char* name() const override { return device_->name(); }
    Device* device() const override { return device_; }

    void compute(std::span<Tensor* const> nodes) override {
        DeviceGuard guard(ctx_.device);
        // A decoding step hands over the node list of the step before, unchanged: its checks,
        // fusions and fingerprints are those of the last call.
        const uint64_t list = reuse_checks_ ? list_fingerprint_of(nodes) : 0;
        if (!reuse_checks_ || !last_list_ || list != *last_list_) {
            last_list_.reset(); // set again once this list has passed its checks
            prepare_work(nodes);
            last_list_ = list;
        } else {
            fusions_ += fusions_in_work_; // counted per call, reused or not
            fused_nodes_count_ += fused_nodes_in_work_;
        }
        run_work();
    }

    void synchronize() override {
        DeviceGuard guard(ctx_.device);
        GFA_CUDA_CHECK(cudaEventRecord(done_, ctx_.stream));
        GFA_CUDA_CHECK(cudaEventSynchronize(done_));
        raise_kernel_error();
    }

    void write_async(Tensor* t, const void* src, size_t offset, size_t size) override {
        if (!queueable(t, offset, size)) return Backend::write_async(t, src, offset, size);
        DeviceGuard guard(ctx_.device);
        transfers().write(static_cast<char*>(t->data) + offset, src, size);
    }
    void copy_async(const Tensor* from, size_t from_offset, Tensor* to, size_t to_offset,
                    size_t size) override {
        if (!queueable(from, from_offset, size) || !queueable(to, to_offset, size))
            return Backend::copy_async(from, from_offset, to, to_offset, size);
        DeviceGuard guard(ctx_.device);
        GFA_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(to->data) + to_offset,
                                       static_cast<const char*>(from->data) + from_offset, size,
                                       cudaMemcpyDeviceToDevice, ctx_.stream));
    }
    Ticket read_async(const Tensor* t, void* dst, size_t offset, size_t size) override {
        if (!queueable(t, offset, size)) return Backend::read_async(t, dst, offset, size);
        DeviceGuard guard(ctx_.device);
        return transfers().read(dst, static_cast<const char*>(t->data) + offset, size);
    }
    void wait_for(Ticket ticket) override {
        DeviceGuard guard(ctx_.device);
        transfers().wait_for(ticket);
        raise_kernel_error();
    }

    std::vector<std::pair<std::string, int64_t>> counters() const override {
        std::vector<std::pair<std::string, int64_t>> list = graphs_->counter_list();
        list.emplace_back("fusion_enabled", fusion_ ? 1 : 0);
        list.emplace_back("fused_launches", fusions_);
        list.emplace_back("fused_nodes", fused_nodes_count_);
        list.emplace_back("early_launch_enabled", cuda::early_launch_enabled() ? 1 : 0);
        if (skipped_launches_ > 0) list.emplace_back("skipped_launches", skipped_launches_);
        for (size_t op = 0; op < op_host_ns_.size(); ++op)
            if (op_host_ns_[op] > 0)
                list.emplace_back(std::string("host_us.") + op_name(Op(op)), op_host_ns_[op] / 1000);
        return list;
    }

  private:
    // A kernel's error report (cuda::kErrorWords, written through mapped host memory),
    // raised once the work that wrote it is done.
    void raise_kernel_error() {
        const int32_t code = *error_host_;
        if (code != cuda::kNoError) {
            *error_host_ = cuda::kNoError;
            if (code == cuda::kRowIndexOutOfRange)
                fail(std::string(device_->name()) +
                     " backend: a row index (get_rows/set_rows) was out of range");
            if (code == cuda::kExpertOutOfRange)
                fail(std::string(device_->name()) + " backend: mul_mat_id: expert " +
                     std::to_string(error_host_[1]) + " of token " + std::to_string(error_host_[2]) +
                     " is outside [0, " + std::to_string(error_host_[3]) + ") (its rows were set to 0)");
            if (code == cuda::kClassOutOfRange)
                fail(std::string(device_->name()) +
                     " backend: cross_entropy_loss was given a class out of range (its row was left out)");
            fail(std::string(device_->name()) + " backend: a kernel reported error code " +
                 std::to_string(code));
        }
    }

    // Whether a queued transfer can reach t's bytes directly: device memory of this
    // backend's GPU in the file's layout (weights laid out by the GPU translate on set/get).
    bool queueable(const Tensor* t, size_t offset, size_t size) const {
        return t->data && t->buffer && t->buffer->type()->device() == device_ &&
               offset + size <= t->alloc_bytes() && !cuda::has_scales_last(t);
    }
    QueuedTransfers& transfers() {
        if (!transfers_) transfers_ = std::make_unique<QueuedTransfers>(ctx_.stream);
        return *transfers_;
    }

    // Checks every node and sets up work_ (the launches, fused where possible) and the
    // call's shape and fingerprint.
    void prepare_work(std::span<Tensor* const> nodes) {
        const cuda::KernelTable& table = cuda::kernels();
        // Every node is checked before any work is queued, so a bad node is reported the
        // same way whether or not the list is then captured into a graph.
        work_.clear();
        bool graph_ok = true;
        for (Tensor* node : nodes) {
            if (node->op == Op::None || op_def(node->op).is_view) continue;
            const cuda::KernelEntry& k = table[size_t(node->op)];
            if (!k.run || (k.supports && !k.supports(node)))
                fail(std::string(device_->name()) + " backend: no kernel for " + op_name(node->op) + " on " +
                     node->shape_str());
            if (!node->data)
                fail(std::string(device_->name()) + " backend: node '" + node->name + "' (" +
                     op_name(node->op) + ") has no memory");
            if (node->nelements() == 0) continue;
            work_.emplace_back(node, k.run);
            graph_ok = graph_ok && !training_op(node->op);
        }
        fused_size_.assign(work_.size(), 1);
        if (fusion_) fuse_work();
        as_graph_ = graph_ok && work_.size() >= kMinGraphNodes;
        shape_ = as_graph_ ? shape_of(work_) : 0;
        fingerprint_ = as_graph_ ? fingerprint_of(work_) : 0;
    }

    void run_work() {
        auto enqueue = [this] {
            last_columns_ = {}; // tensors of an earlier call may share addresses with this one's
            for (size_t j = 0; j < work_.size(); ++j) {
                const auto& [node, run] = work_[j];
                if (node->op != Op::MulMat) last_columns_ = {};
                if (!run) continue; // computed by a fused launch further on
                const size_t n = fused_size_[j];
                ctx_.fused = n > 1 ? std::span<Tensor* const>(fused_nodes_.data() + (j + 1 - n), n)
                                   : std::span<Tensor* const>{};
                const auto t0 =
                    op_times_ ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
                if (skipped_.covers(node, ctx_.fused)) {
                    cuda::launch_in_place_of(ctx_);
                    ++skipped_launches_;
                    continue;
                }
                run(ctx_, node);
                GFA_CUDA_CHECK_LAUNCH();
                if (op_times_)
                    op_host_ns_[size_t(node->op)] += (std::chrono::steady_clock::now() - t0).count();
            }
        };
        if (!as_graph_ || !graphs_->enabled()) {
            enqueue();
            return;
        }
        graphs_->run(ctx_.stream, shape_, fingerprint_, scratch_.generation(), enqueue);
    }

    // Lets one fused kernel compute runs of nodes (cuda::Fusion): the last node of a run
    // gets the fused launcher, the others none. They stay in the list, so the fingerprint
    // still covers their memory.
    void fuse_work() {
        fusions_in_work_ = 0;
        fused_nodes_in_work_ = 0;
        fused_nodes_.clear();
        for (const auto& w : work_) fused_nodes_.push_back(w.first);
        for (size_t i = 0; i < work_.size();) {
            cuda::Fusion f = cuda::find_norm_fusion(fused_nodes_, i);
            if (f.n_nodes < 2) f = cuda::find_glu_fusion(fused_nodes_, i);
            if (f.n_nodes < 2) f = cuda::find_rope_fusion(fused_nodes_, i);
            if (f.n_nodes < 2) f = cuda::find_attention_fusion(fused_nodes_, i);
            if (f.n_nodes < 2) {
                ++i;
                continue;
            }
            for (size_t j = i; j + 1 < i + f.n_nodes; ++j) work_[j].second = nullptr;
            work_[i + f.n_nodes - 1].second = f.run;
            fused_size_[i + f.n_nodes - 1] = f.n_nodes;
            i += f.n_nodes;
            ++fusions_;
            ++fusions_in_work_;
            fused_nodes_count_ += int64_t(f.n_nodes);
            fused_nodes_in_work_ += int64_t(f.n_nodes);
        }
    }

    Device* device_;
    ComputeCtx ctx_;
    cuda::Scratch scratch_;
    std::unique_ptr<cuda::LaunchGraphs> graphs_;
    bool op_times_ = op_times_by_environment();
    SkippedLaunches skipped_ = skipped_launches_by_environment();
    int64_t skipped_launches_ = 0;
    cuda::QuantizedColumns last_columns_;
    std::array<int64_t, size_t(Op::Count)> op_host_ns_{}; // host time enqueueing each op
    std::vector<std::pair<Tensor*, cuda::Kernel>> work_;  // the nodes of the current compute()
    std::vector<Tensor*> fused_nodes_;                    // work_'s nodes, for finding fusions
    std::vector<size_t> fused_size_;       // per work_ entry: the nodes its launch computes (1 unless fused)
    bool as_graph_ = false;                // work_ may run as a launch graph
    uint64_t shape_ = 0, fingerprint_ = 0; // work_'s, for LaunchGraphs::run
    bool reuse_checks_ = reuse_checks_by_environment();
    std::optional<uint64_t> last_list_; // the node list work_ was prepared from
    bool fusion_ = fusion_by_environment();
    int64_t fusions_ = 0;             // fused launches set up (each compute() call counts its own)
    int64_t fusions_in_work_ = 0;     // those of work_
    int64_t fused_nodes_count_ = 0;   // the nodes those launches computed
    int64_t fused_nodes_in_work_ = 0; // those of work_'s fused launches
    void* cublas_workspace_ = nullptr;
    size_t cublas_workspace_size_ = 0;
    cudaEvent_t done_ = nullptr;
    int32_t* error_host_ = nullptr;
    std::unique_ptr<QueuedTransfers> transfers_; // made at the first queued transfer
};

// Weights in the scales-last layout (cuda_common.h) are read by the kernels of the ops that
// take weights, as their first source and in whole rows; no node writes them. Any other
// reader goes to a backend that gets their bytes through CudaBuffer::get.
bool reads_weights_as_laid_out(const Tensor* node) {
    if (cuda::has_scales_last(node)) return false;
    for (int i = 0; i < kMaxSrc; ++i) {
        const Tensor* s = node->src[i];
        if (!s || !cuda::has_scales_last(s)) continue;
        const bool weight_reader =
            node->op == Op::MulMat || node->op == Op::MulMatId || node->op == Op::GetRows;
        if (i != 0 || !weight_reader || !cuda::scales_last_readable(s)) return false;
    }
    return true;
}

class CudaDevice final : public Device {
  public:
    CudaDevice(int device, const cudaDeviceProp& prop)
        : id_(device), name_("CUDA" + std::to_string(device)), sm_count_(prop.multiProcessorCount),
          cc_major_(prop.major),
          description_(std::string(prop.name) + ", compute capability " + std::to_string(prop.major) + "." +
                       std::to_string(prop.minor) + ", " + std::to_string(prop.multiProcessorCount) + " SMs"),
          buffer_type_(this, device, name_) {}
    const char* name() const override { return name_.c_str(); }
    std::string description() const override { return description_; }
    DeviceKind kind() const override { return DeviceKind::GPU; }
    DeviceMemory memory() const override {
        DeviceGuard guard(id_);
        DeviceMemory m;
        GFA_CUDA_CHECK(cudaMemGetInfo(&m.free, &m.total));
        return m;
    }
    BufferType* buffer_type() override { return &buffer_type_; }
    std::unique_ptr<Backend> create_backend() override {
        return std::make_unique<CudaBackend>(this, id_, sm_count_, cc_major_);
    }
    bool supports_op(const Tensor* node) const override {
        if (node->op == Op::None || op_def(node->op).is_view) return true;
        if (!reads_weights_as_laid_out(node)) return false;
        const cuda::KernelEntry& k = cuda::kernels()[size_t(node->op)];
        return k.run && (!k.supports || k.supports(node));
    }

  private:
    int id_;
    std::string name_;
    int sm_count_;
    int cc_major_;
    std::string description_;
    CudaBufferType buffer_type_;
};

} // namespace

// Adds one device per GPU the runtime reports. No driver, no GPU, or a runtime that cannot
// start all mean "no CUDA devices" rather than an error: the CPU still works.
void append_cuda_devices(std::vector<Device*>& out) {
    static std::vector<std::unique_ptr<CudaDevice>> owned = [] {
        std::vector<std::unique_ptr<CudaDevice>> list;
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess) {
            cudaGetLastError(); // clear the sticky "no driver" error
            return list;
        }
        for (int i = 0; i < count; ++i) {
            cudaDeviceProp prop{};
            if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
                cudaGetLastError();
                continue;
            }
            list.push_back(std::make_unique<CudaDevice>(i, prop));
        }
        return list;
    }();
    for (auto& d : owned) out.push_back(d.get());
}

} // namespace gfa
