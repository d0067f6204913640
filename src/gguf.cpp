// GGUF reader and writer. The reader never trusts a number from the file: each count,
// length, dimension and offset is checked against what is left of the file (and against
// overflow) before it sizes an allocation or a read.
#include <ggml-fa/gguf.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <set>
#include <unordered_set>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static_assert(std::endian::native == std::endian::little,
              "GGUF files are little-endian; so is every host we support");

namespace gfa::gguf {

namespace {

constexpr char kMagic[4] = {'G', 'G', 'U', 'F'};
// Nested arrays are legal but nothing real nests deeply; the cap keeps recursion bounded
// for hostile files.
constexpr int kMaxArrayDepth = 8;
constexpr uint32_t kNumValueTypes = 13;

// Bytes of a fixed-size value type, 0 for strings and arrays.
size_t fixed_size(ValueType t) {
    switch (t) {
    case ValueType::U8:
    case ValueType::I8:
    case ValueType::Bool:
        return 1;
    case ValueType::U16:
    case ValueType::I16:
        return 2;
    case ValueType::U32:
    case ValueType::I32:
    case ValueType::F32:
        return 4;
    case ValueType::U64:
    case ValueType::I64:
    case ValueType::F64:
        return 8;
    case ValueType::String:
    case ValueType::Array:
        return 0;
    }
    return 0;
}

// The fewest bytes one value of type t can occupy in a file: bounds array lengths.
size_t min_encoded_size(ValueType t) {
    if (t == ValueType::String) return 8;    // length
    if (t == ValueType::Array) return 4 + 8; // element type + length
    return fixed_size(t);
}

uint64_t align_up(uint64_t x, uint64_t alignment) {
    return (x + alignment - 1) / alignment * alignment;
}

bool checked_mul(uint64_t a, uint64_t b, uint64_t* out) {
    return !__builtin_mul_overflow(a, b, out);
}

std::string quoted(std::string_view s) {
    std::string r(1, '\'');
    r += s;
    r += '\'';
    return r;
}

// A bounds-checked little-endian cursor over the file.
class Cursor {
  public:
    Cursor(const uint8_t* data, size_t size, const std::string& name)
        : data_(data), size_(size), name_(name) {}

    [[noreturn]] void fail_at(uint64_t offset, const std::string& what) const {
        fail("GGUF " + name_ + ": at byte " + std::to_string(offset) + ": " + what);
    }

    uint64_t pos() const { return pos_; }
    uint64_t remaining() const { return size_ - pos_; }
    size_t size() const { return size_; }

    void need(uint64_t n, std::string_view what) const {
        if (n > remaining())
            fail_at(pos_, std::string(what) + " needs " + std::to_string(n) +
                              " bytes but the file ends after " + std::to_string(remaining()) +
                              " (file size " + std::to_string(size_) + ")");
    }

    template <typename T> T read(std::string_view what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, data_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }

    std::string read_string(std::string_view what) {
        const uint64_t at = pos_;
        const uint64_t len = read<uint64_t>(std::string(what) + " length");
        if (len > remaining())
            fail_at(at, std::string(what) + " length " + std::to_string(len) +
                            " runs past the end of the file (" + std::to_string(remaining()) +
                            " bytes left)");
        std::string s(reinterpret_cast<const char*>(data_ + pos_), size_t(len));
        pos_ += len;
        return s;
    }

