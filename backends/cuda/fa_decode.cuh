// FlashAttention forward for decoding: few query rows per KV head (Sq * G <= 16), where the
// whole job is reading K and V once at full memory bandwidth.
//
// Grid: (KV splits, KV heads, batch). A block owns one KV head of one batch entry and one
// contiguous range of keys (a split). Its rows are all Sq * G query rows that share the KV
// head (row p: query position p / G of query head hk * G + p % G), padded to the 16 rows of
// one mma tile, so each K/V byte is read once for all of them.
//
// Inside a block the warps share no K/V: the split's keys come in chunks of 16, warp w takes
// chunks w, w + NW, w + 2 NW, ... and streams them through its own ring of STAGES cp.async
// chunk buffers (STAGES - 1 chunks in flight while it computes one). The main loop therefore
// has no block barrier, only __syncwarp. Each warp keeps its own online-softmax state and O
// accumulator; the warps are merged through shared memory at the end, and the block writes
// the output (one split) or its partial result for the combine kernel.
//
// Fragments are read straight from the raw rows in shared memory (no ldmatrix), which is what
// lets q8_0/q4_0 rows stay compact until registers:
//  - S = Q K^T. The B operand (k = head dim, n = key) of lane (g, t) for k-steps 2m and
//    2m + 1 is 8 consecutive elements 32m + 8t .. 32m + 8t + 7 of key row g: one 16-byte
//    load of a 16-bit row, or a quarter of one 32-element quantized block. A dot product does
//    not care in which order its terms are summed, so Q's A fragments use the same order:
//    logical k 2t, 2t+1 | 2t+8, 2t+9 of k-step 2m + h are dims 32m + 8t + 4h + {0, 1 | 2, 3}.
//  - O += P V. The B operand (k = key, n = output dim) of lane (g, t) pairs keys 2t, 2t+1
//    (b0) and 2t+8, 2t+9 (b1) at one output dim. Lane g takes output dim 64c + 8g + e as
//    column g of n-tile 8c + e, i.e. 8 consecutive elements of each of its 4 key rows, and
//    pairs rows with byte permutes. The epilogue maps the accumulators back to their dims.
#pragma once

#include "fa_args.h"
#include "fa_common.cuh"
#include "fa_decode.h"
#include "fa_forward.cuh" // fast_exp2, fast_tanh, alibi_slope, mask_value
#include "fa_launch.h"
#include "early_launch.cuh"

#include <ggml-fa/error.h>

#include <string>

