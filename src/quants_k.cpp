// The GGUF block formats used by llama.cpp models beyond Q8_0/Q4_0: Q4_1, Q5_0, Q5_1 and the
// 256-element "K" formats Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
//
// Decoders are exact: each value is computed with the same float operations, in the same
// order, as the format's definition (scale products first, then one multiply and one add),
// and multiply-add contraction is switched off so that an FMA cannot change the last bit.
// Encoders fit each block by a few rounds of least squares; they do not reproduce
// llama.cpp's search bit for bit but produce valid blocks of comparable error.
#include "quants.h"

#include <algorithm>
#include <cmath>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace gfa::quant {

namespace {

int nearest_int(float x) {
    return int(std::lrintf(x));
}

// Round-trip a float through f16 storage: the encoder must fit q against the scale the
// decoder will actually see.
float as_stored_f16(float x, uint16_t* bits) {
    *bits = fp32_to_fp16(x);
    return fp16_to_fp32(*bits);
}

uint32_t load_u32_le(const uint8_t* p) {
    return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
void store_u32_le(uint8_t* p, uint32_t v) {
    for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i));
}

// ---- affine 32-element blocks (Q4_1, Q5_1): x = d * q + m -------------------------------

// Chooses the step and offset from the block's range and returns q for every element.
template <int kLevels>
void fit_affine_block(const float* x, int n, uint16_t* d_bits, uint16_t* m_bits, uint8_t* q) {
    float lo = x[0], hi = x[0];
    for (int j = 1; j < n; ++j) lo = std::min(lo, x[j]), hi = std::max(hi, x[j]);
    const float m = as_stored_f16(lo, m_bits);
    // The stored offset may round above the true minimum; widen the step to still reach hi.
    const float d = as_stored_f16((hi - m) / float(kLevels - 1), d_bits);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < n; ++j) q[j] = uint8_t(std::clamp(nearest_int((x[j] - m) * id), 0, kLevels - 1));
}

// ---- K-format helpers -------------------------------------------------------------------

