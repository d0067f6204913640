// What the shaders of the ops other than attention share: the parameter block (mirrored by
// OpParams in vk_ops.h), up to three sources and a destination, typed reads of any GGUF
// type the library stores (f32, f16, bf16, i32, and the quantized blocks, decoded exactly as
// src/quants.cpp, src/quants_k.cpp and src/quants_iq4.cpp do), typed writes, and a status word through which a
// shader reports bad data (a row index out of range) to the host.
//
// Tensors are bound as arrays of 32-bit words and addressed in BYTES: a descriptor holds the
// element counts, the byte strides and the byte offset of element 0 from the binding's start,
// so quantized rows (blocks of 18, 34, 210 ... bytes) are addressed like any other.
#include "math.glsl"

// gfa::Type values.
const uint T_F32 = 0u, T_F16 = 1u, T_Q4_0 = 2u, T_Q4_1 = 3u, T_Q5_0 = 6u, T_Q5_1 = 7u, T_Q8_0 = 8u;
const uint T_Q2_K = 10u, T_Q3_K = 11u, T_Q4_K = 12u, T_Q5_K = 13u, T_Q6_K = 14u, T_IQ4_NL = 20u, T_IQ4_XS = 23u;
const uint T_I32 = 26u, T_I64 = 27u, T_BF16 = 30u;
// The levels of the IQ4 formats' 4-bit indices (gfa::kIq4Levels).
const int IQ4_LEVELS[16] = int[16](-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);

struct TensorDesc {
    uvec4 ne; // elements per dim
    uvec4 nb; // byte stride per dim
    uint off; // byte offset of element 0 from the binding's start
    uint type;
    uint pad0, pad1;
};

layout(std430, binding = 0) readonly buffer ParamsBlock {
    TensorDesc src0, src1, src2, dst;
    uvec4 iarg; // integer arguments of the op
    vec4 farg;  // float arguments of the op
    uint op;    // which of a shader's ops
    uint n;     // work items (elements, rows, ...)
    uint pad0, pad1;
} P;

// Sources are read-only except in shaders that update them in place (AdamW's moments).
#ifdef GFA_WRITABLE_SOURCES
#define SOURCE_ACCESS
#else
#define SOURCE_ACCESS readonly
#endif
layout(std430, binding = 1) readonly buffer Src0 { uint src0_words[]; };
layout(std430, binding = 2) SOURCE_ACCESS buffer Src1 { uint src1_words[]; };
layout(std430, binding = 3) SOURCE_ACCESS buffer Src2 { uint src2_words[]; };
layout(std430, binding = 4) buffer Dst { uint dst_words[]; };
// The status word, then the first bad expert id mul_mat_id met, for the host's message: its
// token + 1 (non-zero once a report has taken these words), the id, the number of experts.
layout(std430, binding = 5) buffer Status { uint status_word; uint status_detail[3]; };
layout(std430, binding = 6) readonly buffer Table { uint table_words[]; }; // computed by the host
layout(std430, binding = 7) readonly buffer Extra { uint extra_words[]; }; // a fourth input

// Bits of the status word; the host turns them into errors when the work has run.
const uint STATUS_ROW_OUT_OF_RANGE = 1u;
const uint STATUS_CLASS_OUT_OF_RANGE = 2u; // a cross-entropy class label outside the logits
const uint STATUS_EXPERT_OUT_OF_RANGE = 4u; // a mul_mat_id expert id outside [0, E)
void report(uint bits) {
    atomicOr(status_word, bits);
}
// Reports expert id `e` of token `t` outside [0, E); the first report keeps its numbers.
void report_expert(int e, uint t, uint E) {
    report(STATUS_EXPERT_OUT_OF_RANGE);
    if (atomicCompSwap(status_detail[0], 0u, t + 1u) == 0u) {
        status_detail[1] = uint(e);
        status_detail[2] = E;
    }
}