  private:
    const uint8_t* data_;
    size_t size_;
    uint64_t pos_ = 0;
    const std::string& name_;
};

ValueType read_value_type(Cursor& c, std::string_view what) {
    const uint64_t at = c.pos();
    const uint32_t id = c.read<uint32_t>(what);
    if (id >= kNumValueTypes)
        c.fail_at(at, std::string(what) + " " + std::to_string(id) + " is not a GGUF value type");
    return ValueType(id);
}

Value read_value(Cursor& c, ValueType t, int depth) {
    switch (t) {
    case ValueType::U8:
        return c.read<uint8_t>("u8 value");
    case ValueType::I8:
        return c.read<int8_t>("i8 value");
    case ValueType::U16:
        return c.read<uint16_t>("u16 value");
    case ValueType::I16:
        return c.read<int16_t>("i16 value");
    case ValueType::U32:
        return c.read<uint32_t>("u32 value");
    case ValueType::I32:
        return c.read<int32_t>("i32 value");
    case ValueType::F32:
        return c.read<float>("f32 value");
    case ValueType::U64:
        return c.read<uint64_t>("u64 value");
    case ValueType::I64:
        return c.read<int64_t>("i64 value");
    case ValueType::F64:
        return c.read<double>("f64 value");
    case ValueType::Bool: {
        const uint8_t b = c.read<uint8_t>("bool value");
        if (b > 1) c.fail_at(c.pos() - 1, "bool value is " + std::to_string(b) + ", not 0 or 1");
        return b == 1;
    }
    case ValueType::String:
        return c.read_string("string");
    case ValueType::Array: {
        const uint64_t at = c.pos();
        if (depth >= kMaxArrayDepth)
            c.fail_at(at, "arrays nested more than " + std::to_string(kMaxArrayDepth) + " deep");
        Array a;
        a.type = read_value_type(c, "array element type");
        const uint64_t count_at = c.pos();
        const uint64_t n = c.read<uint64_t>("array length");
        // Every element takes at least min_encoded_size bytes, so a length the rest of the
        // file cannot hold is rejected before anything is allocated for it.
        if (n > c.remaining() / min_encoded_size(a.type))
            c.fail_at(count_at, "array of " + std::to_string(n) + " " + std::string(value_type_name(a.type)) +
                                    " values cannot fit in the " + std::to_string(c.remaining()) +
                                    " bytes left in the file");
        a.items.reserve(size_t(n));
        for (uint64_t i = 0; i < n; ++i) a.items.push_back(read_value(c, a.type, depth + 1));
        return a;
    }
    }
    c.fail_at(c.pos(), "unknown value type");
}

struct MappedFile {
    const uint8_t* data = nullptr;
    size_t size = 0;
};

} // namespace

// ---- values and metadata ------------------------------------------------------------------

uint32_t file_type_of(Type t) {
    switch (t) {
    case Type::F32:
        return 0;
    case Type::F16:
        return 1;
    case Type::Q4_0:
        return 2;
    case Type::Q4_1:
        return 3;
    case Type::Q8_0:
        return 7;
    case Type::Q5_0:
        return 8;
    case Type::Q5_1:
        return 9;
    case Type::Q4_K:
        return 14; // Q4_K_S
    case Type::Q5_K:
        return 16; // Q5_K_S
    case Type::Q6_K:
        return 18;
    case Type::Q2_K:
        return 10;
    case Type::Q3_K:
        return 11; // Q3_K_S: every matrix in Q3_K
    case Type::IQ4_NL:
        return 25;
    case Type::IQ4_XS:
        return 30;
    case Type::BF16:
        return 32;
    default:
        fail("no GGUF file type stands for " + std::string(type_name(t)));
    }
}

std::string_view value_type_name(ValueType t) {
    static constexpr std::string_view names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                                 "bool", "string", "array", "u64", "i64", "f64"};
    return uint32_t(t) < kNumValueTypes ? names[uint32_t(t)] : std::string_view("unknown");
}

bool Array::operator==(const Array& o) const {
    return type == o.type && items == o.items;
}

void Value::wrong_type(ValueType wanted) const {
    fail("GGUF value is " + std::string(value_type_name(type())) + ", not " +
         std::string(value_type_name(wanted)));
}

int64_t Value::as_int() const {
    return std::visit(
        [this](const auto& x) -> int64_t {
            using T = std::decay_t<decltype(x)>;
            if constexpr (std::is_same_v<T, uint64_t>) {
                if (x > uint64_t(INT64_MAX))
                    fail("GGUF u64 value " + std::to_string(x) + " does not fit in int64");
                return int64_t(x);
            } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
                return int64_t(x);
            } else {
                fail("GGUF value is " + std::string(value_type_name(type())) + ", not an integer");
            }
        },
        v);
}

