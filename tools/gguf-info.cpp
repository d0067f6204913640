// gguf-info: shows what a GGUF file holds.
//
//   gguf-info FILE               metadata and tensor table, human-readable
//   gguf-info --json FILE        the same as JSON (every value in full, with its type), of
//                                this one file
//   gguf-info --dump NAME FILE   the tensor's values as floats, one per line (%.9g, which
//                                reads back to the identical float)
// The human-readable table and --dump read a split model's other shards too, given the first.
#include <ggml-fa/error.h>
#include <ggml-fa/gguf.h>

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

using namespace gfa;

namespace {

void json_string(std::string& out, const std::string& s) {
    out += '"';
    for (unsigned char ch : s) {
        if (ch == '"' || ch == '\\') {
            out += '\\';
            out += char(ch);
        } else if (ch < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", ch);
            out += buf;
        } else {
            out += char(ch);
        }
    }
    out += '"';
}

void json_float(std::string& out, double x, bool single) {
    // Python's json module reads these three spellings.
    if (std::isnan(x))
        out += "NaN";
    else if (std::isinf(x))
        out += x > 0 ? "Infinity" : "-Infinity";
    else {
        char buf[40];
        std::snprintf(buf, sizeof buf, single ? "%.9g" : "%.17g", x);
        out += buf;
    }
}

void json_value(std::string& out, const gguf::Value& v);

// An array as {"type": element type, "items": [...]}, so nested arrays keep their types.
void json_array(std::string& out, const gguf::Array& a) {
    out += "{\"type\": \"";
    out += gguf::value_type_name(a.type);
    out += "\", \"items\": [";
    for (size_t i = 0; i < a.items.size(); ++i) {
        if (i) out += ", ";
        json_value(out, a.items[i]);
    }
    out += "]}";
}

void json_value(std::string& out, const gguf::Value& v) {
    using gguf::ValueType;
    switch (v.type()) {
    case ValueType::F32:
        json_float(out, v.as<float>(), true);
        break;
    case ValueType::F64:
        json_float(out, v.as<double>(), false);
        break;
    case ValueType::Bool:
        out += v.as<bool>() ? "true" : "false";
        break;
    case ValueType::String:
        json_string(out, v.as_string());
        break;
    case ValueType::Array:
        json_array(out, v.as_array());
        break;
    case ValueType::U64:
        out += std::to_string(v.as<uint64_t>());
        break;
    default:
        out += std::to_string(v.as_int());
        break;
    }
}

std::string shape_string(const gguf::TensorInfo& t) {
    std::string s;
    for (int d = 0; d < t.n_dims; ++d) s += (d ? " x " : "") + std::to_string(t.ne[d]);
    return s;
}

void print_json(const gguf::File& f) {
    std::string out = "{\"version\": " + std::to_string(f.version()) +
                      ", \"alignment\": " + std::to_string(f.alignment()) +
                      ", \"data_offset\": " + std::to_string(f.data_offset()) + ", \"metadata\": [";
    bool first = true;
    for (const gguf::KeyValue& kv : f.metadata().entries()) {
        out += first ? "\n  [" : ",\n  [";
        first = false;
        json_string(out, kv.key);
        out += ", \"";
        out += gguf::value_type_name(kv.value.type());
        out += "\", ";
        json_value(out, kv.value);
        out += "]";
    }
    out += "],\n\"tensors\": [";
    first = true;
    for (const gguf::TensorInfo& t : f.tensors()) {
        out += first ? "\n  {\"name\": " : ",\n  {\"name\": ";
        first = false;
        json_string(out, t.name);
        out += ", \"type\": \"" + std::string(type_name(t.type)) +
               "\", \"type_id\": " + std::to_string(uint32_t(t.type)) + ", \"dims\": [";
        for (int d = 0; d < t.n_dims; ++d) out += (d ? ", " : "") + std::to_string(t.ne[d]);
        out +=
            "], \"offset\": " + std::to_string(t.offset) + ", \"nbytes\": " + std::to_string(t.nbytes) + "}";
    }
    out += "]}\n";
    std::fputs(out.c_str(), stdout);
}

void print_text(const gguf::File& f, const std::string& path) {
    std::printf("%s: GGUF v%u, %zu bytes, alignment %" PRIu64 ", data at byte %" PRIu64 "\n", path.c_str(),
                f.version(), f.file_size(), f.alignment(), f.data_offset());
    std::printf("\n%zu metadata entries:\n", f.metadata().size());
    for (const gguf::KeyValue& kv : f.metadata().entries())
        std::printf("  %-40s %-6s %s\n", kv.key.c_str(),
                    std::string(gguf::value_type_name(kv.value.type())).c_str(),
                    kv.value.to_string().c_str());
    if (f.shards() > 1)
        std::printf("\n%zu tensors from %d shards (offsets within each tensor's own shard):\n",
                    f.tensors().size(), f.shards());
    else
        std::printf("\n%zu tensors:\n", f.tensors().size());
    std::printf("  %-40s %-6s %-24s %12s %12s\n", "name", "type", "shape", "offset", "bytes");
    for (const gguf::TensorInfo& t : f.tensors())
        std::printf("  %-40s %-6s %-24s %12" PRIu64 " %12zu\n", t.name.c_str(),
                    std::string(type_name(t.type)).c_str(), shape_string(t).c_str(), t.offset, t.nbytes);
}

void dump_tensor(const gguf::File& f, const std::string& name) {
    const gguf::TensorInfo& t = f.tensor(name);
    const TypeTraits& tt = type_traits(t.type);
    if (!tt.to_float)
        fail("tensor '" + name + "' has type " + std::string(tt.name) + ", which has no float conversion");
    std::vector<float> values(size_t(t.n_elements()));
    tt.to_float(t.data, values.data(), t.n_elements());
    std::string out;
    out.reserve(values.size() * 16);
    char buf[40];
    for (float v : values) {
        std::snprintf(buf, sizeof buf, "%.9g\n", double(v));
        out += buf;
    }
    std::fputs(out.c_str(), stdout);
}

int usage() {
    std::fprintf(stderr, "usage: gguf-info [--json | --dump TENSOR] FILE.gguf\n");
    return 2;
}

} // namespace

int main(int argc, char** argv) {
    std::vector<std::string> args(argv + 1, argv + argc);
    try {
        if (args.size() == 1 && args[0] != "--json" && args[0] != "--help") {
            print_text(gguf::File::open_model(args[0]), args[0]); // a split model's shards joined
        } else if (args.size() == 2 && args[0] == "--json") {
            print_json(gguf::File::open(args[1]));
        } else if (args.size() == 3 && args[0] == "--dump") {
            dump_tensor(gguf::File::open_model(args[2]), args[1]);
        } else {
            return usage();
        }
    } catch (const Error& e) {
        std::fprintf(stderr, "gguf-info: %s\n", e.what());
        return 1;
    }
    return 0;
}