// Sub-block scales and mins of Q4_K/Q5_K: six bits each, packed into 12 bytes.
void unpack_scale_min_k4(int j, const uint8_t* s, uint8_t* sc, uint8_t* mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = uint8_t((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4));
        *mn = uint8_t((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

void pack_scale_min_k4(const uint8_t* sc, const uint8_t* mn, uint8_t* s) {
    for (int j = 0; j < 4; ++j) {
        s[j] = uint8_t((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = uint8_t((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
        s[j + 8] = uint8_t((sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4));
    }
}

// Fits x ~= scale * q - offset with q in 0..nmax and offset >= 0 (the formats can only
// subtract a non-negative min). Starts from the range, then alternates rounding q and a
// least-squares solve for (scale, offset), keeping the best fit seen.
void fit_scale_min(const float* x, int n, int nmax, float* scale_out, float* offset_out) {
    float lo = 0.0f, hi = x[0];
    for (int j = 0; j < n; ++j) lo = std::min(lo, x[j]), hi = std::max(hi, x[j]);
    if (hi <= lo) {
        *scale_out = 0.0f;
        *offset_out = -lo;
        return;
    }
    float scale = (hi - lo) / float(nmax), offset = -lo;
    auto error_of = [&](float s, float o) {
        if (s <= 0.0f) return INFINITY;
        double e = 0.0;
        for (int j = 0; j < n; ++j) {
            const int q = std::clamp(nearest_int((x[j] + o) / s), 0, nmax);
            const double diff = double(s) * q - o - x[j];
            e += diff * diff;
        }
        return float(e);
    };
    float best_err = error_of(scale, offset), best_scale = scale, best_offset = offset;
    for (int iter = 0; iter < 4; ++iter) {
        // q from the current fit, then the least-squares (scale, offset) for that q.
        double sq = 0, sqq = 0, sx = 0, sqx = 0;
        for (int j = 0; j < n; ++j) {
            const int q = std::clamp(nearest_int((x[j] + offset) / scale), 0, nmax);
            sq += q, sqq += double(q) * q, sx += x[j], sqx += double(q) * x[j];
        }
        const double det = n * sqq - sq * sq;
        if (det <= 0) break;
        double s = (n * sqx - sq * sx) / det;
        double o = -(sx - s * sq) / n;
        if (o < 0) { // the best line passes above zero at q = 0: pin the offset to zero
            o = 0;
            s = sqq > 0 ? sqx / sqq : 0;
        }
        if (s <= 0) break;
        scale = float(s), offset = float(o);
        const float err = error_of(scale, offset);
        if (err < best_err) best_err = err, best_scale = scale, best_offset = offset;
    }
    *scale_out = best_scale;
    *offset_out = best_offset;
}

// Shared encoder for Q4_K and Q5_K: fits the eight sub-blocks, quantizes their scales and
// mins to six bits against the super-block maxima, and returns q (0..nmax) per element.
void quantize_k_superblock(const float* x, int nmax, uint16_t* d_bits, uint16_t* dmin_bits,
                           uint8_t* packed_scales, uint8_t* q) {
    constexpr int kSub = 32, kNumSub = QK_K / kSub;
    float scale[kNumSub], offset[kNumSub];
    float max_scale = 0.0f, max_offset = 0.0f;
    for (int j = 0; j < kNumSub; ++j) {
        fit_scale_min(x + j * kSub, kSub, nmax, &scale[j], &offset[j]);
        max_scale = std::max(max_scale, scale[j]);
        max_offset = std::max(max_offset, offset[j]);
    }
    const float d = as_stored_f16(max_scale / 63.0f, d_bits);
    const float dmin = as_stored_f16(max_offset / 63.0f, dmin_bits);
    uint8_t sc[kNumSub], mn[kNumSub];
    for (int j = 0; j < kNumSub; ++j) {
        sc[j] = uint8_t(d > 0.0f ? std::clamp(nearest_int(scale[j] / d), 0, 63) : 0);
        mn[j] = uint8_t(dmin > 0.0f ? std::clamp(nearest_int(offset[j] / dmin), 0, 63) : 0);
    }
    pack_scale_min_k4(sc, mn, packed_scales);
    // Re-fit q against the scales as the decoder will reconstruct them.
    for (int j = 0; j < kNumSub; ++j) {
        const float s = d * float(sc[j]), o = dmin * float(mn[j]);
        for (int l = 0; l < kSub; ++l) {
            const float v = x[j * kSub + l];
            q[j * kSub + l] = uint8_t(s > 0.0f ? std::clamp(nearest_int((v + o) / s), 0, nmax) : 0);
        }
    }
}

} // namespace

// ---- Q4_1 -------------------------------------------------------------------------------

void dequantize_q4_1(const void* src, float* dst, int64_t n) {
    const block_q4_1* b = static_cast<const block_q4_1*>(src);
    for (int64_t i = 0; i < n / QK4_1; ++i, dst += QK4_1) {
        const float d = fp16_to_fp32(b[i].d), m = fp16_to_fp32(b[i].m);
        for (int j = 0; j < QK4_1 / 2; ++j) {
            dst[j] = d * float(b[i].qs[j] & 0x0f) + m;
            dst[j + QK4_1 / 2] = d * float(b[i].qs[j] >> 4) + m;
        }
    }
}

void quantize_q4_1(const float* src, void* dst, int64_t n) {
    block_q4_1* b = static_cast<block_q4_1*>(dst);
    for (int64_t i = 0; i < n / QK4_1; ++i) {
        uint8_t q[QK4_1];
        fit_affine_block<16>(src + i * QK4_1, QK4_1, &b[i].d, &b[i].m, q);
        for (int j = 0; j < QK4_1 / 2; ++j) b[i].qs[j] = uint8_t(q[j] | (q[j + QK4_1 / 2] << 4));
    }
}

// ---- Q5_0 -------------------------------------------------------------------------------

void dequantize_q5_0(const void* src, float* dst, int64_t n) {
    const block_q5_0* b = static_cast<const block_q5_0*>(src);
    for (int64_t i = 0; i < n / QK5_0; ++i, dst += QK5_0) {
        const float d = fp16_to_fp32(b[i].d);
        const uint32_t qh = load_u32_le(b[i].qh);
        for (int j = 0; j < QK5_0 / 2; ++j) {
            const int lo = (b[i].qs[j] & 0x0f) | int((qh >> j) & 1u) << 4;
            const int hi = (b[i].qs[j] >> 4) | int((qh >> (j + QK5_0 / 2)) & 1u) << 4;
            dst[j] = d * float(lo - 16);
            dst[j + QK5_0 / 2] = d * float(hi - 16);
        }
    }
}

void quantize_q5_0(const float* src, void* dst, int64_t n) {
    block_q5_0* b = static_cast<block_q5_0*>(dst);
    for (int64_t i = 0; i < n / QK5_0; ++i) {
        const float* x = src + i * QK5_0;
        // As Q4_0: the value of largest magnitude maps to -16 so all 32 levels are usable.
        float amax = 0.0f, vmax = 0.0f;
        for (int j = 0; j < QK5_0; ++j)
            if (std::fabs(x[j]) > amax) amax = std::fabs(x[j]), vmax = x[j];
        const float d = as_stored_f16(vmax / -16.0f, &b[i].d);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint32_t qh = 0;
        for (int j = 0; j < QK5_0 / 2; ++j) {
            const int lo = std::clamp(nearest_int(x[j] * id) + 16, 0, 31);
            const int hi = std::clamp(nearest_int(x[j + QK5_0 / 2] * id) + 16, 0, 31);
            b[i].qs[j] = uint8_t((lo & 0x0f) | ((hi & 0x0f) << 4));
            qh |= uint32_t(lo >> 4) << j | uint32_t(hi >> 4) << (j + QK5_0 / 2);
        }
        store_u32_le(b[i].qh, qh);
    }
}

// ---- Q5_1 -------------------------------------------------------------------------------

void dequantize_q5_1(const void* src, float* dst, int64_t n) {
    const block_q5_1* b = static_cast<const block_q5_1*>(src);
    for (int64_t i = 0; i < n / QK5_1; ++i, dst += QK5_1) {
        const float d = fp16_to_fp32(b[i].d), m = fp16_to_fp32(b[i].m);
        const uint32_t qh = load_u32_le(b[i].qh);
        for (int j = 0; j < QK5_1 / 2; ++j) {
            const int lo = (b[i].qs[j] & 0x0f) | int((qh >> j) & 1u) << 4;
            const int hi = (b[i].qs[j] >> 4) | int((qh >> (j + QK5_1 / 2)) & 1u) << 4;
            dst[j] = d * float(lo) + m;
            dst[j + QK5_1 / 2] = d * float(hi) + m;
        }
    }
}

void quantize_q5_1(const float* src, void* dst, int64_t n) {
    block_q5_1* b = static_cast<block_q5_1*>(dst);
    for (int64_t i = 0; i < n / QK5_1; ++i) {
        uint8_t q[QK5_1];
        fit_affine_block<32>(src + i * QK5_1, QK5_1, &b[i].d, &b[i].m, q);
        uint32_t qh = 0;
        for (int j = 0; j < QK5_1 / 2; ++j) {
            const int lo = q[j], hi = q[j + QK5_1 / 2];
            b[i].qs[j] = uint8_t((lo & 0x0f) | ((hi & 0x0f) << 4));
            qh |= uint32_t(lo >> 4) << j | uint32_t(hi >> 4) << (j + QK5_1 / 2);
        }
        store_u32_le(b[i].qh, qh);
    }
}

// ---- Q4_K -------------------------------------------------------------------------------

void dequantize_q4_K(const void* src, float* dst, int64_t n) {
    const block_q4_K* b = static_cast<const block_q4_K*>(src);
    for (int64_t i = 0; i < n / QK_K; ++i, dst += QK_K) {
        const float d = fp16_to_fp32(b[i].d), dmin = fp16_to_fp32(b[i].dmin);
        for (int j = 0; j < QK_K / 32; ++j) {
            uint8_t sc, mn;
            unpack_scale_min_k4(j, b[i].scales, &sc, &mn);
            const float scale = d * float(sc), offset = dmin * float(mn);
            const uint8_t* qs = b[i].qs + (j / 2) * 32;
            const int shift = (j % 2) * 4;
            for (int l = 0; l < 32; ++l) dst[j * 32 + l] = scale * float((qs[l] >> shift) & 0x0f) - offset;
        }
    }
}

void quantize_q4_K(const float* src, void* dst, int64_t n) {
    block_q4_K* b = static_cast<block_q4_K*>(dst);
    for (int64_t i = 0; i < n / QK_K; ++i) {
        uint8_t q[QK_K];
        quantize_k_superblock(src + i * QK_K, 15, &b[i].d, &b[i].dmin, b[i].scales, q);
        for (int c = 0; c < QK_K / 64; ++c)
            for (int l = 0; l < 32; ++l)
                b[i].qs[c * 32 + l] = uint8_t(q[c * 64 + l] | (q[c * 64 + 32 + l] << 4));
    }
}

// ---- Q5_K -------------------------------------------------------------------------------

void dequantize_q5_K(const void* src, float* dst, int64_t n) {
    const block_q5_K* b = static_cast<const block_q5_K*>(src);
    for (int64_t i = 0; i < n / QK_K; ++i, dst += QK_K) {
        const float d = fp16_to_fp32(b[i].d), dmin = fp16_to_fp32(b[i].dmin);
        for (int j = 0; j < QK_K / 32; ++j) {
            uint8_t sc, mn;
            unpack_scale_min_k4(j, b[i].scales, &sc, &mn);
            const float scale = d * float(sc), offset = dmin * float(mn);
            const uint8_t* qs = b[i].qs + (j / 2) * 32;
            const int shift = (j % 2) * 4;
            for (int l = 0; l < 32; ++l) {
                const int q = ((qs[l] >> shift) & 0x0f) | ((b[i].qh[l] >> j) & 1) << 4;
                dst[j * 32 + l] = scale * float(q) - offset;
            }
        }
    }
}

void quantize_q5_K(const float* src, void* dst, int64_t n) {
    block_q5_K* b = static_cast<block_q5_K*>(dst);
    for (int64_t i = 0; i < n / QK_K; ++i) {
        uint8_t q[QK_K];
        quantize_k_superblock(src + i * QK_K, 31, &b[i].d, &b[i].dmin, b[i].scales, q);
        std::fill(std::begin(b[i].qh), std::end(b[i].qh), uint8_t(0));
        for (int c = 0; c < QK_K / 64; ++c)
            for (int l = 0; l < 32; ++l)
                b[i].qs[c * 32 + l] = uint8_t((q[c * 64 + l] & 0x0f) | ((q[c * 64 + 32 + l] & 0x0f) << 4));
        for (int j = 0; j < QK_K / 32; ++j)
            for (int l = 0; l < 32; ++l) b[i].qh[l] |= uint8_t((q[j * 32 + l] >> 4) << j);
    }
}

// ---- Q6_K -------------------------------------------------------------------------------

void dequantize_q6_K(const void* src, float* dst, int64_t n) {
    const block_q6_K* b = static_cast<const block_q6_K*>(src);
    for (int64_t i = 0; i < n / QK_K; ++i, dst += QK_K) {
        const float d = fp16_to_fp32(b[i].d);
        for (int h = 0; h < 2; ++h) {
            const uint8_t* ql = b[i].ql + 64 * h;
            const uint8_t* qh = b[i].qh + 32 * h;
            for (int r = 0; r < 128; ++r) {
                const int low = (ql[r % 64] >> (4 * (r / 64))) & 0x0f;
                const int high = (qh[r % 32] >> (2 * (r / 32))) & 0x03;
                const int e = 128 * h + r;
                const float scale = d * float(b[i].scales[e / 16]);
                dst[e] = scale * float((low | high << 4) - 32);
            }
        }
    }
}

void quantize_q6_K(const float* src, void* dst, int64_t n) {
    block_q6_K* b = static_cast<block_q6_K*>(dst);
    constexpr int kSub = 16, kNumSub = QK_K / kSub;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        const float* x = src + i * QK_K;
        // Symmetric sub-block scales: the largest magnitude (with its sign) maps to -32,
        // the one level the positive side lacks.
        float scale[kNumSub], max_scale = 0.0f;
        for (int j = 0; j < kNumSub; ++j) {
            float amax = 0.0f, vmax = 0.0f;
            for (int l = 0; l < kSub; ++l)
                if (std::fabs(x[j * kSub + l]) > amax)
                    amax = std::fabs(x[j * kSub + l]), vmax = x[j * kSub + l];
            scale[j] = vmax / -32.0f;
            if (std::fabs(scale[j]) > std::fabs(max_scale)) max_scale = scale[j];
        }
        // The int8 scales likewise give -128 to the largest sub-block scale.
        const float d = as_stored_f16(max_scale / -128.0f, &b[i].d);
        uint8_t q[QK_K];
        for (int j = 0; j < kNumSub; ++j) {
            const int sc = d != 0.0f ? std::clamp(nearest_int(scale[j] / d), -128, 127) : 0;
            b[i].scales[j] = int8_t(sc);
            const float s = d * float(sc);
            for (int l = 0; l < kSub; ++l) {
                const float v = x[j * kSub + l];
                q[j * kSub + l] = uint8_t(s != 0.0f ? std::clamp(nearest_int(v / s), -32, 31) + 32 : 32);
            }
        }
        for (int h = 0; h < 2; ++h) {
            uint8_t* ql = b[i].ql + 64 * h;
            uint8_t* qh = b[i].qh + 32 * h;
            std::fill(ql, ql + 64, uint8_t(0));
            std::fill(qh, qh + 32, uint8_t(0));
            for (int r = 0; r < 128; ++r) {
                const int v = q[128 * h + r];
                ql[r % 64] |= uint8_t((v & 0x0f) << (4 * (r / 64)));
                qh[r % 32] |= uint8_t((v >> 4) << (2 * (r / 32)));
            }
        }
    }
}

// ---- Q2_K -------------------------------------------------------------------------------

void dequantize_q2_K(const void* src, float* dst, int64_t n) {
    const block_q2_K* b = static_cast<const block_q2_K*>(src);
    for (int64_t i = 0; i < n / QK_K; ++i, dst += QK_K) {
        const float d = fp16_to_fp32(b[i].d), dmin = fp16_to_fp32(b[i].dmin);
        for (int e = 0; e < QK_K; ++e) {
            const uint8_t sc = b[i].scales[e / 16];
            const float scale = d * float(sc & 0x0f), offset = dmin * float(sc >> 4);
            const int r = e % 128;
            const int q = (b[i].qs[32 * (e / 128) + r % 32] >> (2 * (r / 32))) & 3;
            dst[e] = scale * float(q) - offset;
        }
    }
}

void quantize_q2_K(const float* src, void* dst, int64_t n) {
    block_q2_K* b = static_cast<block_q2_K*>(dst);
    constexpr int kSub = 16, kNumSub = QK_K / kSub;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        const float* x = src + i * QK_K;
        float scale[kNumSub], offset[kNumSub], max_scale = 0.0f, max_offset = 0.0f;
        for (int j = 0; j < kNumSub; ++j) {
            fit_scale_min(x + j * kSub, kSub, 3, &scale[j], &offset[j]);
            max_scale = std::max(max_scale, scale[j]);
            max_offset = std::max(max_offset, offset[j]);
        }
        const float d = as_stored_f16(max_scale / 15.0f, &b[i].d);
        const float dmin = as_stored_f16(max_offset / 15.0f, &b[i].dmin);
        std::fill(std::begin(b[i].qs), std::end(b[i].qs), uint8_t(0));
        for (int j = 0; j < kNumSub; ++j) {
            const int sc = d > 0.0f ? std::clamp(nearest_int(scale[j] / d), 0, 15) : 0;
            const int mn = dmin > 0.0f ? std::clamp(nearest_int(offset[j] / dmin), 0, 15) : 0;
            b[i].scales[j] = uint8_t(sc | mn << 4);
            // q against the scale and offset as the decoder rebuilds them
            const float s = d * float(sc), o = dmin * float(mn);
            for (int l = 0; l < kSub; ++l) {
                const int e = j * kSub + l, r = e % 128;
                const int q = s > 0.0f ? std::clamp(nearest_int((x[e] + o) / s), 0, 3) : 0;
                b[i].qs[32 * (e / 128) + r % 32] |= uint8_t(q << (2 * (r / 32)));
            }
        }
    }
}

// ---- Q3_K -------------------------------------------------------------------------------

namespace {

// The 6-bit scale of sub-block j (0..63; the decoder subtracts 32).
int q3_K_scale(const uint8_t* s, int j) {
    const int low = j < 8 ? s[j] & 0x0f : s[j - 8] >> 4;
    const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    return low | high << 4;
}

// Fits x ~= scale * q with q in -4..3 (three bits, the extra level on the negative side):
// the value of largest magnitude starts at -4, then least squares for the scale of the
// rounded q, keeping the best fit.
float fit_q3_scale(const float* x, int n) {
    float amax = 0.0f, vmax = 0.0f;
    for (int l = 0; l < n; ++l)
        if (std::fabs(x[l]) > amax) amax = std::fabs(x[l]), vmax = x[l];
    if (amax == 0.0f) return 0.0f;
    auto error_of = [&](float s) {
        double e = 0.0;
        for (int l = 0; l < n; ++l) {
            const double diff = double(s) * std::clamp(nearest_int(x[l] / s), -4, 3) - x[l];
            e += diff * diff;
        }
        return e;
    };
    float scale = vmax / -4.0f, best = scale;
    double best_err = error_of(scale);
    for (int iter = 0; iter < 3; ++iter) {
        double sxq = 0, sqq = 0;
        for (int l = 0; l < n; ++l) {
            const int q = std::clamp(nearest_int(x[l] / scale), -4, 3);
            sxq += double(x[l]) * q, sqq += double(q) * q;
        }
        if (sqq <= 0 || sxq == 0) break;
        scale = float(sxq / sqq);
        const double err = error_of(scale);
        if (err < best_err) best_err = err, best = scale;
    }
    return best;
}

} // namespace

void dequantize_q3_K(const void* src, float* dst, int64_t n) {
    const block_q3_K* b = static_cast<const block_q3_K*>(src);
    for (int64_t i = 0; i < n / QK_K; ++i, dst += QK_K) {
        const float d = fp16_to_fp32(b[i].d);
        for (int e = 0; e < QK_K; ++e) {
            const float scale = d * float(q3_K_scale(b[i].scales, e / 16) - 32);
            const int r = e % 128, low = (b[i].qs[32 * (e / 128) + r % 32] >> (2 * (r / 32))) & 3;
            const int high = (b[i].hmask[e % 32] >> (e / 32)) & 1;
            dst[e] = scale * float(low - (high ? 0 : 4));
        }
    }
}

void quantize_q3_K(const float* src, void* dst, int64_t n) {
    block_q3_K* b = static_cast<block_q3_K*>(dst);
    constexpr int kSub = 16, kNumSub = QK_K / kSub;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        const float* x = src + i * QK_K;
        float scale[kNumSub], max_scale = 0.0f;
        for (int j = 0; j < kNumSub; ++j) {
            scale[j] = fit_q3_scale(x + j * kSub, kSub);
            if (std::fabs(scale[j]) > std::fabs(max_scale)) max_scale = scale[j];
        }
        // The largest sub-block scale (with its sign) maps to -32, the level only the
        // negative side has.
        const float d = as_stored_f16(max_scale / -32.0f, &b[i].d);
        std::fill(std::begin(b[i].scales), std::end(b[i].scales), uint8_t(0));
        std::fill(std::begin(b[i].qs), std::end(b[i].qs), uint8_t(0));
        std::fill(std::begin(b[i].hmask), std::end(b[i].hmask), uint8_t(0));
        for (int j = 0; j < kNumSub; ++j) {
            const int sc = d != 0.0f ? std::clamp(nearest_int(scale[j] / d), -32, 31) : 0;
            const int stored = sc + 32;
            if (j < 8)
                b[i].scales[j] |= uint8_t(stored & 0x0f);
            else
                b[i].scales[j - 8] |= uint8_t((stored & 0x0f) << 4);
            b[i].scales[8 + j % 4] |= uint8_t((stored >> 4) << (2 * (j / 4)));
            const float s = d * float(sc);
            for (int l = 0; l < kSub; ++l) {
                const int e = j * kSub + l, r = e % 128;
                // q + 4 in 0..7: its low two bits in qs, the third in hmask
                const int u = (s != 0.0f ? std::clamp(nearest_int(x[e] / s), -4, 3) : 0) + 4;
                b[i].qs[32 * (e / 128) + r % 32] |= uint8_t((u & 3) << (2 * (r / 32)));
                b[i].hmask[e % 32] |= uint8_t((u >> 2) << (e / 32));
            }
        }
    }
}

} // namespace gfa::quant
