#version 450
// flash_attn_ext backward, first pass: D_i = dO_i . O_i for every query row (the rowsum of
// dO * O that dS = P (dP - D) needs), one invocation per row, into the row scratch.
#extension GL_GOOGLE_include_directive : require

layout(local_size_x = 128) in;

#include "fa_common.glsl"

void main() {
    const uint row = gl_GlobalInvocationID.x; // (b * Hq + h) * Sq + i
    if (row >= P.B * P.Hq * P.Sq) return;
    const uint i = row % P.Sq, h = (row / P.Sq) % P.Hq, b = row / (P.Sq * P.Hq);
    float D = 0.0;
    for (uint d = 0; d < P.Dv; ++d) D += load_dO(d, h, i, b) * load_o(d, h, i, b);
    rowD_words[P.rowD_off + row] = floatBitsToUint(D);
}