double Value::as_float() const {
    if (const float* f = std::get_if<float>(&v)) return *f;
    if (const double* d = std::get_if<double>(&v)) return *d;
    return double(as_int());
}

std::string Value::to_string(size_t max_items) const {
    return std::visit(
        [&](const auto& x) -> std::string {
            using T = std::decay_t<decltype(x)>;
            if constexpr (std::is_same_v<T, bool>) {
                return x ? "true" : "false";
            } else if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
                char buf[40];
                std::snprintf(buf, sizeof buf, std::is_same_v<T, float> ? "%.9g" : "%.17g", double(x));
                return buf;
            } else if constexpr (std::is_same_v<T, std::string>) {
                // Quoted with C escapes so that one value stays on one line.
                std::string s = "\"";
                for (unsigned char ch : x) {
                    if (ch == '"' || ch == '\\')
                        s += '\\', s += char(ch);
                    else if (ch == '\n')
                        s += "\\n";
                    else if (ch == '\t')
                        s += "\\t";
                    else if (ch < 0x20 || ch == 0x7f) {
                        char buf[8];
                        std::snprintf(buf, sizeof buf, "\\x%02x", ch);
                        s += buf;
                    } else
                        s += char(ch);
                }
                return s + "\"";
            } else if constexpr (std::is_same_v<T, Array>) {
                std::string s = "[";
                const size_t shown = std::min(max_items, x.items.size());
                for (size_t i = 0; i < shown; ++i) s += (i ? ", " : "") + x.items[i].to_string(max_items);
                if (shown < x.items.size())
                    s += (shown ? ", ... (" : "... (") + std::to_string(x.items.size()) + " " +
                         std::string(value_type_name(x.type)) + " items)";
                return s + "]";
            } else {
                return std::to_string(x);
            }
        },
        v);
}

const Value* Metadata::find(std::string_view key) const {
    auto it = index_.find(std::string(key));
    return it == index_.end() ? nullptr : &entries_[it->second].value;
}

const Value& Metadata::at(std::string_view key) const {
    const Value* v = find(key);
    if (!v) fail("GGUF metadata has no key " + quoted(key));
    return *v;
}

void Metadata::set(std::string key, Value value) {
    auto [it, inserted] = index_.try_emplace(key, entries_.size());
    if (inserted)
        entries_.push_back({std::move(key), std::move(value)});
    else
        entries_[it->second].value = std::move(value);
}

bool Metadata::erase(std::string_view key) {
    auto it = index_.find(std::string(key));
    if (it == index_.end()) return false;
    entries_.erase(entries_.begin() + std::ptrdiff_t(it->second));
    index_.clear();
    for (size_t i = 0; i < entries_.size(); ++i) index_.emplace(entries_[i].key, i);
    return true;
}

// ---- reading -----------------------------------------------------------------------------

File File::open(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail("GGUF " + path + ": cannot open: " + std::strerror(errno));
    struct stat st {};
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        fail("GGUF " + path + ": not a regular file");
    }
    const size_t size = size_t(st.st_size);
    if (size == 0) {
        ::close(fd);
        fail("GGUF " + path + ": the file is empty");
    }
    void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int map_errno = errno;
    ::close(fd); // the mapping keeps the file's pages reachable
    if (p == MAP_FAILED) fail("GGUF " + path + ": mmap failed: " + std::strerror(map_errno));
    File f;
    f.base_ = std::shared_ptr<const uint8_t>(
        static_cast<const uint8_t*>(p), [size](const uint8_t* q) { munmap(const_cast<uint8_t*>(q), size); });
    f.size_ = size;
    f.parse_all(path);
    return f;
}

File File::parse(const void* bytes, size_t size, const std::string& name) {
    File f;
    std::shared_ptr<uint8_t> copy(new uint8_t[std::max<size_t>(size, 1)], std::default_delete<uint8_t[]>());
    if (size) std::memcpy(copy.get(), bytes, size);
    f.base_ = std::move(copy);
    f.size_ = size;
    f.parse_all(name);
    return f;
}

