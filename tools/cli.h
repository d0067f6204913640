// What the command-line programs share: reading option values with errors that name the
// option, turning --backend and --kv-type into a device and a type, and main() itself.
#pragma once

#include <ggml-fa/backend.h>
#include <ggml-fa/error.h>
#include <ggml-fa/ops.h>
#include <ggml-fa/types.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace gfa::cli {

// The largest value of an int option.
inline constexpr int64_t kIntMax = INT32_MAX;

// Option `flag`'s value v as an integer in [lo, hi]: the whole of v, what the option's field
// can hold and means (no fraction dropped, no narrowing that wraps around).
inline int64_t integer_of(const std::string& flag, const std::string& v, int64_t lo = INT64_MIN,
                          int64_t hi = INT64_MAX) {
    size_t used = 0;
    int64_t x = 0;
    try {
        x = std::stoll(v, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    if (v.empty() || used != v.size()) fail(flag + " " + v + ": expected an integer");
    if (x < lo || x > hi)
        fail(flag + " " + v + ": expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
             "]");
    return x;
}

// Option `flag`'s value v as a finite number (the whole of v).
inline float real_of(const std::string& flag, const std::string& v) {
    size_t used = 0;
    float x = 0;
    try {
        x = std::stof(v, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    if (v.empty() || used != v.size() || !std::isfinite(x)) fail(flag + " " + v + ": expected a number");
    return x;
}

// --tokens ID,ID,...: token ids (each in [0, 2^31)); at least one.
inline std::vector<int32_t> token_ids(const std::string& list) {
    std::vector<int32_t> out;
    for (size_t at = 0; at <= list.size();) {
        const size_t end = std::min(list.find(',', at), list.size());
        out.push_back(int32_t(integer_of("--tokens", list.substr(at, end - at), 0, kIntMax)));
        at = end + 1;
    }
    return out;
}

// Walks argv; value(), integer() and real() take the argument after the current option.
class Args {
  public:
    Args(int argc, char** argv) : argc_(argc), argv_(argv) {}
    bool next() { return ++i_ < argc_; }
    const std::string option() const { return argv_[i_]; }

    std::string value() {
        if (i_ + 1 >= argc_) fail(option() + " needs a value");
        return argv_[++i_];
    }
    int64_t integer(int64_t lo = INT64_MIN, int64_t hi = INT64_MAX) {
        const std::string flag = option();
        return integer_of(flag, value(), lo, hi);
    }
    float real() {
        const std::string flag = option();
        return real_of(flag, value());
    }

  private:
    int argc_;
    char** argv_;
    int i_ = 0;
};

// --backend cpu|cuda|vulkan: the CPU device, or the first CUDA or Vulkan device (an error
// when this build or machine has none).
inline Device* device_for_backend(const std::string& backend) {
    if (backend == "cpu") return &cpu_device();
    if (backend != "cuda" && backend != "vulkan")
        fail("--backend " + backend + ": expected cpu, cuda or vulkan");
    const char* name = backend == "cuda" ? "CUDA0" : "Vulkan0";
    Device* d = find_device(name);
    if (!d) fail("--backend " + backend + ": no " + name + " device in this build or on this machine");
    return d;
}

// --kv-type f16|f32|q8_0
inline Type kv_type(const std::string& name) {
    if (name == "f16") return Type::F16;
    if (name == "f32") return Type::F32;
    if (name == "q8_0") return Type::Q8_0;
    fail("--kv-type " + name + ": expected f16, f32 or q8_0");
}

// --matmul-precision f32|tf32|q8|bf16 (SessionOptions::matmul_precision)
inline MatMulPrecision precision(const std::string& name) {
    if (name == "f32") return MatMulPrecision::F32;
    if (name == "tf32") return MatMulPrecision::TF32;
    if (name == "q8") return MatMulPrecision::Q8;
    if (name == "bf16") return MatMulPrecision::BF16;
    fail("--matmul-precision " + name + ": expected f32, tf32, q8 or bf16");
}

// --attention-precision f32|bf16 (SessionOptions::attention_precision)
inline FlashAttnPrecision attention_precision(const std::string& name) {
    if (name == "f32") return FlashAttnPrecision::F32;
    if (name == "bf16") return FlashAttnPrecision::BF16;
    fail("--attention-precision " + name + ": expected f32 or bf16");
}

// A program's main(): runs `run`, and reports what it throws as "program: message" with exit
// status 1.
inline int main_of(const char* program, int (*run)(int, char**), int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: %s\n", program, e.what());
        return 1;
    }
}

} // namespace gfa::cli
