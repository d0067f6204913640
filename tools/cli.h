// What the command-line programs share: reading option values with errors that name the
// option, turning --backend and --kv-type into a device and a type, and main() itself.
#pragma once

#include <ggml-fa/backend.h>
#include <ggml-fa/error.h>
#include <ggml-fa/ops.h>
#include <ggml-fa/types.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>

namespace gfa::cli {

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
    int64_t integer() {
        const std::string flag = option(), v = value();
        size_t used = 0;
        int64_t x = 0;
        try {
            x = std::stoll(v, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        if (v.empty() || used != v.size()) fail(flag + " " + v + ": expected an integer");
        return x;
    }
    float real() {
        const std::string flag = option(), v = value();
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
