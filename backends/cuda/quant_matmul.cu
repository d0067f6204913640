// Quantized weights times f32 columns (see quant_matmul.h).
//
// Decoding (N <= 8) is bound by reading the weights once, so the kernel is built around the
// loads: one warp per output row (2 or 4 for rows too long for one pass, matvec_rows.cuh),
// its lanes reading consecutive pieces of the row's blocks (a warp instruction covers a
// contiguous stretch of the row), with the widest loads the row's alignment allows; at one
// column the q4_K and q6_K items load the column values they meet with their own bytes
// (column fetching, below). The columns of b are
// first quantized to int8 in blocks of 32 (as llama.cpp's q8_1), so that each 4 weights meet 4 activations in
// one __dp4a: the integer dot products keep the arithmetic far below the load rate, which fp32 FMAs (plus the
// int-to-float conversions of every weight) would not at N > 1. Formats with an offset
// (q4_0's -8, x = d q + m, the K formats' subtracted mins) take the offset term from the sum
// of each 32-block of the rounded b. Error: the int8 rounding of b, about 0.4% of the size of
// the result for uniform data (the CPU's integer path for q8_0/q4_0 does the same).
//
// Prefill (N > 8) dequantizes a to f16 (exact values, then rounded) for cuBLAS.
#include "cuda_device.cuh"
#include "early_launch.cuh"
#include "int8_columns.cuh"
#include "matvec_rows.cuh"
#include "quant_matmul.h"

#include <climits>
#include <cstdlib>
#include <cstring>
#include <tuple>

namespace gfa::cuda {

namespace {

constexpr int kMatvecWarps = 4;
// Blocks per SM the register budget must allow: for one column 8 (64 registers a thread,
// 32 warps per SM, enough loads in flight); more columns need more accumulators, and the
// items of q5_K and q3_K (codes plus a high bit each) more registers (they spilled at 64).
constexpr int matvec_min_blocks(int type, int columns) {
    const int blocks = columns <= 1 ? 8 : columns <= 2 ? 6 : 4;
    return (type == kQ5_K || type == kQ3_K) && blocks > 6 ? 6 : blocks;
}
constexpr int kDequantThreads = 128;

size_t align16(size_t v) {
    return (v + 15) / 16 * 16;
}

// The quantized columns of the matrix a warp works on: column c's int8 values at
// q + c * q_stride, its (scale, sum) pairs per block of 32 at ds + c * ds_stride.
struct Columns {
    const int8_t* q;
    const float2* ds;
    int64_t q_stride, ds_stride;
    int n;
};

__device__ __forceinline__ uint2 x8(const Columns& x, int c, int64_t k) {
    return __ldg(reinterpret_cast<const uint2*>(x.q + c * x.q_stride + k));
}
__device__ __forceinline__ uint4 x16(const Columns& x, int c, int64_t k) {
    return __ldg(reinterpret_cast<const uint4*>(x.q + c * x.q_stride + k));
}
__device__ __forceinline__ float2 xds(const Columns& x, int c, int64_t block32) {
    return __ldg(x.ds + c * x.ds_stride + block32);
}
// The pairs of blocks block32 and block32 + 1 in one 16-byte load (block32 even: the pairs
// start 16-byte aligned, and a column's K / 32 pairs are an even number where K % 256 == 0).
__device__ __forceinline__ float4 xds_two(const Columns& x, int c, int64_t block32) {
    return __ldg(reinterpret_cast<const float4*>(x.ds + c * x.ds_stride + block32));
}

__device__ __forceinline__ int dot8(uint32_t w0, uint32_t w1, uint2 v, int acc) {
    return __dp4a(int(w1), int(v.y), __dp4a(int(w0), int(v.x), acc));
}
__device__ __forceinline__ int dot16(const uint32_t (&w)[4], uint4 v) {
    return __dp4a(int(w[3]), int(v.w),
                  __dp4a(int(w[2]), int(v.z), __dp4a(int(w[1]), int(v.y), __dp4a(int(w[0]), int(v.x), 0))));
}

__device__ __forceinline__ float f16_low(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
__device__ __forceinline__ float f16_high(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}

// Bit i of b (i < 4) to bit 4 of byte i: the fifth bits of four Q5_0 / Q5_1 values.
__device__ __forceinline__ uint32_t fifth_bits(uint32_t b) {
    return ((b & 1u) << 4) | ((b & 2u) << 11) | ((b & 4u) << 18) | ((b & 8u) << 25);
}

// Scales and mins of sub-blocks j and j + 1 (j even) from the 12 packed bytes of a Q4_K /
// Q5_K block, as words, each as two bytes (sub-block j in the low one). Both sub-blocks are
// among the first four (6-bit values in the low bits of bytes j, j + 1 of words 0 and 1) or
// both among the last four (low 4 bits in word 2, high 2 in the top bits of words 0 and 1),
// so one select picks the rule without a branch: the eight lanes of a block take both halves,
// and a branch on the half diverged in every warp.
__device__ __forceinline__ void scale_min_pairs(const uint32_t (&s)[3], int j, uint32_t& scales,
                                                uint32_t& mins) {
    const uint32_t shift = 8u * uint32_t(j & 3); // 0 or 16
    const uint32_t a = (s[0] >> shift) & 0xffffu, b = (s[1] >> shift) & 0xffffu,
                   c = (s[2] >> shift) & 0xffffu;
    const bool first_four = j < 4;
    scales = first_four ? a & 0x3f3fu : (c & 0x0f0fu) | ((a & 0xc0c0u) >> 2);
    mins = first_four ? b & 0x3f3fu : ((c >> 4) & 0x0f0fu) | ((b & 0xc0c0u) >> 2);
}

// u < 2^23 as a float without a conversion instruction (those issue at a quarter of the
// rate of the arithmetic around them): u in the mantissa of 2^23, less 2^23.
__device__ __forceinline__ float small_to_float(uint32_t u) {
    return __uint_as_float(0x4b000000u | u) - 8388608.0f;
}

constexpr int min_int(int a, int b) {
    return a < b ? a : b;
}

// ---- one lane's share of a block ----------------------------------------------------------
//
// Item<T, A>: kParts lanes share a block (consecutive lanes, consecutive bytes). load() reads
// the lane's bytes of the block at blk (a row whose base and strides are A-byte aligned);
// dot() adds their products with every column to acc. kUnroll items are loaded before any is
// used, so that several loads per lane are in flight.

template <int T, int A> struct Item;

// q8_0: four lanes per block, 8 values each.
template <int A> struct Item<kQ8_0, A> {
    static constexpr int kParts = 4, kUnroll = 4;
    uint32_t q[2];
    float d;
    __device__ __forceinline__ void load(const char* blk, int part) {
        d = f16_bits_at(blk);
        load_words<2, 2>(blk + 2 + 8 * part, q);
    }
    template <int NC>
    __device__ __forceinline__ void dot(const Columns& x, int64_t ib, int part, float (&acc)[NC]) const {
        const int64_t k = 32 * ib + 8 * part;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            if (c >= x.n) break;
            const float2 ds = xds(x, c, ib);
            acc[c] += d * ds.x * float(dot8(q[0], q[1], x8(x, c, k), 0));
        }
    }
};

// The scales-last layouts (a weights buffer, cuda_common.h) give each item its block's body,
// as aligned as the row (up to A), and the block's scale from the row's end.

// q8_0 with the scales last: two lanes per block, each taking 16 of its values in one 16-byte
// load where the row is 16-byte aligned (K % 256 == 0); the two lanes of a block read the same
// 2-byte scale, a warp's 16 blocks have theirs in one 32-byte sector. The file's layout takes
// five 2-byte loads for 8 values.
template <int A> struct Item<kQ8_0ScalesLast, A> {
    static constexpr int kParts = 2, kUnroll = 4;
    uint32_t q[4];
    float d;
    __device__ __forceinline__ void load(const char* body, const char* scale, int part) {
        load_words<A, 4>(body + 16 * part, q);
        d = f16_bits_at(scale);
    }
    template <int NC>
    __device__ __forceinline__ void dot(const Columns& x, int64_t ib, int part, float (&acc)[NC]) const {
        const int64_t k = 32 * ib + 16 * part;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            if (c >= x.n) break;
            acc[c] += d * xds(x, c, ib).x * float(dot16(q, x16(x, c, k)));
        }
    }
};

// q4_0, iq4_nl and q5_0 with the scales last: two lanes per block, as in the file's layout
// (lane `part` takes nibble bytes 8 part .. 8 part + 7: values 8 part + (0..7) in the low
// nibbles, 16 + 8 part + (0..7) in the high ones; q5_0's body starts with its 4-byte qh), but
// in one 8-byte load where the row is 8-byte aligned (q4_0, iq4_nl: 16-byte bodies) or two
// 4-byte ones (q5_0: 20-byte bodies) instead of 2-byte loads. (One lane per block with a
// 16-byte load spilled at the deeper pass within 64 registers.)
template <int T, int A> struct ItemNibblesScalesLast {
    static constexpr bool kFiveBits = T == kQ5_0ScalesLast;
    static constexpr int kQs = kFiveBits ? 4 : 0; // the nibbles' offset in the body
    static constexpr int kAlignQs = min_int(A, kFiveBits ? 4 : 8);
    static constexpr int kParts = 2, kUnroll = 4;
    uint32_t q[2], qh;
    float d;
    __device__ __forceinline__ void load(const char* body, const char* scale, int part) {
        if constexpr (kFiveBits) {
            uint32_t w[1];
            load_words<kAlignQs, 1>(body, w);
            qh = w[0];
        }
        load_words<kAlignQs, 2>(body + kQs + 8 * part, q);
        d = f16_bits_at(scale);
    }
    template <int NC>
    __device__ __forceinline__ void dot(const Columns& x, int64_t ib, int part, float (&acc)[NC]) const {
        uint32_t lo[2], hi[2];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            if constexpr (T == kIQ4_NLScalesLast) {
                iq4_levels8(q[k], lo[k], hi[k]);
                continue;
            }
            lo[k] = q[k] & 0x0f0f0f0fu;
            hi[k] = (q[k] >> 4) & 0x0f0f0f0fu;
            if constexpr (kFiveBits) {
                lo[k] |= fifth_bits((qh >> (8 * part + 4 * k)) & 0xfu);
                hi[k] |= fifth_bits((qh >> (16 + 8 * part + 4 * k)) & 0xfu);
            }
        }
        // q4_0 / q5_0 values are d (q - 8) / d (q - 16): each of the block's two lanes adds half
        // of the offset -8 d / -16 d times the block's column sum; iq4_nl's levels are signed.
        constexpr float kHalfOffset = T == kQ4_0ScalesLast ? -4.0f : T == kQ5_0ScalesLast ? -8.0f : 0.0f;
        const int64_t k = 32 * ib + 8 * part;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            if (c >= x.n) break;
            const float2 ds = xds(x, c, ib);
            const int s = dot8(hi[0], hi[1], x8(x, c, k + 16), dot8(lo[0], lo[1], x8(x, c, k), 0));
            if constexpr (kHalfOffset != 0.0f)
                acc[c] += d * ds.x * float(s) + kHalfOffset * d * ds.y;
            else
                acc[c] += d * ds.x * float(s);
        }
    }
};
template <int A> struct Item<kQ4_0ScalesLast, A> : ItemNibblesScalesLast<kQ4_0ScalesLast, A> {};
template <int A> struct Item<kQ5_0ScalesLast, A> : ItemNibblesScalesLast<kQ5_0ScalesLast, A> {};
template <int A> struct Item<kIQ4_NLScalesLast, A> : ItemNibblesScalesLast<kIQ4_NLScalesLast, A> {};

