#version 450
// top_k: each row's k largest positions, largest first, ties by the lower position, NaN
// ranked with -inf (the order of the CPU kernel and the reference). A workgroup owns a row
// at a time (grid-stride over rows). Instead of sorting, each invocation takes a position
// and counts the positions that come before it in that order: the count is its rank, and it
// writes itself to output rank when the rank is below k. The order is strict, so ranks 0 ..
// n-1 go to one position each and all k outputs are written, for any row length. The row is
// compared a workgroup-sized tile at a time through shared memory; n * n / NT comparisons per
// invocation, little for a router's few experts (n <= 256) and still right for long rows.
// k = 1 (greedy decoding over a vocabulary) takes one pass and a tree instead.
#extension GL_GOOGLE_include_directive : require
const uint NT = 128;
layout(local_size_x = 128) in;

#include "op_common.glsl"

shared uint tile[NT];
shared uint tile_pos[NT]; // k = 1: the positions of the keys in tile
const uint NONE = 0xffffffffu;

// A key whose unsigned order is the values' order: the sign bit flipped for positives, all
// bits for negatives. Integer keys behave the same on every driver, whatever it does with
// NaN, signed zeros or denormals in float compares. Both zeros get one key (they tie, as the
// reference compares them), and NaN gets -inf's.
uint order_key(uint bits) {
    const uint magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) bits = 0xff800000u;
    else if (magnitude == 0u) bits = 0u;
    return (bits & 0x80000000u) != 0u ? ~bits : bits | 0x80000000u;
}

uint key_at(uint row, uint i) {
    return order_key(src0_words[(row + i * P.src0.nb.x) >> 2]);
}

void main() {
    const uint n = P.src0.ne.x, k = P.dst.ne.x, tid = gl_LocalInvocationID.x;
    const uint rows = P.dst.ne.y * P.dst.ne.z * P.dst.ne.w;
    for (uint r = gl_WorkGroupID.x; r < rows; r += gl_NumWorkGroups.x) {
        const uvec4 i = unflatten(r, uvec4(1u, P.dst.ne.yzw));
        const uint src = row_of(P.src0, i.y, i.z, i.w), dst = row_of(P.dst, i.y, i.z, i.w);
        if (k == 1u) {
            // The first largest value (greedy decoding's pick over a vocabulary): one pass
            // over the row, each invocation keeping its best, then a tree over the workgroup.
            uint best = 0u, at = NONE;
            for (uint p = tid; p < n; p += NT) {
                const uint key = key_at(src, p);
                if (at == NONE || key > best) {
                    best = key;
                    at = p;
                }
            }
            barrier(); // the previous row's tree is done with the tiles
            tile[tid] = best;
            tile_pos[tid] = at;
            barrier();
            for (uint step = NT / 2u; step > 0u; step >>= 1u) {
                if (tid < step) {
                    const uint other = tile[tid + step], other_at = tile_pos[tid + step];
                    if (other_at != NONE && (tile_pos[tid] == NONE || other > tile[tid] ||
                                             (other == tile[tid] && other_at < tile_pos[tid]))) {
                        tile[tid] = other;
                        tile_pos[tid] = other_at;
                    }
                }
                barrier();
            }
            if (tid == 0u) dst_words[dst >> 2] = tile_pos[0];
            continue;
        }
        for (uint p0 = 0u; p0 < n; p0 += NT) {
            const uint p = p0 + tid;
            const uint key = p < n ? key_at(src, p) : 0u;
            uint rank = 0u; // positions before p: larger keys, and equal keys at lower positions
            for (uint q0 = 0u; q0 < n; q0 += NT) {
                barrier(); // every invocation is done with the previous tile
                if (q0 + tid < n) tile[tid] = key_at(src, q0 + tid);
                barrier();
                const uint count = min(NT, n - q0);
                for (uint j = 0u; j < count; ++j) {
                    const uint other = tile[j];
                    rank += other > key || (other == key && q0 + j < p) ? 1u : 0u;
                }
            }
            if (p < n && rank < k) dst_words[(dst + rank * P.dst.nb.x) >> 2] = p;
        }
    }
}
