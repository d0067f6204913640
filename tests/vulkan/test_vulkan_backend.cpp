// The Vulkan device, its buffers and its backend's errors; the compare suite on Vulkan.
#include "compare.h"
#include "op_check.h"
#include "vulkan_device.h"

#include <ggml-fa/backend.h>
#include <ggml-fa/ops.h>

#include <cstring>
#include <string>

using namespace gfa;

TEST_CASE("Vulkan devices are registered with a description and a device buffer type", "[vulkan]") {
    Device* d = vulkan0();
    CHECK(d->kind() == DeviceKind::GPU);
    CHECK(d->description().find("Vulkan") != std::string::npos);
    CHECK(d->memory().total > 0);
    BufferType* bt = d->buffer_type();
    CHECK_FALSE(bt->is_host());
    CHECK(bt->device() == d);
    CHECK(bt->alignment() >= 16);
    CHECK(d->can_use(bt));
    CHECK_FALSE(d->can_use(cpu_device().buffer_type()));
}

TEST_CASE("Vulkan buffers round-trip data and fill bytes", "[vulkan]") {
    Device* d = vulkan0();
    const size_t align = d->buffer_type()->alignment();
    Context ctx;
    Tensor* a = ctx.new_tensor(Type::F32, {1001});
    Tensor* b = ctx.new_tensor(Type::F16, {37, 3});
    const size_t b_at = (a->nbytes() + align - 1) / align * align;
    std::unique_ptr<Buffer> buf = d->buffer_type()->allocate(b_at + b->nbytes());
    buf->place(a, 0);
    buf->place(b, b_at);

    const std::vector<float> values = test::random_values(size_t(a->nelements()));
    tensor_set_f32(a, values);
    CHECK(tensor_get_f32(a) == values);

    std::vector<uint8_t> bytes(b->nbytes());
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = uint8_t(test::rng()());
    tensor_set(b, bytes.data(), 0, bytes.size());
    std::vector<uint8_t> back(bytes.size());
    tensor_get(b, back.data(), 0, back.size());
    CHECK(back == bytes);
    // A part of a tensor, at an odd offset.
    std::vector<uint8_t> part(5);
    tensor_get(b, part.data(), 7, part.size());
    CHECK(std::memcmp(part.data(), bytes.data() + 7, part.size()) == 0);
    CHECK(tensor_get_f32(a) == values); // b's writes left a alone

    buf->fill(0xAB);
    tensor_get(b, back.data(), 0, back.size());
    for (uint8_t x : back) CHECK(x == 0xAB);

    // Reading past the buffer's end is an error, not a stray read.
    std::vector<uint8_t> too_much(b->nbytes() + 64);
    CHECK_THROWS_WITH(buf->get(b, too_much.data(), 0, too_much.size()),
                      Catch::Contains("Vulkan0") && Catch::Contains("outside its buffer"));
}

TEST_CASE("Vulkan out-of-memory names the device and the size", "[vulkan]") {
    const size_t huge = size_t(1) << 46; // 64 TiB
    try {
        vulkan0()->buffer_type()->allocate(huge);
        FAIL("a 64 TiB allocation succeeded");
    } catch (const OutOfMemory& e) {
        const std::string msg = e.what();
        CHECK(msg.find("Vulkan0") != std::string::npos);
        CHECK(msg.find(std::to_string(huge)) != std::string::npos);
    }
    // The device still works afterwards.
    auto buf = vulkan0()->buffer_type()->allocate(1024);
    CHECK(buf->size() == 1024);
}

TEST_CASE("Vulkan backend refuses nodes it has no kernel for", "[vulkan]") {
    Device* d = vulkan0();
    Context ctx;
    Tensor* a = ctx.new_tensor(Type::F32, {32, 3});
    Tensor* s = cast(ctx, a, Type::Q4_0); // encoding q4_0 is the CPU's
    CHECK_FALSE(d->supports_op(s));
    auto backend = d->create_backend();
    Tensor* nodes[] = {s};
    CHECK_THROWS_WITH(backend->compute(nodes),
                      Catch::Contains("Vulkan0") && Catch::Contains("no kernel for cont"));
}

TEST_CASE("The compare suite passes on Vulkan, every node there", "[vulkan][fa]") {
    auto backend = vulkan0()->create_backend();
    auto cpu = make_cpu_backend(2);
    for (const compare::Case& c : compare::builtin_suite()) {
        const compare::CaseResult r = compare::run_case(c, *backend, cpu.get(), test::seed());
        INFO("case " << c.name << " (seed " << test::seed() << "): " << r.error << " worst "
                     << (r.report.worst_index >= 0 ? r.report.nodes[size_t(r.report.worst_index)].label : "")
                     << " error " << r.report.worst);
        // This backend computes in f32 whatever the storage: the CPU's tolerance holds here.
        CHECK(r.error.empty());
        CHECK(r.report.ok(c.tol));
        for (const compare::NodeResult& n : r.report.nodes) {
            INFO(n.label);
            CHECK(n.backend == "Vulkan0");
        }
        CHECK(r.report.log.empty()); // no fallback to the CPU
    }
}

TEST_CASE("Vulkan backend names a tensor that is not in its memory", "[vulkan]") {
    // q/k/v in host memory, the output in device memory: the backend must refuse before it
    // reads or writes anything, naming the tensor.
    Context host(ContextParams{.alloc_data = true});
    Tensor* q = host.new_tensor(Type::F32, {64, 5, 2, 1});
    Tensor* k = host.new_tensor(Type::F32, {64, 9, 2, 1});
    Tensor* v = host.new_tensor(Type::F32, {64, 9, 2, 1});
    Context nodes;
    Tensor* o = flash_attn_ext(nodes, q, k, v, nullptr, {.scale = 0.125f});
    auto buf = vulkan0()->buffer_type()->allocate(o->alloc_bytes());
    buf->place(o, 0);
    auto backend = vulkan0()->create_backend();
    Tensor* list[] = {o};
    CHECK_THROWS_WITH(backend->compute(list),
                      Catch::Contains("Vulkan0") && Catch::Contains("q is not in this device's memory"));
    // The backend still works afterwards.
    CHECK_NOTHROW(backend->synchronize());
}