// q4_0, q4_1, q5_0, q5_1: two lanes per block; lane `part` takes qs bytes 8 part .. 8 part + 7,
// i.e. values 8 part + (0..7) (low nibbles) and 16 + 8 part + (0..7) (high nibbles).
template <int T, int A> struct Item32 {
    static constexpr bool kHasMin = T == kQ4_1 || T == kQ5_1;
    static constexpr bool kFiveBits = T == kQ5_0 || T == kQ5_1;
    static constexpr int kHead = kHasMin ? 4 : 2;             // d (and m)
    static constexpr int kQs = kFiveBits ? kHead + 4 : kHead; // after qh
    static constexpr int kAlignQs = min_int(A, kQs % 8 == 0 ? 8 : kQs % 4 == 0 ? 4 : 2);
    static constexpr int kParts = 2, kUnroll = 4;
    uint32_t q[2], head, qh;
    __device__ __forceinline__ void load(const char* blk, int part) {
        // d and m (offset 0), and q5_1's qh (offset 4), are 4-aligned; q5_0's qh is not.
        constexpr int kAlignHead = min_int(A, kHasMin ? 4 : 2);
        if constexpr (kHasMin) {
            uint32_t w[1];
            load_words<kAlignHead, 1>(blk, w);
            head = w[0];
        } else {
            head = __ldg(reinterpret_cast<const unsigned short*>(blk));
        }
        if constexpr (kFiveBits) {
            uint32_t w[1];
            load_words<kAlignHead, 1>(blk + kHead, w);
            qh = w[0];
        }
        load_words<kAlignQs, 2>(blk + kQs + 8 * part, q);
    }
    template <int NC>
    __device__ __forceinline__ void dot(const Columns& x, int64_t ib, int part, float (&acc)[NC]) const {
        uint32_t lo[2], hi[2];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            lo[k] = q[k] & 0x0f0f0f0fu;
            hi[k] = (q[k] >> 4) & 0x0f0f0f0fu;
            if constexpr (kFiveBits) {
                lo[k] |= fifth_bits((qh >> (8 * part + 4 * k)) & 0xfu);
                hi[k] |= fifth_bits((qh >> (16 + 8 * part + 4 * k)) & 0xfu);
            }
        }
        const float d = f16_low(head);
        // The offset applies to all 32 values of the block; each of the two lanes adds half.
        // q4_0 / q5_0 values are d (q - 8) / d (q - 16): an offset of -8 d / -16 d.
        const float offset = kHasMin ? 0.5f * f16_high(head) : (T == kQ4_0 ? -4.0f : -8.0f) * d;
        const int64_t k = 32 * ib + 8 * part;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            if (c >= x.n) break;
            const float2 ds = xds(x, c, ib);
            const int s = dot8(hi[0], hi[1], x8(x, c, k + 16), dot8(lo[0], lo[1], x8(x, c, k), 0));
            acc[c] += d * ds.x * float(s) + offset * ds.y;
        }
    }
};
template <int A> struct Item<kQ4_0, A> : Item32<kQ4_0, A> {};
template <int A> struct Item<kQ4_1, A> : Item32<kQ4_1, A> {};
template <int A> struct Item<kQ5_0, A> : Item32<kQ5_0, A> {};
template <int A> struct Item<kQ5_1, A> : Item32<kQ5_1, A> {};

