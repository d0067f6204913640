// Quantized GGUF blocks on the device: block sizes per type, exact dequantization of eight
// consecutive values of a block, and loads that respect the alignment a block actually has.
//
// Dequantization reproduces src/quants.cpp, src/quants_k.cpp and src/quants_iq4.cpp bit for bit: the same
// float operations in the same order, written with round-to-nearest intrinsics (__fmul_rn,
// __fadd_rn, __fsub_rn) so that the compiler cannot contract a multiply and an add into an
// FMA (the CPU code is compiled with contraction off for the same reason).
#pragma once

#include "cuda_common.h"

#include <cuda_fp16.h>

#include <utility>

namespace gfa::cuda {

// Ids of the block types as template arguments (Q8_0 / Q4_0 ids live in cuda_device.cuh too;
// these are the same values).
inline constexpr int kQ8_0 = int(Type::Q8_0);
inline constexpr int kQ4_0 = int(Type::Q4_0);
inline constexpr int kQ4_1 = int(Type::Q4_1);
inline constexpr int kQ5_0 = int(Type::Q5_0);
inline constexpr int kQ5_1 = int(Type::Q5_1);
inline constexpr int kQ4_K = int(Type::Q4_K);
inline constexpr int kQ5_K = int(Type::Q5_K);
inline constexpr int kQ6_K = int(Type::Q6_K);
inline constexpr int kQ2_K = int(Type::Q2_K);
inline constexpr int kQ3_K = int(Type::Q3_K);
inline constexpr int kIQ4_NL = int(Type::IQ4_NL);
inline constexpr int kIQ4_XS = int(Type::IQ4_XS);

// Values and bytes per block. kMaxAlign: the largest power of two (up to 16) that divides the
// block size, i.e. the alignment every block of a row has when the row itself is aligned.
template <int T> struct QuantBlock;
template <> struct QuantBlock<kQ8_0> {
    static constexpr int kValues = QK8_0, kBytes = sizeof(block_q8_0), kMaxAlign = 2;
};
template <> struct QuantBlock<kQ4_0> {
    static constexpr int kValues = QK4_0, kBytes = sizeof(block_q4_0), kMaxAlign = 2;
};
template <> struct QuantBlock<kQ4_1> {
    static constexpr int kValues = QK4_1, kBytes = sizeof(block_q4_1), kMaxAlign = 4;
};
template <> struct QuantBlock<kQ5_0> {
    static constexpr int kValues = QK5_0, kBytes = sizeof(block_q5_0), kMaxAlign = 2;
};
template <> struct QuantBlock<kQ5_1> {
    static constexpr int kValues = QK5_1, kBytes = sizeof(block_q5_1), kMaxAlign = 8;
};
template <> struct QuantBlock<kQ4_K> {
    static constexpr int kValues = QK_K, kBytes = sizeof(block_q4_K), kMaxAlign = 16;
};
template <> struct QuantBlock<kQ5_K> {
    static constexpr int kValues = QK_K, kBytes = sizeof(block_q5_K), kMaxAlign = 16;
};
template <> struct QuantBlock<kQ6_K> {
    static constexpr int kValues = QK_K, kBytes = sizeof(block_q6_K), kMaxAlign = 2;
};
template <> struct QuantBlock<kQ2_K> {
    static constexpr int kValues = QK_K, kBytes = sizeof(block_q2_K), kMaxAlign = 4;
};
template <> struct QuantBlock<kQ3_K> {
    static constexpr int kValues = QK_K, kBytes = sizeof(block_q3_K), kMaxAlign = 2;
};
template <> struct QuantBlock<kIQ4_NL> {
    static constexpr int kValues = QK4_NL, kBytes = sizeof(block_iq4_nl), kMaxAlign = 2;
};
template <> struct QuantBlock<kIQ4_XS> {
    static constexpr int kValues = QK_K, kBytes = sizeof(block_iq4_xs), kMaxAlign = 8;
};
// The formats with one f16 scale per block: where the scale lies in a block of the file's
// layout. The rest of the block, its body, is the bytes before or after it.
template <int T> struct SingleScale { static constexpr bool kHas = false; };
template <> struct SingleScale<kQ8_0> {
    static constexpr bool kHas = true;
    static constexpr int kScaleOffset = 0;
};
template <> struct SingleScale<kQ4_0> : SingleScale<kQ8_0> {};
template <> struct SingleScale<kQ5_0> : SingleScale<kQ8_0> {};
template <> struct SingleScale<kIQ4_NL> : SingleScale<kQ8_0> {};
template <> struct SingleScale<kQ6_K> {
    static constexpr bool kHas = true;
    static constexpr int kScaleOffset = QuantBlock<kQ6_K>::kBytes - 2;
};
template <int T> constexpr int kBodyOffset = SingleScale<T>::kScaleOffset == 0 ? 2 : 0;

// Those formats with the scales last (cuda_common.h): blocks keep their size for the row's
// length; a row's bodies (kBody bytes each) are as aligned as the row, up to 16 bytes, and
// its scales follow them.
template <int T> struct ScalesLastBlock {
    static_assert(SingleScale<T>::kHas, "no scales-last layout for this format");
    static constexpr int kValues = QuantBlock<T>::kValues, kBytes = QuantBlock<T>::kBytes, kBody = kBytes - 2;
    static constexpr int kMaxAlign = kBody % 16 == 0 ? 16 : kBody % 8 == 0 ? 8 : kBody % 4 == 0 ? 4 : 2;
};
template <> struct QuantBlock<kQ8_0ScalesLast> : ScalesLastBlock<kQ8_0> {};
template <> struct QuantBlock<kQ4_0ScalesLast> : ScalesLastBlock<kQ4_0> {};
template <> struct QuantBlock<kQ5_0ScalesLast> : ScalesLastBlock<kQ5_0> {};
template <> struct QuantBlock<kIQ4_NLScalesLast> : ScalesLastBlock<kIQ4_NL> {};
template <> struct QuantBlock<kQ6_KScalesLast> : ScalesLastBlock<kQ6_K> {};

// The low-bit formats (q2_K, q3_K, iq4_nl, iq4_xs) are read by the kernels unless
// GFA_CUDA_LOW_BIT=0 turns them off; their nodes then go to the CPU (the loader keeps such
// matrices in host memory). Read on every call, so a test can switch it.
bool low_bit_quants_enabled();

// The block types the CUDA kernels read.
inline bool is_cuda_quant_type(Type t) {
    switch (t) {
    case Type::Q8_0:
    case Type::Q4_0:
    case Type::Q4_1:
    case Type::Q5_0:
    case Type::Q5_1:
    case Type::Q4_K:
    case Type::Q5_K:
    case Type::Q6_K:
        return true;
    case Type::Q2_K:
    case Type::Q3_K:
    case Type::IQ4_NL:
    case Type::IQ4_XS:
        return low_bit_quants_enabled();
    default:
        return false;
    }
}

// Calls f(std::integral_constant<int, T>{}) for the block type t (one of the above).
template <class F> void dispatch_quant_type(Type t, F&& f) {
    switch (t) {
    case Type::Q8_0:
        return f(std::integral_constant<int, kQ8_0>{});
    case Type::Q4_0:
        return f(std::integral_constant<int, kQ4_0>{});
    case Type::Q4_1:
        return f(std::integral_constant<int, kQ4_1>{});
    case Type::Q5_0:
        return f(std::integral_constant<int, kQ5_0>{});
    case Type::Q5_1:
        return f(std::integral_constant<int, kQ5_1>{});
    case Type::Q4_K:
        return f(std::integral_constant<int, kQ4_K>{});
    case Type::Q5_K:
        return f(std::integral_constant<int, kQ5_K>{});
    case Type::Q6_K:
        return f(std::integral_constant<int, kQ6_K>{});
    case Type::Q2_K:
        return f(std::integral_constant<int, kQ2_K>{});
    case Type::Q3_K:
        return f(std::integral_constant<int, kQ3_K>{});
    case Type::IQ4_NL:
        return f(std::integral_constant<int, kIQ4_NL>{});
    case Type::IQ4_XS:
        return f(std::integral_constant<int, kIQ4_XS>{});
    default:
        fail(std::string("CUDA: no quantized kernels for type ") + std::string(type_name(t)));
    }
}

// The same for the type id of a TensorView, which may be a layout of the device's own.
template <class F> void dispatch_quant_view(int type, F&& f) {
    switch (type) {
    case kQ8_0ScalesLast:
        return f(std::integral_constant<int, kQ8_0ScalesLast>{});
    case kQ4_0ScalesLast:
        return f(std::integral_constant<int, kQ4_0ScalesLast>{});
    case kQ5_0ScalesLast:
        return f(std::integral_constant<int, kQ5_0ScalesLast>{});
    case kIQ4_NLScalesLast:
        return f(std::integral_constant<int, kIQ4_NLScalesLast>{});
    case kQ6_KScalesLast:
        return f(std::integral_constant<int, kQ6_KScalesLast>{});
    default:
        if (is_scales_last_id(type))
            fail("CUDA: no kernels for " + std::string(type_name(Type(block_type_of(type)))) +
                 " with the scales last");
        dispatch_quant_type(Type(type), std::forward<F>(f));
    }
}
// A TensorView's type for messages.
inline std::string view_type_name(int type) {
    const std::string name(type_name(Type(block_type_of(type))));
    return is_scales_last_id(type) ? name + " (scales last)" : name;
}

// ---- loads --------------------------------------------------------------------------------

__device__ __forceinline__ float f16_bits_at(const char* p) {
    return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// kWords little-endian 32-bit words from p, which is known to be kAlign-byte aligned (2, 4,
// 8 or 16): 16- or 8-byte vector loads where alignment allows, else 4-byte loads. A 2-byte
// aligned p is read as the aligned words that cover the range, joined by funnel shifts: each
// of those words holds at least one byte of the range, so no load leaves the memory the
// range lies in (allocations are at least 4-byte granular).
template <int kAlign, int kWords>
__device__ __forceinline__ void load_words(const char* p, uint32_t (&w)[kWords]) {
    if constexpr (kAlign >= 16 && kWords % 4 == 0) {
#pragma unroll
        for (int i = 0; i < kWords / 4; ++i) {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
            w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
        }
    } else if constexpr (kAlign >= 8 && kWords % 2 == 0) {
#pragma unroll
        for (int i = 0; i < kWords / 2; ++i) {
            const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + i);
            w[2 * i] = v.x, w[2 * i + 1] = v.y;
        }
    } else if constexpr (kAlign >= 4) {
#pragma unroll
        for (int i = 0; i < kWords; ++i) w[i] = __ldg(reinterpret_cast<const unsigned int*>(p) + i);
    } else {
        const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
        const unsigned int* aligned = reinterpret_cast<const unsigned int*>(addr & ~uintptr_t(3));
        const bool odd = (addr & 2) != 0;
        const uint32_t shift = odd ? 16u : 0u;
        uint32_t cur = __ldg(aligned);
#pragma unroll
        for (int i = 0; i < kWords; ++i) {
            // The word after the range is only needed (and only read) when p is not 4-aligned.
            const uint32_t next = (i + 1 < kWords || odd) ? __ldg(aligned + i + 1) : 0u;
            w[i] = __funnelshift_r(cur, next, shift);
            cur = next;
        }
    }
}

// ---- exact dequantization of eight consecutive values -----------------------------------

__device__ __forceinline__ uint32_t byte_at(const char* p, int i) {
    return uint32_t(reinterpret_cast<const uint8_t*>(p)[i]);
}
__device__ __forceinline__ uint32_t le32_at(const char* p) {
    return byte_at(p, 0) | byte_at(p, 1) << 8 | byte_at(p, 2) << 16 | byte_at(p, 3) << 24;
}

// The IQ4 levels (gfa::kIq4Levels) as four words of four signed bytes, for byte permutes.
constexpr uint32_t iq4_level_word(int k) {
    return uint32_t(uint8_t(kIq4Levels[4 * k])) | uint32_t(uint8_t(kIq4Levels[4 * k + 1])) << 8 |
           uint32_t(uint8_t(kIq4Levels[4 * k + 2])) << 16 | uint32_t(uint8_t(kIq4Levels[4 * k + 3])) << 24;
}
// Four 4-bit indices (one per byte of idx, each 0..15) to their levels as four signed bytes:
// one permute picks among levels 0..7, one among 8..15, and bit 3 of each index chooses.
__device__ __forceinline__ uint32_t iq4_levels4(uint32_t idx) {
    constexpr uint32_t w0 = iq4_level_word(0), w1 = iq4_level_word(1), w2 = iq4_level_word(2),
                       w3 = iq4_level_word(3);
    const uint32_t sel =
        (idx & 0x7u) | ((idx >> 4) & 0x70u) | ((idx >> 8) & 0x700u) | ((idx >> 12) & 0x7000u);
    const uint32_t lo = __byte_perm(w0, w1, sel), hi = __byte_perm(w2, w3, sel);
    const uint32_t upper = ((idx >> 3) & 0x01010101u) * 0xffu;
    return (lo & ~upper) | (hi & upper);
}
// The eight 4-bit indices of four packed bytes (each byte: one index in its low nibble, one
// in its high) to their levels, those of the low nibbles in lo and of the high nibbles in hi.
// A permute reads only the low three bits of each selector nibble, so the packed word serves
// as the selector as it is: two permutes give four indices' levels among 0..7 and among 8..15,
// a third picks by each index's bit 3 (moved to the pick's bit 2), and two more sort the
// eight levels into low and high nibbles: 8 permutes for 8 values instead of 4 words'
// unpacking and selects.
__device__ __forceinline__ void iq4_levels8(uint32_t packed, uint32_t& lo, uint32_t& hi) {
    constexpr uint32_t w0 = iq4_level_word(0), w1 = iq4_level_word(1), w2 = iq4_level_word(2),
                       w3 = iq4_level_word(3);
    const uint32_t pick = 0x32103210u | ((packed & 0x88888888u) >> 1);
    uint32_t in_order[2]; // the levels of bytes 2 i and 2 i + 1: low, high, low, high
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const uint32_t idx = packed >> (16 * i);
        in_order[i] = __byte_perm(__byte_perm(w0, w1, idx), __byte_perm(w2, w3, idx), pick >> (16 * i));
    }
    lo = __byte_perm(in_order[0], in_order[1], 0x6420u);
    hi = __byte_perm(in_order[0], in_order[1], 0x7531u);
}
__device__ __forceinline__ float iq4_level(uint32_t i) {
    return float(int8_t(iq4_levels4(i) & 0xffu));
}

