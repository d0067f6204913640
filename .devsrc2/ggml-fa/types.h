// Element types, their storage layout, and conversions.
//
// Quantized block layouts are byte-for-byte those of GGUF files, so weights read from a
// file can be used in place.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace gfa {

// Values match the GGUF/ggml type ids, so a type read from a file needs no translation.
enum class Type : uint32_t {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    BF16 = 30,
};

using ToFloatFn = void (*)(const void* src, float* dst, int64_t n);
using FromFloatFn = void (*)(const float* src, void* dst, int64_t n);

struct TypeTraits {
    std::string_view name;
    int64_t block_size = 0; // elements per block (1 for plain types)
    size_t type_size = 0;   // bytes per block
    bool is_quantized = false;
    ToFloatFn to_float = nullptr;     // n must be a multiple of block_size
    FromFloatFn from_float = nullptr; // nullptr where we cannot produce the type
};

// Throws gfa::Error for an id that is not a known type.
const TypeTraits& type_traits(Type t);
bool is_known_type(uint32_t id);
std::string_view type_name(Type t);
// Bytes for a row of n elements (n must be a multiple of the block size).
size_t row_size(Type t, int64_t n);

// ---- 16-bit floats -------------------------------------------------------------------

// IEEE half, stored as raw bits so host code needs no compiler extension.
struct f16 {
    uint16_t bits;
};
// bfloat16: the top half of an IEEE float.
struct bf16 {
    uint16_t bits;
};

float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f); // round to nearest even, overflow to inf, NaN kept

inline float bf16_to_fp32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint16_t fp32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40); // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                          // nearest even
    return uint16_t(u >> 16);
}

// ---- quantized blocks (GGUF layout) ---------------------------------------------------

inline constexpr int QK8_0 = 32;
struct block_q8_0 {
    uint16_t d; // f16 scale
    int8_t qs[QK8_0];
};
static_assert(sizeof(block_q8_0) == 34);

inline constexpr int QK4_0 = 32;
struct block_q4_0 {
    uint16_t d;             // f16 scale
    uint8_t qs[QK4_0 / 2]; // element i in low nibble of byte i, element i+16 in the high nibble
};
static_assert(sizeof(block_q4_0) == 18);

} // namespace gfa
