// Functions GLSL lacks or gets imprecise on some drivers (to f32 accuracy), and the
// library's f32 -> f16 / bf16 roundings.
#ifndef GFA_MATH_GLSL
#define GFA_MATH_GLSL

// tanh to f32 accuracy everywhere. GLSL's tanh may be computed as (e^x - e^-x) / (e^x + e^-x),
// which overflows to NaN at large |x| and cancels at small |x| (a relative error of 1e-4
// near 1e-3 was seen); so: its Taylor series below 0.1 (the next term is under 1e-9 of the
// value) and 1 - 2 / (e^2|x| + 1) above, which loses at most one digit at 0.1.
float stable_tanh(float x) {
    const float a = abs(x);
    if (a < 0.1) {
        const float x2 = x * x;
        return x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))));
    }
    const float t = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    return x < 0.0 ? -t : t;
}

// erf, Abramowitz & Stegun 7.1.26: absolute error below 1.5e-7 everywhere (GLSL has none).
float erf_approx(float x) {
    const float a = abs(x);
    const float t = 1.0 / (1.0 + 0.3275911 * a);
    const float poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    const float y = 1.0 - poly * exp(-a * a);
    return x < 0.0 ? -y : y;
}

// f32 -> f16 / bf16 bits, rounded to nearest even (the library's conversions).
uint f16_bits(float x) {
    return packHalf2x16(vec2(x, 0.0)) & 0xffffu;
}
uint bf16_bits(float x) {
    uint u = floatBitsToUint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u; // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}

#endif