// The codes (0..31) of values 8 chunk .. 8 chunk + 7 of a q5_0 / q5_1 block: low four bits
// from its 16 nibble bytes (values 0..15 low nibbles, 16..31 high), the fifth from bit e of qh.
__device__ __forceinline__ void five_bit_codes(const char* nibbles, uint32_t qh, int chunk, int (&q)[8]) {
    const char* qs = nibbles + 8 * (chunk & 1);
    const int shift = (chunk >> 1) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i)
        q[i] = int(((byte_at(qs, i) >> shift) & 0x0f) | ((qh >> (8 * chunk + i)) & 1u) << 4);
}

// Six-bit scale and min of sub-block j of a Q4_K / Q5_K block (12 packed bytes at s).
__device__ __forceinline__ void scale_min_k4(const char* s, int j, int& sc, int& mn) {
    if (j < 4) {
        sc = int(byte_at(s, j) & 63);
        mn = int(byte_at(s, j + 4) & 63);
    } else {
        sc = int((byte_at(s, j + 4) & 0x0f) | ((byte_at(s, j - 4) >> 6) << 4));
        mn = int((byte_at(s, j + 4) >> 4) | ((byte_at(s, j) >> 6) << 4));
    }
}

// Values 8 * chunk .. 8 * chunk + 7 of a block of a format with one scale, from its body
// (the block without the scale, in either layout) and its scale d.
template <int T>
__device__ __forceinline__ void dequantize_body_chunk(const char* body, float d, int chunk, float (&v)[8]) {
    if constexpr (T == kQ8_0) {
        const int8_t* qs = reinterpret_cast<const int8_t*>(body) + 8 * chunk;
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(d, float(qs[i]));
    } else if constexpr (T == kQ4_0 || T == kIQ4_NL) {
        // Values 0..15 are the low nibbles of bytes 0..15, values 16..31 the high nibbles.
        const char* qs = body + 8 * (chunk & 1);
        const int shift = (chunk >> 1) * 4;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const uint32_t q = (byte_at(qs, i) >> shift) & 0x0fu;
            if constexpr (T == kQ4_0)
                v[i] = __fmul_rn(d, float(int(q) - 8));
            else
                v[i] = __fmul_rn(d, iq4_level(q));
        }
    } else if constexpr (T == kQ5_0) {
        // The body is qh, then the nibbles as q4_0's.
        int q[8];
        five_bit_codes(body + 4, le32_at(body), chunk, q);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(d, float(q[i] - 16));
    } else {
        static_assert(T == kQ6_K, "not a format with one scale per block");
        // Value e = 128 h + r: low four bits from ql, high two from qh, int8 scale per 16.
        const int e0 = 8 * chunk, h = e0 / 128, r0 = e0 % 128;
        const char* ql = body + 64 * h + r0 % 64;
        const char* qh = body + 128 + 32 * h + r0 % 32;
        const int low_shift = 4 * (r0 / 64), high_shift = 2 * (r0 / 32);
        const float scale = __fmul_rn(d, float(reinterpret_cast<const int8_t*>(body + 192)[e0 / 16]));
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int low = int((byte_at(ql, i) >> low_shift) & 0x0f);
            const int high = int((byte_at(qh, i) >> high_shift) & 0x03);
            v[i] = __fmul_rn(scale, float((low | high << 4) - 32));
        }
    }
}