void File::parse_all(const std::string& name) {
    Cursor c(base_.get(), size_, name);

    // Header: magic, version, tensor count, key/value count.
    c.need(4, "the magic \"GGUF\"");
    if (std::memcmp(base_.get(), kMagic, 4) != 0) c.fail_at(0, "not a GGUF file (the magic is not \"GGUF\")");
    c.read<uint32_t>("magic");
    version_ = c.read<uint32_t>("version");
    if (version_ == 1)
        c.fail_at(4, "GGUF version 1 (32-bit counts) is not supported; convert the file to version 3");
    if (version_ != 2 && version_ != 3)
        c.fail_at(4, "unsupported GGUF version " + std::to_string(version_) + " (2 and 3 are read)");
    const uint64_t n_tensors = c.read<uint64_t>("tensor count");
    const uint64_t n_kv = c.read<uint64_t>("metadata count");
    // Each entry needs at least a string length and a type word: reject counts the file
    // cannot hold before reserving anything for them.
    if (n_kv > c.remaining() / (8 + 4))
        c.fail_at(16, "metadata count " + std::to_string(n_kv) + " cannot fit in a file of " +
                          std::to_string(size_) + " bytes");
    if (n_tensors > c.remaining() / (8 + 4 + 4 + 8)) // name length, n_dims, type, offset
        c.fail_at(8, "tensor count " + std::to_string(n_tensors) + " cannot fit in a file of " +
                         std::to_string(size_) + " bytes");

    // Metadata.
    uint64_t alignment_at = 0;
    for (uint64_t i = 0; i < n_kv; ++i) {
        const uint64_t at = c.pos();
        std::string key = c.read_string("metadata key");
        const ValueType t = read_value_type(c, "value type of " + quoted(key));
        Value v = read_value(c, t, 0);
        if (metadata_.find(key)) c.fail_at(at, "duplicate metadata key " + quoted(key));
        if (key == kAlignmentKey) alignment_at = at;
        metadata_.set(std::move(key), std::move(v));
    }
    alignment_ = kDefaultAlignment;
    if (const Value* a = metadata_.find(kAlignmentKey)) {
        if (a->type() != ValueType::U32)
            c.fail_at(alignment_at, std::string(kAlignmentKey) + " is " +
                                        std::string(value_type_name(a->type())) + ", not u32");
        alignment_ = a->as<uint32_t>();
        if (alignment_ == 0 || !std::has_single_bit(alignment_))
            c.fail_at(alignment_at, std::string(kAlignmentKey) + " = " + std::to_string(alignment_) +
                                        " is not a power of two");
    }

    // Tensor infos.
    std::unordered_set<std::string> names;
    std::vector<uint64_t> offset_at(static_cast<size_t>(n_tensors));
    tensors_.reserve(size_t(n_tensors));
    for (uint64_t i = 0; i < n_tensors; ++i) {
        const uint64_t info_at = c.pos();
        TensorInfo t;
        t.name = c.read_string("tensor name");
        const std::string what = "tensor " + quoted(t.name);
        if (!names.insert(t.name).second) c.fail_at(info_at, "duplicate tensor name " + quoted(t.name));
        const uint64_t dims_at = c.pos();
        const uint32_t n_dims = c.read<uint32_t>(what + " dimension count");
        if (n_dims < 1 || n_dims > uint32_t(kMaxDims))
            c.fail_at(dims_at, what + " has " + std::to_string(n_dims) + " dimensions (1 to " +
                                   std::to_string(kMaxDims) + " are supported)");
        t.n_dims = int(n_dims);
        uint64_t n_elements = 1;
        for (uint32_t d = 0; d < n_dims; ++d) {
            const uint64_t at = c.pos();
            const int64_t ne = c.read<int64_t>(what + " dimension");
            if (ne < 0) c.fail_at(at, what + " has negative dimension " + std::to_string(ne));
            if (!checked_mul(n_elements, uint64_t(ne), &n_elements) || n_elements > uint64_t(INT64_MAX))
                c.fail_at(at, what + " has more elements than fit in 63 bits");
            t.ne[d] = ne;
        }
        const uint64_t type_at = c.pos();
        const uint32_t type_id = c.read<uint32_t>(what + " type");
        if (!is_known_type(type_id))
            c.fail_at(type_at,
                      what + " has tensor type id " + std::to_string(type_id) + ", which is not supported");
        t.type = Type(type_id);
        const TypeTraits& tt = type_traits(t.type);
        if (t.ne[0] % tt.block_size != 0)
            c.fail_at(dims_at, what + " row length " + std::to_string(t.ne[0]) +
                                   " is not a multiple of the " + std::string(tt.name) + " block size " +
                                   std::to_string(tt.block_size));
        uint64_t nbytes = 0;
        if (!checked_mul(n_elements / uint64_t(tt.block_size), tt.type_size, &nbytes))
            c.fail_at(dims_at, what + " byte size overflows 64 bits");
        t.nbytes = size_t(nbytes);
        offset_at[i] = c.pos();
        t.offset = c.read<uint64_t>(what + " offset");
        tensors_.push_back(std::move(t));
    }

    // Data section: starts at the next multiple of the alignment; each tensor must lie
    // inside it, aligned, and apart from every other tensor.
    data_offset_ = align_up(c.pos(), alignment_);
    const uint64_t data_size = size_ > data_offset_ ? size_ - data_offset_ : 0;
    for (size_t i = 0; i < tensors_.size(); ++i) {
        TensorInfo& t = tensors_[i];
        const uint64_t at = offset_at[i];
        if (t.offset % alignment_ != 0)
            c.fail_at(at, "tensor " + quoted(t.name) + " data offset " + std::to_string(t.offset) +
                              " is not a multiple of the alignment " + std::to_string(alignment_));
        if (t.offset > data_size || t.nbytes > data_size - t.offset)
            c.fail_at(at, "tensor " + quoted(t.name) + " data [" + std::to_string(t.offset) + ", +" +
                              std::to_string(t.nbytes) + ") lies outside the data section of " +
                              std::to_string(data_size) + " bytes starting at byte " +
                              std::to_string(data_offset_));
        t.data = base_.get() + data_offset_ + t.offset;
    }
    std::vector<size_t> order(tensors_.size());
    std::iota(order.begin(), order.end(), size_t(0));
    std::sort(order.begin(), order.end(),
              [&](size_t a, size_t b) { return tensors_[a].offset < tensors_[b].offset; });
    for (size_t k = 1; k < order.size(); ++k) {
        const TensorInfo& prev = tensors_[order[k - 1]];
        const TensorInfo& next = tensors_[order[k]];
        if (prev.nbytes > 0 && next.nbytes > 0 && prev.offset + prev.nbytes > next.offset)
            c.fail_at(data_offset_ + next.offset,
                      "tensor " + quoted(next.name) + " data overlaps tensor " + quoted(prev.name));
    }
}

