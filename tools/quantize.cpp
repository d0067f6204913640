// quantize: rewrites the weight matrices of a GGUF file (2-d, and the 3-d stacks of a mixture's
// experts) in another element type and keeps everything else unchanged: metadata, 1-d tensors
// such as norms, tensors whose rows fit neither the target's block size nor its fallback's,
// and a mixture's router (ffn_gate_inp), whose few rows decide which experts run, as llama.cpp
// keeps it too. A K format's fallback, for rows that are not whole blocks of 256 but are of 32
// (Qwen2-MoE's experts of width 1408, say), is the block type llama.cpp's quantizer picks for
// them: q2_K, q3_K, iq4_xs -> iq4_nl; q4_K -> q5_0; q5_K -> q5_1; q6_K -> q8_0.
//
//   quantize IN.gguf OUT.gguf TYPE [--keep NAME]... [-t THREADS]
//
// TYPE is one of f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_K q3_K q4_K q5_K q6_K iq4_nl iq4_xs,
// or one of the mixes q4_K_M and q5_K_M: llama.cpp's file types of those names, the ones most
// local models are shared in. They take q4_K (q5_K) for most matrices and q6_K where their
// rule gives more bits: the output projection (or the tied token embeddings), and the value
// projections and down projections of the first and last eighth of the layers and of every
// third layer between (a fused qkv projection takes q5_K / q6_K). llama.cpp's further
// exceptions for 70B models and 8-expert mixtures (more bits for their value and output
// projections) are not reproduced: such files get the rule above. --keep leaves the named
// tensor as it is (may be repeated). Rows are encoded on -t threads (default: every hardware
// thread): the searching encoders (the K and IQ4 formats) take minutes for a 7B model on one.
#include <ggml-fa/error.h>
#include <ggml-fa/gguf.h>

#include "tools/cli.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

using namespace gfa;

namespace {

const Type kTargets[] = {Type::F32,  Type::F16,  Type::BF16, Type::Q8_0,   Type::Q4_0,
                         Type::Q4_1, Type::Q5_0, Type::Q5_1, Type::Q2_K,   Type::Q3_K,
                         Type::Q4_K, Type::Q5_K, Type::Q6_K, Type::IQ4_NL, Type::IQ4_XS};

// What the command line asked for: one block type for every matrix, or a mix.
struct Recipe {
    std::string name;
    Type base;
    bool medium_mix = false; // the _M rules (Recipe::type_for)
    uint32_t file_type;      // general.file_type, as llama.cpp numbers its file types

    // The block type of the matrix `name` in layer `layer` of `n_layers` (-1: not in a layer),
    // before any fallback; output_tied: the file has no output.weight (the embeddings serve).
    Type type_for(const std::string& tensor, int layer, int n_layers, bool output_tied) const {
        if (!medium_mix) return base;
        auto ends_with = [&](const char* suffix) {
            const std::string s(suffix);
            return tensor.size() >= s.size() && tensor.compare(tensor.size() - s.size(), s.size(), s) == 0;
        };
        if (tensor == "output.weight" || (output_tied && tensor == "token_embd.weight")) return Type::Q6_K;
        if (ends_with("attn_qkv.weight")) return base == Type::Q4_K ? Type::Q5_K : Type::Q6_K;
        // The first and last eighth of the layers, and every third layer between them.
        const bool more_bits = layer >= 0 && (layer < n_layers / 8 || layer >= 7 * n_layers / 8 ||
                                              (layer - n_layers / 8) % 3 == 2);
        if (more_bits && (ends_with("attn_v.weight") || tensor.find("ffn_down") != std::string::npos))
            return Type::Q6_K;
        return base;
    }
};

Recipe parse_recipe(const std::string& name) {
    if (name == "q4_K_M") return {name, Type::Q4_K, true, 15};
    if (name == "q5_K_M") return {name, Type::Q5_K, true, 17};
    for (Type t : kTargets)
        if (type_name(t) == name) return {name, t, false, gguf::file_type_of(t)};
    std::string message = "unknown target type '";
    message += name;
    message += "' (one of:";
    for (Type t : kTargets) (message += ' ') += type_name(t);
    fail(message + " q4_K_M q5_K_M)");
}

// The layer of a tensor named blk.N.*, or -1.
int layer_of(const std::string& tensor) {
    if (tensor.rfind("blk.", 0) != 0) return -1;
    const size_t dot = tensor.find('.', 4);
    if (dot == std::string::npos || dot == 4) return -1;
    int layer = 0;
    for (size_t i = 4; i < dot; ++i) {
        if (tensor[i] < '0' || tensor[i] > '9' || layer > 1000000) return -1;
        layer = layer * 10 + (tensor[i] - '0');
    }
    return layer;
}

// The block type for rows the target's blocks do not divide (nullopt: none; keep the tensor).
std::optional<Type> fallback_for(Type target) {
    switch (target) {
    case Type::Q2_K:
    case Type::Q3_K:
    case Type::IQ4_XS:
        return Type::IQ4_NL;
    case Type::Q4_K:
        return Type::Q5_0;
    case Type::Q5_K:
        return Type::Q5_1;
    case Type::Q6_K:
        return Type::Q8_0;
    default:
        return std::nullopt;
    }
}

int usage() {
    std::fprintf(stderr, "usage: quantize IN.gguf OUT.gguf TYPE [--keep TENSOR]... [-t THREADS]\n");
    return 2;
}

} // namespace

