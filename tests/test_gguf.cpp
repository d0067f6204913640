#include <catch2/catch.hpp>

#include "gguf_test_util.h"

#include <ggml-fa/error.h>
#include <ggml-fa/gguf.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <random>

using namespace gfa;
using namespace gfa::gguf;
using gguf_test::Bytes;

namespace {

struct SampleTensor {
    std::string name;
    Type type;
    std::vector<int64_t> dims;
    std::vector<uint8_t> bytes;
};

// Tensors of several types and odd shapes, filled with random (valid) encodings.
std::vector<SampleTensor> sample_tensors(std::mt19937& rng) {
    std::vector<SampleTensor> ts = {
        {"f32.odd", Type::F32, {3, 5}, {}},       {"f16.vector", Type::F16, {17}, {}},
        {"q8_0.matrix", Type::Q8_0, {64, 3}, {}}, {"q4_K.matrix", Type::Q4_K, {256, 2, 1, 2}, {}},
        {"q6_K.row", Type::Q6_K, {512}, {}},      {"i32.ids", Type::I32, {7}, {}},
        {"empty", Type::F32, {0, 4}, {}},
    };
    std::normal_distribution<float> dist;
    for (SampleTensor& t : ts) {
        int64_t n = 1;
        for (int64_t d : t.dims) n *= d;
        std::vector<float> x(static_cast<size_t>(n));
        for (float& v : x) v = dist(rng);
        t.bytes.resize(row_size(t.type, t.dims[0]) * size_t(n / std::max<int64_t>(t.dims[0], 1)));
        if (n == 0) continue;
        const TypeTraits& tt = type_traits(t.type);
        if (tt.from_float)
            tt.from_float(x.data(), t.bytes.data(), n);
        else
            for (uint8_t& b : t.bytes) b = uint8_t(rng());
    }
    return ts;
}

Writer sample_writer(const std::vector<SampleTensor>& ts) {
    Writer w;
    w.metadata() = gguf_test::sample_metadata();
    for (const SampleTensor& t : ts)
        w.add_tensor_view(t.name, t.type, t.dims, t.bytes.data(), t.bytes.size());
    return w;
}

void check_matches(const File& f, const Metadata& meta, const std::vector<SampleTensor>& ts) {
    REQUIRE(f.metadata().size() == meta.size());
    for (size_t i = 0; i < meta.size(); ++i) {
        INFO("key " << meta.entries()[i].key);
        CHECK(f.metadata().entries()[i].key == meta.entries()[i].key);
        CHECK(f.metadata().entries()[i].value == meta.entries()[i].value);
    }
    REQUIRE(f.tensors().size() == ts.size());
    for (size_t i = 0; i < ts.size(); ++i) {
        const TensorInfo& t = f.tensors()[i];
        INFO("tensor " << ts[i].name);
        CHECK(t.name == ts[i].name);
        CHECK(t.type == ts[i].type);
        REQUIRE(t.n_dims == int(ts[i].dims.size()));
        for (int d = 0; d < t.n_dims; ++d) CHECK(t.ne[d] == ts[i].dims[size_t(d)]);
        REQUIRE(t.nbytes == ts[i].bytes.size());
        CHECK(t.offset % f.alignment() == 0);
        if (t.nbytes) CHECK(std::memcmp(t.data, ts[i].bytes.data(), t.nbytes) == 0);
    }
}

std::filesystem::path temp_file(const std::string& stem) {
    std::random_device rd;
    return std::filesystem::temp_directory_path() / (stem + "-" + std::to_string(rd()) + ".gguf");
}

// Expects parsing to fail with a gfa::Error whose message names the problem.
void require_rejected(const Bytes& bytes, const std::string& expected) {
    INFO("expected an error containing: " << expected);
    try {
        File::parse(bytes.b.data(), bytes.b.size(), "case");
        FAIL("the file was accepted");
    } catch (const Error& e) {
        INFO("message: " << e.what());
        CHECK(std::string(e.what()).find(expected) != std::string::npos);
    }
}

} // namespace

TEST_CASE("GGUF writer output reads back identically", "[gguf]") {
    const unsigned seed = std::random_device{}();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    const auto ts = sample_tensors(rng);
    const Writer w = sample_writer(ts);
    const std::vector<uint8_t> bytes = w.to_bytes();
    const File f = File::parse(bytes.data(), bytes.size());
    CHECK(f.version() == 3);
    CHECK(f.alignment() == 32);
    CHECK(f.data_offset() % 32 == 0);
    check_matches(f, w.metadata(), ts);

    // Typed access.
    CHECK(f.metadata().at("test.u32").as<uint32_t>() == 4000000000u);
    CHECK(f.metadata().at("test.i8").as_int() == -120);
    CHECK(f.metadata().at("test.f32").as_float() == Approx(3.14159274));
    CHECK(f.metadata().at("test.array_string").as_array().items[2].as_string() == "ccc");
    CHECK_THROWS_AS(f.metadata().at("test.u32").as<float>(), Error);
    CHECK_THROWS_AS(f.metadata().at("test.u64").as_int(), Error); // 1.8e19 does not fit
    CHECK_THROWS_AS(f.metadata().at("no.such.key"), Error);
    CHECK_THROWS_AS(f.tensor("no.such.tensor"), Error);
    CHECK(f.tensor("q6_K.row").nbytes == 420);
}