namespace gfa::cuda::fa {

static_assert(kF16 == 1 && kBF16 == 2 && kQ8_0 == 3 && kQ4_0 == 4, "decode_row_bytes() assumes these codes");

// ---- K/V chunk rows in shared memory ------------------------------------------------------

// Rows of KV storage (code) and head dim D as a chunk buffer holds them, copied in W-byte
// cp.async pieces. 16-bit rows are stored densely with an XOR swizzle of their 16-byte pieces,
// chosen so that the fragment loads below hit 8 different 16-byte bank groups in each
// quarter-warp: K reads piece 4m + t of rows g (two rows per quarter-warp: swizzle by row
// bit 0), V reads piece 8c + g of rows 2t.. (four rows two apart: swizzle by row bits 1-2).
// Quantized rows keep their byte layout (blocks are only 2-byte aligned) in a padded pitch
// of 32 mod 128 bytes: the 2-byte loads of K (word 2t of rows g) then fall in distinct banks.
template <int KV, int D, int W> struct KvRows {
    static constexpr bool kQuant = KV == kQ8_0 || KV == kQ4_0;
    static constexpr int kBlockBytes = KV == kQ8_0 ? 34 : 18;
    static constexpr int kRowBytes = decode_row_bytes(KV, D);
    static constexpr int kPieces = kRowBytes / W;
    static constexpr int kPitch = kQuant ? (kRowBytes - 32 + 127) / 128 * 128 + 32 : kRowBytes;
    static_assert(D % 64 == 0, "rows of whole 64-element groups");
    static_assert(kRowBytes % W == 0 && (kQuant || W == 16), "pieces must tile the row");
    static_assert(kPitch % 16 == 0 && kPitch >= kRowBytes, "pitch keeps every piece aligned");

    template <bool IS_K> static __device__ __forceinline__ int piece_offset(int r, int pc) {
        if constexpr (kQuant) {
            return r * kPitch + pc * W;
        } else {
            const int swizzle = IS_K ? (r & 1) << 2 : ((r >> 1) & 3) << 1;
            return r * kRowBytes + ((pc ^ swizzle) << 4);
        }
    }

    // Elements e0 .. e0 + 7 (e0 a multiple of 8) of row r as 4 pairs of T, low half first.
    template <bool IS_K, class T>
    static __device__ __forceinline__ void load8(const char* tile, int r, int e0, uint32_t (&u)[4]) {
        if constexpr (!kQuant) {
            const uint4 v = *reinterpret_cast<const uint4*>(tile + piece_offset<IS_K>(r, e0 >> 3));
            u[0] = v.x, u[1] = v.y, u[2] = v.z, u[3] = v.w;
        } else {
            const char* blk = tile + r * kPitch + (e0 >> 5) * kBlockBytes;
            const uint16_t d_bits = *reinterpret_cast<const uint16_t*>(blk);
            const int within = e0 & 31;
            // q8_0: the int8 quants follow the scale. q4_0: element e < 16 is the low nibble of
            // byte e, element e + 16 its high nibble.
            const char* qs = blk + 2 + (KV == kQ8_0 ? within : (within & 15));
            const int shift = KV == kQ4_0 && within >= 16 ? 4 : 0;
            uint32_t w[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) w[e] = *reinterpret_cast<const uint16_t*>(qs + 2 * e);
            if constexpr (Elem<T>::code == kF16) {
                // Exact small integers in f16 without int->float conversions: the byte b under
                // the exponent of 1024 reads 1024 + b. q8_0 biases the int8 by 128 first.
                const __half2 d2 = __half2half2(__ushort_as_half(d_bits));
                const __half2 bias = __float2half2_rn(KV == kQ8_0 ? 1152.0f : 1032.0f);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const uint32_t bytes = KV == kQ8_0 ? (w[e] ^ 0x8080u) : ((w[e] >> shift) & 0x0f0fu);
                    const uint32_t biased = __byte_perm(bytes, 0x6464u, 0x5140);
                    __half2 x = __hsub2(*reinterpret_cast<const __half2*>(&biased), bias);
                    x = __hmul2(x, d2);
                    u[e] = *reinterpret_cast<const uint32_t*>(&x);
                }
            } else {
                const float d = __half2float(__ushort_as_half(d_bits));
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float lo, hi;
                    if constexpr (KV == kQ8_0) {
                        lo = float(int8_t(w[e] & 0xff)), hi = float(int8_t(w[e] >> 8));
                    } else {
                        lo = float(int((w[e] >> shift) & 0xf) - 8),
                        hi = float(int((w[e] >> (8 + shift)) & 0xf) - 8);
                    }
                    u[e] = Elem<T>::pack(d * lo, d * hi);
                }
            }
        }
    }
};