// Items with a Piece (the column values and scales their codes meet) compute through
// Item::dot_with(acc, part, n, piece_of), which takes column c's piece from piece_of(c): dot()
// loads each column's piece as it goes, dot_piece() takes one loaded together with the item
// (quant_matvec_kernel's column fetching).
template <class Item> struct PieceDots {
    template <class Piece> __device__ __forceinline__ float dot_piece(const Piece& p, int part) const {
        float acc[1] = {0.0f};
        self().dot_with(acc, part, 1, [&](int) { return p; });
        return acc[0];
    }
    template <int NC>
    __device__ __forceinline__ void dot(const Columns& x, int64_t ib, int part, float (&acc)[NC]) const {
        self().dot_with(acc, part, x.n, [&](int c) { return Item::piece(x, c, ib, part); });
    }

  private:
    __device__ __forceinline__ const Item& self() const { return static_cast<const Item&>(*this); }
};

// q4_K, q5_K: eight lanes per block; lane `part` takes qs bytes 16 part .. 16 part + 15: in
// 32-byte chunk c = part / 2, values 16 h .. 16 h + 15 (h = part % 2) of sub-blocks 2c (low
// nibbles) and 2c + 1 (high nibbles), and for q5_K the qh bytes of the same 16 positions.
template <int T, int A> struct ItemK : PieceDots<ItemK<T, A>> {
    static constexpr bool kFiveBits = T == kQ5_K;
    static constexpr int kQs = kFiveBits ? 48 : 16;
    static constexpr int kAlign16 = min_int(A, 16);
    static constexpr int kParts = 8, kUnroll = 2;
    uint32_t q[4], qh[kFiveBits ? 4 : 1], scales[3], head;
    __device__ __forceinline__ void load(const char* blk, int part) {
        uint32_t w[4]; // d and dmin, then the 12 bytes of scales and mins: one load where aligned
        load_words<kAlign16, 4>(blk, w);
        head = w[0];
        scales[0] = w[1];
        scales[1] = w[2];
        scales[2] = w[3];
        load_words<kAlign16, 4>(blk + kQs + 16 * part, q);
        if constexpr (kFiveBits) load_words<kAlign16, 4>(blk + 16 + 16 * (part & 1), qh);
    }
    // The column values the lane's codes meet (16 of sub-block j0, 16 of j1) and both
    // sub-blocks' (scale, sum) pairs. q5_K does not fetch them with its items: with its high
    // bits held too, three of four product shapes ran 2-6% slower that way (H100).
    struct Piece {
        uint4 lo, hi;
        float4 ds;
    };
    static constexpr int kPieceMaxUnroll = kFiveBits ? 0 : 2;
    __device__ __forceinline__ static Piece piece(const Columns& x, int c, int64_t ib, int part) {
        const int j0 = 2 * (part >> 1);
        const int64_t k0 = 256 * ib + 32 * j0 + 16 * (part & 1);
        return {x16(x, c, k0), x16(x, c, k0 + 32), xds_two(x, c, 8 * ib + j0)};
    }
    // Adds the products with each column c < min(NC, n), its piece from piece_of(c).
    template <int NC, class P>
    __device__ __forceinline__ void dot_with(float (&acc)[NC], int part, int n, P&& piece_of) const {
        const int j0 = 2 * (part >> 1), j1 = j0 + 1;
        uint32_t lo[4], hi[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            lo[k] = q[k] & 0x0f0f0f0fu;
            hi[k] = (q[k] >> 4) & 0x0f0f0f0fu;
            if constexpr (kFiveBits) {
                lo[k] |= ((qh[k] >> j0) & 0x01010101u) << 4;
                hi[k] |= ((qh[k] >> j1) & 0x01010101u) << 4;
            }
        }
        uint32_t sc, mn;
        scale_min_pairs(scales, j0, sc, mn);
        const int sc0 = int(sc & 0xffu), sc1 = int(sc >> 8);
        const float d = f16_low(head);
        // Each sub-block's min is shared by two lanes: each subtracts half.
        const float half_dmin = 0.5f * f16_high(head);
        const float min0 = small_to_float(mn & 0xffu), min1 = small_to_float(mn >> 8);
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            if (c >= n) break;
            const Piece p = piece_of(c);
            const float4 ds = p.ds; // sub-blocks j0 and j1
            // |sum| <= 16 * 31 * 127 and scales < 64: the integer products are exact.
            const int s0 = sc0 * dot16(lo, p.lo), s1 = sc1 * dot16(hi, p.hi);
            acc[c] += d * (ds.x * float(s0) + ds.z * float(s1)) - half_dmin * (ds.y * min0 + ds.w * min1);
        }
    }
};
template <int A> struct Item<kQ4_K, A> : ItemK<kQ4_K, A> {};
template <int A> struct Item<kQ5_K, A> : ItemK<kQ5_K, A> {};

// (q - 32) for four 6-bit values q, one per byte, as signed bytes: q ^ 32 is q - 32 in six-bit
// two's complement; copying its bit 5 into bits 6 and 7 sign-extends it.
__device__ __forceinline__ uint32_t centered_six_bits(uint32_t q) {
    const uint32_t t = q ^ 0x20202020u, sign = t & 0x20202020u;
    return t | (sign << 1) | (sign << 2);
}