// Values 8 * chunk .. 8 * chunk + 7 of the block at blk (chunk < kValues / 8).
template <int T> __device__ __forceinline__ void dequantize_chunk(const char* blk, int chunk, float (&v)[8]) {
    if constexpr (SingleScale<T>::kHas) {
        dequantize_body_chunk<T>(blk + kBodyOffset<T>, f16_bits_at(blk + SingleScale<T>::kScaleOffset), chunk,
                                 v);
    } else if constexpr (T == kQ4_1) {
        // Values 0..15 are the low nibbles of bytes 0..15, values 16..31 the high nibbles.
        const float d = f16_bits_at(blk);
        const char* qs = blk + 4 + 8 * (chunk & 1);
        const int shift = (chunk >> 1) * 4;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int q = int((byte_at(qs, i) >> shift) & 0x0f);
            v[i] = __fadd_rn(__fmul_rn(d, float(q)), f16_bits_at(blk + 2));
        }
    } else if constexpr (T == kQ5_1) { // (q5_0 has one scale: dequantize_body_chunk)
        const float d = f16_bits_at(blk);
        int q[8];
        five_bit_codes(blk + 8, le32_at(blk + 4), chunk, q);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = __fadd_rn(__fmul_rn(d, float(q[i])), f16_bits_at(blk + 2));
    } else if constexpr (T == kQ4_K || T == kQ5_K) {
        // Sub-block j = chunk / 4 (32 values): x = (d * sc) * q - (dmin * mn).
        constexpr int kQs = T == kQ4_K ? 16 : 48;
        const int j = chunk / 4, l0 = 8 * (chunk % 4);
        int sc, mn;
        scale_min_k4(blk + 4, j, sc, mn);
        const float scale = __fmul_rn(f16_bits_at(blk), float(sc));
        const float offset = __fmul_rn(f16_bits_at(blk + 2), float(mn));
        const char* qs = blk + kQs + (j / 2) * 32 + l0;
        const int shift = (j % 2) * 4;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            int q = int((byte_at(qs, i) >> shift) & 0x0f);
            if constexpr (T == kQ5_K) q |= int((byte_at(blk + 16, l0 + i) >> j) & 1u) << 4;
            v[i] = __fsub_rn(__fmul_rn(scale, float(q)), offset);
        }
    } else if constexpr (T == kQ2_K) {
        // Sub-block e0 / 16: x = (d * sc) * q - (dmin * mn); value 128 h + r is bits 2 (r / 32)
        // of qs byte 32 h + r % 32 (the eight values of a chunk share h, r / 32 and the scale).
        const int e0 = 8 * chunk, r0 = e0 % 128;
        const uint32_t sc = byte_at(blk, e0 / 16);
        const float scale = __fmul_rn(f16_bits_at(blk + 80), float(sc & 15u));
        const float offset = __fmul_rn(f16_bits_at(blk + 82), float(sc >> 4));
        const char* qs = blk + 16 + 32 * (e0 / 128) + r0 % 32;
        const int shift = 2 * (r0 / 32);
#pragma unroll
        for (int i = 0; i < 8; ++i)
            v[i] = __fsub_rn(__fmul_rn(scale, float((byte_at(qs, i) >> shift) & 3u)), offset);
    } else if constexpr (T == kQ3_K) {
        // x = (d * (sc - 32)) * (two bits of qs - (hmask bit ? 0 : 4)); the 6-bit scale of
        // sub-block j: low nibble in byte j (j < 8) or the high one of byte j - 8, top bits
        // 2 (j / 4) of byte 8 + j % 4 (all at 96).
        const int e0 = 8 * chunk, r0 = e0 % 128, j = e0 / 16;
        const uint32_t low4 = j < 8 ? byte_at(blk + 96, j) & 15u : byte_at(blk + 96, j - 8) >> 4;
        const uint32_t sc = low4 | ((byte_at(blk + 104, j % 4) >> (2 * (j / 4))) & 3u) << 4;
        const float scale = __fmul_rn(f16_bits_at(blk + 108), float(int(sc) - 32));
        const char* qs = blk + 32 + 32 * (e0 / 128) + r0 % 32;
        const int shift = 2 * (r0 / 32), hbit = e0 / 32;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int low = int((byte_at(qs, i) >> shift) & 3u);
            const int high = int((byte_at(blk, (e0 + i) % 32) >> hbit) & 1u);
            v[i] = __fmul_rn(scale, float(low - (high ? 0 : 4)));
        }
    } else {
        static_assert(T == kIQ4_XS, "unknown block type");
        // Sub-block j = chunk / 4 (32 values): x = (d * (sc - 32)) * level.
        const int j = chunk / 4, l0 = 8 * (chunk % 4);
        const uint32_t scales_h = byte_at(blk, 2) | byte_at(blk, 3) << 8;
        const uint32_t sc = ((byte_at(blk + 4, j / 2) >> (4 * (j % 2))) & 15u) | ((scales_h >> (2 * j)) & 3u)
                                                                                     << 4;
        const float scale = __fmul_rn(f16_bits_at(blk), float(int(sc) - 32));
        const char* qs = blk + 8 + 16 * j + (l0 & 15);
        const int shift = l0 < 16 ? 0 : 4;
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(scale, iq4_level((byte_at(qs, i) >> shift) & 15u));
    }
}