// cp.async of W bytes (zero-filled when !valid). The memory clobber keeps the compiler from
// moving shared-memory reads of a buffer across the copies that refill it.
template <int W> __device__ __forceinline__ void cp_async_piece(uint32_t dst, const void* src, bool valid) {
    if constexpr (W == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                     "r"(valid ? 16 : 0)
                     : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(W),
                     "r"(valid ? W : 0)
                     : "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait_pending() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// One warp copies KC rows (row r at src + r * stride; rows >= n_rows zero-filled) into a
// chunk buffer, lane-interleaved over the pieces so that consecutive lanes read consecutive
// bytes of a row.
template <class Rows, bool IS_K, int KC, int W>
__device__ __forceinline__ void copy_chunk_rows(uint32_t tile, const char* src, int64_t stride, int n_rows,
                                                int lane) {
    constexpr int kTotal = KC * Rows::kPieces, kIters = (kTotal + 31) / 32;
    // Unrolled, each piece's row offset is precomputed and held in registers across chunks:
    // worth it up to a few pieces per lane, a register spill beyond.
    constexpr int kUnroll = kIters <= 9 ? kIters : 1;
#pragma unroll(kUnroll)
    for (int it = 0; it < kIters; ++it) {
        const int idx = it * 32 + lane;
        if (kTotal % 32 == 0 || idx < kTotal) {
            const int r = idx / Rows::kPieces, pc = idx % Rows::kPieces;
            const bool valid = r < n_rows;
            const char* from = src + (valid ? int64_t(r) * stride : 0) + pc * W; // row 0 is always real
            cp_async_piece<W>(tile + uint32_t(Rows::template piece_offset<IS_K>(r, pc)), from, valid);
        }
    }
}

// ---- the kernel -----------------------------------------------------------------------------

template <int D_, int KV_, class T_, int W_> struct DecodeTraits {
    static constexpr int D = D_, KV = KV_, W = W_;
    using T = T_;
    using Rows = KvRows<KV, D, W>;
    static constexpr int NW = 4; // warps: with 2-4 blocks per SM, 8-16 streams of chunks per SM
    static constexpr int KC = kDecodeChunk;
    static constexpr int STAGES = 3; // 2 chunks in flight per warp: ~2x the bytes DRAM latency needs
    static constexpr int kThreads = 32 * NW;
    static constexpr int kStageBytes = 2 * KC * Rows::kPitch; // K rows, then V rows
    // A warp's O rows in the merge, row max and row sum. Rows are padded by 8 floats and each
    // row's 16-byte units swizzled (unit ^= bit 5 of the dim), so that the 16-byte stores of
    // a quarter-warp (rows g, g + 1 x four t) hit 8 different bank groups.
    static constexpr int kMergePitch = D + 8;
    static constexpr int kMergeBytes = 16 * kMergePitch * 4 + 2 * 16 * 4;
    static __device__ __forceinline__ int merge_index(int p, int d) { // d a multiple of 4
        return p * kMergePitch + ((d >> 2 ^ (d >> 5 & 1)) << 2);
    }
    static constexpr int kRingBytes = STAGES * kStageBytes;
    static constexpr int kWarpBytes = ((kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes) + 15) / 16 * 16;
    // Q's A fragments: in registers up to D = 128; at D = 256 their 64 registers beside the
    // 128 of the O accumulator would spill, so they live in shared memory, fragment-major
    // (k-step, lane): one conflict-free 16-byte load per k-step and chunk.
    static constexpr bool kQInSmem = D > 128;
    static constexpr int kQBytes = kQInSmem ? D / 16 * 32 * 16 : 0;
    static constexpr int kSmemBytes = NW * kWarpBytes + kQBytes;
};

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) decode_kernel(const FwdArgs a, const int split_begin) {
    using T = typename Tr::T;
    using Rows = typename Tr::Rows;
    constexpr int D = Tr::D, KC = Tr::KC, NW = Tr::NW, STAGES = Tr::STAGES, W = Tr::W;
    constexpr int NT_KEY = KC / 8, NT_OUT = D / 8;
    extern __shared__ __align__(128) uint4 smem[];

    const Shape& s = a.s;
    const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int rows = s.Sq * s.G; // <= 16
    const int split = int(blockIdx.x), hk = int(blockIdx.y), b = int(blockIdx.z);

    // ---- the keys of this split that some row can see (the host cut the splits from the
    // visible range, in whole chunks, so chunks never straddle splits) ----
    int64_t key_lo = int64_t(split_begin) + int64_t(split) * a.split_keys;
    int64_t key_hi = min(int64_t(s.Skv), key_lo + a.split_keys);
    if (s.has_hi) key_hi = min(key_hi, int64_t(s.diag(s.Sq - 1)) + s.hi_off + 1);
    if (s.has_lo) key_lo = max(key_lo, int64_t(s.diag(0)) + s.lo_off);
    const int chunk_first = int(key_lo / KC);
    const int n_chunks = key_hi > key_lo ? int((key_hi - 1) / KC) - chunk_first + 1 : 0;
    const int my_chunks = n_chunks > warp ? (n_chunks - warp + NW - 1) / NW : 0;
    auto chunk_key0 = [&](int k) { return (chunk_first + warp + k * NW) * KC; };

    // ---- this lane's rows g and g + 8 (clamped to a real row: padded rows compute on a copy
    // of the last row's mask with zero Q, and are never written) ----
    int row_i[2];
    const char* mask_row[2];
    float slope_log2[2];
    const char* q_row[2];
    bool row_real[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_real[r] = g + 8 * r < rows;
        const int p = min(g + 8 * r, rows - 1);
        const int h = hk * s.G + p % s.G;
        row_i[r] = p / s.G;
        q_row[r] = a.q.data + b * a.q.nb3 + int64_t(h) * a.q.nb2 + int64_t(row_i[r]) * a.q.nb1;
        mask_row[r] = a.mask.data
                          ? a.mask.data + b * a.mask.nb3 + h * a.mask.nb2 + int64_t(row_i[r]) * a.mask.nb1
                          : nullptr;
        slope_log2[r] = alibi_slope(s, h) * kLog2e;
    }

    // Launched early: everything above reads only the arguments, and overlaps the kernel in
    // front; the query, the mask and the cache rows below may come from it.
    await_inputs();
    allow_next_launch();

    // ---- Q as A fragments in the permuted head-dim order (see top), converted once ----
    // Per k-step pair m a lane needs elements 32m + 8t .. 32m + 8t + 7 of rows g and g + 8.
    // Q's loads go out before the chunk copies: issued after them, their replies would queue
    // behind the SM's whole first K/V stream. Their storage type and alignment are decided
    // once (not per element), so that they all go out before the first one is waited on.
    constexpr int QF_REGS = Tr::kQInSmem ? 1 : D / 16;
    uint32_t qf[QF_REGS][4];
    uint4* const q_smem = reinterpret_cast<uint4*>(reinterpret_cast<char*>(smem) + NW * Tr::kWarpBytes);
    const bool loads_q = !Tr::kQInSmem || warp == 0;
    const int q_code = a.q.code & ~kUnaligned;
    // 16-byte loads where both of the lane's rows start 16-byte aligned (the usual case)
    const bool q_aligned = __all_sync(
        0xffffffffu,
        ((reinterpret_cast<uintptr_t>(q_row[0]) | reinterpret_cast<uintptr_t>(q_row[1])) & 15) == 0);
    auto with_q_type = [&](auto&& fn) {
        using Vec = std::true_type;
        using Scalar = std::false_type;
        if (q_code == kF32)
            q_aligned ? fn(float{}, Vec{}) : fn(float{}, Scalar{});
        else if (q_code == kF16)
            q_aligned ? fn(__half{}, Vec{}) : fn(__half{}, Scalar{});
        else
            q_aligned ? fn(__nv_bfloat16{}, Vec{}) : fn(__nv_bfloat16{}, Scalar{});
    };
    uint4 q_bits[2][D / 32][2]; // f32 rows fill both 16-byte halves, 16-bit rows the first
    if (loads_q)
        with_q_type([&](auto src_type, auto vector_loads) {
            using S = decltype(src_type);
#pragma unroll
            for (int m = 0; m < D / 32; ++m)
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    load8_bits<S, decltype(vector_loads)::value>(q_row[r], 32 * m + 8 * t4, q_bits[r][m]);
        });

    // Mask values of this lane's scores in a chunk: rows g, g + 8, keys n0 + 8nt + 2t + c.
    // They are fetched one chunk ahead (the first, like Q, before the copies start) so that
    // their latency hides behind a chunk of work, and without a branch per value (keys past
    // the end read the last key and are dropped), so that the loads go out together.
    const bool has_mask = a.mask.data != nullptr;
    auto load_mask = [&](int k, float(&mv)[2][NT_KEY][2]) {
        const int n0 = chunk_key0(k);
        auto fetch = [&](auto mask_type) {
            using S = decltype(mask_type);
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int nt = 0; nt < NT_KEY; ++nt)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int j = n0 + nt * 8 + 2 * t4 + c;
                        const float x = to_f32(reinterpret_cast<const S*>(mask_row[r])[min(j, s.Skv - 1)]);
                        mv[r][nt][c] = j < s.Skv ? x : 0.0f;
                    }
        };
        if (a.mask.code == kF32)
            fetch(float{});
        else
            fetch(__half{});
    };
    float mask_now[2][NT_KEY][2] = {};
    if (has_mask && my_chunks > 0) load_mask(0, mask_now);

    // ---- start streaming: the first STAGES - 1 chunks of this warp ----
    char* const ring = reinterpret_cast<char*>(smem) + warp * Tr::kWarpBytes;
    const uint32_t ring_addr = smem_addr(ring);
    const char* k_head = a.k.data + b * a.k.nb3 + hk * a.k.nb2;
    const char* v_head = a.v.data + b * a.v.nb3 + hk * a.v.nb2;
    auto load_chunk = [&](int k) {
        const int n0 = chunk_key0(k), n_rows = min(KC, s.Skv - n0);
        const uint32_t tile = ring_addr + uint32_t((k % STAGES) * Tr::kStageBytes);
        copy_chunk_rows<Rows, true, KC, W>(tile, k_head + int64_t(n0) * a.k.nb1, a.k.nb1, n_rows, lane);
        copy_chunk_rows<Rows, false, KC, W>(tile + KC * Rows::kPitch, v_head + int64_t(n0) * a.v.nb1, a.v.nb1,
                                            n_rows, lane);
    };
