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

// Rows with the scales last: a GPU keeps a model's weights so (see the CUDA backend's weights
// buffers) when each block of their format holds exactly one f16 scale, d, beside bytes of its
// own (q8_0, q4_0, q5_0, iq4_nl: d first; q6_K: d last). A row of K values keeps its size but
// holds the blocks' other bytes first, block after block, and then the blocks' scales, in
// order. In the file's layout of 34-, 18-, 22- or 210-byte blocks nothing past 2-byte alignment
// can be read at once; in this one the bodies (32, 16 or 208 bytes) are 16-byte aligned where
// the row is, and q5_0's (20 bytes) 4-byte aligned.
struct SingleScaleBlock {
    int bytes;        // the block's size
    int scale_offset; // where its f16 d lies in the file's layout: 0 or bytes - 2
    int body_offset() const { return scale_offset == 0 ? 2 : 0; }
    int body_bytes() const { return bytes - 2; }
};
// The block of t, for the formats that have a scales-last layout; nullptr for the others.
const SingleScaleBlock* scales_last_block(Type t);
// Convert n_rows packed rows of K values of t (a format with a scales-last layout; K a whole
// number of blocks) between the file's layout and the scales-last one.
void rows_to_scales_last(Type t, const void* blocks, void* out, int64_t K, int64_t n_rows);
void rows_from_scales_last(Type t, const void* rows, void* blocks, int64_t K, int64_t n_rows);

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
