// The backend layers, each a small interface:
//   BufferType -> Buffer -> Backend (a stream) -> Device -> registry.
// The scheduler and allocator talk only to these interfaces.
#pragma once

#include <ggml-fa/tensor.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace gfa {

class Device;
class Buffer;

// Where memory of one kind comes from (host memory, one GPU's memory, pinned host memory).
class BufferType {
  public:
    virtual ~BufferType() = default;
    virtual const char* name() const = 0;
    // Throws gfa::OutOfMemory naming the device and the size when the memory is not there.
    virtual std::unique_ptr<Buffer> allocate(size_t size) = 0;
    virtual size_t alignment() const = 0;
    virtual bool is_host() const = 0; // tensor->data can be read by the CPU directly
    virtual Device* device() const = 0;
};

// What a buffer's tensors are for.
enum class BufferUsage {
    Compute, // anything: graph inputs, intermediate results, trainable parameters
    // A loaded model's weights: each tensor is written with set (whole rows at a time, as a
    // file's tensors are) and from then on only read. A backend may keep such tensors in a
    // layout of its own that its kernels read faster; set and get translate, so users see
    // the file's bytes either way.
    Weights,
};

// One allocation. Tensors are placed in it at aligned offsets.
class Buffer {
  public:
    virtual ~Buffer() = default;
    BufferType* type() const { return type_; }
    void* base() const { return base_; }
    size_t size() const { return size_; }

    BufferUsage usage() const { return usage_; }
    // Declares what the buffer holds; before anything is written to it (a backend that
    // lays weights out its own way throws gfa::Error otherwise).
    virtual void set_usage(BufferUsage usage) { usage_ = usage; }

    // Places t at base + offset; sets t->data and t->buffer. Views get their data from
    // their source instead (see place_view).
    void place(Tensor* t, size_t offset);

    virtual void set(Tensor* t, const void* src, size_t offset, size_t size) = 0;
    virtual void get(const Tensor* t, void* dst, size_t offset, size_t size) const = 0;
    virtual void fill(uint8_t value) = 0;

  protected:
    Buffer(BufferType* type, void* base, size_t size) : type_(type), base_(base), size_(size) {}

  private:
    BufferType* type_;
    void* base_;
    size_t size_;
    BufferUsage usage_ = BufferUsage::Compute;
};

// Gives a view tensor the data pointer and buffer of its source (which must be placed).
void place_view(Tensor* view);

// A stream of work on one device.
class Backend {
  public:
    virtual ~Backend() = default;
    virtual const char* name() const = 0;
    virtual Device* device() const = 0;
    // Runs the nodes in order. Every node's data (and its sources') must already be placed
    // in buffers this backend can use. Views and leaves are skipped.
    virtual void compute(std::span<Tensor* const> nodes) = 0;
    // Waits for queued work; compute() may return before the work is done.
    virtual void synchronize() {}

    // Transfers queued behind the work handed to compute() so far, in order with it, so that
    // the host can prepare a next step while the device still runs this one (a decoding loop
    // that never waits between tokens). The tensors must live in memory this backend uses.
    //   write_async: bytes [offset, offset + size) of t from src; src may be reused as soon as
    //     the call returns.
    //   copy_async: size bytes from one tensor to another.
    //   read_async: bytes of t into dst, which holds them once wait_for(the ticket) returned.
    // The defaults wait for the queue and transfer at once (right on every backend); a GPU
    // backend queues them on its stream.
    using Ticket = uint64_t;
    virtual void write_async(Tensor* t, const void* src, size_t offset, size_t size);
    virtual void copy_async(const Tensor* from, size_t from_offset, Tensor* to, size_t to_offset,
                            size_t size);
    virtual Ticket read_async(const Tensor* t, void* dst, size_t offset, size_t size);
    // Waits until the read with this ticket (and the work queued before it) is done; raises a
    // kernel's error report as synchronize() does.
    virtual void wait_for(Ticket ticket);
    // Counts of how the backend ran its work so far, as (name, value) pairs, for profiles
    // (the CUDA backend: graph launches, graph updates, eager runs). Empty when it keeps none.
    virtual std::vector<std::pair<std::string, int64_t>> counters() const { return {}; }
};

enum class DeviceKind { CPU, GPU };

struct DeviceMemory {
    size_t free = 0, total = 0;
};

class Device {
  public:
    virtual ~Device() = default;
    virtual const char* name() const = 0; // "CPU", "CUDA0", "Vulkan0"
    virtual std::string description() const = 0;
    virtual DeviceKind kind() const = 0;
    virtual DeviceMemory memory() const = 0;
    virtual BufferType* buffer_type() = 0;
    virtual std::unique_ptr<Backend> create_backend() = 0;
    // Exact: true only when this device computes the node correctly (types, shapes, params).
    virtual bool supports_op(const Tensor* node) const = 0;
    // Can this device's kernels read tensors placed in buffers of this type?
    virtual bool can_use(const BufferType* bt) const { return bt->device() == this; }
};

// ---- registry --------------------------------------------------------------------------

// Every device compiled in and present on this machine, the CPU first.
const std::vector<Device*>& devices();
Device* find_device(std::string_view name); // nullptr when absent
Device& cpu_device();
// Creates a CPU backend with its own thread pool (n_threads <= 0: all cores).
std::unique_ptr<Backend> make_cpu_backend(int n_threads = 0);
void set_cpu_threads(Backend& cpu_backend, int n_threads);

} // namespace gfa
