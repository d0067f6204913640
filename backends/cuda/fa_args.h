// Kernel arguments of the FlashAttention kernels: plain structs of pointers, byte strides
// and sizes, filled on the host from an attn::Problem and passed to kernels by value.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GFA_HD __host__ __device__ __forceinline__
#else
#define GFA_HD inline
#endif

namespace gfa::cuda::fa {

// Sizes and score parameters every kernel needs.
struct Shape {
    int Sq = 0, Skv = 0, Hq = 0, Hkv = 0, G = 1, B = 0; // G = Hq / Hkv query heads per KV head
    int Dk = 0, Dv = 0;
    float scale = 1.0f;
    float softcap = 0.0f;
    // ALiBi slope of head h: h < n_head_log2 ? m0^(h+1) : m1^(2(h - n_head_log2) + 1).
    float alibi_m0 = 1.0f, alibi_m1 = 1.0f;
    int alibi_n_head_log2 = 0; // 0: no ALiBi, slope 1
    // Visibility: key j is visible from query i when lo_off <= j - (i + Skv - Sq) <= hi_off,
    // each bound switched on by its flag (causal and window_right give hi, window_left lo).
    bool has_hi = false, has_lo = false;
    int hi_off = 0, lo_off = 0;

    GFA_HD int diag(int i) const { return i + Skv - Sq; }
    GFA_HD bool visible(int i, int j) const {
        const int d = j - diag(i);
        return (!has_hi || d <= hi_off) && (!has_lo || d >= lo_off);
    }
    // The keys query i sees, as the closed range [lo, hi] within [0, Skv) (empty when
    // lo > hi): the keys j < Skv with visible(i, j). Kernels find it once per row and then
    // mask a score with two comparisons against its column, a constant of the unrolled tile
    // loop; testing visible() and j < Skv per score took longer than a whole unmasked tile
    // of the D = 64 forward (phase trace, H200).
    struct KeyRange {
        int lo, hi;
    };
    GFA_HD KeyRange visible_keys(int i) const {
        // 64-bit: a window offset may be as large as an int holds
        int64_t lo = 0, hi = int64_t(Skv) - 1;
        const int64_t d = diag(i);
        if (has_hi && d + hi_off < hi) hi = d + hi_off;
        if (has_lo && d + lo_off > lo) lo = d + lo_off;
        return {int(lo > Skv ? Skv : lo), int(hi < -1 ? -1 : hi)};
    }
};

// The work of one block of a flat 1-d grid over (KV head, outer = batch or batch x split,
// tile). Blocks come in groups of `group` (head, outer) pairs whose tiles interleave: the
// group's tile 0 of every pair, then its tile 1, ... With a causal or window mask some tiles
// are longer than others and the kernel maps tile 0 to its longest, so in each group the
// longest start first and the short ones fill the tail. The group keeps the pairs whose
// blocks run together few, so the rows they all read (K/V in the forward; Q, dO and the dQ
// accumulator in the backward) stay in L2: with every pair in one group (the order once used
// for all masked problems) the blocks running together at 2k keys and D = 256 each read
// another head, and the backward became bound by HBM (H100: 120 TFLOP/s against 165 for
// FlashAttention-2, whose grid keeps a head's tiles together). group = 1 is that order: a
// head's tiles adjacent.
struct GridPos {
    int head, outer, tile;
};
GFA_HD GridPos grid_pos(unsigned idx, int n_head, int n_outer, int n_tile, int group) {
    const unsigned pairs = unsigned(n_head) * unsigned(n_outer);
    const unsigned per_group = unsigned(group) * unsigned(n_tile);
    const unsigned first = idx / per_group * unsigned(group), r = idx % per_group;
    const unsigned size = pairs - first < unsigned(group) ? pairs - first : unsigned(group);
    const unsigned pair = first + r % size;
    return {int(pair % unsigned(n_head)), int(pair / unsigned(n_head)), int(r / size)};
}

// A strided 16-bit-or-wider operand: base pointer and byte strides of dims 1..3.
struct Operand {
    const char* data = nullptr;
    int64_t nb1 = 0, nb2 = 0, nb3 = 0;
    int code = 0; // ElemCode
};

// Classes of an explicit mask's tiles (fa_mask_tiles.cu), found by a pass over the mask
// before the attention kernel, for masks shared by all heads. A graph that carries causal
// attention, a window or padding as an additive mask (as ggml-style graphs do) then runs
// like the causal flag: tiles the mask hides at either end of a block's range are not
// visited, and tiles where every value is 0 read no mask values. Tiles are those of the
// kernel that reads the classes: rows of `rows` packed query rows (query position p / G),
// columns of `keys` keys.
enum MaskTileClass : uint8_t {
    kTileHidden = 0, // every value -inf: the tile adds nothing
    kTileZero = 1,   // every value 0: scores as without a mask
    kTileMixed = 2,  // anything else: read the values
};
struct MaskTiles {
    const uint8_t* cls = nullptr; // [slice][row tile][key tile]; null: not classified
    // [slice][outer tile] pairs {n_inner - 1 - first, last}: the first and last tiles that
    // are not hidden along the kernel's loop (key tiles of a row tile for the forward, row
    // tiles of a key tile for the backward), both -1 when every tile is hidden. Stored so
    // that both are found with atomicMax from a memset of -1.
    const int* span = nullptr;
    int n_row_tiles = 0, n_key_tiles = 0;