File File::open_model(const std::string& path) {
    File f = open(path);
    const Value* count_value = f.metadata().find("split.count");
    const int64_t count = count_value ? count_value->as_int() : 1;
    if (count <= 1) return f;
    // llama.cpp names shard i (from 1) PREFIX-0000i-of-0000N.gguf
    auto shard_suffix = [&](int64_t i) {
        char suffix[64];
        std::snprintf(suffix, sizeof suffix, "-%05lld-of-%05lld.gguf", (long long)i, (long long)count);
        return std::string(suffix);
    };
    const std::string first = shard_suffix(1);
    if (path.size() <= first.size() || path.compare(path.size() - first.size(), first.size(), first) != 0)
        fail("GGUF " + path + ": the first shard of a model split in " + std::to_string(count) +
             " (split.count) must be named PREFIX" + first);
    if (const Value* no = f.metadata().find("split.no"); no && no->as_int() != 0)
        fail("GGUF " + path + ": split.no is " + std::to_string(no->as_int()) + ", not the first shard's 0");
    const std::string prefix = path.substr(0, path.size() - first.size());
    std::set<std::string> names;
    for (const TensorInfo& t : f.tensors_) names.insert(t.name);
    for (int64_t i = 1; i < count; ++i) {
        const std::string shard_path = prefix + shard_suffix(i + 1);
        struct stat st {};
        if (::stat(shard_path.c_str(), &st) != 0)
            fail("GGUF " + path + ": shard " + std::to_string(i + 1) + " of " + std::to_string(count) + " (" +
                 shard_path + ") is missing");
        const File shard = open(shard_path);
        const Value* shard_no = shard.metadata().find("split.no");
        const Value* shard_count = shard.metadata().find("split.count");
        if (!shard_no || shard_no->as_int() != i || !shard_count || shard_count->as_int() != count)
            fail("GGUF " + shard_path + ": not shard " + std::to_string(i + 1) + " of " +
                 std::to_string(count) + " (its split.no / split.count say otherwise)");
        for (const TensorInfo& t : shard.tensors_) {
            if (!names.insert(t.name).second)
                fail("GGUF " + shard_path + ": tensor " + quoted(t.name) + " is in an earlier shard too");
            f.tensors_.push_back(t);
        }
        f.other_shards_.push_back(shard.base_);
    }
    if (const Value* total = f.metadata().find("split.tensors.count");
        total && total->as_int() != int64_t(names.size()))
        fail("GGUF " + path + ": the shards hold " + std::to_string(names.size()) +
             " tensors, split.tensors.count says " + std::to_string(total->as_int()));
    return f;
}