#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) {
        if (k < my_chunks) load_chunk(k);
        cp_async_commit(); // empty groups too: the wait below counts groups
    }

    if (loads_q)
        with_q_type([&](auto src_type, auto) {
            using S = decltype(src_type);
#pragma unroll
            for (int m = 0; m < D / 32; ++m) {
                float x[2][8];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    bits8_to_float<S>(q_bits[r][m], x[r]);
#pragma unroll
                    for (int e = 0; e < 8; ++e) x[r][e] = row_real[r] ? x[r][e] : 0.0f; // padded rows: zero Q
                }
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    uint32_t(&f)[4] = qf[Tr::kQInSmem ? 0 : 2 * m + h];
                    f[0] = Elem<T>::pack(x[0][4 * h], x[0][4 * h + 1]);
                    f[1] = Elem<T>::pack(x[1][4 * h], x[1][4 * h + 1]);
                    f[2] = Elem<T>::pack(x[0][4 * h + 2], x[0][4 * h + 3]);
                    f[3] = Elem<T>::pack(x[1][4 * h + 2], x[1][4 * h + 3]);
                    if constexpr (Tr::kQInSmem)
                        q_smem[(2 * m + h) * 32 + lane] = make_uint4(f[0], f[1], f[2], f[3]);
                }
            }
        });
    if constexpr (Tr::kQInSmem) __syncthreads();
    auto q_frag = [&](int kk, uint32_t(&f)[4]) {
        if constexpr (Tr::kQInSmem) {
            const uint4 v = q_smem[kk * 32 + lane];
            f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) f[e] = qf[kk][e];
        }
    };

    float o_acc[NT_OUT][4];
