// Tile primitives shared by the FlashAttention kernels: 16-bit element types, shared-memory
// tiles with an XOR swizzle, cp.async tile loads, ldmatrix fragment loads and the
// m16n8k16 tensor-core product. Everything here is warp- or block-level and inlined.
//
// Fragment conventions (PTX ISA, mma.m16n8k16 with 16-bit inputs and fp32 accumulators):
// a lane is (g, t) = (lane / 4, lane % 4). The accumulator of a 16x8 tile holds
// c[0..1] = (row g, cols 2t, 2t+1) and c[2..3] = (row g+8, cols 2t, 2t+1). The A operand
// (16x16) holds a[0] = (row g, k 2t..), a[1] = (row g+8, k 2t..), a[2] = (row g, k 2t+8..),
// a[3] = (row g+8, k 2t+8..). The B operand (16x8) holds b[0] = (k 2t.., col g) and
// b[1] = (k 2t+8.., col g). Two accumulator tiles side by side are therefore exactly one A
// fragment: P = softmax(S) is fed to O += P V without leaving registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace gfa::cuda::fa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Storage type codes passed at run time (match the subset of gfa::Type we read/write).
// kUnaligned marks 16-bit rows whose addresses are not 16-byte aligned (no cp.async).
enum ElemCode : int { kF32 = 0, kF16 = 1, kBF16 = 2, kQ8_0 = 3, kQ4_0 = 4, kUnaligned = 16 };

// ---- 16-bit element types -------------------------------------------------------------

template <class T> struct Elem;
template <> struct Elem<__half> {
    static constexpr ElemCode code = kF16;
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
    static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
};
template <> struct Elem<__nv_bfloat16> {
    static constexpr ElemCode code = kBF16;
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
    static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// Reads element i of a row stored as f32, f16 or bf16.
__device__ __forceinline__ float load_elem(const void* row, int64_t i, int code) {
    if (code == kF32) return static_cast<const float*>(row)[i];
    if (code == kF16) return __half2float(static_cast<const __half*>(row)[i]);
    return __bfloat162float(static_cast<const __nv_bfloat16*>(row)[i]);
}

// One f32 or f16 element (an additive mask's) as a float.
__device__ __forceinline__ float to_f32(float x) {
    return x;
}
__device__ __forceinline__ float to_f32(__half x) {
    return __half2float(x);
}

// Elements i .. i + 7 of a row stored as S, as their raw bits: bits[0] holds them for 16-bit
// S, bits[0..1] for f32. VEC: the row start is 16-byte aligned and i a multiple of 8, so they
// come in 16-byte loads; else one element at a time. Kept apart from the conversion
// (bits8_to_float) so that a caller can issue loads, do other work, then convert.
template <class S, bool VEC>
__device__ __forceinline__ void load8_bits(const void* row, int i, uint4 (&bits)[2]) {
    const S* p = static_cast<const S*>(row) + i;
    if constexpr (VEC) {
        bits[0] = reinterpret_cast<const uint4*>(p)[0];
        if constexpr (sizeof(S) == 4) bits[1] = reinterpret_cast<const uint4*>(p)[1];
    } else if constexpr (sizeof(S) == 4) {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(p);
        bits[0] = make_uint4(w[0], w[1], w[2], w[3]);
        bits[1] = make_uint4(w[4], w[5], w[6], w[7]);
    } else {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
        auto two = [&](int e) { return uint32_t(h[e]) | uint32_t(h[e + 1]) << 16; };
        bits[0] = make_uint4(two(0), two(2), two(4), two(6));
    }
}
template <class S> __device__ __forceinline__ void bits8_to_float(const uint4 (&bits)[2], float (&x)[8]) {
    if constexpr (sizeof(S) == 4) {
        const uint32_t w[8] = {bits[0].x, bits[0].y, bits[0].z, bits[0].w,
                               bits[1].x, bits[1].y, bits[1].z, bits[1].w};
#pragma unroll
        for (int e = 0; e < 8; ++e) x[e] = __uint_as_float(w[e]);
    } else {
        const uint32_t w[4] = {bits[0].x, bits[0].y, bits[0].z, bits[0].w};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const uint16_t h = uint16_t((e & 1) ? w[e >> 1] >> 16 : w[e >> 1] & 0xffffu);
            if constexpr (std::is_same_v<S, __half>)
                x[e] = __half2float(__ushort_as_half(h));
            else
                x[e] = __bfloat162float(__ushort_as_bfloat16(h));
        }
    }
}