// Where block ib of a scales-last row of K values keeps its body and its scale.
template <int V> __device__ __forceinline__ const char* scales_last_body(const char* row, int64_t ib) {
    return row + ib * QuantBlock<V>::kBody;
}
template <int V>
__device__ __forceinline__ const char* scales_last_scale(const char* row, int64_t K, int64_t ib) {
    using B = QuantBlock<V>;
    return row + (K / B::kValues) * B::kBody + 2 * ib;
}

// Values 8 c .. 8 c + 7 of a row of K values of view type T (a block format, or one with the
// scales last).
template <int T>
__device__ __forceinline__ void dequantize_row_chunk(const char* row, int64_t K, int64_t c, float (&v)[8]) {
    if constexpr (is_scales_last_id(T)) {
        constexpr int kChunks = QuantBlock<T>::kValues / 8;
        const int64_t ib = c / kChunks;
        dequantize_body_chunk<block_type_of(T)>(
            scales_last_body<T>(row, ib), f16_bits_at(scales_last_scale<T>(row, K, ib)), int(c % kChunks), v);
    } else {
        using B = QuantBlock<T>;
        constexpr int kChunks = B::kValues / 8;
        dequantize_chunk<T>(row + (c / kChunks) * B::kBytes, int(c % kChunks), v);
    }
}