#pragma unroll
    for (int dt = 0; dt < NT_OUT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o_acc[dt][e] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    const float scale_log2 = s.scale * kLog2e;
    // Plain scores (no softcap, no mask, positive scale) stay raw: the scale joins the
    // exponent as one FFMA, exp2(raw * scale_log2 - m), as in the main kernel.
    const bool plain_scores = s.softcap <= 0.0f && !has_mask && s.scale > 0.0f;
    const float score_mul = plain_scores ? scale_log2 : 1.0f;
    const float cap_log2 = s.softcap * kLog2e, scale_over_cap = s.softcap > 0.0f ? s.scale / s.softcap : 0.0f;
    // Chunks whose keys every row sees (and that end before Skv) skip the visibility test.
    const int64_t all_see_below =
        s.has_hi ? int64_t(s.diag(0)) + s.hi_off : INT64_MAX; // last key all rows see
    const int64_t all_see_from =
        s.has_lo ? int64_t(s.diag(s.Sq - 1)) + s.lo_off : 0; // first key all rows see

    for (int k = 0; k < my_chunks; ++k) {
        // ---- wait for chunk k (this lane's copies, then the warp's), refill the ring ----
        cp_async_wait_pending<STAGES - 2>();
        __syncwarp();
        // The buffer refilled here held chunk k - 1, which every lane finished before the barrier.
        if (k + STAGES - 1 < my_chunks) load_chunk(k + STAGES - 1);
        cp_async_commit();
        float mask_next[2][NT_KEY][2] = {};
        if (has_mask && k + 1 < my_chunks) load_mask(k + 1, mask_next);

        const char* tile_k = ring + (k % STAGES) * Tr::kStageBytes;
        const char* tile_v = tile_k + KC * Rows::kPitch;
        const int n0 = chunk_key0(k);

        // ---- S = Q K^T ----
        float sc[NT_KEY][4];
#pragma unroll
        for (int nt = 0; nt < NT_KEY; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[nt][e] = 0.0f;
#pragma unroll
        for (int m = 0; m < D / 32; ++m) {
            uint32_t qa[4], qb[4]; // k-steps 2m and 2m + 1
            q_frag(2 * m, qa);
            q_frag(2 * m + 1, qb);
#pragma unroll
            for (int nt = 0; nt < NT_KEY; ++nt) {
                uint32_t kb[4];
                Rows::template load8<true, T>(tile_k, nt * 8 + g, 32 * m + 8 * t4, kb);
                mma_16816<T>(sc[nt], qa, kb[0], kb[1]);
                mma_16816<T>(sc[nt], qb, kb[2], kb[3]);
            }
        }

        // ---- scores in base 2: scale, softcap, additive mask (ALiBi), visibility ----
        if (!plain_scores) {
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int nt = 0; nt < NT_KEY; ++nt)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        float& x = sc[nt][2 * r + c];
                        x = s.softcap > 0.0f ? cap_log2 * fast_tanh(x * scale_over_cap) : x * scale_log2;
                        if (has_mask) x += slope_log2[r] * mask_now[r][nt][c];
                    }
        }
        const bool boundary = n0 + KC > s.Skv || n0 + KC - 1 > all_see_below || n0 < all_see_from;
        if (boundary) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                // the row's visible keys relative to this lane's first column of the chunk
                const Shape::KeyRange keys = s.visible_keys(row_i[r]);
                const int lo = keys.lo - (n0 + 2 * t4), hi = keys.hi - (n0 + 2 * t4);
#pragma unroll
                for (int nt = 0; nt < NT_KEY; ++nt)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int col = nt * 8 + c;
                        float& x = sc[nt][2 * r + c];
                        x = col < lo || col > hi ? -INFINITY : x;
                    }
            }
        }

        // ---- online softmax (base 2): rescale O and l by exp2(m_old - m_new) ----
        // Once the running maxima settle, most chunks leave them unchanged (corr = 1 exactly)
        // and the warp skips the O rescale.
        float corr[2];
        bool rescale = false;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < NT_KEY; ++nt) mx = fmaxf(mx, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
            const float m_new = fmaxf(row_max[r], quad_max(mx) * score_mul);
            const float m_use = m_new == -INFINITY ? 0.0f : m_new; // nothing visible yet: no NaN
            corr[r] = fast_exp2(row_max[r] - m_use);
            row_max[r] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT_KEY; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    float& x = sc[nt][2 * r + c];
                    x = fast_exp2(fmaf(x, score_mul, -m_use));
                    sum += x;
                }
            row_sum[r] = row_sum[r] * corr[r] + sum; // quad-partial; reduced in the epilogue
            rescale |= corr[r] != 1.0f;
        }
        if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
            for (int dt = 0; dt < NT_OUT; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) o_acc[dt][e] *= corr[e >> 1];
        }

        // ---- O += P V: P straight from the S accumulators, V paired across key rows ----
