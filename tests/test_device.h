// A device for scheduler tests: private memory the CPU may not read directly (so the
// scheduler must copy) and a few exact element-wise ops. `faulty` makes it add wrongly in
// the last bit of one element, so comparison tests can prove they catch a bad backend.
#pragma once

#include <catch2/catch.hpp>

#include <ggml-fa/backend.h>

#include "op_def.h"
#include "reference.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>

namespace gfa::test {

// ---- a test device: private (not host-visible) memory and four element-wise ops --------

class TestDevice;

class TestBuffer final : public Buffer {
  public:
    TestBuffer(BufferType* type, void* base, size_t size) : Buffer(type, base, size) {}
    ~TestBuffer() override { std::free(base()); }
    void set(Tensor* t, const void* src, size_t offset, size_t size) override {
        std::memcpy(static_cast<char*>(t->data) + offset, src, size);
    }
    void get(const Tensor* t, void* dst, size_t offset, size_t size) const override {
        std::memcpy(dst, static_cast<const char*>(t->data) + offset, size);
    }
    void fill(uint8_t value) override { std::memset(base(), value, size()); }
};

class TestBufferType final : public BufferType {
  public:
    explicit TestBufferType(Device* dev) : device_(dev) {}
    const char* name() const override { return "TEST"; }
    std::unique_ptr<Buffer> allocate(size_t size) override {
        ++allocations;
        const size_t rounded = (size + 31) / 32 * 32;
        void* p = std::aligned_alloc(32, rounded);
        if (!p) throw OutOfMemory("TEST: out of memory");
        std::memset(p, 0xFF, rounded); // fresh device memory holds NaN, not zeros
        return std::make_unique<TestBuffer>(this, p, size);
    }
    size_t alignment() const override { return 32; }
    bool is_host() const override { return false; } // the CPU must not read it directly
    Device* device() const override { return device_; }
    int allocations = 0;

  private:
    Device* device_;
};

class TestBackend final : public Backend {
  public:
    explicit TestBackend(TestDevice* dev);
    const char* name() const override;
    Device* device() const override;
    void compute(std::span<Tensor* const> nodes) override;
    int nodes_computed = 0;

  private:
    TestDevice* device_;
};

class TestDevice final : public Device {
  public:
    TestDevice(std::string name, std::set<Op> ops, bool faulty = false)
        : faulty(faulty), name_(std::move(name)), ops_(std::move(ops)), bt_(this) {}
    const bool faulty;
    const char* name() const override { return name_.c_str(); }
    std::string description() const override { return "test device"; }
    DeviceKind kind() const override { return DeviceKind::GPU; }
    DeviceMemory memory() const override { return {}; }
    BufferType* buffer_type() override { return &bt_; }
    std::unique_ptr<Backend> create_backend() override { return std::make_unique<TestBackend>(this); }
    bool supports_op(const Tensor* n) const override {
        if (n->op == Op::None || op_def(n->op).is_view) return true;
        if (!ops_.count(n->op) || n->type != Type::F32 || !n->is_contiguous()) return false;
        for (const Tensor* s : n->src)
            if (s && s->type != Type::F32) return false;
        return true;
    }
    TestBufferType& test_buffer_type() { return bt_; }

  private:
    std::string name_;
    std::set<Op> ops_;
    TestBufferType bt_;
};

inline TestBackend::TestBackend(TestDevice* dev) : device_(dev) {}
inline const char* TestBackend::name() const {
    return device_->name();
}
inline Device* TestBackend::device() const {
    return device_;
}

inline float element(const Tensor* t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    const auto* base = static_cast<const char*>(t->data);
    float v;
    std::memcpy(&v, base + i0 * t->nb[0] + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3], sizeof v);
    return v;
}

inline void TestBackend::compute(std::span<Tensor* const> nodes) {
    for (Tensor* n : nodes) {
        if (n->op == Op::None || op_def(n->op).is_view) continue;
        REQUIRE(device_->supports_op(n));
        // Every tensor this backend touches must be in its own memory.
        for (const Tensor* s : n->src)
            if (s) REQUIRE(device_->can_use(s->buffer->type()));
        REQUIRE(device_->can_use(n->buffer->type()));
        const Tensor *a = n->src[0], *b = n->src[1];
        auto* out = static_cast<float*>(n->data);
        int64_t k = 0;
        gfa::ref::for_each_index(n, [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
            const float x = element(a, i0, i1, i2, i3);
            const float y = b ? element(b, i0 % b->ne[0], i1 % b->ne[1], i2 % b->ne[2], i3 % b->ne[3]) : 0.0f;
            float r = 0;
            switch (n->op) {
            case Op::Add:
                r = x + y;
                break;
            case Op::Sub:
                r = x - y;
                break;
            case Op::Mul:
                r = x * y;
                break;
            case Op::Neg:
                r = -x;
                break;
            default:
                FAIL("test backend asked to run " << op_name(n->op));
            }
            if (device_->faulty && n->op == Op::Add && k == n->nelements() / 2) r += 0.5f;
            out[k++] = r;
        });
        ++nodes_computed;
    }
}

} // namespace gfa::test