TEST_CASE("GGUF files are memory-mapped with aligned tensor data", "[gguf]") {
    const unsigned seed = std::random_device{}();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    const auto ts = sample_tensors(rng);
    Writer w = sample_writer(ts);
    w.set(kAlignmentKey, uint32_t(64));
    const auto path = temp_file("gfa-gguf");
    w.write(path.string());
    {
        const File f = File::open(path.string());
        CHECK(f.alignment() == 64);
        check_matches(f, w.metadata(), ts);
        for (const TensorInfo& t : f.tensors()) CHECK(reinterpret_cast<uintptr_t>(t.data) % 64 == 0);
        CHECK(f.file_size() == std::filesystem::file_size(path));
    }
    std::filesystem::remove(path);
    CHECK_THROWS_AS(File::open(path.string()), Error); // gone now

    // An empty file.
    std::FILE* empty = std::fopen(path.string().c_str(), "wb");
    REQUIRE(empty);
    std::fclose(empty);
    CHECK_THROWS_WITH(File::open(path.string()), Catch::Contains("empty"));
    std::filesystem::remove(path);
}

TEST_CASE("GGUF version 2 files are read", "[gguf]") {
    Bytes b;
    b.header(1, 1, 2).str("general.name").u32(uint32_t(ValueType::String)).str("v2");
    b.tensor("w", {4}, uint32_t(Type::F32), 0).pad_to(32);
    for (float v : {1.0f, 2.0f, 3.0f, 4.0f}) b.pod(v);
    const File f = File::parse(b.b.data(), b.b.size());
    CHECK(f.version() == 2);
    CHECK(f.metadata().at("general.name").as_string() == "v2");
    CHECK(static_cast<const float*>(f.tensor("w").data)[3] == 4.0f);
}