// q6_K: eight lanes per block; lane part = 4 hf + s takes ql bytes 16 part .. 16 part + 15 of
// half hf: values 16 s + (0..15) of the half (low nibbles) and 64 + 16 s + (0..15) (high
// nibbles), whose two high bits both sit in qh bytes 32 hf + 16 (s % 2) + (0..15). The body
// (all but the scale d) is A-byte aligned: 2 in the file's 210-byte blocks, up to 16 with the
// scales last.
template <int A> struct ItemQ6K : PieceDots<ItemQ6K<A>> {
    static constexpr int kParts = 8, kUnroll = 2;
    uint32_t ql[4], qh[4];
    int sc_lo, sc_hi;
    float d;
    __device__ __forceinline__ void load(const char* body, const char* scale, int part) {
        const int hf = part >> 2, s = part & 3;
        load_words<A, 4>(body + 16 * part, ql);
        load_words<A, 4>(body + 128 + 32 * hf + 16 * (s & 1), qh);
        const signed char* scales = reinterpret_cast<const signed char*>(body + 192 + 8 * hf + s);
        sc_lo = __ldg(scales);
        sc_hi = __ldg(scales + 4);
        d = f16_bits_at(scale);
    }
    // The column values the lane's codes meet (16 of the half's low run, 16 of its high run)
    // and the scales of their blocks of 32.
    struct Piece {
        uint4 lo, hi;
        float scale_lo, scale_hi;
    };
    static constexpr int kPieceMaxUnroll = 2;
    __device__ __forceinline__ static Piece piece(const Columns& x, int c, int64_t ib, int part) {
        const int64_t k_lo = 256 * ib + 128 * (part >> 2) + 16 * (part & 3), k_hi = k_lo + 64;
        return {x16(x, c, k_lo), x16(x, c, k_hi), xds(x, c, k_lo / 32).x, xds(x, c, k_hi / 32).x};
    }
    // Adds the products with each column c < min(NC, n), its piece from piece_of(c).
    template <int NC, class P>
    __device__ __forceinline__ void dot_with(float (&acc)[NC], int part, int n, P&& piece_of) const {
        const int s = part & 3, t = s >> 1;
        // With one or two columns the codes stay unsigned (0..63, valid signed bytes as well)
        // and each product takes the -32 as four more __dp4a with -32 in every byte, fewer
        // instructions than centering eight words; with more columns centering once is cheaper.
        constexpr bool kCenter = NC > 2;
        uint32_t lo[4], hi[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            lo[k] = (ql[k] & 0x0f0f0f0fu) | (((qh[k] >> (2 * t)) & 0x03030303u) << 4);
            hi[k] = ((ql[k] >> 4) & 0x0f0f0f0fu) | (((qh[k] >> (4 + 2 * t)) & 0x03030303u) << 4);
            if constexpr (kCenter) {
                lo[k] = centered_six_bits(lo[k]);
                hi[k] = centered_six_bits(hi[k]);
            }
        }
        auto centered_dot = [](const uint32_t(&w)[4], uint4 v) {
            if constexpr (kCenter) return dot16(w, v);
            constexpr int kMinus32 = int(0xe0e0e0e0u);
            int sum = 0;
            sum = __dp4a(int(w[0]), int(v.x), __dp4a(kMinus32, int(v.x), sum));
            sum = __dp4a(int(w[1]), int(v.y), __dp4a(kMinus32, int(v.y), sum));
            sum = __dp4a(int(w[2]), int(v.z), __dp4a(kMinus32, int(v.z), sum));
            return __dp4a(int(w[3]), int(v.w), __dp4a(kMinus32, int(v.w), sum));
        };
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            if (c >= n) break;
            const Piece p = piece_of(c);
            // |sum| <= 16 * 32 * 127, |scale| <= 128: the integer products are exact.
            acc[c] += d * (p.scale_lo * float(sc_lo * centered_dot(lo, p.lo)) +
                           p.scale_hi * float(sc_hi * centered_dot(hi, p.hi)));
        }
    }
};
template <int A> struct Item<kQ6_K, A> : ItemQ6K<2> {
    __device__ __forceinline__ void load(const char* blk, int part) {
        ItemQ6K<2>::load(blk, blk + SingleScale<kQ6_K>::kScaleOffset, part);
    }
};
template <int A> struct Item<kQ6_KScalesLast, A> : ItemQ6K<A> {};

// q2_K, q3_K: four lanes per block; lane part = 2 h + s takes the 16 qs bytes 32 h + 16 s ..
// of half h, which hold values 128 h + 32 g + 16 s + (0..15) in bits 2g, 2g + 1 for g = 0..3:
// four runs of 16, each one sub-block (8 h + 2 g + s) with one scale. q2_K subtracts each
// sub-block's min times the sum of its 16 column values (the columns' sums are per 32, so
// the lane takes its 16 by one more dot product); q3_K's third bit (bit 4 h + g of hmask byte
// 16 s + l) makes the code u in 0..7 and the value u - 4, a signed byte.
template <int T, int A> struct ItemLowK {
    static constexpr bool kThreeBits = T == kQ3_K;
    static constexpr int kQs = kThreeBits ? 32 : 16;
    static constexpr int kAlignQs = min_int(A, 4);
    static constexpr int kParts = 4, kUnroll = 2;
    uint32_t q[4], hm[kThreeBits ? 4 : 1], scales[4];
    float d, dmin;
    __device__ __forceinline__ void load(const char* blk, int part) {
        load_words<kAlignQs, 4>(blk + kQs + 16 * part, q);
        if constexpr (kThreeBits) {
            load_words<2, 4>(blk + 16 * (part & 1), hm);
            uint32_t packed[3]; // the 12 packed scale bytes
            load_words<2, 3>(blk + 96, packed);
            scales[0] = packed[0], scales[1] = packed[1], scales[2] = packed[2], scales[3] = 0;
            d = f16_bits_at(blk + 108);
        } else {
            load_words<kAlignQs, 4>(blk, scales); // 16 bytes: scale and min of each sub-block
            d = f16_bits_at(blk + 80);
            dmin = f16_bits_at(blk + 82);
        }
    }
    // The scale (and q2_K's min) of sub-block 8 h + 2 g + s: byte 2 (g % 2) + s of a word
    // chosen by g (unrolled) and h, so that no register array is indexed at run time.
    template <int g> __device__ __forceinline__ void scale_of(int h, int s, int& sc, int& mn) const {
        const int byte_shift = 8 * (2 * (g % 2) + s);
        if constexpr (kThreeBits) {
            // low nibble of byte j (j < 8) or high nibble of byte j - 8; top bits 2 (j / 4) of byte 8 + j % 4
            const uint32_t low4 = (scales[g / 2] >> (byte_shift + 4 * h)) & 15u;
            const uint32_t high2 = (scales[2] >> (byte_shift + 2 * (2 * h + g / 2))) & 3u;
            sc = int(low4 | high2 << 4) - 32;
            mn = 0;
        } else {
            const uint32_t b = ((h ? scales[2 + g / 2] : scales[g / 2]) >> byte_shift) & 0xffu;
            sc = int(b & 15u);
            mn = int(b >> 4);
        }
    }
    // The run of 16 values in bits 2 g, 2 g + 1.
    template <int g, int NC>
    __device__ __forceinline__ void dot_run(const Columns& x, int64_t ib, int h, int s,
                                            float (&acc)[NC]) const {
        uint32_t codes[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            codes[k] = (q[k] >> (2 * g)) & 0x03030303u;
            if constexpr (kThreeBits)
                codes[k] = __vsub4(codes[k] | ((hm[k] >> (4 * h + g)) & 0x01010101u) << 2, 0x04040404u);
        }
        int sc, mn;
        scale_of<g>(h, s, sc, mn);
        const float scale = d * float(sc);
        const int64_t k0 = 256 * ib + 128 * h + 32 * g + 16 * s;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            if (c >= x.n) break;
            const float dx = xds(x, c, k0 / 32).x;
            const uint4 xv = x16(x, c, k0);
            float term = scale * dx * float(dot16(codes, xv));
            if constexpr (!kThreeBits) { // minus the min times the sum of the 16 column values
                const int sum =
                    __dp4a(0x01010101, int(xv.w),
                           __dp4a(0x01010101, int(xv.z),
                                  __dp4a(0x01010101, int(xv.y), __dp4a(0x01010101, int(xv.x), 0))));
                term -= dmin * float(mn) * dx * float(sum);
            }
            acc[c] += term;
        }
    }
    template <int NC>
    __device__ __forceinline__ void dot(const Columns& x, int64_t ib, int part, float (&acc)[NC]) const {
        const int h = part >> 1, s = part & 1;
        dot_run<0>(x, ib, h, s, acc);
        dot_run<1>(x, ib, h, s, acc);
        dot_run<2>(x, ib, h, s, acc);
        dot_run<3>(x, ib, h, s, acc);
    }
};
template <int A> struct Item<kQ2_K, A> : ItemLowK<kQ2_K, A> {};
template <int A> struct Item<kQ3_K, A> : ItemLowK<kQ3_K, A> {};