const TensorInfo* File::find_tensor(std::string_view name) const {
    for (const TensorInfo& t : tensors_)
        if (t.name == name) return &t;
    return nullptr;
}

const TensorInfo& File::tensor(std::string_view name) const {
    const TensorInfo* t = find_tensor(name);
    if (!t) fail("GGUF file has no tensor " + quoted(name));
    return *t;
}

// ---- writing -----------------------------------------------------------------------------

namespace {

struct VectorSink {
    std::vector<uint8_t>& out;
    void write(const void* p, size_t n) {
        const uint8_t* b = static_cast<const uint8_t*>(p);
        out.insert(out.end(), b, b + n);
    }
};

struct FileSink {
    std::FILE* f;
    const std::string& path;
    void write(const void* p, size_t n) {
        if (n && std::fwrite(p, 1, n, f) != n)
            fail("GGUF " + path + ": write failed: " + std::strerror(errno));
    }
};

template <typename Sink> struct Emitter {
    Sink& sink;
    uint64_t pos = 0;

    void bytes(const void* p, size_t n) {
        sink.write(p, n);
        pos += n;
    }
    template <typename T> void pod(T v) { bytes(&v, sizeof v); }
    void string(const std::string& s) {
        pod(uint64_t(s.size()));
        bytes(s.data(), s.size());
    }
    void pad_to(uint64_t alignment) {
        static constexpr uint8_t zeros[256] = {};
        uint64_t n = align_up(pos, alignment) - pos;
        while (n) {
            const size_t k = size_t(std::min<uint64_t>(n, sizeof zeros));
            bytes(zeros, k);
            n -= k;
        }
    }
    void value(const Value& v, const std::string& key) {
        std::visit(
            [&](const auto& x) {
                using T = std::decay_t<decltype(x)>;
                if constexpr (std::is_same_v<T, std::string>) {
                    string(x);
                } else if constexpr (std::is_same_v<T, Array>) {
                    pod(uint32_t(x.type));
                    pod(uint64_t(x.items.size()));
                    for (const Value& item : x.items) {
                        if (item.type() != x.type)
                            fail("GGUF metadata " + quoted(key) + ": array of " +
                                 std::string(value_type_name(x.type)) + " holds a " +
                                 std::string(value_type_name(item.type())) + " item");
                        value(item, key);
                    }
                } else if constexpr (std::is_same_v<T, bool>) {
                    pod(uint8_t(x ? 1 : 0));
                } else {
                    pod(x);
                }
            },
            v.v);
    }
};

} // namespace

