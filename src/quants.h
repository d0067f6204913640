// Row conversions between float and every storage type (internal). Each quantized format
// has its encoder and decoder here; n is always a multiple of the format's block size.
#pragma once

#include <ggml-fa/types.h>

namespace gfa::quant {

void f16_to_f32(const void* src, float* dst, int64_t n);
void f32_to_f16(const float* src, void* dst, int64_t n);
void bf16_to_f32(const void* src, float* dst, int64_t n);
void f32_to_bf16(const float* src, void* dst, int64_t n);

void dequantize_q8_0(const void* src, float* dst, int64_t n);
void quantize_q8_0(const float* src, void* dst, int64_t n);
void dequantize_q4_0(const void* src, float* dst, int64_t n);
void quantize_q4_0(const float* src, void* dst, int64_t n);

// Q8_0 rows with the scales last: a GPU keeps a model's q8_0 weights so (see the CUDA
// backend's weights buffers). Each row of K values (K % 32 == 0) keeps its size, 34 K / 32
// bytes, but holds its K int8 values first and then the K / 32 f16 scales: in the file's
// layout of 34-byte blocks nothing past 2-byte alignment can be read at once, in this one a
// row's values are 16-byte aligned where the row is. Both convert n_rows packed rows.
void q8_0_rows_to_scales_last(const void* blocks, void* out, int64_t K, int64_t n_rows);
void q8_0_rows_from_scales_last(const void* rows, void* blocks, int64_t K, int64_t n_rows);

// GGUF formats used by llama.cpp models (src/quants_k.cpp).
void dequantize_q4_1(const void* src, float* dst, int64_t n);
void quantize_q4_1(const float* src, void* dst, int64_t n);
void dequantize_q5_0(const void* src, float* dst, int64_t n);
void quantize_q5_0(const float* src, void* dst, int64_t n);
void dequantize_q5_1(const void* src, float* dst, int64_t n);
void quantize_q5_1(const float* src, void* dst, int64_t n);
void dequantize_q4_K(const void* src, float* dst, int64_t n);
void quantize_q4_K(const float* src, void* dst, int64_t n);
void dequantize_q5_K(const void* src, float* dst, int64_t n);
void quantize_q5_K(const float* src, void* dst, int64_t n);
void dequantize_q6_K(const void* src, float* dst, int64_t n);
void quantize_q6_K(const float* src, void* dst, int64_t n);
void dequantize_q2_K(const void* src, float* dst, int64_t n);
void quantize_q2_K(const float* src, void* dst, int64_t n);
void dequantize_q3_K(const void* src, float* dst, int64_t n);
void quantize_q3_K(const float* src, void* dst, int64_t n);

// Non-linear 4-bit formats (src/quants_iq4.cpp).
void dequantize_iq4_nl(const void* src, float* dst, int64_t n);
void quantize_iq4_nl(const float* src, void* dst, int64_t n);
void dequantize_iq4_xs(const void* src, float* dst, int64_t n);
void quantize_iq4_xs(const float* src, void* dst, int64_t n);

} // namespace gfa::quant
