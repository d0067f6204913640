// Operand tile loads: 16-bit rows of the compute type go through cp.async; other float
// types are converted and q8_0/q4_0 rows (GGUF block layout) dequantized on the way into
// shared memory, so quantized caches are read once, in their compact form.
#pragma once

#include "fa_common.cuh"

namespace gfa::cuda::fa {

// Eight consecutive elements [e0, e0 + 8) of a quantized row, e0 a multiple of 8.
__device__ __forceinline__ void dequant8(const char* row, int e0, int code, float (&x)[8]) {
    const int blk = e0 / 32, within = e0 % 32;
    if (code == kQ8_0) {
        const char* bp = row + blk * 34; // f16 scale + 32 x int8
        const float d = __half2float(*reinterpret_cast<const __half*>(bp));
        const uint16_t* qs = reinterpret_cast<const uint16_t*>(bp + 2 + within); // 2-byte aligned
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const uint16_t w = qs[e];
            x[2 * e] = d * float(int8_t(w & 0xff));
            x[2 * e + 1] = d * float(int8_t(w >> 8));
        }
    } else { // q4_0: element e < 16 in the low nibble of byte e, e >= 16 in the high nibble of byte e - 16
        const char* bp = row + blk * 18;
        const float d = __half2float(*reinterpret_cast<const __half*>(bp));
        const uint16_t* qs = reinterpret_cast<const uint16_t*>(bp + 2 + (within & 15));
        const int shift = within >= 16 ? 4 : 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const uint16_t w = qs[e];
            x[2 * e] = d * float(int((w >> shift) & 0xf) - 8);
            x[2 * e + 1] = d * float(int((w >> (8 + shift)) & 0xf) - 8);
        }
    }
}

// Loads rows [0, ROWS) x cols [0, COLS) of any operand tile into a swizzled shared tile of T.
// row_ptr(r) is the global address of row r (called for r < n_rows only); rows >= n_rows and
// columns >= n_cols are zero. code picks the path: T's own code (16-byte aligned rows) goes
// through cp.async; f32/f16/bf16 (kUnaligned set for 16-bit rows that cp.async cannot read)
// are converted through registers; q8_0/q4_0 are dequantized through registers.
template <class T, int NTHREADS, int ROWS, int COLS, class RowPtr>
__device__ __forceinline__ void load_any_tile(SmemTile<ROWS, COLS> tile, RowPtr row_ptr, int n_rows, int n_cols,
                                              int code, const void* any_valid_ptr) {
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
    for (int idx = int(threadIdx.x); idx < kChunks; idx += NTHREADS) {
        const int r = idx / (COLS / 8), c = idx % (COLS / 8);
        float x[8];
        if (r < n_rows && c * 8 < n_cols) {
            dequant8(static_cast<const char*>(row_ptr(r)), c * 8, plain, x);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) x[e] = 0.0f;
        }
        uint4 v;
        v.x = Elem<T>::pack(x[0], x[1]);
        v.y = Elem<T>::pack(x[2], x[3]);
        v.z = Elem<T>::pack(x[4], x[5]);
        v.w = Elem<T>::pack(x[6], x[7]);
        st_shared_v4(tile.chunk_addr(r, c), v);
    }
}

} // namespace gfa::cuda::fa
