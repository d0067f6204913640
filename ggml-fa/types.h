// Element types, their storage layout, and conversions.
//
// Quantized block layouts are byte-for-byte those of GGUF files, so weights read from a
// file can be used in place.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

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
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    IQ4_NL = 20,
    IQ4_XS = 23,
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
// Rows of ne0 f32 values encoded as type t (one row after another); throws where t cannot be
// produced or ne0 is not a multiple of its block size.
std::vector<uint8_t> encode_rows(const std::vector<float>& values, Type t, int64_t ne0);

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
    u += 0x7fffu + ((u >> 16) & 1u);                                        // nearest even
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
    uint16_t d;            // f16 scale
    uint8_t qs[QK4_0 / 2]; // element i in low nibble of byte i, element i+16 in the high nibble
};
static_assert(sizeof(block_q4_0) == 18);

inline constexpr int QK4_1 = 32;
struct block_q4_1 {
    uint16_t d;            // f16 step
    uint16_t m;            // f16 offset: x = d * q + m, q in 0..15
    uint8_t qs[QK4_1 / 2]; // nibbles as in block_q4_0
};
static_assert(sizeof(block_q4_1) == 20);

inline constexpr int QK5_0 = 32;
struct block_q5_0 {
    uint16_t d;            // f16 scale: x = d * (q - 16), q in 0..31
    uint8_t qh[4];         // little-endian 32-bit word, bit i = fifth bit of element i
    uint8_t qs[QK5_0 / 2]; // low four bits, nibbles as in block_q4_0
};
static_assert(sizeof(block_q5_0) == 22);

inline constexpr int QK5_1 = 32;
struct block_q5_1 {
    uint16_t d; // f16 step
    uint16_t m; // f16 offset: x = d * q + m, q in 0..31
    uint8_t qh[4];
    uint8_t qs[QK5_1 / 2];
};
static_assert(sizeof(block_q5_1) == 24);

// "K" formats: a 256-element super-block split into sub-blocks whose scales (and mins) are
// themselves quantized against one f16 super-scale.
inline constexpr int QK_K = 256;
inline constexpr int K_SCALE_SIZE = 12;

// Eight sub-blocks of 32: x = d * sc[j] * q - dmin * mn[j], with 6-bit sc and mn packed into
// 12 bytes. Bytes 0..3 hold sc[0..3] (low 6 bits) and the top 2 bits of sc[4..7]; bytes 4..7
// likewise for mn; bytes 8..11 hold the low 4 bits of sc[4..7] (low nibble) and mn[4..7].
struct block_q4_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qs[QK_K / 2]; // 32-byte chunk c: sub-block 2c in the low nibbles, 2c+1 in the high
};
static_assert(sizeof(block_q4_K) == 144);

// Q4_K plus a fifth bit per element: bit j of qh[l] belongs to element l of sub-block j.
struct block_q5_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
};
static_assert(sizeof(block_q5_K) == 176);

// Sixteen sub-blocks of 16 with int8 scales: x = d * scales[i / 16] * (q - 32), q in 0..63.
// Each 128-element half h uses ql[64h..64h+63] (element r: low nibble for r < 64, high nibble
// of byte r - 64 otherwise) and qh[32h..32h+31] (element r: bits 2*(r/32) of byte r % 32).
struct block_q6_K {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
};
static_assert(sizeof(block_q6_K) == 210);

// Sixteen sub-blocks of 16 at two bits: x = d * (scales[i / 16] & 15) * q - dmin * (scales[i / 16]
// >> 4), q in 0..3. Each 128-element half h uses qs[32h..32h+31]: element r of the half is
// bits 2*(r/32) of byte r % 32.
struct block_q2_K {
    uint8_t scales[QK_K / 16];
    uint8_t qs[QK_K / 4];
    uint16_t d;
    uint16_t dmin;
};
static_assert(sizeof(block_q2_K) == 84);

// Sixteen sub-blocks of 16 at three bits: x = d * (sc[i / 16] - 32) * q, q in -4..3, made of two
// bits in qs (placed as in block_q2_K) and a high bit in hmask (bit k of hmask[l] for element
// 32k + l; a set bit adds nothing, a clear one subtracts 4). The 6-bit scales sc are packed in
// 12 bytes: bytes 0..7 hold the low nibbles of sc[0..7] and (high nibbles) sc[8..15]; the top two
// bits of sc[j] are bits 2*(j/4) of byte 8 + j % 4.
struct block_q3_K {
    uint8_t hmask[QK_K / 8];
    uint8_t qs[QK_K / 4];
    uint8_t scales[12];
    uint16_t d;
};
static_assert(sizeof(block_q3_K) == 110);

// The "IQ4" formats: 4-bit indices into a fixed table of 16 non-uniform levels (denser near
// zero, where most weights lie), times a scale.
inline constexpr int8_t kIq4Levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                          1,    13,   25,  38,  53,  69,  89,  113};
inline constexpr int QK4_NL = 32;
struct block_iq4_nl {
    uint16_t d;             // x = d * kIq4Levels[index]
    uint8_t qs[QK4_NL / 2]; // element i in the low nibble of byte i, i + 16 in the high one
};
static_assert(sizeof(block_iq4_nl) == 18);

// Eight sub-blocks of 32 with 6-bit scales: x = d * (sc[j] - 32) * kIq4Levels[index], the low
// four bits of sc[j] in nibble j % 2 of scales_l[j / 2], the top two at bits 2j of scales_h.
// Sub-block j's indices are qs[16j..16j+15], placed as in block_iq4_nl.
struct block_iq4_xs {
    uint16_t d;
    uint16_t scales_h;
    uint8_t scales_l[QK_K / 64];
    uint8_t qs[QK_K / 2];
};
static_assert(sizeof(block_iq4_xs) == 136);

} // namespace gfa