bool is_quantized(uint type) {
    return type == T_Q4_0 || type == T_Q4_1 || type == T_Q5_0 || type == T_Q5_1 || type == T_Q8_0 ||
           type == T_Q2_K || type == T_Q3_K || type == T_Q4_K || type == T_Q5_K || type == T_Q6_K ||
           type == T_IQ4_NL || type == T_IQ4_XS;
}
// Values and bytes per block.
uint block_values(uint type) {
    return type == T_Q2_K || type == T_Q3_K || type == T_Q4_K || type == T_Q5_K || type == T_Q6_K ||
                   type == T_IQ4_XS
               ? 256u
               : 32u;
}
uint block_bytes(uint type) {
    switch (type) {
    case T_Q4_0: return 18u;
    case T_IQ4_NL: return 18u;
    case T_Q2_K: return 84u;
    case T_Q3_K: return 110u;
    case T_IQ4_XS: return 136u;
    case T_Q4_1: return 20u;
    case T_Q5_0: return 22u;
    case T_Q5_1: return 24u;
    case T_Q8_0: return 34u;
    case T_Q4_K: return 144u;
    case T_Q5_K: return 176u;
    default: return 210u; // T_Q6_K
    }
}

// Byte address of element (i0, i1, i2, i3) of a plain (not block) tensor.
uint byte_of(TensorDesc t, uint i0, uint i1, uint i2, uint i3) {
    return t.off + i0 * t.nb.x + i1 * t.nb.y + i2 * t.nb.z + i3 * t.nb.w;
}
// Byte address of the row (i1, i2, i3).
uint row_of(TensorDesc t, uint i1, uint i2, uint i3) {
    return t.off + i1 * t.nb.y + i2 * t.nb.z + i3 * t.nb.w;
}
// Element coordinates of flat (row-major) index k in a tensor of shape ne.
uvec4 unflatten(uint k, uvec4 ne) {
    const uint i0 = k % ne.x;
    k /= ne.x;
    const uint i1 = k % ne.y;
    k /= ne.y;
    return uvec4(i0, i1, k % ne.z, k / ne.z);
}