// iq4_nl: two lanes per block, as q4_0 (lane `part` takes qs bytes 8 part .. 8 part + 7), the
// indices turned into their signed levels for __dp4a.
template <int A> struct Item<kIQ4_NL, A> {
    static constexpr int kParts = 2, kUnroll = 4;
    uint32_t q[2];
    float d;
    __device__ __forceinline__ void load(const char* blk, int part) {
        d = f16_bits_at(blk);
        load_words<2, 2>(blk + 2 + 8 * part, q);
    }
    template <int NC>
    __device__ __forceinline__ void dot(const Columns& x, int64_t ib, int part, float (&acc)[NC]) const {
        uint32_t lo[2], hi[2];
#pragma unroll
        for (int k = 0; k < 2; ++k) iq4_levels8(q[k], lo[k], hi[k]);
        const int64_t k = 32 * ib + 8 * part;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            if (c >= x.n) break;
            const int s = dot8(hi[0], hi[1], x8(x, c, k + 16), dot8(lo[0], lo[1], x8(x, c, k), 0));
            acc[c] += d * xds(x, c, ib).x * float(s);
        }
    }
};

// iq4_xs: eight lanes per block, lane j taking sub-block j (qs bytes 16 j .. 16 j + 15 after
// the 8-byte head: values 32 j + (0..15) in the low nibbles, 32 j + 16 + (0..15) in the high).
template <int A> struct Item<kIQ4_XS, A> {
    static constexpr int kAlignQs = min_int(A, 8);
    static constexpr int kParts = 8, kUnroll = 2;
    uint32_t q[4], head[2];
    __device__ __forceinline__ void load(const char* blk, int part) {
        load_words<kAlignQs, 2>(blk, head); // d, scales_h, scales_l[4]
        load_words<kAlignQs, 4>(blk + 8 + 16 * part, q);
    }
    template <int NC>
    __device__ __forceinline__ void dot(const Columns& x, int64_t ib, int part, float (&acc)[NC]) const {
        const int j = part;
        uint32_t lo[4], hi[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) iq4_levels8(q[k], lo[k], hi[k]);
        const uint32_t low4 = (head[1] >> (8 * (j / 2) + 4 * (j % 2))) & 15u;
        const uint32_t high2 = (head[0] >> (16 + 2 * j)) & 3u;
        const float scale = f16_low(head[0]) * float(int(low4 | high2 << 4) - 32);
        const int64_t k0 = 256 * ib + 32 * j;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            if (c >= x.n) break;
            const int sum = dot16(hi, x16(x, c, k0 + 16)) + dot16(lo, x16(x, c, k0));
            acc[c] += scale * xds(x, c, k0 / 32).x * float(sum);
        }
    }
};

// ---- kernels ------------------------------------------------------------------------------

// One warp per 32 values of one column of b (columns ordered n, then i2, then i3).
__global__ void quantize_columns_kernel(TensorView b, int8_t* q, float2* ds, int64_t n_blocks) {
    await_inputs();
    allow_next_launch();
    const int lane = threadIdx.x % 32;
    const int64_t blocks_per_column = b.ne[0] / 32;
    for (int64_t w = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; w < n_blocks;
         w += int64_t(gridDim.x) * blockDim.x / 32) {
        const int64_t column = w / blocks_per_column, ib = w % blocks_per_column;
        const int64_t i1 = column % b.ne[1], i2 = (column / b.ne[1]) % b.ne[2],
                      i3 = column / (b.ne[1] * b.ne[2]);
        round_block_to_int8(load_f32(b, 32 * ib + lane, i1, i2, i3), lane, q + 32 * w, ds + w);
    }
}

// Launched early (early_launch.cuh): with constant weights (a model's) each warp asks L2 for
// the start of its row before the kernel that quantized the columns has finished (into L2,
// not registers: items held across the wait made the k-quant kernels spill).
constexpr int64_t kMatvecPrefetchBytes = 8192;

// Loads item i of a row of K values (part i % kParts of block i / kParts) wherever view type
// T keeps that block's bytes.
template <int T, class W>
__device__ __forceinline__ void load_item(W& item, const char* row, int64_t K, int i) {
    // (Unsigned: a signed division by kParts costs sign fix-ups on every item.)
    const unsigned ib = unsigned(i) / W::kParts, part = unsigned(i) % W::kParts;
    if constexpr (is_scales_last_id(T))
        item.load(scales_last_body<T>(row, ib), scales_last_scale<T>(row, K, ib), int(part));
    else
        item.load(row + int64_t(ib) * QuantBlock<T>::kBytes, int(part));
}

// Column fetching: an item type with a Piece (the column values its codes meet) can have the
// kernel load each item's piece together with the item, at one column, where the pass is no
// deeper than kPieceMaxUnroll (deeper ones spilled within 64 registers). Otherwise the pieces
// are loaded in the products, after the codes have arrived, so their L1/L2 latency follows
// the codes' instead of overlapping it (the test for a missing column kept the compiler from
// hoisting them). GFA_CUDA_FETCH_COLUMNS=0 turns it off, for comparisons.
template <class W> constexpr int piece_max_unroll() {
    if constexpr (requires { W::kPieceMaxUnroll; })
        return W::kPieceMaxUnroll;
    else
        return 0;
}
template <class W, int U> struct Pieces { typename W::Piece at[U]; };
template <class W> struct Pieces<W, 0> {};

bool column_fetch_enabled() {
    const char* v = std::getenv("GFA_CUDA_FETCH_COLUMNS");
    return v == nullptr || std::strcmp(v, "0") != 0;
}