void Writer::add(std::string name, Type type, const std::vector<int64_t>& dims, const void* data,
                 size_t nbytes, bool copy) {
    const std::string what = "GGUF tensor " + quoted(name);
    if (dims.empty() || dims.size() > size_t(kMaxDims))
        fail(what + " has " + std::to_string(dims.size()) + " dimensions (1 to 4 are supported)");
    for (const Pending& p : tensors_)
        if (p.info.name == name) fail(what + " is added twice");
    TensorInfo info;
    info.name = std::move(name);
    info.n_dims = int(dims.size());
    info.type = type;
    uint64_t n_elements = 1;
    for (size_t d = 0; d < dims.size(); ++d) {
        if (dims[d] < 0) fail(what + " has negative dimension " + std::to_string(dims[d]));
        if (!checked_mul(n_elements, uint64_t(dims[d]), &n_elements) || n_elements > uint64_t(INT64_MAX))
            fail(what + " has more elements than fit in 63 bits");
        info.ne[d] = dims[d];
    }
    const size_t expected = row_size(type, info.ne[0]) * size_t(info.ne[1] * info.ne[2] * info.ne[3]);
    if (nbytes != expected)
        fail(what + " is given " + std::to_string(nbytes) + " bytes but its shape and type " +
             std::string(type_name(type)) + " need " + std::to_string(expected));
    if (nbytes > 0 && !data) fail(what + " has no data");
    info.nbytes = nbytes;
    Pending p{std::move(info), {}};
    if (copy) {
        p.owned.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + nbytes);
        p.info.data = p.owned.data();
    } else {
        p.info.data = data;
    }
    tensors_.push_back(std::move(p));
}

void Writer::add_tensor(std::string name, Type type, const std::vector<int64_t>& dims, const void* data,
                        size_t nbytes) {
    add(std::move(name), type, dims, data, nbytes, true);
}

void Writer::add_tensor_view(std::string name, Type type, const std::vector<int64_t>& dims, const void* data,
                             size_t nbytes) {
    add(std::move(name), type, dims, data, nbytes, false);
}

uint64_t Writer::alignment() const {
    const Value* a = metadata_.find(kAlignmentKey);
    if (!a) return kDefaultAlignment;
    if (a->type() != ValueType::U32) fail(std::string("GGUF ") + kAlignmentKey + " must be u32");
    const uint32_t v = a->as<uint32_t>();
    if (v == 0 || !std::has_single_bit(v))
        fail(std::string("GGUF ") + kAlignmentKey + " = " + std::to_string(v) + " is not a power of two");
    return v;
}

template <typename Sink> void Writer::emit(Sink& sink) const {
    const uint64_t align = alignment();
    Emitter<Sink> e{sink};
    e.bytes(kMagic, 4);
    e.pod(kVersion);
    e.pod(uint64_t(tensors_.size()));
    e.pod(uint64_t(metadata_.size()));
    for (const KeyValue& kv : metadata_.entries()) {
        e.string(kv.key);
        e.pod(uint32_t(kv.value.type()));
        e.value(kv.value, kv.key);
    }
    uint64_t offset = 0;
    for (const Pending& p : tensors_) {
        e.string(p.info.name);
        e.pod(uint32_t(p.info.n_dims));
        for (int d = 0; d < p.info.n_dims; ++d) e.pod(int64_t(p.info.ne[d]));
        e.pod(uint32_t(p.info.type));
        e.pod(offset);
        offset = align_up(offset + p.info.nbytes, align);
    }
    e.pad_to(align);
    for (const Pending& p : tensors_) {
        e.bytes(p.info.data, p.info.nbytes);
        e.pad_to(align);
    }
}

std::vector<uint8_t> Writer::to_bytes() const {
    std::vector<uint8_t> out;
    VectorSink sink{out};
    emit(sink);
    return out;
}

void Writer::write(const std::string& path) const {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) fail("GGUF " + path + ": cannot create: " + std::strerror(errno));
    try {
        FileSink sink{f, path};
        emit(sink);
    } catch (...) {
        std::fclose(f);
        std::remove(path.c_str());
        throw;
    }
    if (std::fclose(f) != 0) fail("GGUF " + path + ": write failed: " + std::strerror(errno));
}

} // namespace gfa::gguf
