// The non-linear 4-bit GGUF formats IQ4_NL (blocks of 32, one f16 scale) and IQ4_XS
// (super-blocks of 256: eight 6-bit sub-block scales against one f16 scale). Each element is
// an index into kIq4Levels, a table of 16 levels spaced more finely near zero.
//
// Decoders are exact (the same float operations in the same order as the format's
// definition, no contraction into FMAs); encoders fit each block by least squares over the
// rounded indices and do not reproduce llama.cpp's search bit for bit.
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

// Index of the level nearest to v (levels in ascending order).
int nearest_level(float v) {
    int best = 0;
    float best_dist = std::fabs(v - float(kIq4Levels[0]));
    for (int k = 1; k < 16; ++k) {
        const float dist = std::fabs(v - float(kIq4Levels[k]));
        if (dist < best_dist) best_dist = dist, best = k;
    }
    return best;
}

// Fits x ~= scale * kIq4Levels[index]: the value of largest magnitude starts on the outermost
// level (-127), then least squares for the scale of the chosen indices, keeping the best fit.
float fit_iq4_scale(const float* x, int n) {
    float amax = 0.0f, vmax = 0.0f;
    for (int l = 0; l < n; ++l)
        if (std::fabs(x[l]) > amax) amax = std::fabs(x[l]), vmax = x[l];
    if (amax == 0.0f) return 0.0f;
    auto error_of = [&](float s) {
        double e = 0.0;
        for (int l = 0; l < n; ++l) {
            const double diff = double(s) * kIq4Levels[nearest_level(x[l] / s)] - x[l];
            e += diff * diff;
        }
        return e;
    };
    float scale = vmax / float(kIq4Levels[0]), best = scale;
    double best_err = error_of(scale);
    for (int iter = 0; iter < 4; ++iter) {
        double sxl = 0, sll = 0;
        for (int l = 0; l < n; ++l) {
            const double level = kIq4Levels[nearest_level(x[l] / scale)];
            sxl += double(x[l]) * level, sll += level * level;
        }
        if (sll <= 0 || sxl == 0) break;
        scale = float(sxl / sll);
        const double err = error_of(scale);
        if (err < best_err) best_err = err, best = scale;
    }
    return best;
}

// Indices of 32 elements against the scale s, packed two per byte (i and i + 16).
void pack_indices(const float* x, float s, uint8_t* qs) {
    for (int l = 0; l < 16; ++l) {
        const int lo = s != 0.0f ? nearest_level(x[l] / s) : nearest_level(0.0f);
        const int hi = s != 0.0f ? nearest_level(x[l + 16] / s) : nearest_level(0.0f);
        qs[l] = uint8_t(lo | hi << 4);
    }
}

} // namespace

// ---- IQ4_NL -----------------------------------------------------------------------------

void dequantize_iq4_nl(const void* src, float* dst, int64_t n) {
    const block_iq4_nl* b = static_cast<const block_iq4_nl*>(src);
    for (int64_t i = 0; i < n / QK4_NL; ++i, dst += QK4_NL) {
        const float d = fp16_to_fp32(b[i].d);
        for (int l = 0; l < QK4_NL / 2; ++l) {
            dst[l] = d * float(kIq4Levels[b[i].qs[l] & 0x0f]);
            dst[l + QK4_NL / 2] = d * float(kIq4Levels[b[i].qs[l] >> 4]);
        }
    }
}

void quantize_iq4_nl(const float* src, void* dst, int64_t n) {
    block_iq4_nl* b = static_cast<block_iq4_nl*>(dst);
    for (int64_t i = 0; i < n / QK4_NL; ++i) {
        const float* x = src + i * QK4_NL;
        b[i].d = fp32_to_fp16(fit_iq4_scale(x, QK4_NL));
        pack_indices(x, fp16_to_fp32(b[i].d), b[i].qs); // against the scale as stored
    }
}

// ---- IQ4_XS -----------------------------------------------------------------------------

void dequantize_iq4_xs(const void* src, float* dst, int64_t n) {
    const block_iq4_xs* b = static_cast<const block_iq4_xs*>(src);
    for (int64_t i = 0; i < n / QK_K; ++i, dst += QK_K) {
        const float d = fp16_to_fp32(b[i].d);
        for (int j = 0; j < QK_K / 32; ++j) {
            const int sc = ((b[i].scales_l[j / 2] >> (4 * (j % 2))) & 0x0f) | ((b[i].scales_h >> (2 * j)) & 3)
                                                                                  << 4;
            const float scale = d * float(sc - 32);
            const uint8_t* qs = b[i].qs + 16 * j;
            for (int l = 0; l < 16; ++l) {
                dst[32 * j + l] = scale * float(kIq4Levels[qs[l] & 0x0f]);
                dst[32 * j + l + 16] = scale * float(kIq4Levels[qs[l] >> 4]);
            }
        }
    }
}

void quantize_iq4_xs(const float* src, void* dst, int64_t n) {
    block_iq4_xs* b = static_cast<block_iq4_xs*>(dst);
    constexpr int kNumSub = QK_K / 32;
    for (int64_t i = 0; i < n / QK_K; ++i) {
        const float* x = src + i * QK_K;
        float scale[kNumSub], max_scale = 0.0f;
        for (int j = 0; j < kNumSub; ++j) {
            scale[j] = fit_iq4_scale(x + 32 * j, 32);
            if (std::fabs(scale[j]) > std::fabs(max_scale)) max_scale = scale[j];
        }
        // The largest sub-block scale (with its sign) maps to -32, the level only the
        // negative side has.
        b[i].d = fp32_to_fp16(max_scale / -32.0f);
        const float d = fp16_to_fp32(b[i].d);
        b[i].scales_h = 0;
        std::fill(std::begin(b[i].scales_l), std::end(b[i].scales_l), uint8_t(0));
        for (int j = 0; j < kNumSub; ++j) {
            const int sc = (d != 0.0f ? std::clamp(int(std::lrintf(scale[j] / d)), -32, 31) : 0) + 32;
            b[i].scales_l[j / 2] |= uint8_t((sc & 0x0f) << (4 * (j % 2)));
            b[i].scales_h = uint16_t(b[i].scales_h | (sc >> 4) << (2 * j));
            pack_indices(x + 32 * j, d * float(sc - 32), b[i].qs + 16 * j);
        }
    }
}

} // namespace gfa::quant