    // The slice of batch b: masks shared over the batch have one.
    GFA_HD int64_t slice(const Operand& mask, int b) const { return mask.nb3 ? b : 0; }
    // Index of the class of (row tile, key tile) for batch b.
    GFA_HD int64_t at(const Operand& mask, int b, int row_tile, int key_tile) const {
        return (slice(mask, b) * n_row_tiles + row_tile) * n_key_tiles + key_tile;
    }
};

struct FwdArgs {
    Shape s;
    Operand q, k, v;    // q [Dk, Sq, Hq, B], k [Dk, Skv, Hkv, B], v [Dv, Skv, Hkv, B]
    Operand mask;       // [Skv, Sq, Hm, Bm], nb2/nb3 zero when broadcast; data null if absent
    const float* sinks; // [Hq] or null
    char* o;            // [Dv, Hq, Sq, B]
    int64_t o_nb1 = 0, o_nb2 = 0, o_nb3 = 0; // per head, per position, per batch
    int o_code = 0;
    float* lse = nullptr;             // [Sq, Hq, B] or null
    int64_t lse_nb1 = 0, lse_nb2 = 0; // elements per head, per batch
    // Or null: where the combine kernel also writes o (f32, packed) as int8 column blocks
    // (int8_columns.cuh): column i + Sq * b holds the Hq * Dv values of position i, batch b.
    int8_t* o_q = nullptr;
    float* o_ds = nullptr; // (scale, sum) pairs
    // Split-KV: n_split > 1 writes partial results to part_o/part_lse for the combine kernel.
    int n_split = 1, split_keys = 0;
    bool longest_first = false; // tile 0 is the last row tile (causal: the one seeing most keys)
    int tile_group = 1;         // pairs per group of the grid order, see GridPos
    float* part_o = nullptr;    // [n_split][B][Hkv][Sq*G][Dv]
    float* part_lse = nullptr;  // [n_split][B][Hkv][Sq*G], base 2
    MaskTiles mask_tiles;       // rows of BM packed rows, spans over key tiles
};

struct BwdArgs {
    Shape s;
    Operand q, k, v, mask;
    Operand o, dO;    // [Dv, Hq, Sq, B] (nb1 per head, nb2 per position)
    const float* lse; // [Sq, Hq, B]
    int64_t lse_nb1 = 0, lse_nb2 = 0;
    const float* sinks; // [Hq] or null
    // outputs
    char* dq;
    int64_t dq_nb1 = 0, dq_nb2 = 0, dq_nb3 = 0;
    int dq_code = 0;
    char* dk;
    int64_t dk_nb1 = 0, dk_nb2 = 0, dk_nb3 = 0;
    int dk_code = 0;
    char* dv;
    int64_t dv_nb1 = 0, dv_nb2 = 0, dv_nb3 = 0;
    int dv_code = 0;
    float* dsinks = nullptr;
    // workspace
    int Sq_pad = 0;              // rows of the per-row arrays, a multiple of every BM
    float* lse2 = nullptr;       // [B][Hq][Sq_pad]: LSE * log2(e), +inf where no gradient flows
    float* delta = nullptr;      // [B][Hq][Sq_pad]: rowsum(dO * O)
    float* dq_accum = nullptr;   // [B][Hq][Sq][dq_ld] fp32, columns interleaved (dq_accum_col)
    int dq_ld = 0;               // accumulator row length: Dk rounded up to 16
    float* dsink_rows = nullptr; // [Hq][B*Sq]: per-row terms of dsinks
    bool accumulate_dq = true;   // false: the dK/dV kernel leaves dQ to the separate dQ kernel
    int tile_group = 1;          // grid order of the 8-warp dK/dV kernel, see GridPos
    MaskTiles mask_tiles;        // 8-warp dK/dV kernel: its BM x BN tiles, spans over row tiles
};

// The fp32 dQ accumulator keeps each group of 16 columns interleaved in pairs,
//   [0 1 8 9 | 2 3 10 11 | 4 5 12 13 | 6 7 14 15],
// the order in which a tensor-core lane holds them: its pairs (2 t4, 2 t4 + 1) of two
// adjacent 8-column accumulator tiles become 4 consecutive floats, added with one 16-byte
// atomic instead of two 8-byte ones (a step of the 8-warp kernel issues half the atomics;
// their burst at the end of a step kept warps throttled behind the memory queue). Returns
// where column c of a row is kept; pairs (c even, c + 1) stay adjacent.
GFA_HD int dq_accum_col(int c) {
    const int w = c & 15;
    return (c & ~15) + ((w & 7) >> 1) * 4 + (w >> 3) * 2 + (w & 1);
}
GFA_HD int dq_accum_ld(int Dk) {
    return (Dk + 15) / 16 * 16;
}

} // namespace gfa::cuda::fa
