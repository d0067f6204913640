#version 450
// flash_attn_ext forward, FlashAttention-2 style: a workgroup owns BR rows of one K/V head
// and walks the key tiles those rows can see, keeping a running maximum and sum per row
// (online softmax) so the scores never leave shared memory. The output accumulators live in
// registers: each row's Dv values are spread over NT / BR invocations.
//
// GQA packing: the rows are (query, head) pairs of the K/V head's group, query-major (row
// p is query p / G of head hk G + p % G), so each K and V tile is loaded once for the whole
// group, and a decoding step (one query) fills a workgroup's rows with the group's heads.
//
// Specialization: DMAX (head dims up to it), BR (rows per workgroup), BC (keys per tile).
// Shared memory: (BR + BC) * DMAX + BR * BC floats; the host picks tiles that fit.
#extension GL_GOOGLE_include_directive : require

layout(constant_id = 0) const uint DMAX = 64;
layout(constant_id = 1) const uint BR = 32;
layout(constant_id = 2) const uint BC = 32;
const uint NT = 128; // invocations per workgroup
layout(local_size_x = 128) in;

#include "fa_common.glsl"

const uint TPR = NT / BR;    // invocations per query row
const uint DPT = DMAX / TPR; // output dims per invocation

shared float Qs[BR * DMAX];
shared float KVs[BC * DMAX]; // the K tile, then the V tile in the same space
shared float S[BR * BC];     // scores, then probabilities
shared float row_max[BR], row_sum[BR], row_rescale[BR], row_slope[BR];

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint G = P.group_size;
    const uint p0 = gl_WorkGroupID.x * BR; // the first packed row
    const uint hk = gl_WorkGroupID.y, b = gl_WorkGroupID.z;
    const uint rows = min(BR, P.Sq * G - p0);
    // Row r's query and head.
#define ROW_QUERY(r) ((p0 + (r)) / G)
#define ROW_HEAD(r) (hk * G + (p0 + (r)) % G)

    // Stage 1: the Q tile, and each row's softmax state and ALiBi slope. A sink starts the
    // row with its logit as the maximum and exp(0) = 1 in the sum (a key whose value is zero).
    for (uint e = tid; e < BR * P.Dk; e += NT) {
        const uint r = e / P.Dk, d = e % P.Dk;
        Qs[r * DMAX + d] = r < rows ? load_q(d, ROW_QUERY(r), ROW_HEAD(r), b) : 0.0;
    }
    if (tid < BR) {
        const uint h = tid < rows ? ROW_HEAD(tid) : hk * G;
        row_max[tid] = P.has_sinks != 0u ? sink_logit(h) : NEG_INF;
        row_sum[tid] = P.has_sinks != 0u ? 1.0 : 0.0;
        row_slope[tid] = alibi_slope(h);
    }
    const uint my_row = tid / TPR, lane = tid % TPR;
    float acc[DPT];
    for (uint k = 0; k < DPT; ++k) acc[k] = 0.0;

    // Causal and window limits skip whole key tiles outside what any of the rows sees.
    const uvec2 keys = key_range(ROW_QUERY(0u), ROW_QUERY(rows - 1u));
    for (uint j0 = keys.x - keys.x % BC; j0 < keys.y; j0 += BC) {
        barrier(); // the previous tile's P V is done with KVs and S

        // Stage 2: the K tile.
        for (uint e = tid; e < BC * P.Dk; e += NT) {
            const uint c = e / P.Dk, d = e % P.Dk;
            KVs[c * DMAX + d] = j0 + c < P.Skv ? load_k(d, j0 + c, hk, b) : 0.0;
        }
        barrier();

        // Stage 3: scores S = scale Q K^T (softcap, mask), NEG_INF where a key is hidden.
        for (uint e = tid; e < BR * BC; e += NT) {
            const uint r = e / BC, c = e % BC, i = ROW_QUERY(r), j = j0 + c;
            float s = NEG_INF;
            if (r < rows && j < P.Skv && visible(i, j)) {
                float qk = 0.0;
                for (uint d = 0; d < P.Dk; ++d) qk += Qs[r * DMAX + d] * KVs[c * DMAX + d];
                float t;
                s = pair_score(qk, i, j, ROW_HEAD(r), b, row_slope[r], t);
            }
            S[e] = s;
        }
        barrier();

        // Stage 4: online softmax. The new maximum rescales what the row has summed so far;
        // S becomes the tile's probabilities relative to it.
        if (tid < BR) {
            const float old_max = row_max[tid];
            float new_max = old_max;
            for (uint c = 0; c < BC; ++c) new_max = max(new_max, S[tid * BC + c]);
            float tile_sum = 0.0;
            for (uint c = 0; c < BC; ++c) {
                const float s = S[tid * BC + c];
                const float p = s == NEG_INF ? 0.0 : exp(s - new_max);
                S[tid * BC + c] = p;
                tile_sum += p;
            }
            const float rescale = old_max == NEG_INF ? (new_max == NEG_INF ? 1.0 : 0.0) : exp(old_max - new_max);
            row_sum[tid] = row_sum[tid] * rescale + tile_sum;
            row_max[tid] = new_max;
            row_rescale[tid] = rescale;
        }
        barrier();

        // Stage 5: the V tile over the K tile.
        for (uint e = tid; e < BC * P.Dv; e += NT) {
            const uint c = e / P.Dv, d = e % P.Dv;
            KVs[c * DMAX + d] = j0 + c < P.Skv ? load_v(d, j0 + c, hk, b) : 0.0;
        }
        barrier();

        // Stage 6: O = O * rescale + P V.
        const float rescale = row_rescale[my_row];
        for (uint k = 0; k < DPT; ++k) {
            const uint d = lane + k * TPR;
            if (d >= P.Dv) break;
            float pv = 0.0;
            for (uint c = 0; c < BC; ++c) pv += S[my_row * BC + c] * KVs[c * DMAX + d];
            acc[k] = acc[k] * rescale + pv;
        }
    }
    barrier();

    // Stage 7: O / sum and the row's log-sum-exp; a row that saw nothing (and has no sink)
    // gives O = 0 and LSE = -inf.
    if (my_row < rows) {
        const uint i = ROW_QUERY(my_row), h = ROW_HEAD(my_row);
        const float sum = row_sum[my_row];
        const float inv = sum > 0.0 ? 1.0 / sum : 0.0;
        for (uint k = 0; k < DPT; ++k) {
            const uint d = lane + k * TPR;
            if (d >= P.Dv) break;
            store_o(P.o_off + d + h * P.o_nb1 + i * P.o_nb2 + b * P.o_nb3, acc[k] * inv);
        }
        if (lane == 0u && P.has_lse != 0u)
            o_words[P.lse_off + i + h * P.Sq + b * P.Sq * P.Hq] =
                floatBitsToUint(sum > 0.0 ? row_max[my_row] + log(sum) : NEG_INF);
    }
}
