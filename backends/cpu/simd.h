// An 8-lane float vector for the CPU kernels: AVX2+FMA intrinsics where the compiler
// targets them, plain loops (which compilers vectorize for SSE/NEON) elsewhere. AVX-512
// machines use the AVX2 path; the kernels are written against this small vocabulary so
// their loops read like the algorithm rather than like intrinsics.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GFA_SIMD_AVX2 1
#endif

namespace gfa::cpu::simd {

inline constexpr int kLanes = 8;

#if GFA_SIMD_AVX2

struct vf8 {
    __m256 v;
};
inline vf8 load(const float* p) {
    return {_mm256_loadu_ps(p)};
}
inline void store(float* p, vf8 a) {
    _mm256_storeu_ps(p, a.v);
}
inline vf8 splat(float x) {
    return {_mm256_set1_ps(x)};
}
inline vf8 zero() {
    return {_mm256_setzero_ps()};
}
inline vf8 fma(vf8 a, vf8 b, vf8 c) {
    return {_mm256_fmadd_ps(a.v, b.v, c.v)};
} // a*b + c
inline vf8 operator+(vf8 a, vf8 b) {
    return {_mm256_add_ps(a.v, b.v)};
}
inline vf8 operator-(vf8 a, vf8 b) {
    return {_mm256_sub_ps(a.v, b.v)};
}
inline vf8 operator*(vf8 a, vf8 b) {
    return {_mm256_mul_ps(a.v, b.v)};
}
inline vf8 max(vf8 a, vf8 b) {
    return {_mm256_max_ps(a.v, b.v)};
}

// 2^x to about 2e-7 relative: 2^round(x) built in the exponent bits times a degree-6
// polynomial for 2^f, f in [-1/2, 1/2]. x <= -127 (and -inf) gives 0; NaN stays NaN.
inline vf8 exp2(vf8 x) {
    __m256 xc = _mm256_max_ps(_mm256_set1_ps(-127.0f), x.v); // NaN passes through
    xc = _mm256_min_ps(_mm256_set1_ps(127.0f), xc);
    const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(xc, n);
    __m256 p = _mm256_set1_ps(1.5403530393381606e-4f); // ln2^6/6!
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.2402265069591007f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931471805599453f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    // n = -127 makes the exponent field 0, i.e. the factor 0.0f.
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return {_mm256_mul_ps(p, _mm256_castsi256_ps(e))};
}

inline float reduce_max(vf8 a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

// 8 halves to floats (F16C is implied by every AVX2 target we build for).
inline vf8 load_f16(const uint16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline void store_f16(uint16_t* p, vf8 a) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT));
}
inline vf8 load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
// 8 int8 to floats.
inline vf8 load_i8(const int8_t* p) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}

// lane i = the sum of the lanes of v[i]: eight horizontal sums in one transposing tree.
inline vf8 reduce_add8(const vf8 v[8]) {
    const __m256 t0 = _mm256_hadd_ps(v[0].v, v[1].v), t1 = _mm256_hadd_ps(v[2].v, v[3].v);
    const __m256 t2 = _mm256_hadd_ps(v[4].v, v[5].v), t3 = _mm256_hadd_ps(v[6].v, v[7].v);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    // u0 holds v0..v3's partial sums per 128-bit half, u1 those of v4..v7.
    return {_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31))};
}

inline float f16_to_f32(uint16_t h) {
    return _cvtsh_ss(h);
}

// One 32-element block of signed bytes times a scale: out[i] holds elements [8i, 8i + 8).
inline void load_i8x32_scaled(const int8_t* qs, float d, vf8 out[4]) {
    const __m256 dv = _mm256_set1_ps(d);
    for (int i = 0; i < 4; ++i) {
        const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * i)));
        out[i].v = _mm256_mul_ps(_mm256_cvtepi32_ps(w), dv);
    }
}

// One 32-element block of 4-bit codes, (code - 8) * d; element i < 16 is the low nibble of
// byte i, element i + 16 its high nibble.
inline void load_u4x32_centered(const uint8_t* qs, float d, vf8 out[4]) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, low_mask);                    // elements 0..15
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask); // elements 16..31
    const __m256 dv = _mm256_set1_ps(d), offset = _mm256_set1_ps(-8.0f * d);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; ++i) // code * d - 8 d
        out[i].v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), dv, offset);
}

#else // portable fallback

struct vf8 {
    float x[kLanes];
};
inline vf8 load(const float* p) {
    vf8 r;
    std::memcpy(r.x, p, sizeof r.x);
    return r;
}
inline void store(float* p, vf8 a) {
    std::memcpy(p, a.x, sizeof a.x);
}
inline vf8 splat(float x) {
    vf8 r;
    for (float& v : r.x) v = x;
    return r;
}
inline vf8 zero() {
    return splat(0.0f);
}
#define GFA_SIMD_LANEWISE(expr)                                                                              \
    vf8 r;                                                                                                   \
    for (int i = 0; i < kLanes; ++i) r.x[i] = (expr);                                                        \
    return r
inline vf8 fma(vf8 a, vf8 b, vf8 c) {
    GFA_SIMD_LANEWISE(a.x[i] * b.x[i] + c.x[i]);
}
inline vf8 operator+(vf8 a, vf8 b) {
    GFA_SIMD_LANEWISE(a.x[i] + b.x[i]);
}
inline vf8 operator-(vf8 a, vf8 b) {
    GFA_SIMD_LANEWISE(a.x[i] - b.x[i]);
}
inline vf8 operator*(vf8 a, vf8 b) {
    GFA_SIMD_LANEWISE(a.x[i] * b.x[i]);
}
inline vf8 max(vf8 a, vf8 b) {
    GFA_SIMD_LANEWISE(a.x[i] > b.x[i] ? a.x[i] : b.x[i]);
}
inline vf8 exp2(vf8 a) {
    GFA_SIMD_LANEWISE(std::exp2(a.x[i]));
}
#undef GFA_SIMD_LANEWISE
inline float reduce_max(vf8 a) {
    float m = a.x[0];
    for (int i = 1; i < kLanes; ++i) m = a.x[i] > m ? a.x[i] : m;
    return m;
}

#endif

// tanh(x) = sign(x) (1 - 2 / (e^{2|x|} + 1)); |x| is clamped where tanh is 1 in float.
inline vf8 tanh(vf8 x) {
    float buf[kLanes], ax[kLanes];
    store(buf, x);
    for (int i = 0; i < kLanes; ++i) ax[i] = std::fmin(std::fabs(buf[i]), 15.0f);
    const vf8 e = exp2(load(ax) * splat(2.0f * 1.4426950408889634f));
    float ev[kLanes];
    store(ev, e);
    for (int i = 0; i < kLanes; ++i) {
        const float t = 1.0f - 2.0f / (ev[i] + 1.0f);
        buf[i] = std::isnan(buf[i]) ? buf[i] : std::copysign(t, buf[i]);
    }
    return load(buf);
}

} // namespace gfa::cpu::simd
