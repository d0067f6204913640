// Operand tile loads: 16-bit rows of the compute type go through cp.async; other float
// types are converted and q8_0/q4_0 rows (GGUF block layout) dequantized on the way into
// shared memory, so quantized caches are read once, in their compact form.
#pragma once

#include "fa_common.cuh"

namespace gfa::cuda::fa {

// Eight consecutive elements [e0, e0 + 8) of a quantized row, e0 a multiple of 8: fetched
// as raw 16-bit words first (the block's f16 scale and 4 words of quants; blocks are only
// 2-byte aligned), decoded later, so that a thread has several chunks' loads in flight.
struct QuantChunk {
    uint16_t d, w[4];
};
__device__ __forceinline__ QuantChunk fetch_quant8(const char* row, int e0, int code) {
    const int blk = e0 / 32, within = e0 % 32;
    const char* bp = row + blk * (code == kQ8_0 ? 34 : 18);
    // q8_0: 32 int8 after the scale; q4_0: element e < 16 in the low nibble of byte e,
    // e >= 16 in the high nibble of byte e - 16.
    const uint16_t* qs = reinterpret_cast<const uint16_t*>(bp + 2 + (code == kQ8_0 ? within : (within & 15)));
    QuantChunk c;
    c.d = *reinterpret_cast<const uint16_t*>(bp);
#pragma unroll
    for (int e = 0; e < 4; ++e) c.w[e] = qs[e];
    return c;
}
__device__ __forceinline__ void decode_quant8(const QuantChunk& c, int e0, int code, float (&x)[8]) {
    const float d = __half2float(__ushort_as_half(c.d));
    if (code == kQ8_0) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            x[2 * e] = d * float(int8_t(c.w[e] & 0xff));
            x[2 * e + 1] = d * float(int8_t(c.w[e] >> 8));
        }
    } else {
        const int shift = (e0 % 32) >= 16 ? 4 : 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            x[2 * e] = d * float(int((c.w[e] >> shift) & 0xf) - 8);
            x[2 * e + 1] = d * float(int((c.w[e] >> (8 + shift)) & 0xf) - 8);
        }
    }
}

// Loads rows [0, ROWS) x cols [0, COLS) of any operand tile into a swizzled shared tile of T.
// row_ptr(r) is the global address of row r (called for r < n_rows only); rows >= n_rows and
// columns >= n_cols are zero. code picks the path: T's own code (16-byte aligned rows) goes
// through cp.async; f32/f16/bf16 (kUnaligned set for 16-bit rows that cp.async cannot read)
// are converted through registers; q8_0/q4_0 are dequantized through registers.
template <class T, int NTHREADS, class Tile, class RowPtr>
__device__ __forceinline__ void load_any_tile(Tile tile, RowPtr row_ptr, int n_rows, int n_cols, int code,
                                              const void* any_valid_ptr) {
    constexpr int ROWS = Tile::kRows, COLS = Tile::kCols;
    if (code == Elem<T>::code) {
        load_tile_async<NTHREADS>(tile, row_ptr, n_rows, n_cols, any_valid_ptr);
        return;
    }
    const int plain = code & ~kUnaligned;
    if (plain <= kBF16) {
        load_tile_convert<T, NTHREADS>(tile, row_ptr, n_rows, n_cols, plain);
        return;
    }
    constexpr int kChunks = ROWS * (COLS / 8);
    constexpr int kBatch = 4; // chunks fetched before the first is decoded
    static_assert(kChunks % (NTHREADS * kBatch) == 0, "quantized tile chunks must divide evenly");
    for (int it0 = 0; it0 < kChunks / NTHREADS; it0 += kBatch) {
        QuantChunk raw[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            const int idx = (it0 + u) * NTHREADS + int(threadIdx.x);
            const int r = idx / (COLS / 8), c = idx % (COLS / 8);
            if (r < n_rows && c * 8 < n_cols)
                raw[u] = fetch_quant8(static_cast<const char*>(row_ptr(r)), c * 8, plain);
            else
                raw[u] = QuantChunk{0, {0, 0, 0, 0}};
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            const int idx = (it0 + u) * NTHREADS + int(threadIdx.x);
            const int r = idx / (COLS / 8), c = idx % (COLS / 8);
            float x[8];
            decode_quant8(raw[u], c * 8, plain, x);
            uint4 v;
            v.x = Elem<T>::pack(x[0], x[1]);
            v.y = Elem<T>::pack(x[2], x[3]);
            v.z = Elem<T>::pack(x[4], x[5]);
            v.w = Elem<T>::pack(x[6], x[7]);
            st_shared_v4(tile.chunk_addr(r, c), v);
        }
    }
}

// Where load_strided_tile's general path goes: inline (the quantized K/V of decoding take it
// on every tile), or out of line for kernels where it is rare (the backward's last query
// tile, non-native operand types) and would otherwise lend its index arithmetic to the
// compiler's scheduling of every step.
enum class GeneralPath { Inline, OutOfLine };

template <class T, int NTHREADS, class Tile>
__device__ __noinline__ void load_any_tile_out_of_line(Tile tile, const char* rows, int64_t stride,
                                                       int n_rows, int n_cols, int code) {
    load_any_tile<T, NTHREADS>(
        tile, [&](int r) { return rows + r * stride; }, n_rows, n_cols, code, rows);
}

// Loads a tile of rows that are `stride` bytes apart (K, V, and the Q/dO tiles of the
// backward). A whole tile already in the compute type (every row real, every column used)
// takes the streamlined path: each thread copies a fixed column chunk of rows r0, r0 + RPI,
// ..., so its global address advances by one stride step and its shared address by a
// constant (RPI is a multiple of the 8-row swizzle period), with no bounds checks. That
// matters: the general path spends about a dozen integer instructions per 16-byte copy,
// as many as the tensor-core work of the tile. Anything else goes through load_any_tile.
template <class T, int NTHREADS, GeneralPath kGeneral = GeneralPath::Inline, class Tile>
__device__ __forceinline__ void load_strided_tile(Tile tile, const char* rows, int64_t stride, int n_rows,
                                                  int n_cols, int code) {
    constexpr int ROWS = Tile::kRows, COLS = Tile::kCols;
    constexpr int kChunksPerRow = COLS / 8;
    constexpr int kRowsPerPass = NTHREADS / kChunksPerRow;
    if constexpr (NTHREADS % kChunksPerRow == 0 && kRowsPerPass % 8 == 0 && ROWS % kRowsPerPass == 0) {
        if (code == Elem<T>::code && n_rows == ROWS && n_cols == COLS) {
            const int c = int(threadIdx.x) % kChunksPerRow, r0 = int(threadIdx.x) / kChunksPerRow;
            const char* src = rows + r0 * stride + c * 16;
            const uint32_t dst = tile.chunk_addr(r0, c);
            const int64_t src_step = kRowsPerPass * stride;
#pragma unroll
            for (int pass = 0; pass < ROWS / kRowsPerPass; ++pass) {
                cp_async_16(dst + uint32_t(pass * kRowsPerPass * Tile::kRowPitch), src, true);
                src += src_step;
            }
            return;
        }
    }
    if constexpr (kGeneral == GeneralPath::OutOfLine)
        load_any_tile_out_of_line<T, NTHREADS>(tile, rows, stride, n_rows, n_cols, code);
    else
        load_any_tile<T, NTHREADS>(
            tile, [&](int r) { return rows + r * stride; }, n_rows, n_cols, code, rows);
}

} // namespace gfa::cuda::fa