// The rows of the product's block `block`: the body of quant_matvec_kernel, whose blocks are
// the product's, and of quant_matvec_pair_kernel, whose blocks are two products'.
// U: items a lane loads before using any (W::kUnroll, or a deeper pass for long rows,
// matvec_shape). kFetch: pieces loaded with the items (above; NC == 1 only).
template <int T, int A, int NC, int U, bool kFetch>
__device__ __forceinline__ void matvec_block(const TensorView& a, Columns x, const TensorView& dst,
                                             int64_t r2, int64_t r3, int split, bool a_constant, int64_t n_ff,
                                             const TensorView& glu, unsigned block) {
    static_assert(!kFetch || NC == 1);
    using W = Item<T, A>;
    using B = QuantBlock<T>;
    const RowSlice rs = row_slice<kMatvecWarps>(split, n_ff, block);
    const bool has_row = n_ff > 0 ? rs.pair < n_ff : rs.row < dst.ne[0];
    const auto [row, i2, i3] = matrix_row(a, dst, rs.row, r2, r3);
    const int n_items = int(a.ne[0] / B::kValues) * W::kParts;
    if (a_constant && has_row && rs.slice == 0)
        warp_prefetch_l2(row, min(kMatvecPrefetchBytes, (a.ne[0] / B::kValues) * B::kBytes),
                         int(threadIdx.x) % 32);
    await_inputs();
    allow_next_launch();

    if (gridDim.y > 1) {
        const int64_t matrix = i3 * dst.ne[2] + i2;
        x.q += matrix * x.n * x.q_stride;
        x.ds += matrix * x.n * x.ds_stride;
    }
    float acc[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[c] = 0.0f;
    for (int base = rs.first; has_row && base < n_items; base += rs.stride * U) {
        W items[U];
        [[maybe_unused]] Pieces<W, kFetch ? U : 0> pieces;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = base + rs.stride * u;
            if (i < n_items) {
                load_item<T>(items[u], row, a.ne[0], i);
                if constexpr (kFetch)
                    pieces.at[u] = W::piece(x, 0, unsigned(i) / W::kParts, int(unsigned(i) % W::kParts));
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = base + rs.stride * u;
            if (i >= n_items) continue;
            if constexpr (kFetch)
                acc[0] += items[u].dot_piece(pieces.at[u], int(unsigned(i) % W::kParts));
            else
                items[u].template dot<NC>(x, unsigned(i) / W::kParts, int(unsigned(i) % W::kParts), acc);
        }
    }
    write_row_sums<kMatvecWarps>(acc, x.n, rs, split, has_row, dst, i2, i3, n_ff, glu);
}

template <int T, int A, int NC, int U = Item<T, A>::kUnroll, bool kFetch = false>
__global__ void __launch_bounds__(kMatvecWarps * 32, matvec_min_blocks(T, NC))
    quant_matvec_kernel(TensorView a, Columns x, TensorView dst, int64_t r2, int64_t r3, int split,
                        bool a_constant, int64_t n_ff, TensorView glu) {
    matvec_block<T, A, NC, U, kFetch>(a, x, dst, r2, r3, split, a_constant, n_ff, glu, blockIdx.x);
}

// ---- two products in one launch ---------------------------------------------------------
//
// Decoding multiplies one column by two matrices of different block types where a file
// quantizes them differently (a Q4_K_M file's v projection is q6_K in about half the layers,
// beside q and k in q4_K, so the three cannot be merged into one matrix). Run one after the
// other, the small v product (1024 rows of 4096 at 8B) is a launch of its own in the chain.
// Here the blocks of one grid take the rows of both: the first `first_blocks` blocks those of
// the first product, the rest the second's, each at the variant its own launch would use (one
// column, kUnroll items deep, column fetching where the item has it), so the results are bit
// for bit those of two launches. On an H100 a 1.1B Q4_K_M model decoded 1-3% faster, an 8B
// one 0.4% (docs/BENCHMARKS.md).
struct MatvecJob {
    TensorView a, dst;
    int split;
    bool a_constant;
};

template <int T, int A>
constexpr bool kFetchAtDefaultDepth = piece_max_unroll<Item<T, A>>() >= Item<T, A>::kUnroll;

template <int T, int A>
__device__ __forceinline__ void matvec_job_block(const MatvecJob& job, const Columns& x, unsigned block) {
    matvec_block<T, A, 1, Item<T, A>::kUnroll, kFetchAtDefaultDepth<T, A>>(
        job.a, x, job.dst, 1, 1, job.split, job.a_constant, 0, TensorView{}, block);
}

template <int T1, int A1, int T2, int A2>
__global__ void __launch_bounds__(kMatvecWarps * 32,
                                  min_int(matvec_min_blocks(T1, 1), matvec_min_blocks(T2, 1)))
    quant_matvec_pair_kernel(MatvecJob first, MatvecJob second, Columns x, unsigned first_blocks) {
    if (blockIdx.x < first_blocks)
        matvec_job_block<T1, A1>(first, x, blockIdx.x);
    else
        matvec_job_block<T2, A2>(second, x, blockIdx.x - first_blocks);
}

// One thread block per row of a; each thread writes 8 consecutive f16 values (16 bytes).
template <int T> __global__ void dequantize_f16_kernel(TensorView a, __half* out) {
    const int64_t r = blockIdx.x;
    const int64_t i1 = r % a.ne[1], i2 = (r / a.ne[1]) % a.ne[2], i3 = r / (a.ne[1] * a.ne[2]);
    const char* row = a.data + i1 * a.nb[1] + i2 * a.nb[2] + i3 * a.nb[3];
    const int64_t chunks = a.ne[0] / 8;
    uint4* dst = reinterpret_cast<uint4*>(out + r * a.ne[0]);
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
        float v[8];
        dequantize_row_chunk<T>(row, a.ne[0], c, v);
        uint32_t h[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const __half2 pair = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
            h[i] = *reinterpret_cast<const uint32_t*>(&pair);
        }
        dst[c] = make_uint4(h[0], h[1], h[2], h[3]);
    }
}

// The alignment of a's rows: of its base and of its strides (2, 4 or 16 bytes).
int row_alignment(const TensorView& a) {
    const uint64_t bits = uint64_t(reinterpret_cast<uintptr_t>(a.data)) | uint64_t(a.nb[1]) |
                          uint64_t(a.nb[2]) | uint64_t(a.nb[3]);
    if (bits % 2 != 0)
        fail("mul_mat on CUDA: quantized weights " + view_type_name(a.type) +
             " at an odd address or with odd row strides");
    return bits % 16 == 0 ? 16 : bits % 4 == 0 ? 4 : 2;
}

// How a row is read: `split` warps (matvec_rows.cuh), each lane loading `unroll` items per
// pass.
struct MatvecShape {
    int split, unroll;
};

// Items a lane of the deeper pass loads, with one column: q4_K (q5_K's and q6_K's items, with
// their high bits, spilled at 3 deep within the 64 registers of 8 blocks per SM) and q4_0 with
// the scales last (items of 3 registers; iq4_nl's, with its level lookups, spilled at 6 deep;
// q4_0's keeps one 4-byte spill slot outside the loop); 0: no deeper pass. (q8_0 with the
// scales last had one at 6 deep until its items, 5 registers, came to spill 72-80 bytes there:
// its K = 5632 product then took 7.71-7.75 us at 2 warps a row against 7.36-7.41 at 4 without
// the deeper pass, and a 1.1B q8_0 model decoded 751-762 against 774-787 tok/s, H100.)
template <int T> constexpr int kDeepUnroll = T == kQ4_K ? 3 : T == kQ4_0ScalesLast ? 6 : 0;
template <int T> constexpr bool kHasDeepPass = kDeepUnroll<T> > 0;

// q4_K rows of 65-128 items (K = 2304..4096), where there are many of them (an 8B model's merged
// gate/up product: 28672 rows of K = 4096), take one warp a row at 4 items deep instead of two
// warps at 2: half the warps, so half the fixed work per weight byte (row indices, the sum
// across a row's warps), which bounds a product of several waves of blocks. Without column
// fetching (its pieces spilled at this depth). On an H100 the 14336 x 4096 product alone went
// from 16.2-16.3 to 15.5-15.6 us; with fewer rows the product is a wave or two of blocks and the
// wider warps lose (4096 x 4096: 6.4 against 5.7 us), hence the row minimum. An 8B-shaped
// Q4_K_M model decoded 314-316 -> 331-332 tok/s with this rule (323-324 with the 4-deep pass
// for every q4_K product).
constexpr int kFourDeep = 4;
constexpr int64_t kFourDeepMinRows = 8192;

