// GGUF files: the model format of llama.cpp. A file is a header, typed key/value metadata,
// a table of tensors (name, shape, element type, offset) and an aligned data section.
//
// Reading memory-maps the file read-only; every tensor gets a pointer into the mapping, so
// weights are used in place without a copy. Every count, length and offset is checked
// against the file before use: a malformed file gives a gfa::Error naming the problem and
// its byte offset, never a crash. Writing produces version 3 files.
#pragma once

#include <ggml-fa/error.h>
#include <ggml-fa/types.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <variant>
#include <vector>

namespace gfa::gguf {

inline constexpr uint32_t kVersion = 3;           // written; 2 and 3 are read
inline constexpr uint64_t kDefaultAlignment = 32; // when general.alignment is absent
inline constexpr const char* kAlignmentKey = "general.alignment";
inline constexpr int kMaxDims = 4;

// Metadata value types, numbered as in the file.
enum class ValueType : uint32_t {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
};
std::string_view value_type_name(ValueType t);

// The general.file_type llama.cpp records for a file whose matrices are of type t (its
// "mostly t" numbering; a K type counts as its _S variant, every matrix of that type).
// Throws for a type that has none.
uint32_t file_type_of(Type t);

struct Value;

namespace detail {
template <typename T, typename V> struct variant_index;
template <typename T, typename... Ts> struct variant_index<T, std::variant<Ts...>> {
    static constexpr size_t value = [] {
        size_t i = 0;
        ((std::is_same_v<T, Ts> ? true : (++i, false)) || ...);
        return i;
    }();
};
} // namespace detail

// An array has one element type for all its items; items may themselves be arrays.
struct Array {
    ValueType type = ValueType::U8;
    std::vector<Value> items;
    bool operator==(const Array&) const;
};

// One metadata value. The variant's alternative index is the ValueType number.
struct Value {
    using Storage = std::variant<uint8_t, int8_t, uint16_t, int16_t, uint32_t, int32_t, float, bool,
                                 std::string, Array, uint64_t, int64_t, double>;
    Storage v;

    Value() = default;
    template <typename T>
    requires std::is_constructible_v<Storage, T> Value(T x) : v(std::move(x)) {}
    Value(const char* s) : v(std::string(s)) {}

    ValueType type() const { return ValueType(v.index()); }
    bool operator==(const Value& o) const { return v == o.v; }

    // Typed access; a gfa::Error names the expected and actual type on mismatch.
    template <typename T> const T& as() const {
        if (const T* p = std::get_if<T>(&v)) return *p;
        wrong_type(ValueType(detail::variant_index<T, Storage>::value));
    }
    int64_t as_int() const;  // any integer type whose value fits in int64
    double as_float() const; // f32 or f64 (or an integer type)
    const std::string& as_string() const { return as<std::string>(); }
    const Array& as_array() const { return as<Array>(); }

    // A short human-readable rendering; arrays longer than max_items are elided.
    std::string to_string(size_t max_items = 8) const;

  private:
    [[noreturn]] void wrong_type(ValueType wanted) const;
};

struct KeyValue {
    std::string key;
    Value value;
};

// Ordered metadata with lookup by key; keys are unique.
class Metadata {
  public:
    const std::vector<KeyValue>& entries() const { return entries_; }
    size_t size() const { return entries_.size(); }
    const Value* find(std::string_view key) const;
    // Throws a gfa::Error naming the key when it is missing.
    const Value& at(std::string_view key) const;
    // Replaces the value of an existing key (keeping its position) or appends a new one.
    void set(std::string key, Value value);
    bool erase(std::string_view key);

  private:
    std::vector<KeyValue> entries_;
    std::unordered_map<std::string, size_t> index_; // key -> position in entries_
};

struct TensorInfo {
    std::string name;
    int n_dims = 0;
    std::array<int64_t, kMaxDims> ne{1, 1, 1, 1}; // ne[0] is the innermost (contiguous) dimension
    Type type = Type::F32;
    uint64_t offset = 0; // from the start of the data section
    size_t nbytes = 0;
    const void* data = nullptr; // into the mapping (reader); nullptr otherwise

    int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
};

// A parsed GGUF file. Copies share the mapping, which lives as long as any copy.
class File {
  public:
    // Memory-maps path read-only and parses it.
    static File open(const std::string& path);
    // As open, and where the file is the first shard of a model split by llama.cpp's
    // gguf-split (split.count > 1 in its metadata, named PREFIX-00001-of-0000N.gguf), also
    // maps the other shards and joins their tensors to the first's, whose metadata describes
    // the model. A missing or mismatched shard, or a tensor named twice, is a gfa::Error naming
    // the shard. The joined tensors' data pointers point into their own shards; their offsets
    // are relative to their own shard's data section.
    static File open_model(const std::string& path);
    // 1 for a whole file, else the number of shards joined.
    int shards() const { return 1 + int(other_shards_.size()); }
    // Parses bytes held in memory (copied); `name` is used in error messages.
    static File parse(const void* bytes, size_t size, const std::string& name = "<memory>");

    uint32_t version() const { return version_; }
    uint64_t alignment() const { return alignment_; }
    uint64_t data_offset() const { return data_offset_; } // file offset of the data section
    size_t file_size() const { return size_; }
    const Metadata& metadata() const { return metadata_; }
    const std::vector<TensorInfo>& tensors() const { return tensors_; }
    const TensorInfo* find_tensor(std::string_view name) const;
    const TensorInfo& tensor(std::string_view name) const; // gfa::Error when absent

  private:
    void parse_all(const std::string& name);

    std::shared_ptr<const uint8_t> base_;
    std::vector<std::shared_ptr<const uint8_t>> other_shards_; // mappings the joined tensors point into
    size_t size_ = 0;
    uint32_t version_ = 0;
    uint64_t alignment_ = kDefaultAlignment;
    uint64_t data_offset_ = 0;
    Metadata metadata_;
    std::vector<TensorInfo> tensors_;
};

// Builds a version 3 file from metadata and tensor data held in memory.
class Writer {
  public:
    Metadata& metadata() { return metadata_; }
    const Metadata& metadata() const { return metadata_; }
    void set(std::string key, Value value) { metadata_.set(std::move(key), std::move(value)); }

    // dims lists ne[0] (innermost) first. The data is copied.
    void add_tensor(std::string name, Type type, const std::vector<int64_t>& dims, const void* data,
                    size_t nbytes);
    // As add_tensor, but only the pointer is kept: it must stay valid until write() returns.
    void add_tensor_view(std::string name, Type type, const std::vector<int64_t>& dims, const void* data,
                         size_t nbytes);

    std::vector<uint8_t> to_bytes() const;
    void write(const std::string& path) const;

  private:
    struct Pending {
        TensorInfo info;
        std::vector<uint8_t> owned;
    };
    void add(std::string name, Type type, const std::vector<int64_t>& dims, const void* data, size_t nbytes,
             bool copy);
    uint64_t alignment() const;
    template <typename Sink> void emit(Sink& sink) const;

    Metadata metadata_;
    std::vector<Pending> tensors_;
};

} // namespace gfa::gguf