// Writes two adjacent elements (i, i+1) of a row stored as f32, f16 or bf16; the row start
// and i are even, so the pair is naturally aligned.
__device__ __forceinline__ void store_pair(void* row, int64_t i, float x0, float x1, int code) {
    if (code == kF32) {
        *reinterpret_cast<float2*>(static_cast<float*>(row) + i) = make_float2(x0, x1);
    } else if (code == kF16) {
        *reinterpret_cast<__half2*>(static_cast<__half*>(row) + i) = __floats2half2_rn(x0, x1);
    } else {
        *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(row) + i) =
            __floats2bfloat162_rn(x0, x1);
    }
}
__device__ __forceinline__ void store_elem(void* row, int64_t i, float x, int code) {
    if (code == kF32)
        static_cast<float*>(row)[i] = x;
    else if (code == kF16)
        static_cast<__half*>(row)[i] = __float2half_rn(x);
    else
        static_cast<__nv_bfloat16*>(row)[i] = __float2bfloat16_rn(x);
}

// ---- shared-memory tiles ----------------------------------------------------------------

// A ROWS x COLS tile of 16-bit elements. Each row is COLS/8 chunks of 16 bytes; chunk c of
// row r lives at chunk c ^ (r % 8), so the 8 rows an ldmatrix phase reads (same logical
// chunk, consecutive rows) land in 8 different bank groups. COLS is a multiple of 64, and
// the base a multiple of 128 bytes (frag_addr relies on both).
template <int ROWS, int COLS> struct SmemTile {
    static_assert(COLS % 64 == 0, "swizzled tiles need rows of whole 128-byte groups");
    static constexpr int kRows = ROWS, kCols = COLS;
    static constexpr int kChunksPerRow = COLS / 8;
    static constexpr int kBytes = ROWS * COLS * 2;
    static constexpr int kRowPitch = COLS * 2; // bytes from a chunk to the same chunk of the next row
    uint32_t base;                             // shared-space address

    __device__ __forceinline__ uint32_t chunk_addr(int row, int chunk) const {
        return base + uint32_t(row * (COLS * 2) + ((chunk ^ (row & 7)) << 4));
    }
    // Address of the 32-bit pair (row, col) with col even.
    __device__ __forceinline__ uint32_t pair_addr(int row, int col) const {
        return chunk_addr(row, col >> 3) + uint32_t((col & 7) * 2);
    }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- global -> shared copies ---------------------------------------------------------------

// 16-byte asynchronous copy; when !valid the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint4 v) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w));
}
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v));
}

// Stores four 8x8 16-bit matrices, ldmatrix's inverse (Hopper): lanes 8i..8i+7 give the row
// addresses of matrix i, and register i of lane l holds row l/4, columns 2(l%4), 2(l%4)+1 of
// matrix i, the layout of an mma accumulator's packed pairs. One instruction replaces four
// 32-bit stores per lane.
// sm_90 and later only.
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2,
                                            uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0),
                 "r"(r1), "r"(r2), "r"(r3));
}

// Loads rows [0, ROWS) x cols [0, COLS) of a row-major 16-bit matrix into a swizzled tile
// with cp.async. row_ptr(r) gives the global address of row r (only called for r < n_rows);
// rows >= n_rows and columns >= n_cols (a multiple of 8) are zero-filled.
template <int NTHREADS, class Tile, class RowPtr>
__device__ __forceinline__ void load_tile_async(Tile tile, RowPtr row_ptr, int n_rows, int n_cols,
                                                const void* any_valid_ptr) {
    constexpr int ROWS = Tile::kRows, COLS = Tile::kCols;
    constexpr int kChunks = ROWS * (COLS / 8);
    static_assert(kChunks % NTHREADS == 0, "tile chunks must divide evenly among threads");
#pragma unroll
    for (int it = 0; it < kChunks / NTHREADS; ++it) {
        const int idx = it * NTHREADS + int(threadIdx.x);
        const int r = idx / (COLS / 8), c = idx % (COLS / 8);
        const bool valid = r < n_rows && c * 8 < n_cols;
        const void* src =
            valid ? static_cast<const void*>(static_cast<const char*>(row_ptr(r)) + c * 16) : any_valid_ptr;
        cp_async_16(tile.chunk_addr(r, c), src, valid);
    }
}