// The item's own depth, unless a deeper pass reads the row with fewer warps or in fewer
// passes. A q4_K row of K = 5632 (a 1.1B model's down projection, 176 items) takes 4 warps
// whose lanes hold 1 or 2 items at depth 2: one row per block, two waves of blocks on an
// H100. At depth 3 it takes 2 warps whose lanes hold 2 or 3: two rows per block, one wave.
// Decoding that model went from 748-756 to 771-774 tok/s (H100).
template <int T, int A> MatvecShape matvec_shape(int64_t K, int64_t rows, int columns) {
    using W = Item<T, A>;
    const int64_t items = K / QuantBlock<T>::kValues * W::kParts;
    const int split = row_split_for(items, W::kUnroll, kMatvecWarps);
    if constexpr (T == kQ4_K) {
        if (columns == 1 && rows >= kFourDeepMinRows) {
            const int one_warp = row_split_for(items, kFourDeep, kMatvecWarps);
            if (one_warp == 1 && split > 1) return {1, kFourDeep};
        }
    }
    if constexpr (kHasDeepPass<T>) {
        if (columns == 1) {
            constexpr int kDeep = kDeepUnroll<T>;
            const int deep = row_split_for(items, kDeep, kMatvecWarps);
            auto passes = [&](int sp, int u) {
                return (items + int64_t(32) * sp * u - 1) / (int64_t(32) * sp * u);
            };
            if (deep < split || passes(deep, kDeep) < passes(split, W::kUnroll)) return {deep, kDeep};
        }
    }
    return {split, W::kUnroll};
}

template <int T, int A>
void launch_matvec(const TensorView& a, const Columns& x, const TensorView& dst, int64_t r2, int64_t r3,
                   bool a_constant, const TensorView& glu, int64_t n_ff, cudaStream_t stream) {
    const MatvecShape shape = matvec_shape<T, A>(a.ne[0], a.ne[1], x.n);
    const int64_t rows = dst.ne[0];
    const int64_t matrices = dst.ne[2] * dst.ne[3];
    const int split = shape.split;
    const dim3 grid(unsigned(row_groups(rows, n_ff, split, kMatvecWarps)), unsigned(matrices));
    const dim3 block(kMatvecWarps * 32);
    auto launch = [&](auto kernel) {
        launch_early(kernel, grid, block, 0, stream, a, x, dst, r2, r3, split, a_constant, n_ff, glu);
    };
    if constexpr (kHasDeepPass<T>) {
        constexpr int kDeep = kDeepUnroll<T>;
        if (x.n == 1 && shape.unroll == kDeep) return launch(quant_matvec_kernel<T, A, 1, kDeep>);
        if constexpr (T == kQ4_K)
            if (x.n == 1 && shape.unroll == kFourDeep) return launch(quant_matvec_kernel<T, A, 1, kFourDeep>);
    }
    using W = Item<T, A>;
    if constexpr (piece_max_unroll<W>() >= W::kUnroll) {
        if (x.n == 1 && shape.unroll == W::kUnroll && column_fetch_enabled())
            return launch(quant_matvec_kernel<T, A, 1, W::kUnroll, true>);
    }
    if (x.n == 1)
        launch(quant_matvec_kernel<T, A, 1>);
    else if (x.n == 2)
        launch(quant_matvec_kernel<T, A, 2>);
    else if (x.n <= 4)
        launch(quant_matvec_kernel<T, A, 4>);
    else
        launch(quant_matvec_kernel<T, A, 8>);
}

// Where quantize_columns puts the int8 values and the (scale, sum) pairs.
struct ColumnsLayout {
    int64_t n_columns, q_bytes, ds_offset;
};
ColumnsLayout columns_layout(const TensorView& b) {
    const int64_t n_columns = b.ne[1] * b.ne[2] * b.ne[3];
    const int64_t q_bytes = n_columns * b.ne[0];
    return {n_columns, q_bytes, int64_t(align16(size_t(q_bytes)))};
}

} // namespace

bool low_bit_quants_enabled() {
    const char* v = std::getenv("GFA_CUDA_LOW_BIT");
    return v == nullptr || std::strcmp(v, "0") != 0;
}

size_t quantized_columns_bytes(const TensorView& b) {
    const ColumnsLayout l = columns_layout(b);
    return size_t(l.ds_offset) + size_t(l.n_columns * (b.ne[0] / 32)) * sizeof(float2);
}

ColumnBlocks column_blocks_in(const TensorView& b, void* scratch) {
    char* base = static_cast<char*>(scratch);
    return {reinterpret_cast<int8_t*>(base), reinterpret_cast<float2*>(base + columns_layout(b).ds_offset)};
}

void quantize_columns(const TensorView& b, void* scratch, cudaStream_t stream) {
    if (b.ne[0] % 32 != 0) fail("mul_mat on CUDA: quantized columns need K % 32 == 0");
    const int64_t n_blocks = columns_layout(b).n_columns * (b.ne[0] / 32);
    if (n_blocks == 0) return;
    constexpr int kThreads = 256;
    const ColumnBlocks at = column_blocks_in(b, scratch);
    launch_early(quantize_columns_kernel, grid_for(n_blocks * 32, kThreads), kThreads, 0, stream, b, at.q,
                 at.ds, n_blocks);
}

namespace {

// Calls f(T, A), both as integral constants: a's type and the widest row alignment its
// matrix-vector kernel can use.
template <class F> void dispatch_matvec(const TensorView& a, F&& f) {
    const int align = row_alignment(a);
    dispatch_quant_view(a.type, [&](auto tag) {
        constexpr int kMax = QuantBlock<decltype(tag)::value>::kMaxAlign;
        if constexpr (kMax >= 16) {
            if (align >= 16) return f(tag, std::integral_constant<int, 16>{});
        }
        if constexpr (kMax >= 4) {
            if (align >= 4) return f(tag, std::integral_constant<int, 4>{});
        }
        f(tag, std::integral_constant<int, 2>{});
    });
}

MatvecShape shape_of(const TensorView& a, int64_t columns) {
    MatvecShape shape{1, 1};
    dispatch_matvec(a, [&](auto type, auto align) {
        shape = matvec_shape<decltype(type)::value, decltype(align)::value>(a.ne[0], a.ne[1], int(columns));
    });
    return shape;
}

} // namespace

int quant_matvec_split(const TensorView& a, int64_t columns) {
    return shape_of(a, columns).split;
}

int quant_matvec_depth(const TensorView& a, int64_t columns) {
    return shape_of(a, columns).unroll;
}