#pragma unroll
        for (int kk = 0; kk < KC / 16; ++kk) {
            uint32_t pa[4];
            acc_to_a<T>(pa, sc[2 * kk], sc[2 * kk + 1]);
            const int key = kk * 16 + 2 * t4;
#pragma unroll
            for (int c = 0; c < D / 64; ++c) {
                uint32_t v0[4], v1[4], v8[4], v9[4];
                const int e0 = 64 * c + 8 * g;
                Rows::template load8<false, T>(tile_v, key, e0, v0);
                Rows::template load8<false, T>(tile_v, key + 1, e0, v1);
                Rows::template load8<false, T>(tile_v, key + 8, e0, v8);
                Rows::template load8<false, T>(tile_v, key + 9, e0, v9);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    // element e of the pair register e / 2: low halves (e even) or high halves
                    const uint32_t sel = (e & 1) ? 0x7632u : 0x5410u;
                    const uint32_t b0 = __byte_perm(v0[e >> 1], v1[e >> 1], sel);
                    const uint32_t b1 = __byte_perm(v8[e >> 1], v9[e >> 1], sel);
                    mma_16816<T>(o_acc[8 * c + e], pa, b0, b1);
                }
            }
        }

#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int nt = 0; nt < NT_KEY; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) mask_now[r][nt][c] = mask_next[r][nt][c];
    }

    // ---- merge the warps: each writes O, m, l of its real rows into its own (now idle) ring ----
    // O rows are stored 4 dims per 16-byte store (merge_index), conflict-free.
    cp_async_wait_pending<0>();
    __syncwarp();
    float* const merge_o = reinterpret_cast<float*>(ring);   // [16][kMergePitch]
    float* const merge_max = merge_o + 16 * Tr::kMergePitch; // [16]
    float* const merge_sum = merge_max + 16;                 // [16]
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(row_sum[r]);
        const int p = g + 8 * r;
        if (!row_real[r]) continue;
            // o_acc[dt][2r + c] is output dim 64 (dt / 8) + 8 (2 t + c) + dt % 8
