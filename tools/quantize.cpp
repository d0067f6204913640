// quantize: rewrites the weight matrices of a GGUF file (2-d, and the 3-d stacks of a mixture's
// experts) in another element type and keeps everything else unchanged: metadata, 1-d tensors
// such as norms, tensors whose rows do not fit the target's block size, and a mixture's router
// (ffn_gate_inp), whose few rows decide which experts run, as llama.cpp keeps it too.
//
//   quantize IN.gguf OUT.gguf TYPE [--keep NAME]... [-t THREADS]
//
// TYPE is one of f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_K q5_K q6_K. --keep leaves the named
// tensor as it is (may be repeated). Rows are encoded on -t threads (default: every hardware
// thread): the searching encoders (the K and IQ4 formats) take minutes for a 7B model on one.
#include <ggml-fa/error.h>
#include <ggml-fa/gguf.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace gfa;

namespace {

const Type kTargets[] = {Type::F32,  Type::F16,  Type::BF16, Type::Q8_0,   Type::Q4_0,
                         Type::Q4_1, Type::Q5_0, Type::Q5_1, Type::Q2_K,   Type::Q3_K,
                         Type::Q4_K, Type::Q5_K, Type::Q6_K, Type::IQ4_NL, Type::IQ4_XS};

Type parse_type(const std::string& name) {
    for (Type t : kTargets)
        if (type_name(t) == name) return t;
    std::string message = "unknown target type '";
    message += name;
    message += "' (one of:";
    for (Type t : kTargets) (message += ' ') += type_name(t);
    fail(message + ")");
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
            threads = std::atoi(args[++i].c_str());
            if (threads < 1) {
                std::fprintf(stderr, "quantize: -t %s: expected a positive thread count\n", args[i].c_str());
                return 2;
            }
        } else {
            return usage();
        }
    }
    try {
        const auto start = std::chrono::steady_clock::now();
        const Type target = parse_type(args[2]);
        const TypeTraits& out_traits = type_traits(target);
        const gguf::File in = gguf::File::open(args[0]);

        gguf::Writer out;
        out.metadata() = in.metadata();
        out.set("general.file_type", gguf::file_type_of(target));

        std::deque<std::vector<uint8_t>> converted; // stable storage until the write
        size_t bytes_in = 0, bytes_out = 0, n_converted = 0;
        for (const gguf::TensorInfo& t : in.tensors()) {
            std::vector<int64_t> dims(t.ne.begin(), t.ne.begin() + t.n_dims);
            const TypeTraits& in_traits = type_traits(t.type);
            const bool router =
                t.name.find("ffn_gate_inp") != std::string::npos; // and Qwen2-MoE's shared gate
            const bool wanted = (t.n_dims == 2 || t.n_dims == 3) && t.type != target && !router &&
                                std::find(keep.begin(), keep.end(), t.name) == keep.end();
            const bool possible = in_traits.to_float && t.ne[0] % out_traits.block_size == 0;
            bytes_in += t.nbytes;
            if (!wanted || !possible) {
                out.add_tensor_view(t.name, t.type, dims, t.data, t.nbytes);
                bytes_out += t.nbytes;
                continue;
            }
            // Row by row: the float copy of a whole matrix is never needed.
            const size_t in_row = row_size(t.type, t.ne[0]), out_row = row_size(target, t.ne[0]);
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
            out.add_tensor_view(t.name, target, dims, q.data(), q.size());
            bytes_out += q.size();
            ++n_converted;
        }
        out.write(args[1]);
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::printf("%s: %zu of %zu tensors to %s, %.2f MiB -> %.2f MiB in %.2f s\n", args[1].c_str(),
                    n_converted, in.tensors().size(), std::string(out_traits.name).c_str(),
                    bytes_in / 1048576.0, bytes_out / 1048576.0, secs);
    } catch (const Error& e) {
        std::fprintf(stderr, "quantize: %s\n", e.what());
        return 1;
    }
    return 0;
}
