// Float conversions and the two basic block formats, Q8_0 and Q4_0 (ggml's rounding), and
// the scales-last row layout of the formats with one scale per block.
#include "quants.h"

#include <ggml-fa/error.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <string>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace gfa::quant {

// The 16-bit conversions run wherever weights are unpacked (GEMM packing of every f16/bf16
// weight panel for a prompt), so they use 8-wide instructions where the CPU has them: a
// scalar call per element cost a quarter of an f16 prompt's GEMM time. Both are exact.
void f16_to_f32(const void* src, float* dst, int64_t n) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
    for (; i < n; ++i) dst[i] = fp16_to_fp32(s[i]);
}
void f32_to_f16(const float* src, void* dst, int64_t n) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = fp32_to_fp16(src[i]);
}
void bf16_to_f32(const void* src, float* dst, int64_t n) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    int64_t i = 0;
#if defined(__AVX2__)
    for (; i + 8 <= n; i += 8) { // bf16 is the top half of an f32
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
#endif
    for (; i < n; ++i) dst[i] = bf16_to_fp32(s[i]);
}
void f32_to_bf16(const float* src, void* dst, int64_t n) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = fp32_to_bf16(src[i]);
}

void dequantize_q8_0(const void* src, float* dst, int64_t n) {
    const block_q8_0* b = static_cast<const block_q8_0*>(src);
    for (int64_t i = 0; i < n / QK8_0; ++i) {
        const float d = fp16_to_fp32(b[i].d);
        for (int j = 0; j < QK8_0; ++j) dst[i * QK8_0 + j] = d * float(b[i].qs[j]);
    }
}

const SingleScaleBlock* scales_last_block(Type t) {
    static constexpr SingleScaleBlock kQ8_0{int(sizeof(block_q8_0)), 0};
    static constexpr SingleScaleBlock kQ4_0{int(sizeof(block_q4_0)), 0};
    static constexpr SingleScaleBlock kQ5_0{int(sizeof(block_q5_0)), 0};
    static constexpr SingleScaleBlock kIQ4_NL{int(sizeof(block_iq4_nl)), 0};
    static constexpr SingleScaleBlock kQ6_K{int(sizeof(block_q6_K)), int(offsetof(block_q6_K, d))};
    static_assert(offsetof(block_q6_K, d) == sizeof(block_q6_K) - 2);
    switch (t) {
    case Type::Q8_0:
        return &kQ8_0;
    case Type::Q4_0:
        return &kQ4_0;
    case Type::Q5_0:
        return &kQ5_0;
    case Type::IQ4_NL:
        return &kIQ4_NL;
    case Type::Q6_K:
        return &kQ6_K;
    default:
        return nullptr;
    }
}

namespace {

// The layout of rows of t: its block, and how many blocks a row of K values holds.
struct ScalesLastRows {
    SingleScaleBlock block;
    int64_t blocks_per_row;
    int64_t row_bytes() const { return blocks_per_row * block.bytes; }
    int64_t scales_at() const { return blocks_per_row * block.body_bytes(); }
};
ScalesLastRows scales_last_rows(Type t, int64_t K) {
    const SingleScaleBlock* b = scales_last_block(t);
    if (!b) throw Error(std::string("no scales-last layout for type ") + std::string(type_name(t)));
    const int64_t per_block = type_traits(t).block_size;
    if (K % per_block != 0)
        throw Error("scales-last rows of " + std::string(type_name(t)) + ": K = " + std::to_string(K) +
                    " is not a whole number of blocks");
    return {*b, K / per_block};
}

} // namespace

namespace {

// Calls move(block_part, row_part, bytes) for each block's body and scale: where they lie in
// the file's blocks and where in the scales-last rows (rows start at the same offsets in both).
template <class Move> void each_scales_last_part(Type t, int64_t K, int64_t n_rows, Move&& move) {
    const ScalesLastRows l = scales_last_rows(t, K);
    const int64_t body = l.block.body_bytes();
    for (int64_t r = 0; r < n_rows; ++r)
        for (int64_t i = 0; i < l.blocks_per_row; ++i) {
            const int64_t block = r * l.row_bytes() + i * l.block.bytes, row = r * l.row_bytes();
            move(block + l.block.body_offset(), row + i * body, size_t(body));
            move(block + l.block.scale_offset, row + l.scales_at() + 2 * i, size_t(2));
        }
}

} // namespace

void rows_to_scales_last(Type t, const void* blocks, void* out, int64_t K, int64_t n_rows) {
    const auto* in = static_cast<const uint8_t*>(blocks);
    auto* rows = static_cast<uint8_t*>(out);
    each_scales_last_part(t, K, n_rows, [&](int64_t at_block, int64_t at_row, size_t n) {
        std::memcpy(rows + at_row, in + at_block, n);
    });
}

void rows_from_scales_last(Type t, const void* rows, void* blocks, int64_t K, int64_t n_rows) {
    const auto* in = static_cast<const uint8_t*>(rows);
    auto* out = static_cast<uint8_t*>(blocks);
    each_scales_last_part(t, K, n_rows, [&](int64_t at_block, int64_t at_row, size_t n) {
        std::memcpy(out + at_block, in + at_row, n);
    });
}

void quantize_q8_0(const float* src, void* dst, int64_t n) {
    block_q8_0* b = static_cast<block_q8_0*>(dst);
    for (int64_t i = 0; i < n / QK8_0; ++i) {
        const float* x = src + i * QK8_0;
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK8_0; ++j) b[i].qs[j] = int8_t(std::round(x[j] * id));
    }
}

void dequantize_q4_0(const void* src, float* dst, int64_t n) {
    const block_q4_0* b = static_cast<const block_q4_0*>(src);
    for (int64_t i = 0; i < n / QK4_0; ++i) {
        const float d = fp16_to_fp32(b[i].d);
        for (int j = 0; j < QK4_0 / 2; ++j) {
            dst[i * QK4_0 + j] = d * float(int(b[i].qs[j] & 0x0f) - 8);
            dst[i * QK4_0 + j + QK4_0 / 2] = d * float(int(b[i].qs[j] >> 4) - 8);
        }
    }
}

void quantize_q4_0(const float* src, void* dst, int64_t n) {
    block_q4_0* b = static_cast<block_q4_0*>(dst);
    for (int64_t i = 0; i < n / QK4_0; ++i) {
        const float* x = src + i * QK4_0;
        // The value of largest magnitude, with its sign, maps to -8 so the full range is used.
        float amax = 0.0f, vmax = 0.0f;
        for (int j = 0; j < QK4_0; ++j)
            if (std::fabs(x[j]) > amax) amax = std::fabs(x[j]), vmax = x[j];
        const float d = vmax / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK4_0 / 2; ++j) {
            const int lo = std::min(15, int(x[j] * id + 8.5f));
            const int hi = std::min(15, int(x[j + QK4_0 / 2] * id + 8.5f));
            b[i].qs[j] = uint8_t(lo | (hi << 4));
        }
    }
}

} // namespace gfa::quant