#pragma unroll
        for (int grp = 0; grp < D / 64; ++grp)
#pragma unroll
            for (int c = 0; c < 2; ++c)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int dt = 8 * grp + 4 * half, d = 64 * grp + 8 * (2 * t4 + c) + 4 * half;
                    *reinterpret_cast<float4*>(merge_o + Tr::merge_index(p, d)) =
                        make_float4(o_acc[dt][2 * r + c], o_acc[dt + 1][2 * r + c], o_acc[dt + 2][2 * r + c],
                                    o_acc[dt + 3][2 * r + c]);
                }
        if (t4 == 0) merge_max[p] = row_max[r], merge_sum[p] = l;
    }
    __syncthreads();

    // ---- combine the warps' rows: each thread 4 consecutive dims of one row ----
    auto warp_area = [&](int w) {
        return reinterpret_cast<const float*>(reinterpret_cast<const char*>(smem) + w * Tr::kWarpBytes);
    };
    for (int idx = int(threadIdx.x); idx < rows * (D / 4); idx += Tr::kThreads) {
        const int p = idx / (D / 4), d = idx % (D / 4) * 4;
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < NW; ++w) m = fmaxf(m, warp_area(w)[16 * Tr::kMergePitch + p]);
        const float m_use = m == -INFINITY ? 0.0f : m;
        float l = 0.0f, o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float* area = warp_area(w);
            const float f = exp2f(area[16 * Tr::kMergePitch + p] - m_use); // 0 for a warp that saw nothing
            l += f * area[16 * Tr::kMergePitch + 16 + p];
            const float4 v = *reinterpret_cast<const float4*>(area + Tr::merge_index(p, d));
            o[0] += f * v.x, o[1] += f * v.y, o[2] += f * v.z, o[3] += f * v.w;
        }
        const int i = p / s.G, h = hk * s.G + p % s.G;
        if (a.n_split > 1) {
            const int64_t prow = (int64_t(split) * s.B + b) * s.Hkv * rows + int64_t(hk) * rows + p;
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            // the workspace is 256-byte aligned and rows are D floats: a 16-byte store
            *reinterpret_cast<float4*>(a.part_o + prow * D + d) =
                make_float4(o[0] * inv, o[1] * inv, o[2] * inv, o[3] * inv);
            if (d == 0) a.part_lse[prow] = l > 0.0f ? m + log2f(l) : -INFINITY;
            continue;
        }
        // ---- one split: sinks join the denominator; O /= l, LSE = m + log l ----
        float o_scale = 1.0f;
        if (a.sinks) {
            const float sink = a.sinks[h] * kLog2e;
            const float m_new = fmaxf(m, sink);
            o_scale = m == -INFINITY ? 0.0f : exp2f(m - m_new);
            l = l * o_scale + exp2f(sink - m_new);
            m = m_new;
        }
        const float inv = l > 0.0f ? o_scale / l : 0.0f;
        char* dst = a.o + b * a.o_nb3 + int64_t(i) * a.o_nb2 + int64_t(h) * a.o_nb1;
        store_pair(dst, d, o[0] * inv, o[1] * inv, a.o_code);
        store_pair(dst, d + 2, o[2] * inv, o[3] * inv, a.o_code);
        if (a.lse && d == 0)
            a.lse[b * a.lse_nb2 + h * a.lse_nb1 + i] = l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY;
    }
}

