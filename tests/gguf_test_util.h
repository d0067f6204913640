// Helpers shared by the GGUF tests: a byte builder for hand-made (and deliberately broken)
// files, and a valid sample file with every value type and several tensor types.
#pragma once

#include <ggml-fa/gguf.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace gguf_test {

struct Bytes {
    std::vector<uint8_t> b;
    template <typename T> Bytes& pod(T v) {
        const size_t at = b.size();
        b.resize(at + sizeof v);
        std::memcpy(b.data() + at, &v, sizeof v);
        return *this;
    }
    Bytes& u32(uint32_t v) { return pod(v); }
    Bytes& u64(uint64_t v) { return pod(v); }
    Bytes& i64(int64_t v) { return pod(v); }
    Bytes& str(const std::string& s) {
        u64(s.size());
        b.insert(b.end(), s.begin(), s.end());
        return *this;
    }
    Bytes& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
        b.insert(b.end(), {'G', 'G', 'U', 'F'});
        return u32(version).u64(n_tensors).u64(n_kv);
    }
    // A tensor info: name, dims (innermost first), type id, offset.
    Bytes& tensor(const std::string& name, std::vector<int64_t> dims, uint32_t type, uint64_t offset) {
        str(name).u32(uint32_t(dims.size()));
        for (int64_t d : dims) i64(d);
        return u32(type).u64(offset);
    }
    Bytes& pad_to(size_t alignment) {
        while (b.size() % alignment) b.push_back(0);
        return *this;
    }
    Bytes& zeros(size_t n) {
        b.insert(b.end(), n, 0);
        return *this;
    }
};

// Metadata of every value type, including empty and nested arrays.
inline gfa::gguf::Metadata sample_metadata() {
    using namespace gfa::gguf;
    Metadata m;
    m.set("general.architecture", "llama");
    m.set("test.u8", uint8_t(250));
    m.set("test.i8", int8_t(-120));
    m.set("test.u16", uint16_t(65000));
    m.set("test.i16", int16_t(-32000));
    m.set("test.u32", uint32_t(4000000000u));
    m.set("test.i32", int32_t(-2000000000));
    m.set("test.f32", 3.14159274f);
    m.set("test.bool", true);
    m.set("test.string", std::string("h\xc3\xa9llo \"world\"\n"));
    m.set("test.u64", uint64_t(18000000000000000000ull));
    m.set("test.i64", int64_t(-9000000000000000000ll));
    m.set("test.f64", 2.718281828459045);
    m.set("test.empty_string", std::string());
    m.set("test.array_i32", Array{ValueType::I32, {int32_t(1), int32_t(-2), int32_t(3)}});
    m.set("test.array_string", Array{ValueType::String, {"a", "", "ccc"}});
    m.set("test.array_bool", Array{ValueType::Bool, {true, false, true}});
    m.set("test.array_f64", Array{ValueType::F64, {1.5, -0.25}});
    m.set("test.array_empty", Array{ValueType::F32, {}});
    m.set("test.array_nested",
          Array{ValueType::Array,
                {Array{ValueType::U16, {uint16_t(1), uint16_t(2)}}, Array{ValueType::U16, {}}}});
    return m;
}

} // namespace gguf_test