int main(int argc, char** argv) {
    std::vector<std::string> args(argv + 1, argv + argc);
    if (args.size() < 3) return usage();
    std::vector<std::string> keep;
    int threads = int(std::max(1u, std::thread::hardware_concurrency()));
    for (size_t i = 3; i < args.size(); ++i) {
        if (i + 1 >= args.size()) return usage();
        if (args[i] == "--keep") {
            keep.push_back(args[++i]);
        } else if (args[i] == "-t") {
            try {
                threads = int(cli::integer_of("-t", args[++i], 1, 4096));
            } catch (const Error& e) {
                std::fprintf(stderr, "quantize: %s\n", e.what());
                return 2;
            }
        } else {
            return usage();
        }
    }
    try {
        const auto start = std::chrono::steady_clock::now();
        const Recipe recipe = parse_recipe(args[2]);
        const gguf::File in = gguf::File::open(args[0]);

        gguf::Writer out;
        out.metadata() = in.metadata();
        out.set("general.file_type", recipe.file_type);

        int n_layers = 0;
        bool output_tied = true;
        for (const gguf::TensorInfo& t : in.tensors()) {
            n_layers = std::max(n_layers, layer_of(t.name) + 1);
            if (t.name == "output.weight") output_tied = false;
        }

        std::deque<std::vector<uint8_t>> converted; // stable storage until the write
        size_t bytes_in = 0, bytes_out = 0, n_converted = 0, n_fallback = 0;
        std::map<std::string, int> converted_to; // block type name -> tensors
        for (const gguf::TensorInfo& t : in.tensors()) {
            std::vector<int64_t> dims(t.ne.begin(), t.ne.begin() + t.n_dims);
            const TypeTraits& in_traits = type_traits(t.type);
            const bool router =
                t.name.find("ffn_gate_inp") != std::string::npos; // and Qwen2-MoE's shared gate
            const Type target = recipe.type_for(t.name, layer_of(t.name), n_layers, output_tied);
            Type type = target;
            if (const std::optional<Type> fallback = fallback_for(target);
                fallback && t.ne[0] % type_traits(target).block_size != 0 &&
                t.ne[0] % type_traits(*fallback).block_size == 0)
                type = *fallback;
            const TypeTraits& out_traits = type_traits(type);
            const bool wanted = (t.n_dims == 2 || t.n_dims == 3) && t.type != type && !router &&
                                std::find(keep.begin(), keep.end(), t.name) == keep.end();
            const bool possible = in_traits.to_float && t.ne[0] % out_traits.block_size == 0;
            bytes_in += t.nbytes;
            if (!wanted || !possible) {
                out.add_tensor_view(t.name, t.type, dims, t.data, t.nbytes);
                bytes_out += t.nbytes;
                continue;
            }
            // Row by row: the float copy of a whole matrix is never needed.
            const size_t in_row = row_size(t.type, t.ne[0]), out_row = row_size(type, t.ne[0]);
            const int64_t rows = t.ne[1] * (t.n_dims == 3 ? t.ne[2] : 1);
            std::vector<uint8_t>& q = converted.emplace_back(out_row * size_t(rows));
            // Rows are independent: each thread encodes a contiguous range into its own bytes. An
            // encoder's error in a worker is carried to this thread, which reports it.
            std::exception_ptr error;
            std::mutex error_mutex;
            auto encode_rows = [&](int64_t begin, int64_t end) {
                try {
                    std::vector<float> row(size_t(t.ne[0]));
                    for (int64_t r = begin; r < end; ++r) {
                        in_traits.to_float(static_cast<const uint8_t*>(t.data) + size_t(r) * in_row,
                                           row.data(), t.ne[0]);
                        out_traits.from_float(row.data(), q.data() + size_t(r) * out_row, t.ne[0]);
                    }
                } catch (...) {
                    const std::lock_guard lock(error_mutex);
                    if (!error) error = std::current_exception();
                }
            };
            const int64_t n_workers = std::min<int64_t>(threads, rows);
            {
                std::vector<std::jthread> workers;
                for (int64_t w = 1; w < n_workers; ++w)
                    workers.emplace_back(encode_rows, rows * w / n_workers, rows * (w + 1) / n_workers);
                encode_rows(0, rows / n_workers);
            } // joins
            if (error) std::rethrow_exception(error);
            out.add_tensor_view(t.name, type, dims, q.data(), q.size());
            bytes_out += q.size();
            ++n_converted;
            ++converted_to[std::string(type_name(type))];
            if (type != target) ++n_fallback;
        }
        out.write(args[1]);
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::string by_type;
        for (const auto& [name, count] : converted_to)
            by_type += (by_type.empty() ? "" : ", ") + std::to_string(count) + " " + name;
        std::string fallback_note;
        if (n_fallback > 0)
            fallback_note = "; " + std::to_string(n_fallback) +
                            " of them to a fallback type: rows not whole blocks of their target's";
        std::printf("%s: %zu of %zu tensors to %s (%s%s), %.2f MiB -> %.2f MiB in %.2f s\n", args[1].c_str(),
                    n_converted, in.tensors().size(), recipe.name.c_str(), by_type.c_str(),
                    fallback_note.c_str(), bytes_in / 1048576.0, bytes_out / 1048576.0, secs);
    } catch (const Error& e) {
        std::fprintf(stderr, "quantize: %s\n", e.what());
        return 1;
    }
    return 0;
}