void quant_matvec(const TensorView& a, const TensorView& b, const TensorView& dst, const void* scratch,
                  bool a_constant, const TensorView& glu, int64_t n_ff, cudaStream_t stream) {
    if (b.ne[1] < 1 || b.ne[1] > kQuantMatvecMaxColumns)
        fail("mul_mat on CUDA: the matrix-vector path takes 1 to 8 columns, got " + std::to_string(b.ne[1]));
    if (dst.ne[0] == 0 || dst.ne[2] * dst.ne[3] == 0) return;
    const ColumnsLayout l = columns_layout(b);
    const char* base = static_cast<const char*>(scratch);
    const int64_t K = b.ne[0];
    const Columns x{reinterpret_cast<const int8_t*>(base),
                    reinterpret_cast<const float2*>(base + l.ds_offset), K, K / 32, int(b.ne[1])};
    const int64_t r2 = b.ne[2] / a.ne[2], r3 = b.ne[3] / a.ne[3];
    dispatch_matvec(a, [&](auto type, auto align) {
        launch_matvec<decltype(type)::value, decltype(align)::value>(a, x, dst, r2, r3, a_constant, glu, n_ff,
                                                                     stream);
    });
}

namespace {

// The view type and row alignment of the kernel that dispatch_matvec picks for a.
struct MatvecKind {
    int type = 0, align = 0;
    bool operator==(const MatvecKind&) const = default;
};
MatvecKind matvec_kind(const TensorView& a) {
    MatvecKind kind;
    dispatch_matvec(a, [&](auto type, auto align) {
        kind = {decltype(type)::value, decltype(align)::value};
    });
    return kind;
}

template <int T1, int A1, int T2, int A2> struct PairKinds {
    static constexpr MatvecKind first{T1, A1}, second{T2, A2};
    static void launch(const MatvecJob& j1, const MatvecJob& j2, const Columns& x, unsigned first_blocks,
                       unsigned blocks, cudaStream_t stream) {
        launch_early(quant_matvec_pair_kernel<T1, A1, T2, A2>, dim3(blocks), dim3(kMatvecWarps * 32), 0,
                     stream, j1, j2, x, first_blocks);
    }
};
// The pairs that have a kernel: the q/k and v projections of Q4_K_M and Q5_K_M files, with the
// weights in the GPU's layout (cuda_common.h), and Q4_K_M's in the file's layout.
using MatvecPairs =
    std::tuple<PairKinds<kQ4_K, 16, kQ6_KScalesLast, 16>, PairKinds<kQ5_K, 16, kQ6_KScalesLast, 16>,
               PairKinds<kQ4_K, 16, kQ6_K, QuantBlock<kQ6_K>::kMaxAlign>>;

// Calls f(PairKinds{}, swapped) for the kernel of kinds (k1, k2), in either order (swapped:
// k1 is the kernel's second); false where none has a kernel. (A model graph has a layer's v
// product in front of its q/k product.)
template <class F> bool with_pair_kinds(const MatvecKind& k1, const MatvecKind& k2, F&& f) {
    return std::apply(
        [&](auto... pairs) {
            auto take = [&](auto pair) {
                using P = decltype(pair);
                if (P::first == k1 && P::second == k2) return f(pair, false), true;
                if (P::first == k2 && P::second == k1) return f(pair, true), true;
                return false;
            };
            return (... || take(pairs));
        },
        MatvecPairs{});
}

// Whether a's single launch at one column takes the variant a pair's blocks run (kUnroll
// items deep; column fetching exactly where the item has it).
bool takes_default_variant(const TensorView& a) {
    bool fits = false;
    dispatch_matvec(a, [&](auto type, auto align) {
        constexpr int T = decltype(type)::value, A = decltype(align)::value;
        const MatvecShape shape = matvec_shape<T, A>(a.ne[0], a.ne[1], 1);
        fits = shape.unroll == Item<T, A>::kUnroll && (!kFetchAtDefaultDepth<T, A> || column_fetch_enabled());
    });
    return fits;
}

bool paired_launches_enabled() {
    const char* v = std::getenv("GFA_CUDA_PAIRED_PRODUCTS");
    return v == nullptr || std::strcmp(v, "0") != 0;
}

int64_t matvec_blocks(const TensorView& a) {
    return row_groups(a.ne[1], 0, shape_of(a, 1).split, kMatvecWarps);
}

} // namespace

bool quant_matvec_pairs(const TensorView& a1, const TensorView& a2, int64_t columns) {
    auto one_matrix = [](const TensorView& a) { return a.ne[2] == 1 && a.ne[3] == 1; };
    if (!paired_launches_enabled() || columns != 1 || !one_matrix(a1) || !one_matrix(a2) ||
        a1.ne[0] != a2.ne[0] || a1.ne[1] == 0 || a2.ne[1] == 0 ||
        matvec_blocks(a1) + matvec_blocks(a2) > INT32_MAX)
        return false;
    return with_pair_kinds(matvec_kind(a1), matvec_kind(a2), [](auto, bool) {}) &&
           takes_default_variant(a1) && takes_default_variant(a2);
}

void quant_matvec_pair(const TensorView& a1, const TensorView& dst1, bool a1_constant, const TensorView& a2,
                       const TensorView& dst2, bool a2_constant, const TensorView& b, const void* scratch,
                       cudaStream_t stream) {
    if (b.ne[1] != 1 || b.ne[0] != a1.ne[0] || dst1.ne[0] != a1.ne[1] || dst2.ne[0] != a2.ne[1] ||
        !quant_matvec_pairs(a1, a2, b.ne[1]))
        fail("mul_mat on CUDA: no paired launch for " + view_type_name(a1.type) + " " +
             std::to_string(a1.ne[0]) + " x " + std::to_string(a1.ne[1]) + " and " + view_type_name(a2.type) +
             " " + std::to_string(a2.ne[0]) + " x " + std::to_string(a2.ne[1]) + " at " +
             std::to_string(b.ne[1]) + " columns");
    const ColumnsLayout l = columns_layout(b);
    const char* base = static_cast<const char*>(scratch);
    const int64_t K = b.ne[0];
    const Columns x{reinterpret_cast<const int8_t*>(base),
                    reinterpret_cast<const float2*>(base + l.ds_offset), K, K / 32, 1};
    const MatvecJob j1{a1, dst1, shape_of(a1, 1).split, a1_constant};
    const MatvecJob j2{a2, dst2, shape_of(a2, 1).split, a2_constant};
    const int64_t blocks1 = matvec_blocks(a1), blocks2 = matvec_blocks(a2);
    with_pair_kinds(matvec_kind(a1), matvec_kind(a2), [&](auto pair, bool swapped) {
        if (swapped)
            decltype(pair)::launch(j2, j1, x, unsigned(blocks2), unsigned(blocks1 + blocks2), stream);
        else
            decltype(pair)::launch(j1, j2, x, unsigned(blocks1), unsigned(blocks1 + blocks2), stream);
    });
}

void dequantize_to_f16(const TensorView& a, void* out, cudaStream_t stream) {
    const int64_t rows = a.ne[1] * a.ne[2] * a.ne[3];
    if (rows == 0) return;
    (void)row_alignment(a);
    dispatch_quant_view(a.type, [&](auto tag) {
        constexpr int T = decltype(tag)::value;
        dequantize_f16_kernel<T>
            <<<unsigned(rows), kDequantThreads, 0, stream>>>(a, static_cast<__half*>(out));
        GFA_CUDA_CHECK_LAUNCH();
    });
}

} // namespace gfa::cuda