// The same with a conversion: the source rows hold f32, f16 or bf16 (code) and are
// converted to T on the way. Synchronous (plain loads + st.shared); used for tiles that are
// read once per block, such as Q when its storage type differs from the compute type.
template <class T, int NTHREADS, class Tile, class RowPtr>
__device__ __forceinline__ void load_tile_convert(Tile tile, RowPtr row_ptr, int n_rows, int n_cols,
                                                  int code) {
    constexpr int ROWS = Tile::kRows, COLS = Tile::kCols;
    constexpr int kChunks = ROWS * (COLS / 8);
    for (int idx = int(threadIdx.x); idx < kChunks; idx += NTHREADS) {
        const int r = idx / (COLS / 8), c = idx % (COLS / 8);
        float x[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) x[e] = 0.0f;
        if (r < n_rows && c * 8 < n_cols) {
            const void* row = row_ptr(r);
#pragma unroll
            for (int e = 0; e < 8; ++e) x[e] = load_elem(row, c * 8 + e, code);
        }
        uint4 v;
        v.x = Elem<T>::pack(x[0], x[1]);
        v.y = Elem<T>::pack(x[2], x[3]);
        v.z = Elem<T>::pack(x[4], x[5]);
        v.w = Elem<T>::pack(x[6], x[7]);
        st_shared_v4(tile.chunk_addr(r, c), v);
    }
}

// ---- shared -> registers --------------------------------------------------------------------

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// ldmatrix addresses. Each lane points at row (row0 + lr) and chunk (c0 + lc) of a tile, with
// lr, lc fixed per lane, row0 a multiple of 8 and c0 even, lc in {0, 1}. Then
// (c0 + lc) ^ (row % 8) == c0 ^ x with x = lc ^ (lr % 8) < 8. Tile bases and rows are
// multiples of 128 bytes, so in lane_addr = base + lr * row_bytes + 16 x the bits 4..6 are
// x alone, and the address is lane_addr ^ 16 (c0 & 7) plus a multiple of 128 known at
// compile time in unrolled loops: one XOR per distinct (c0 & 7), not two additions.
template <int R, int C>
__device__ __forceinline__ uint32_t frag_addr(SmemTile<R, C> t, int lr, int lc, int row0, int c0) {
    const int x = lc ^ (lr & 7);
    const uint32_t lane_addr = t.base + uint32_t(lr * (C * 2) + (x << 4));
    return (lane_addr ^ uint32_t((c0 & 7) << 4)) + uint32_t(row0 * (C * 2) + ((c0 & ~7) << 4));
}

// A fragment of the 16x16 block at (row0, col0) of a tile stored row-major (rows = M).
template <int R, int C>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], SmemTile<R, C> t, int row0, int col0) {
    const int lane = int(threadIdx.x) & 31;
    ldmatrix_x4(a, frag_addr(t, lane & 15, lane >> 4, row0, col0 >> 3));
}
// A fragment of the 16x16 block whose rows are tile columns col0.. and whose k are tile rows
// row0.. (the tile stores A transposed).
template <int R, int C>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], SmemTile<R, C> t, int row0, int col0) {
    const int lane = int(threadIdx.x) & 31;
    ldmatrix_x4_trans(a, frag_addr(t, (lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1, row0, col0 >> 3));
}
// B fragments of two adjacent n-tiles (n0.., n0+8..) x k16 at k0, from a tile that stores
// B^T row-major (rows = n, cols = k), e.g. K for S = Q K^T. b[0..1] for n0, b[2..3] for n0+8.
template <int R, int C>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], SmemTile<R, C> t, int n0, int k0) {
    const int lane = int(threadIdx.x) & 31;
    ldmatrix_x4(b, frag_addr(t, (lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1, n0, k0 >> 3));
}
// B fragments of two adjacent n-tiles from a tile that stores B row-major (rows = k,
// cols = n), e.g. V for O = P V: ldmatrix.trans makes V^T a layout, not a copy.
template <int R, int C>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], SmemTile<R, C> t, int k0, int n0) {
    const int lane = int(threadIdx.x) & 31;
    ldmatrix_x4_trans(b, frag_addr(t, (lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4, k0, n0 >> 3));
}

// ---- tensor cores -------------------------------------------------------------------------

template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (Elem<T>::code == kF16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// The A fragment for k-step kk made of accumulator tiles 2kk and 2kk+1 (see top comment).
template <class T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = Elem<T>::pack(lo[0], lo[1]);
    a[1] = Elem<T>::pack(lo[2], lo[3]);
    a[2] = Elem<T>::pack(hi[0], hi[1]);
    a[3] = Elem<T>::pack(hi[2], hi[3]);
}

// ---- quad reductions (the 4 lanes that share an accumulator row) ---------------------------

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

} // namespace gfa::cuda::fa