// Element i0 of a packed row of K values of `type` (generic element access; kernels that
// read whole rows use dequantize_row_chunk directly). Not inlined: it would bloat every caller.
__device__ __noinline__ inline float dequantize_element(int type, const char* row, int64_t K, int64_t i0) {
    float v[8];
    const int chunk_value = int(i0 % 8);
    auto chunk_of = [&](auto tag) { dequantize_row_chunk<decltype(tag)::value>(row, K, i0 / 8, v); };
    switch (type) {
    case kQ8_0ScalesLast:
        chunk_of(std::integral_constant<int, kQ8_0ScalesLast>{});
        break;
    case kQ4_0ScalesLast:
        chunk_of(std::integral_constant<int, kQ4_0ScalesLast>{});
        break;
    case kQ5_0ScalesLast:
        chunk_of(std::integral_constant<int, kQ5_0ScalesLast>{});
        break;
    case kIQ4_NLScalesLast:
        chunk_of(std::integral_constant<int, kIQ4_NLScalesLast>{});
        break;
    case kQ6_KScalesLast:
        chunk_of(std::integral_constant<int, kQ6_KScalesLast>{});
        break;
    case kQ8_0:
        chunk_of(std::integral_constant<int, kQ8_0>{});
        break;
    case kQ4_0:
        chunk_of(std::integral_constant<int, kQ4_0>{});
        break;
    case kQ4_1:
        chunk_of(std::integral_constant<int, kQ4_1>{});
        break;
    case kQ5_0:
        chunk_of(std::integral_constant<int, kQ5_0>{});
        break;
    case kQ5_1:
        chunk_of(std::integral_constant<int, kQ5_1>{});
        break;
    case kQ4_K:
        chunk_of(std::integral_constant<int, kQ4_K>{});
        break;
    case kQ5_K:
        chunk_of(std::integral_constant<int, kQ5_K>{});
        break;
    case kQ6_K:
        chunk_of(std::integral_constant<int, kQ6_K>{});
        break;
    case kQ2_K:
        chunk_of(std::integral_constant<int, kQ2_K>{});
        break;
    case kQ3_K:
        chunk_of(std::integral_constant<int, kQ3_K>{});
        break;
    case kIQ4_NL:
        chunk_of(std::integral_constant<int, kIQ4_NL>{});
        break;
    case kIQ4_XS:
        chunk_of(std::integral_constant<int, kIQ4_XS>{});
        break;
    default:
        return __int_as_float(0x7fc00000); // NaN: unsupported types never get here
    }
    float out = v[0];
#pragma unroll
    for (int i = 1; i < 8; ++i)
        if (i == chunk_value) out = v[i];
    return out;
}

} // namespace gfa::cuda