TEST_CASE("GGUF reader rejects malformed files with a message and an offset", "[gguf]") {
    const uint32_t f32 = uint32_t(Type::F32);
    const uint32_t str = uint32_t(ValueType::String), arr = uint32_t(ValueType::Array);

    SECTION("header") {
        require_rejected(Bytes{{'G', 'G'}}, "needs 4 bytes");
        require_rejected(Bytes{{'G', 'G', 'M', 'L', 0, 0, 0, 0}}, "not a GGUF file");
        require_rejected(Bytes().header(0, 0, 1), "version 1");
        require_rejected(Bytes().header(0, 0, 4), "unsupported GGUF version 4");
        Bytes truncated = Bytes().header(0, 0);
        truncated.b.resize(20);
        require_rejected(truncated, "metadata count needs 8 bytes");
        require_rejected(Bytes().header(0, 1ull << 60), "metadata count");
        require_rejected(Bytes().header(1ull << 62, 0), "tensor count");
    }
    SECTION("metadata") {
        require_rejected(Bytes().header(0, 1).u64(1000).zeros(10), "metadata key length 1000 runs past");
        require_rejected(Bytes().header(0, 1).str("k").u32(13).zeros(8), "is not a GGUF value type");
        require_rejected(Bytes().header(0, 1).str("k").u32(uint32_t(ValueType::Bool)).pod(uint8_t(2)),
                         "bool value is 2");
        require_rejected(Bytes().header(0, 1).str("k").u32(uint32_t(ValueType::U64)).zeros(3),
                         "u64 value needs 8");
        require_rejected(Bytes().header(0, 1).str("k").u32(str).u64(~0ull), "string length");
        require_rejected(
            Bytes().header(0, 1).str("k").u32(arr).u32(uint32_t(ValueType::U32)).u64(1000).zeros(40),
            "array of 1000 u32 values cannot fit");
        require_rejected(Bytes().header(0, 1).str("k").u32(arr).u32(99).u64(0), "array element type 99");
        Bytes nested = Bytes().header(0, 1).str("k").u32(arr);
        for (int i = 0; i < 20; ++i) nested.u32(arr).u64(1);
        nested.u32(uint32_t(ValueType::U8)).u64(0);
        require_rejected(nested, "nested more than");
        Bytes dup = Bytes().header(0, 2);
        for (int i = 0; i < 2; ++i) dup.str("same.key").u32(uint32_t(ValueType::U8)).pod(uint8_t(1));
        require_rejected(dup, "duplicate metadata key 'same.key'");
        require_rejected(Bytes().header(0, 1).str(kAlignmentKey).u32(uint32_t(ValueType::U32)).u32(48),
                         "not a power of two");
        require_rejected(Bytes().header(0, 1).str(kAlignmentKey).u32(uint32_t(ValueType::U64)).u64(32),
                         "is u64, not u32");
    }
    SECTION("tensor infos") {
        require_rejected(Bytes().header(1, 0).tensor("t", {}, f32, 0), "has 0 dimensions");
        require_rejected(Bytes().header(1, 0).tensor("t", {1, 1, 1, 1, 1}, f32, 0), "has 5 dimensions");
        require_rejected(Bytes().header(1, 0).tensor("t", {4, -2}, f32, 0), "negative dimension -2");
        require_rejected(Bytes().header(1, 0).tensor("t", {1ll << 40, 1ll << 40}, f32, 0), "63 bits");
        require_rejected(Bytes().header(1, 0).tensor("t", {1ll << 61, 2}, f32, 0).pad_to(32),
                         "byte size overflows");
        require_rejected(Bytes().header(1, 0).tensor("t", {32}, 16, 0).pad_to(32).zeros(64), "type id 16");
        require_rejected(Bytes().header(1, 0).tensor("t", {33}, uint32_t(Type::Q8_0), 0).pad_to(32).zeros(64),
                         "not a multiple of the q8_0 block size");
        Bytes dup = Bytes().header(2, 0).tensor("w", {4}, f32, 0).tensor("w", {4}, f32, 32);
        require_rejected(dup.pad_to(32).zeros(64), "duplicate tensor name 'w'");
        Bytes cut = Bytes().header(1, 0).tensor("t", {4}, f32, 0);
        cut.b.resize(cut.b.size() - 3);
        require_rejected(cut, "offset needs 8 bytes");
    }
    SECTION("tensor data") {
        require_rejected(Bytes().header(1, 0).tensor("t", {4}, f32, 8).pad_to(32).zeros(64),
                         "offset 8 is not a multiple of the alignment 32");
        require_rejected(Bytes().header(1, 0).tensor("t", {16}, f32, 32).pad_to(32).zeros(64),
                         "lies outside the data section");
        require_rejected(Bytes().header(1, 0).tensor("t", {4}, f32, ~0ull - 31).pad_to(32).zeros(64),
                         "lies outside the data section");
        require_rejected(Bytes().header(1, 0).tensor("t", {4}, f32, 0), "lies outside the data section");
        Bytes overlap = Bytes().header(2, 0).tensor("a", {16}, f32, 0).tensor("b", {4}, f32, 32);
        require_rejected(overlap.pad_to(32).zeros(96), "tensor 'b' data overlaps tensor 'a'");
    }
    SECTION("every message names a byte offset") {
        try {
            const Bytes b = Bytes().header(0, 1).str("k").u32(77);
            File::parse(b.b.data(), b.b.size(), "named.gguf");
            FAIL("accepted");
        } catch (const Error& e) {
            CHECK(std::string(e.what()) ==
                  "GGUF named.gguf: at byte 33: value type of 'k' 77 is not a GGUF value type");
        }
    }
}

TEST_CASE("GGUF writer rejects inconsistent input", "[gguf]") {
    Writer w;
    std::vector<float> data(8);
    CHECK_THROWS_WITH(w.add_tensor("t", Type::F32, {4}, data.data(), 32), Catch::Contains("need 16"));
    CHECK_THROWS_WITH(w.add_tensor("t", Type::Q8_0, {16}, data.data(), 32), Catch::Contains("block size"));
    CHECK_THROWS_WITH(w.add_tensor("t", Type::F32, {}, data.data(), 0), Catch::Contains("0 dimensions"));
    w.add_tensor("t", Type::F32, {8}, data.data(), 32);
    CHECK_THROWS_WITH(w.add_tensor("t", Type::F32, {8}, data.data(), 32), Catch::Contains("added twice"));
    w.set("bad.array", Array{ValueType::U8, {uint8_t(1), int8_t(2)}});
    CHECK_THROWS_WITH(w.to_bytes(), Catch::Contains("array of u8 holds a i8 item"));
    w.metadata().erase("bad.array");
    w.set(kAlignmentKey, uint32_t(3));
    CHECK_THROWS_WITH(w.to_bytes(), Catch::Contains("power of two"));
    w.set(kAlignmentKey, uint32_t(16));
    const auto bytes = w.to_bytes();
    CHECK(File::parse(bytes.data(), bytes.size()).alignment() == 16);
}
