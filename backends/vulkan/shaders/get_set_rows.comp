#version 450
// get_rows (gather rows of src0 of any type into f32), its backward get_rows_back (each
// destination element sums the gradient rows that were gathered from it), and set_rows
// (scatter the f32 rows of src1 into dst at the indices src2 holds), one invocation per
// element, or per block
// of 32 when set_rows (or a cast) encodes q8_0 (as src/quants.cpp does: d = amax / 127,
// values rounded half away from zero). An index out
// of range is reported through the status word; get_rows then writes NaN and set_rows skips
// the element, so no memory outside the tensors is touched.
#extension GL_GOOGLE_include_directive : require
layout(local_size_x = 256) in;

#include "op_common.glsl"

const uint OP_GET_ROWS = 0u, OP_SET_ROWS = 1u, OP_GET_ROWS_BACK = 2u, OP_ENCODE_Q8_0 = 3u;

// Row index at element byte b of an i32 or i64 index tensor held in `WORDS`; -1 when it is
// negative or does not fit 31 bits.
#define INDEX_AT(WORDS, type, b)                                                                   \
    ((type) == T_I32 ? int(WORDS[(b) >> 2])                                                        \
                     : (WORDS[((b) >> 2) + 1u] == 0u && WORDS[(b) >> 2] < 0x80000000u ? int(WORDS[(b) >> 2]) : -1))

// Rounds half away from zero (std::round). v - trunc(v) is exact, so the tie test is too.
int round_away(float v) {
    const float t = trunc(v);
    return int(t) + (abs(v - t) >= 0.5 ? (v < 0.0 ? -1 : 1) : 0);
}

// Encodes values first .. first + 31 of the src1 row at byte `from` as the q8_0 block at
// byte `blk` of dst.
void encode_q8_0(uint from, uint first, uint blk) {
    float amax = 0.0;
    for (uint j = 0u; j < 32u; ++j) amax = max(amax, abs(src1_element(from, first + j)));
    precise float d = amax / 127.0;
    precise float id = d != 0.0 ? 1.0 / d : 0.0;
    store_dst_u16(blk, f16_bits(d));
    for (uint j = 0u; j < 32u; j += 2u) {
        precise float v0 = src1_element(from, first + j) * id, v1 = src1_element(from, first + j + 1u) * id;
        store_dst_u16(blk + 2u + j, (uint(round_away(v0)) & 0xffu) | ((uint(round_away(v1)) & 0xffu) << 8));
    }
}

void main() {
    if (P.op == OP_ENCODE_Q8_0) { // cast / cont of src1 into dst (q8_0, the same shape)
        const uvec4 blocks = uvec4(P.dst.ne.x / 32u, P.dst.ne.yzw);
        for (uint k = invocation(); k < P.n; k += n_invocations()) {
            const uvec4 b = unflatten(k, blocks);
            encode_q8_0(row_of(P.src1, b.y, b.z, b.w), 32u * b.x, row_of(P.dst, b.y, b.z, b.w) + 34u * b.x);
        }
        return;
    }
    if (P.op == OP_GET_ROWS_BACK) {
        // dst [ne0, rows, planes]: the sum of the rows i of src0 (the gradient [ne0, n, planes])
        // whose index src1[i, plane] is this row.
        const uint limit = P.dst.ne.y, n = P.src0.ne.y;
        for (uint k = invocation(); k < P.n; k += n_invocations()) {
            const uvec4 d = unflatten(k, P.dst.ne);
            float acc = 0.0;
            for (uint i = 0u; i < n; ++i) {
                const uint at = P.src1.off + i * P.src1.nb.x + (P.src1.ne.y == 1u ? 0u : d.z * P.src1.nb.y);
                const int r = int(src1_words[at >> 2]);
                if (r < 0 || uint(r) >= limit) report(STATUS_ROW_OUT_OF_RANGE);
                else if (uint(r) == d.y) acc += src0_at(d.x, i, d.z, d.w);
            }
            store_dst_at(d.x, d.y, d.z, d.w, acc);
        }
        return;
    }
    if (P.op == OP_GET_ROWS) {
        // dst [ne0, n, planes]: row rows[i1, plane] of plane i2 of src0 (rows: src1, i32).
        const uint limit = P.src0.ne.y;
        for (uint k = invocation(); k < P.n; k += n_invocations()) {
            const uvec4 d = unflatten(k, P.dst.ne);
            const uint at = P.src1.off + d.y * P.src1.nb.x + (P.src1.ne.y == 1u ? 0u : d.z * P.src1.nb.y);
            const int r = int(src1_words[at >> 2]);
            float v = uintBitsToFloat(0x7fc00000u); // NaN
            if (r >= 0 && uint(r) < limit) v = src0_at(d.x, uint(r), d.z, d.w);
            else report(STATUS_ROW_OUT_OF_RANGE);
            store_dst_at(d.x, d.y, d.z, d.w, v);
        }
        return;
    }
    // OP_SET_ROWS: src1 = b [ne0, n, ne2, ne3] f32, src2 = rows [n] (i32 or i64).
    const uint limit = P.dst.ne.y;
    if (P.dst.type == T_Q8_0) {
        const uvec4 blocks = uvec4(P.src1.ne.x / 32u, P.src1.ne.yzw);
        for (uint k = invocation(); k < P.n; k += n_invocations()) {
            const uvec4 s = unflatten(k, blocks);
            const int r = INDEX_AT(src2_words, P.src2.type, P.src2.off + s.y * P.src2.nb.x);
            if (r < 0 || uint(r) >= limit) {
                report(STATUS_ROW_OUT_OF_RANGE);
                continue;
            }
            encode_q8_0(row_of(P.src1, s.y, s.z, s.w), 32u * s.x, row_of(P.dst, uint(r), s.z, s.w) + 34u * s.x);
        }
        return;
    }
    for (uint k = invocation(); k < P.n; k += n_invocations()) {
        const uvec4 s = unflatten(k, P.src1.ne);
        const int r = INDEX_AT(src2_words, P.src2.type, P.src2.off + s.y * P.src2.nb.x);
        if (r < 0 || uint(r) >= limit) {
            report(STATUS_ROW_OUT_OF_RANGE);
            continue;
        }
        store_dst_at(s.x, uint(r), s.z, s.w, src1_at(s.x, s.y, s.z, s.w));
    }
}