// Reads of one bound tensor. NAME_at(i0, i1, i2, i3) reads any type as f32; NAME_element(row,
// i0) reads element i0 of the row starting at byte `row` (blocks decoded). The dequantization
// is `precise` so that no multiply and add fuse: the results equal the CPU's bit for bit.
#define TENSOR_READS(NAME, WORDS, DESC)                                                             \
    uint NAME##_u8(uint b) { return (WORDS[b >> 2] >> ((b & 3u) * 8u)) & 0xffu; }                   \
    int NAME##_i8(uint b) { return int(NAME##_u8(b) << 24) >> 24; }                                 \
    uint NAME##_u16(uint b) { return (WORDS[b >> 2] >> ((b & 2u) * 8u)) & 0xffffu; }                \
    uint NAME##_u32_at2(uint b) { return NAME##_u16(b) | (NAME##_u16(b + 2u) << 16); }               \
    float NAME##_f16(uint b) { return unpackHalf2x16(NAME##_u16(b)).x; }                            \
    float NAME##_plain(uint type, uint b) {                                                         \
        if (type == T_F32) return uintBitsToFloat(WORDS[b >> 2]);                                   \
        if (type == T_F16) return NAME##_f16(b);                                                    \
        if (type == T_BF16) return uintBitsToFloat(NAME##_u16(b) << 16);                            \
        return float(int(WORDS[b >> 2])); /* T_I32 (and the low word of T_I64) */                   \
    }                                                                                               \
    /* Sub-block j's six-bit scale and min in a Q4_K / Q5_K block's 12 packed bytes at s. */         \
    uvec2 NAME##_scale_min_k4(uint s, uint j) {                                                     \
        if (j < 4u) return uvec2(NAME##_u8(s + j) & 63u, NAME##_u8(s + j + 4u) & 63u);               \
        return uvec2((NAME##_u8(s + j + 4u) & 0x0fu) | ((NAME##_u8(s + j - 4u) >> 6) << 4),          \
                     (NAME##_u8(s + j + 4u) >> 4) | ((NAME##_u8(s + j) >> 6) << 4));                 \
    }                                                                                               \
    float NAME##_dequant(uint type, uint blk, uint e) {                                             \
        precise float v;                                                                            \
        if (type == T_Q8_0) {                                                                       \
            v = NAME##_f16(blk) * float(NAME##_i8(blk + 2u + e));                                   \
        } else if (type == T_Q4_0 || type == T_Q4_1) {                                              \
            const uint qs = blk + (type == T_Q4_0 ? 2u : 4u);                                       \
            const uint q = (NAME##_u8(qs + (e & 15u)) >> (e < 16u ? 0u : 4u)) & 0x0fu;              \
            if (type == T_Q4_0) v = NAME##_f16(blk) * float(int(q) - 8);                            \
            else v = NAME##_f16(blk) * float(q) + NAME##_f16(blk + 2u);                             \
        } else if (type == T_Q5_0 || type == T_Q5_1) {                                              \
            const uint qh_at = blk + (type == T_Q5_0 ? 2u : 4u);                                    \
            const uint qh = NAME##_u32_at2(qh_at);                                                  \
            const uint q = ((NAME##_u8(qh_at + 4u + (e & 15u)) >> (e < 16u ? 0u : 4u)) & 0x0fu) |    \
                           (((qh >> e) & 1u) << 4);                                                 \
            if (type == T_Q5_0) v = NAME##_f16(blk) * float(int(q) - 16);                           \
            else v = NAME##_f16(blk) * float(q) + NAME##_f16(blk + 2u);                             \
        } else if (type == T_Q4_K || type == T_Q5_K) {                                              \
            /* Sub-block j (32 values): x = (d * sc) * q - (dmin * mn). */                          \
            const uint j = e / 32u, l = e % 32u;                                                    \
            const uvec2 sm = NAME##_scale_min_k4(blk + 4u, j);                                      \
            precise float scale = NAME##_f16(blk) * float(sm.x);                                    \
            precise float offset = NAME##_f16(blk + 2u) * float(sm.y);                              \
            const uint qs = blk + (type == T_Q4_K ? 16u : 48u) + (j / 2u) * 32u + l;                \
            uint q = (NAME##_u8(qs) >> ((j % 2u) * 4u)) & 0x0fu;                                    \
            if (type == T_Q5_K) q |= ((NAME##_u8(blk + 16u + l) >> j) & 1u) << 4;                   \
            v = scale * float(q) - offset;                                                          \
        } else if (type == T_Q2_K) {                                                                \
            /* 16 sub-blocks: x = (d * sc) * q - (dmin * mn); value 128 h + r is bits 2 (r / 32) of  \
               qs byte 32 h + r % 32 */                                                             \
            const uint sc = NAME##_u8(blk + e / 16u), r = e % 128u;                                 \
            precise float scale = NAME##_f16(blk + 80u) * float(sc & 15u);                          \
            precise float offset = NAME##_f16(blk + 82u) * float(sc >> 4);                          \
            const uint q = (NAME##_u8(blk + 16u + 32u * (e / 128u) + r % 32u) >> (2u * (r / 32u))) & 3u; \
            v = scale * float(q) - offset;                                                          \
        } else if (type == T_Q3_K) {                                                                \
            /* 16 sub-blocks: x = (d * (sc - 32)) * (low two bits - (hmask bit ? 0 : 4)) */          \
            const uint j = e / 16u, r = e % 128u;                                                   \
            const uint lo4 = j < 8u ? NAME##_u8(blk + 96u + j) & 15u : NAME##_u8(blk + 88u + j) >> 4;   \
            const uint sc = lo4 | (((NAME##_u8(blk + 104u + j % 4u) >> (2u * (j / 4u))) & 3u) << 4);    \
            precise float scale = NAME##_f16(blk + 108u) * float(int(sc) - 32);                     \
            const uint low = (NAME##_u8(blk + 32u + 32u * (e / 128u) + r % 32u) >> (2u * (r / 32u))) & 3u; \
            const uint high = (NAME##_u8(blk + e % 32u) >> (e / 32u)) & 1u;                         \
            v = scale * float(int(low) - (high != 0u ? 0 : 4));                                     \
        } else if (type == T_IQ4_NL) {                                                              \
            const uint i = (NAME##_u8(blk + 2u + (e & 15u)) >> (e < 16u ? 0u : 4u)) & 0x0fu;        \
            v = NAME##_f16(blk) * float(IQ4_LEVELS[i]);                                             \
        } else if (type == T_IQ4_XS) {                                                              \
            /* 8 sub-blocks of 32: x = (d * (sc - 32)) * level */                                   \
            const uint j = e / 32u, l = e % 32u;                                                    \
            const uint sc = ((NAME##_u8(blk + 4u + j / 2u) >> (4u * (j % 2u))) & 15u) |              \
                            (((NAME##_u16(blk + 2u) >> (2u * j)) & 3u) << 4);                       \
            precise float scale = NAME##_f16(blk) * float(int(sc) - 32);                            \
            const uint i = (NAME##_u8(blk + 8u + 16u * j + (l & 15u)) >> (l < 16u ? 0u : 4u)) & 0x0fu; \
            v = scale * float(IQ4_LEVELS[i]);                                                       \
        } else { /* T_Q6_K: value e = 128 h + r, four low bits in ql, two high in qh */             \
            const uint h = e / 128u, r = e % 128u;                                                  \
            const uint low = (NAME##_u8(blk + 64u * h + r % 64u) >> (4u * (r / 64u))) & 0x0fu;       \
            const uint high = (NAME##_u8(blk + 128u + 32u * h + r % 32u) >> (2u * (r / 32u))) & 3u;  \
            precise float scale = NAME##_f16(blk + 208u) * float(NAME##_i8(blk + 192u + e / 16u));   \
            v = scale * float(int(low | (high << 4)) - 32);                                         \
        }                                                                                           \
        return v;                                                                                   \
    }                                                                                               \
    float NAME##_element(uint row, uint i0) {                                                       \
        const uint type = DESC.type;                                                                \
        if (!is_quantized(type)) return NAME##_plain(type, row + i0 * DESC.nb.x);                   \
        const uint per = block_values(type);                                                        \
        return NAME##_dequant(type, row + (i0 / per) * block_bytes(type), i0 % per);                \
    }                                                                                               \
    float NAME##_at(uint i0, uint i1, uint i2, uint i3) {                                           \
        return NAME##_element(row_of(DESC, i1, i2, i3), i0);                                        \
    }

TENSOR_READS(src0, src0_words, P.src0)
TENSOR_READS(src1, src1_words, P.src1)
TENSOR_READS(src2, src2_words, P.src2)

// Writes 16 bits at byte b (even) of dst. The halfword shares its word with a neighbour
// another invocation may write at the same time: clearing our half and setting it are two
// atomics on disjoint bits, correct in any order.
void store_dst_u16(uint b, uint bits) {
    const uint shift = 8u * (b & 2u);
    atomicAnd(dst_words[b >> 2], ~(0xffffu << shift));
    atomicOr(dst_words[b >> 2], bits << shift);
}
// Writes the element at byte b of dst (f32, f16, bf16 or i32).
void store_dst(uint b, float x) {
    const uint type = P.dst.type;
    if (type == T_F32) {
        dst_words[b >> 2] = floatBitsToUint(x);
    } else if (type == T_I32) {
        dst_words[b >> 2] = uint(int(x));
    } else {
        store_dst_u16(b, type == T_F16 ? f16_bits(x) : bf16_bits(x));
    }
}
void store_dst_at(uint i0, uint i1, uint i2, uint i3, float x) {
    store_dst(byte_of(P.dst, i0, i1, i2, i3), x);
}

// Invocations of the whole dispatch and this one's index, for grid-stride loops (the host
// caps the workgroup count, so every count of items fits the dispatch limits).
uint n_invocations() {
    return gl_NumWorkGroups.x * gl_WorkGroupSize.x;
}
uint invocation() {
    return gl_GlobalInvocationID.x;
}
