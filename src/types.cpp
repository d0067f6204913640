#include <ggml-fa/error.h>
#include <ggml-fa/types.h>

#include "quants.h"

#include <array>
#include <cmath>
#include <string>

namespace gfa {

void fail(const std::string& message) {
    throw Error(message);
}

float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13); // inf / NaN
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign; // signed zero
    } else {
        // Subnormal half: value = mant * 2^-24, exactly representable as a float.
        float f = std::ldexp(float(mant), -24);
        std::memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

uint16_t fp32_to_fp16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    const uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
    if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u); // rounds to inf (>= 65520)
    if (abs < 0x38800000u) {
        // Result is subnormal or zero: scale so that one ulp of half (2^-24) is one unit.
        float a;
        std::memcpy(&a, &abs, 4);
        const float scaled = a * 16777216.0f; // 2^24, exact
        return uint16_t(sign | uint16_t(std::nearbyint(scaled)));
    }
    // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
    uint32_t h = ((abs >> 13) - (112u << 10));
    const uint32_t rest = abs & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return uint16_t(sign | h);
}

namespace {

void f32_copy_to(const void* src, float* dst, int64_t n) {
    std::memcpy(dst, src, size_t(n) * 4);
}
void f32_copy_from(const float* src, void* dst, int64_t n) {
    std::memcpy(dst, src, size_t(n) * 4);
}

struct Entry {
    Type type;
    TypeTraits traits;
};

const std::array<Entry, 20> kTypes = {{
    {Type::F32, {"f32", 1, 4, false, f32_copy_to, f32_copy_from}},
    {Type::F16, {"f16", 1, 2, false, quant::f16_to_f32, quant::f32_to_f16}},
    {Type::BF16, {"bf16", 1, 2, false, quant::bf16_to_f32, quant::f32_to_bf16}},
    {Type::F64, {"f64", 1, 8, false, nullptr, nullptr}},
    {Type::I8, {"i8", 1, 1, false, nullptr, nullptr}},
    {Type::I16, {"i16", 1, 2, false, nullptr, nullptr}},
    {Type::I32, {"i32", 1, 4, false, nullptr, nullptr}},
    {Type::I64, {"i64", 1, 8, false, nullptr, nullptr}},
    {Type::Q8_0, {"q8_0", 32, 34, true, quant::dequantize_q8_0, quant::quantize_q8_0}},
    {Type::Q4_0, {"q4_0", 32, 18, true, quant::dequantize_q4_0, quant::quantize_q4_0}},
    {Type::Q4_1, {"q4_1", 32, 20, true, quant::dequantize_q4_1, quant::quantize_q4_1}},
    {Type::Q5_0, {"q5_0", 32, 22, true, quant::dequantize_q5_0, quant::quantize_q5_0}},
    {Type::Q5_1, {"q5_1", 32, 24, true, quant::dequantize_q5_1, quant::quantize_q5_1}},
    {Type::Q4_K, {"q4_K", 256, 144, true, quant::dequantize_q4_K, quant::quantize_q4_K}},
    {Type::Q5_K, {"q5_K", 256, 176, true, quant::dequantize_q5_K, quant::quantize_q5_K}},
    {Type::Q6_K, {"q6_K", 256, 210, true, quant::dequantize_q6_K, quant::quantize_q6_K}},
    {Type::Q2_K, {"q2_K", 256, 84, true, quant::dequantize_q2_K, quant::quantize_q2_K}},
    {Type::Q3_K, {"q3_K", 256, 110, true, quant::dequantize_q3_K, quant::quantize_q3_K}},
    {Type::IQ4_NL, {"iq4_nl", 32, 18, true, quant::dequantize_iq4_nl, quant::quantize_iq4_nl}},
    {Type::IQ4_XS, {"iq4_xs", 256, 136, true, quant::dequantize_iq4_xs, quant::quantize_iq4_xs}},
}};

const Entry* find(uint32_t id) {
    for (const Entry& e : kTypes)
        if (uint32_t(e.type) == id) return &e;
    return nullptr;
}

} // namespace

bool is_known_type(uint32_t id) {
    return find(id) != nullptr;
}

const TypeTraits& type_traits(Type t) {
    const Entry* e = find(uint32_t(t));
    if (!e) fail("unknown tensor type id " + std::to_string(uint32_t(t)));
    return e->traits;
}

std::string_view type_name(Type t) {
    const Entry* e = find(uint32_t(t));
    return e ? e->traits.name : std::string_view("unknown");
}

size_t row_size(Type t, int64_t n) {
    const TypeTraits& tt = type_traits(t);
    if (n % tt.block_size != 0)
        fail("row of " + std::to_string(n) + " elements is not a multiple of the " + std::string(tt.name) +
             " block size " + std::to_string(tt.block_size));
    return size_t(n / tt.block_size) * tt.type_size;
}

std::vector<uint8_t> encode_rows(const std::vector<float>& values, Type t, int64_t ne0) {
    const TypeTraits& tt = type_traits(t);
    if (!tt.from_float) fail("values cannot be encoded as " + std::string(tt.name));
    if (ne0 <= 0 || int64_t(values.size()) % ne0 != 0)
        fail(std::to_string(values.size()) + " values are not whole rows of " + std::to_string(ne0));
    const size_t rb = row_size(t, ne0);
    const int64_t rows = int64_t(values.size()) / ne0;
    std::vector<uint8_t> out(rb * size_t(rows));
    for (int64_t r = 0; r < rows; ++r)
        tt.from_float(&values[size_t(r * ne0)], out.data() + size_t(r) * rb, ne0);
    return out;
}

} // namespace gfa
