#version 450
// rope and rope_back, one invocation per destination element: element i0 < n_dims is one
// half of a rotated pair (2p, 2p+1) or, NeoX, (p, p + n_dims/2); the rest pass through.
//
// The angle pos * inv_freq[p] (/ freq_factors[p], src2, when iarg.z) is formed in double (the
// table holds inv_freq in double, computed on the host as the CPU does): positions in the
// thousands times a frequency lose the digits sin and cos need in float. It is reduced to
// [-pi, pi] in double, then sin/cos run in f32.
#extension GL_GOOGLE_include_directive : require
layout(local_size_x = 256) in;

#include "op_common.glsl"

void main() {
    const uint n_dims = P.iarg.x;
    const bool neox = P.iarg.y != 0u;
    const float direction = P.farg.x; // +1 rope, -1 rope_back
    const double TWO_PI = 6.283185307179586476925286766559LF;
    for (uint k = invocation(); k < P.n; k += n_invocations()) {
        const uvec4 d = unflatten(k, P.dst.ne);
        const uint x_row = row_of(P.src0, d.y, d.z, d.w);
        if (d.x >= n_dims) {
            store_dst_at(d.x, d.y, d.z, d.w, src0_element(x_row, d.x));
            continue;
        }
        const uint half_dims = n_dims / 2u;
        const uint pair = neox ? d.x % half_dims : d.x / 2u;
        const uint first = neox ? pair : 2u * pair, second = neox ? pair + half_dims : 2u * pair + 1u;
        const double inv_freq = packDouble2x32(uvec2(table_words[2u * pair], table_words[2u * pair + 1u]));
        const double pos = double(int(src1_words[(P.src1.off + d.z * P.src1.nb.x) >> 2]));
        double theta = pos * inv_freq;
        if (P.iarg.z != 0u) theta /= double(uintBitsToFloat(src2_words[(P.src2.off + pair * P.src2.nb.x) >> 2]));
        theta -= TWO_PI * floor(theta / TWO_PI + 0.5LF);
        const float c = cos(float(theta)), s = direction * sin(float(theta));
        const float x0 = src0_element(x_row, first), x1 = src0_element(x_row, second);
        store_dst_at(d.x, d.y, d.z, d.w, d.x == first ? x0 * c - x1 * s : x0 * s + x1 * c);
    }
}