// ---- instantiation glue --------------------------------------------------------------------

template <class Tr> void decode_set_smem() {
    static const bool ready = [] {
        if (cudaFuncSetAttribute(reinterpret_cast<const void*>(decode_kernel<Tr>),
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes) != cudaSuccess)
            gfa::fail("flash_attn_ext (CUDA): the decode kernel needs " + std::to_string(Tr::kSmemBytes) +
                      " bytes of shared memory, more than the device allows");
        return true;
    }();
    (void)ready;
}

template <int D, int KV, class T, class Fn> void decode_with_copy(int copy_bytes, Fn& fn) {
    constexpr int natural = decode_copy_bytes(KV, D);
    if (copy_bytes == natural) return fn(DecodeTraits<D, KV, T, natural>{});
    if constexpr (natural > 4 && (KV == kQ8_0 || KV == kQ4_0)) // 16-bit rows need whole 16-byte pieces
        if (copy_bytes == 4) return fn(DecodeTraits<D, KV, T, 4>{});
    gfa::fail("flash_attn_ext (CUDA): no decode kernel copies rows in " + std::to_string(copy_bytes) +
              "-byte pieces");
}

// Calls fn(Traits{}) with the traits of the kernel that sel names.
template <int D, class Fn> void decode_dispatch(const DecodeSel& sel, Fn&& fn) {
    switch (sel.kv) {
    case kF16:
        return decode_with_copy<D, kF16, __half>(sel.copy_bytes, fn);
    case kBF16:
        return decode_with_copy<D, kBF16, __nv_bfloat16>(sel.copy_bytes, fn);
    case kQ8_0:
        if (sel.bf16) return decode_with_copy<D, kQ8_0, __nv_bfloat16>(sel.copy_bytes, fn);
        return decode_with_copy<D, kQ8_0, __half>(sel.copy_bytes, fn);
    case kQ4_0:
        if (sel.bf16) return decode_with_copy<D, kQ4_0, __nv_bfloat16>(sel.copy_bytes, fn);
        return decode_with_copy<D, kQ4_0, __half>(sel.copy_bytes, fn);
    default:
        gfa::fail("flash_attn_ext (CUDA): no decode kernel for K/V code " + std::to_string(sel.kv));
    }
}

template <int D> KernelInfo decode_info_tile(const DecodeSel& sel) {
    KernelInfo info;
    decode_dispatch<D>(sel, [&](auto tr) {
        using Tr = decltype(tr);
        decode_set_smem<Tr>();
        info = KernelInfo{16, Tr::NW * Tr::KC, Tr::kThreads, Tr::kSmemBytes, 0};
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.blocks_per_sm, decode_kernel<Tr>, Tr::kThreads,
                                                      Tr::kSmemBytes);
    });
    return info;
}

template <int D>
void decode_launch_tile(const DecodeSel& sel, const FwdArgs& a, int split_begin, dim3 grid, cudaStream_t st) {
    decode_dispatch<D>(sel, [&](auto tr) {
        using Tr = decltype(tr);
        decode_set_smem<Tr>();
        launch_early(decode_kernel<Tr>, grid, Tr::kThreads, Tr::kSmemBytes, st, a, split_begin);
    });
}

} // namespace gfa::cuda::fa
