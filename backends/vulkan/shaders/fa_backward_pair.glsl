// One (query row, key) pair of the FlashAttention-2 backward, shared by the dK/dV and dQ
// shaders. Included after they declare the tiles it reads: Qs and dOs (BR rows), Ks and Vs
// (BC keys), all with row pitch DMAX, and the rows' row_lse and row_D.
//
// P = exp(s - lse) (recomputed from the forward's LSE), dP = dO . v, and
// dS = P (dP - D) scale (1 - tanh^2 under a softcap): the gradient of q.k, which gives
// dQ += dS k and dK += dS q. Hidden pairs and rows that saw nothing give zeros.
void pair_gradient(uint r, uint c, uint i, uint j, uint h, uint b, float slope, out float p, out float ds) {
    p = 0.0;
    ds = 0.0;
    const float lse = row_lse[r];
    if (lse == NEG_INF || !visible(i, j)) return;
    float qk = 0.0;
    for (uint d = 0; d < P.Dk; ++d) qk += Qs[r * DMAX + d] * Ks[c * DMAX + d];
    float t;
    const float s = pair_score(qk, i, j, h, b, slope, t);
    if (s == NEG_INF) return;
    p = exp(s - lse);
    float dp = 0.0;
    for (uint d = 0; d < P.Dv; ++d) dp += dOs[r * DMAX + d] * Vs[c * DMAX + d];
    ds = p * (dp - row_D[r]) * P.scale * (P.softcap > 0.0 ? 1.0 - t * t : 1.0);
}

// The tiles' loads, converted to f32 once: rows i0.. of head h and keys j0.. of kv head hk.
void load_query_tile(uint i0, uint rows, uint h, uint b, uint tid) {
    for (uint e = tid; e < BR * P.Dk; e += NT) {
        const uint r = e / P.Dk, d = e % P.Dk;
        Qs[r * DMAX + d] = r < rows ? load_q(d, i0 + r, h, b) : 0.0;
    }
    for (uint e = tid; e < BR * P.Dv; e += NT) {
        const uint r = e / P.Dv, d = e % P.Dv;
        dOs[r * DMAX + d] = r < rows ? load_dO(d, h, i0 + r, b) : 0.0;
    }
    if (tid < BR) {
        const uint i = i0 + tid;
        row_lse[tid] = tid < rows ? load_lse(i, h, b) : NEG_INF;
        row_D[tid] = tid < rows ? uintBitsToFloat(rowD_words[P.rowD_off + (b * P.Hq + h) * P.Sq + i]) : 0.0;
    }
}
void load_key_tile(uint j0, uint cols, uint hk, uint b, uint tid) {
    for (uint e = tid; e < BC * P.Dk; e += NT) {
        const uint c = e / P.Dk, d = e % P.Dk;
        Ks[c * DMAX + d] = c < cols ? load_k(d, j0 + c, hk, b) : 0.0;
    }
    for (uint e = tid; e < BC * P.Dv; e += NT) {
        const uint c = e / P.Dv, d = e % P.Dv;
        Vs[c * DMAX + d] = c < cols ? load_v(d, j0 + c, hk, b) : 0.0;
    }
}
