// Host side of the CUDA FlashAttention kernels: validation of the descriptor, choice of
// tile and split-KV count, workspaces, and the small kernels around the main ones
// (split-KV combine; backward preprocess, dQ conversion and dSinks reduction).
#include "flash_attn_cuda.h"

#include "fa_common.cuh"
#include "fa_decode.h"
#include "fa_launch.h"
#include "fa_mask_tiles.h"
#include "split_plan.h"
#include "early_launch.cuh"
#include "int8_columns.cuh"

#include <ggml-fa/error.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>

namespace gfa::cuda {

using attn::BackwardProblem;
using attn::Problem;
using attn::View;

namespace {

[[noreturn]] void unsupported(const std::string& what) {
    gfa::fail("flash_attn_ext (CUDA): " + what);
}

void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess) unsupported(std::string(what) + ": " + cudaGetErrorString(err));
}

std::string dims(const View& v) {
    return "[" + std::to_string(v.ne[0]) + ", " + std::to_string(v.ne[1]) + ", " + std::to_string(v.ne[2]) +
           ", " + std::to_string(v.ne[3]) + "]";
}

void expect_shape(const View& v, const char* name, int64_t n0, int64_t n1, int64_t n2, int64_t n3) {
    if (v.ne[0] != n0 || v.ne[1] != n1 || v.ne[2] != n2 || v.ne[3] != n3)
        unsupported(std::string(name) + " has shape " + dims(v) + ", expected [" + std::to_string(n0) + ", " +
                    std::to_string(n1) + ", " + std::to_string(n2) + ", " + std::to_string(n3) + "]");
}

bool is_16bit(Type t) {
    return t == Type::F16 || t == Type::BF16;
}

// Element code of an operand the tile loaders read, with kUnaligned for 16-bit rows that
// cp.async cannot read directly.
int operand_code(const View& v, const char* name, bool allow_quantized) {
    switch (v.type) {
    case Type::F32:
        return fa::kF32;
    case Type::F16:
    case Type::BF16: {
        const bool aligned = reinterpret_cast<uintptr_t>(v.data) % 16 == 0 && v.nb[1] % 16 == 0 &&
                             v.nb[2] % 16 == 0 && v.nb[3] % 16 == 0;
        const int code = v.type == Type::F16 ? fa::kF16 : fa::kBF16;
        return aligned ? code : code | fa::kUnaligned;
    }
    case Type::Q8_0:
        if (allow_quantized) return fa::kQ8_0;
        break;
    case Type::Q4_0:
        if (allow_quantized) return fa::kQ4_0;
        break;
    default:
        break;
    }
    unsupported(std::string(name) + " of type " + std::string(type_name(v.type)) + " is not supported");
}

int output_code(const View& v, const char* name) {
    switch (v.type) {
    case Type::F32:
        return fa::kF32;
    case Type::F16:
        return fa::kF16;
    case Type::BF16:
        return fa::kBF16;
    default:
        unsupported(std::string(name) + " of type " + std::string(type_name(v.type)) + " is not supported");
    }
}

fa::Operand operand(const View& v, int code) {
    fa::Operand o;
    o.data = static_cast<const char*>(v.data);
    o.nb1 = v.nb[1];
    o.nb2 = v.nb[2];
    o.nb3 = v.nb[3];
    o.code = code;
    return o;
}

int head_dim_tile(const Problem& p) {
    const int64_t d = std::max(p.Dk, p.Dv);
    return d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

// Checks everything the kernels rely on and fills the shared part of the kernel arguments.
fa::Shape validate(const Problem& p) {
    if (p.Dk <= 0 || p.Dv <= 0 || p.Sq <= 0 || p.Skv <= 0 || p.Hq <= 0 || p.Hkv <= 0 || p.B <= 0)
        unsupported("empty problem (Dk " + std::to_string(p.Dk) + ", Dv " + std::to_string(p.Dv) + ", Sq " +
                    std::to_string(p.Sq) + ", Skv " + std::to_string(p.Skv) + ")");
    if (p.Dk % 8 != 0 || p.Dv % 8 != 0 || p.Dk > 256 || p.Dv > 256)
        unsupported("head dims Dk " + std::to_string(p.Dk) + ", Dv " + std::to_string(p.Dv) +
                    ": must be multiples of 8, at most 256");
    if (p.Hq % p.Hkv != 0)
        unsupported("Hq " + std::to_string(p.Hq) + " is not a multiple of Hkv " + std::to_string(p.Hkv));
    if (p.Sq > INT32_MAX / 256 || p.Skv > INT32_MAX / 2 || p.Hq > 65535 || p.B > 65535)
        unsupported("sizes exceed the kernel's index range");
    if (!p.q.present() || !p.k.present() || !p.v.present() || !p.o.present())
        unsupported("q, k, v and o must all be given");
    expect_shape(p.q, "q", p.Dk, p.Sq, p.Hq, p.B);
    expect_shape(p.k, "k", p.Dk, p.Skv, p.Hkv, p.B);
    expect_shape(p.v, "v", p.Dv, p.Skv, p.Hkv, p.B);
    expect_shape(p.o, "o", p.Dv, p.Hq, p.Sq, p.B);
    for (const View* v : {&p.k, &p.v})
        if ((v->type == Type::Q8_0 || v->type == Type::Q4_0) && v->ne[0] % 32 != 0)
            unsupported("quantized k/v need head dims that are multiples of 32");
    if (p.mask.present()) {
        if (p.mask.type != Type::F32 && p.mask.type != Type::F16)
            unsupported("mask of type " + std::string(type_name(p.mask.type)) + " (f32 or f16 expected)");
        if (p.mask.ne[0] < p.Skv || p.mask.ne[1] < p.Sq || (p.mask.ne[2] != 1 && p.mask.ne[2] != p.Hq) ||
            (p.mask.ne[3] != 1 && p.mask.ne[3] != p.B))
            unsupported("mask of shape " + dims(p.mask) + " does not cover [Skv, Sq, 1|Hq, 1|B]");
    }
    if (p.sinks.present() && (p.sinks.type != Type::F32 || p.sinks.ne[0] != p.Hq || p.sinks.nb[0] != 4))
        unsupported("sinks must be contiguous f32 [Hq]");
    if (p.lse.present()) {
        if (p.lse.type != Type::F32) unsupported("lse must be f32");
        expect_shape(p.lse, "lse", p.Sq, p.Hq, p.B, 1);
        if (p.lse.nb[0] != 4 || p.lse.nb[1] % 4 != 0 || p.lse.nb[2] % 4 != 0)
            unsupported("lse must have contiguous rows of f32");
    }

    fa::Shape s;
    s.Sq = int(p.Sq), s.Skv = int(p.Skv), s.Hq = int(p.Hq), s.Hkv = int(p.Hkv), s.B = int(p.B);
    s.G = int(p.Hq / p.Hkv);
    s.Dk = int(p.Dk), s.Dv = int(p.Dv);
    s.scale = p.params.scale;
    s.softcap = p.params.logit_softcap;
    if (p.params.max_bias > 0.0f) {
        const int n_head_log2 = 1 << int(std::floor(std::log2(double(p.Hq))));
        s.alibi_n_head_log2 = n_head_log2;
        s.alibi_m0 = std::pow(2.0f, -p.params.max_bias / float(n_head_log2));
        s.alibi_m1 = std::pow(2.0f, -p.params.max_bias / 2.0f / float(n_head_log2));
    }
    // visible(i, j): j - diag(i) <= hi (causal: 0, window_right: wr) and >= -window_left.
    if (p.params.causal || p.params.window_right >= 0) {
        s.has_hi = true;
        s.hi_off = p.params.causal ? (p.params.window_right >= 0 ? std::min(0, p.params.window_right) : 0)
                                   : p.params.window_right;
    }
    if (p.params.window_left >= 0) {
        s.has_lo = true;
        s.lo_off = -p.params.window_left;
    }
    return s;
}

bool compute_bf16(const Problem& p) {
    if (is_16bit(p.k.type)) return p.k.type == Type::BF16;
    return p.q.type == Type::BF16;
}

fa::KernelInfo fwd_info(int tile, bool decode) {
    // Occupancy is a property of the device; query once per kernel.
    static fa::KernelInfo cache[3][2];
    const int ti = tile == 64 ? 0 : tile == 128 ? 1 : 2;
    fa::KernelInfo& info = cache[ti][decode];
    if (info.bm == 0)
        info = tile == 64    ? fa::fwd_info_d64(decode)
               : tile == 128 ? fa::fwd_info_d128(decode)
                             : fa::fwd_info_d256(decode);
    return info;
}

fa::KernelInfo hopper_info(int tile, fa::HopperSchedule sched) {
    static fa::KernelInfo cache[2][2];
    fa::KernelInfo& info = cache[tile == 64 ? 0 : 1][sched == fa::HopperSchedule::Overlap];
    if (info.bm == 0) info = fa::fwd_hopper_info(tile, sched);
    return info;
}

// Pairs of (KV head, outer) per group of the flat grid order (GridPos). Where every tile of
// a pair is as long as the next, a pair's tiles stay together (group 1): they read the same
// rows. Where a mask makes them uneven, groups of about `waves` device-fulls of blocks
// interleave their pairs' tiles, longest first: enough blocks per group to balance long
// against short, few enough pairs that the rows they read stay in L2. Measured on an H100
// (causal, docs/BENCHMARKS.md): the backward at 1 wave and the forward at 4 were as fast as
// any group size tried; one group of every pair left the D = 256 backward at 2k keys 35%
// slower. GFA_CUDA_FA_TILE_GROUP_WAVES overrides both (0: every pair in one group).
constexpr double kForwardGroupWaves = 4.0, kBackwardGroupWaves = 1.0;

int tile_group(bool uneven, int64_t pairs, int64_t n_tiles, int64_t slots, double waves) {
    static const double forced = [] {
        const char* v = std::getenv("GFA_CUDA_FA_TILE_GROUP_WAVES");
        return v && *v ? std::atof(v) : -1.0;
    }();
    if (forced >= 0.0) waves = forced;
    if (!uneven || pairs <= 1) return 1;
    if (waves <= 0.0) return int(pairs);
    const auto group = int64_t(std::ceil(waves * double(slots) / double(std::max<int64_t>(n_tiles, 1))));
    return int(std::clamp<int64_t>(group, 1, pairs));
}

int sm_count() {
    static int count = 0;
    if (count == 0) {
        int dev = 0;
        check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
        check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev),
                   "reading the SM count");
    }
    return count;
}

// ---- staging: operands a kernel re-reads, converted once ---------------------------------
//
// The tile loaders stream rows of the compute type with cp.async; any other float operand
// (f32, the other 16-bit type, 16-bit rows cp.async cannot read) is converted through
// registers on every tile load, and the load then stalls the pipeline it was meant to feed.
// An operand that a kernel reads once per tile of the other side (K and V in the forward,
// once per query-row tile; Q and dO in the backward, once per key tile) is therefore
// converted once, before the kernel, into a contiguous copy in the workspace. The copy holds
// exactly what the inline conversion would have put in shared memory (same rounding), so the
// results do not change, only the path the bytes take.

// Whether the tile loaders would convert v through registers for a kernel computing in
// bf16 (else f16). Quantized K/V are not staged: reading them compact is their point.
bool converts_on_load(const View& v, bool bf16) {
    if (v.type == Type::F32) return true;
    if (!is_16bit(v.type)) return false;
    const fa::ElemCode compute = bf16 ? fa::kBF16 : fa::kF16;
    return operand_code(v, "operand", false) != compute;
}

size_t staged_bytes(const View& v) {
    const size_t n = size_t(v.ne[0]) * size_t(v.ne[1]) * size_t(v.ne[2]) * size_t(v.ne[3]);
    return (n * 2 + 255) / 256 * 256;
}

// One 16-byte chunk (8 elements) of the copy per thread and step; rows hold ne0 elements,
// a multiple of 8 (validate checks the head dims).
template <class T>
__global__ void stage_kernel(const fa::Operand src, int ne0, int ne1, int ne2, int64_t chunks, uint4* dst) {
    const int per_row = ne0 / 8;
    const int code = src.code & ~fa::kUnaligned;
    for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < chunks;
         idx += int64_t(gridDim.x) * blockDim.x) {
        const int c = int(idx % per_row);
        const int64_t r = idx / per_row;
        const int64_t i1 = r % ne1, i2 = r / ne1 % ne2, i3 = r / (int64_t(ne1) * ne2);
        const char* row = src.data + i3 * src.nb3 + i2 * src.nb2 + i1 * src.nb1;
        float x[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) x[e] = fa::load_elem(row, c * 8 + e, code);
        dst[idx] = make_uint4(fa::Elem<T>::pack(x[0], x[1]), fa::Elem<T>::pack(x[2], x[3]),
                              fa::Elem<T>::pack(x[4], x[5]), fa::Elem<T>::pack(x[6], x[7]));
    }
}

// Converts `from` (read through `as`) into a contiguous copy at dst in the compute type and
// returns the operand that reads the copy.
fa::Operand stage(const View& from, const fa::Operand& as, bool bf16, char* dst, cudaStream_t st) {
    const int64_t chunks = from.ne[0] / 8 * from.ne[1] * from.ne[2] * from.ne[3];
    const unsigned blocks = unsigned(std::clamp<int64_t>((chunks + 255) / 256, 1, 8 * int64_t(sm_count())));
    auto* out = reinterpret_cast<uint4*>(dst);
    const int ne0 = int(from.ne[0]), ne1 = int(from.ne[1]), ne2 = int(from.ne[2]);
    if (bf16)
        stage_kernel<__nv_bfloat16><<<blocks, 256, 0, st>>>(as, ne0, ne1, ne2, chunks, out);
    else
        stage_kernel<__half><<<blocks, 256, 0, st>>>(as, ne0, ne1, ne2, chunks, out);
    check_cuda(cudaGetLastError(), "launching the operand conversion kernel");
    fa::Operand copy;
    copy.data = dst;
    copy.nb1 = from.ne[0] * 2;
    copy.nb2 = copy.nb1 * from.ne[1];
    copy.nb3 = copy.nb2 * from.ne[2];
    copy.code = bf16 ? fa::kBF16 : fa::kF16;
    return copy;
}

// Reserves room for a staged copy of v at the end of a workspace of `end` bytes when the
// kernel would otherwise convert it on every load; returns its offset.
std::optional<size_t> reserve_stage(size_t& end, const View& v, bool bf16, bool reread) {
    if (!reread || !converts_on_load(v, bf16)) return std::nullopt;
    end = (end + 255) / 256 * 256;
    const size_t offset = end;
    end += staged_bytes(v);
    return offset;
}

// The operand a kernel reads: the staged copy (converted now) or v itself.
fa::Operand staged_or_direct(const std::optional<size_t>& offset, const View& v, const fa::Operand& direct,
                             bool bf16, char* workspace, cudaStream_t st) {
    return offset ? stage(v, direct, bf16, workspace + *offset, st) : direct;
}

struct FwdPlan {
    int tile = 0;
    bool decode = false, bf16 = false;
    fa::KernelInfo info;
    int row_tiles = 0, n_split = 1, split_keys = 0;
    size_t workspace = 0;
    // The decoding kernel (fa_decode.cuh) instead of the tiled one: which instantiation, and
    // the first key of split 0 (the splits cover only the keys some row can see).
    std::optional<fa::DecodeSel> decode_kernel;
    int split_begin = 0;
    // The wgmma kernel (fa_forward_hopper.cuh) instead of the mma.sync one, and its schedule.
    std::optional<fa::HopperSchedule> hopper;
    std::optional<size_t> stage_k, stage_v; // workspace offsets of converted copies (staging)
    std::optional<size_t> mask_tiles_at;    // workspace offset of the mask's tile classes
    fa::MaskTileGrid mask_grid;
};

// Lowest set bit of the address and strides of a K/V view, at most 16: the widest aligned
// piece its rows can be copied in.
int row_alignment(const View& v) {
    const uint64_t bits =
        reinterpret_cast<uintptr_t>(v.data) | uint64_t(v.nb[1]) | uint64_t(v.nb[2]) | uint64_t(v.nb[3]) | 16u;
    return int(bits & (~bits + 1));
}

// The decoding kernel takes problems with at most 16 query rows per KV head (Sq * G: one
// token with GQA up to 16, or a few tokens of speculative decoding). There every K/V byte a
// block reads feeds at most 16 rows, so the work is bound by reading K and V, and one 16-row
// tensor-core tile per warp streaming its own keys beats the 64-row tile of the main kernel,
// whose rows are mostly padding and whose K/V tiles are loaded and then waited for. Beyond
// 16 rows the main kernel's 4 warps share each K/V tile among 64 rows, and it wins.
// Also required: Dk == Dv in {64, 128, 256}; K and V of one type among f16, bf16 (rows
// 16-byte aligned), q8_0, q4_0 (rows at least 4-byte aligned). Everything else (and every
// score feature is supported) goes to the main kernel.
std::optional<fa::DecodeSel> decode_selection(const Problem& p, const fa::Shape& s) {
    if (int64_t(s.Sq) * s.G > fa::kDecodeMaxRows) return std::nullopt;
    if (p.Dk != p.Dv || (p.Dk != 64 && p.Dk != 128 && p.Dk != 256)) return std::nullopt;
    if (p.k.type != p.v.type) return std::nullopt;
    fa::DecodeSel sel;
    sel.bf16 = compute_bf16(p);
    switch (p.k.type) {
    case Type::F16:
        sel.kv = fa::kF16;
        break;
    case Type::BF16:
        sel.kv = fa::kBF16;
        break;
    case Type::Q8_0:
        sel.kv = fa::kQ8_0;
        break;
    case Type::Q4_0:
        sel.kv = fa::kQ4_0;
        break;
    default:
        return std::nullopt;
    }
    const int align = std::min(row_alignment(p.k), row_alignment(p.v));
    const int natural = fa::decode_copy_bytes(sel.kv, int(p.Dk));
    const bool quantized = sel.kv == fa::kQ8_0 || sel.kv == fa::kQ4_0;
    if (align >= natural)
        sel.copy_bytes = natural;
    else if (quantized && align >= 4)
        sel.copy_bytes = 4;
    else
        return std::nullopt;
    return sel;
}

fa::KernelInfo decode_info(int d, const fa::DecodeSel& sel) {
    // Occupancy is a property of the device; query once per instantiation.
    static fa::KernelInfo cache[3][5][2][3];
    const int di = d == 64 ? 0 : d == 128 ? 1 : 2, ci = sel.copy_bytes == 4 ? 0 : sel.copy_bytes == 8 ? 1 : 2;
    fa::KernelInfo& info = cache[di][sel.kv][sel.bf16][ci];
    if (info.bm == 0)
        info = d == 64    ? fa::decode_info_d64(sel)
               : d == 128 ? fa::decode_info_d128(sel)
                          : fa::decode_info_d256(sel);
    return info;
}

// Splits for the decoding kernel: cut the visible keys into whole rounds (a chunk for every
// warp) and pick the number of splits that fills the device best (fewest splits within 95%
// of the best wave efficiency), with at least 4 rounds per split. A split has fixed work
// besides its rounds (loading Q, merging its warps, writing its partial row, its share of the
// combine), and with 2 rounds that work was as long as the rounds: at 1 x 4k keys (f16, GQA
// 32/8, H200) 16 splits of 4 rounds read 1099 GB/s in one call, 32 splits of 2 rounds 967-973
// and 8 splits of 8 rounds 884.
void plan_decode(FwdPlan& plan, const Problem& p, const fa::Shape& s, const fa::DecodeSel& sel) {
    plan.decode_kernel = sel;
    plan.tile = int(p.Dk);
    plan.bf16 = sel.bf16;
    plan.info = decode_info(plan.tile, sel);
    const int chunk = fa::kDecodeChunk, round = plan.info.bn;
    int64_t lo = 0, hi = s.Skv; // keys some row sees: the union over all rows
    if (s.has_hi) hi = std::min<int64_t>(hi, int64_t(s.diag(s.Sq - 1)) + s.hi_off + 1);
    if (s.has_lo) lo = std::max<int64_t>(lo, int64_t(s.diag(0)) + s.lo_off);
    const int64_t begin = hi > lo ? lo / chunk * chunk : 0;
    const int64_t rounds = hi > lo ? (hi - begin + round - 1) / round : 0;
    const int64_t blocks = int64_t(s.B) * s.Hkv;
    const int64_t slots = int64_t(sm_count()) * std::max(1, plan.info.blocks_per_sm);
    // A split takes at least one round (each warp one chunk) where that makes at most 16
    // splits, up to 4 rounds at longer ranges: short ranges (a 1.1B model's 640 keys: 10
    // rounds) are bound by each warp's chain of chunks, long ones by the combine's partial
    // rows (4k keys, 64 rounds: 33 splits of 2 rounds ran 2 us slower than 16 of 4 with
    // quantized caches). 4 rounds at least, as before, cost that model's decoding 4-6%.
    const int64_t min_rounds = std::clamp<int64_t>((rounds + 15) / 16, 1, 4);
    const int64_t per_split = units_per_split(blocks, slots, rounds, min_rounds, 0.95);
    plan.n_split = rounds > 0 ? int((rounds + per_split - 1) / per_split) : 1;
    plan.split_keys = int(per_split * round);
    plan.split_begin = int(begin);
    plan.row_tiles = 1;
    if (plan.n_split > 1) {
        const size_t part_rows = size_t(plan.n_split) * s.B * s.Hkv * s.Sq * s.G;
        plan.workspace = part_rows * (size_t(s.Dv) + 1) * sizeof(float) + 256;
    }
}

// The tiles in which a kernel gets an explicit mask's classes (MaskTiles), if it gets them:
// for masks shared by all heads (a block's rows span several heads, and a causal, window or
// padding mask is the same for each), where there is more than one key tile to leave out or
// read without values, and the classifying pass's grid fits the launch limits.
std::optional<fa::MaskTileGrid> mask_tiles_for(const Problem& p, const fa::Shape& s, int rows, int keys,
                                               int G, bool spans_over_keys) {
    if (!p.mask.present() || p.mask.ne[2] != 1 || !fa::mask_tiles_enabled()) return std::nullopt;
    const fa::MaskTileGrid grid = fa::mask_tile_grid(s, p.mask.ne[3] > 1, rows, keys, G, spans_over_keys);
    if (grid.n_key_tiles < 2 || !grid.fits()) return std::nullopt;
    return grid;
}

// Reserves room for the classes of `grid` at the end of a workspace of `end` bytes; returns
// their offset.
size_t reserve_mask_tiles(size_t& end, const fa::MaskTileGrid& grid) {
    end = (end + 255) / 256 * 256;
    const size_t offset = end;
    end += grid.bytes();
    return offset;
}

// The main kernel: split-KV (units_per_split) when the blocks cannot fill the device, the
// fewest splits within 85% of the best wave efficiency.
FwdPlan plan_forward(const Problem& p, const fa::Shape& s) {
    FwdPlan plan;
    if (const auto sel = decode_selection(p, s)) {
        plan_decode(plan, p, s, *sel);
        return plan;
    }
    plan.tile = head_dim_tile(p);
    plan.bf16 = compute_bf16(p);
    const int64_t rows = int64_t(s.Sq) * s.G;
    plan.decode = rows <= 64; // the 64-row tile: GQA groups of a few query positions
    // Hopper's warpgroup kernel takes the plain problems of head-dim tiles up to 128 (its
    // softmax keeps raw scores: no mask, no softcap, a positive scale).
    if (!plan.decode && plan.tile <= 128 && !p.mask.present() && s.softcap <= 0.0f && s.scale > 0.0f)
        plan.hopper = fa::hopper_forward_schedule(plan.tile, p.params.causal);
    plan.info = plan.hopper ? hopper_info(plan.tile, *plan.hopper) : fwd_info(plan.tile, plan.decode);
    plan.row_tiles = int((rows + plan.info.bm - 1) / plan.info.bm);
    const int64_t blocks = int64_t(plan.row_tiles) * s.Hkv * s.B;
    const int64_t slots = int64_t(sm_count()) * std::max(1, plan.info.blocks_per_sm);
    const int key_tiles = (s.Skv + plan.info.bn - 1) / plan.info.bn;
    const int tiles_per_split = int(units_per_split(blocks, slots, key_tiles, 1, 0.85));
    plan.n_split = (key_tiles + tiles_per_split - 1) / tiles_per_split;
    plan.split_keys = tiles_per_split * plan.info.bn;
    if (blocks * plan.n_split > INT32_MAX)
        unsupported("the forward grid (" + std::to_string(blocks * plan.n_split) +
                    " blocks of heads x batch x row tiles) exceeds the launch limit");
    if (plan.n_split > 1) {
        const size_t part_rows = size_t(plan.n_split) * s.B * s.Hkv * rows;
        plan.workspace = part_rows * (size_t(s.Dv) + 1) * sizeof(float) + 256;
    }
    // Every row tile of a head reads all its K/V tiles.
    const bool reread = plan.row_tiles > 1;
    plan.stage_k = reserve_stage(plan.workspace, p.k, plan.bf16, reread);
    plan.stage_v = reserve_stage(plan.workspace, p.v, plan.bf16, reread);
    if (const auto grid = mask_tiles_for(p, s, plan.info.bm, plan.info.bn, s.G, true)) {
        plan.mask_grid = *grid;
        plan.mask_tiles_at = reserve_mask_tiles(plan.workspace, *grid);
    }
    return plan;
}

// Stream-ordered scratch: the caller's buffer, or one allocated (and freed) on the stream.
constexpr uintptr_t kWorkspaceAlignment = 256;
class Scratch {
  public:
    Scratch(size_t need, void* given, size_t given_bytes, cudaStream_t st) : stream_(st) {
        if (need == 0) return;
        if (given) {
            if (given_bytes < need)
                unsupported("workspace of " + std::to_string(given_bytes) + " bytes, " +
                            std::to_string(need) + " needed");
            // the kernels store 16-byte vectors at offsets of 256-byte multiples into it
            if (reinterpret_cast<uintptr_t>(given) % kWorkspaceAlignment != 0)
                unsupported("workspace not aligned to " + std::to_string(kWorkspaceAlignment) +
                            " bytes (as cudaMalloc returns)");
            ptr_ = given;
            return;
        }
        if (cudaMallocAsync(&ptr_, need, st) != cudaSuccess) {
            (void)cudaGetLastError();
            throw gfa::OutOfMemory("flash_attn_ext (CUDA): cannot allocate a workspace of " +
                                   std::to_string(need) + " bytes");
        }
        owned_ = true;
    }
    ~Scratch() {
        if (owned_) cudaFreeAsync(ptr_, stream_);
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    char* get() const { return static_cast<char*>(ptr_); }

  private:
    void* ptr_ = nullptr;
    bool owned_ = false;
    cudaStream_t stream_;
};

// ---- split-KV combine: O = sum_s exp2(lse_s - lse) O_s, lse = log2 sum_s exp2(lse_s) -------
//
// One block per output row. Warps take the splits in turn and lanes the head dims, so a row
// with many splits costs a few rounds of independent loads rather than a chain of them; the
// warps' sums meet in shared memory.

constexpr int kCombineWarps = 8;

template <bool MAX> __device__ float block_reduce(float x, float* scratch) {
    const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
#pragma unroll
    for (int w = 16; w > 0; w >>= 1) {
        const float y = __shfl_xor_sync(0xffffffffu, x, w);
        x = MAX ? fmaxf(x, y) : x + y;
    }
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    float r = scratch[0];
#pragma unroll
    for (int w = 1; w < kCombineWarps; ++w) r = MAX ? fmaxf(r, scratch[w]) : r + scratch[w];
    __syncthreads(); // scratch is reused by the next reduction
    return r;
}

__global__ void __launch_bounds__(32 * kCombineWarps) combine_kernel(const fa::FwdArgs a) {
    await_inputs(); // launched early: the query and the cache rows come from earlier kernels
    allow_next_launch();
    constexpr int kMaxDimsPerLane = 256 / 32;
    __shared__ float partial[kCombineWarps][256];
    __shared__ float scratch[kCombineWarps];
    const fa::Shape& s = a.s;
    const int64_t rows_total = int64_t(s.Sq) * s.G;
    const int64_t row = blockIdx.x;
    const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
    const int64_t p = row % rows_total;
    const int hk = int((row / rows_total) % s.Hkv), b = int(row / (rows_total * s.Hkv));
    const int i = int(p / s.G), h = hk * s.G + int(p % s.G);
    const int64_t split_stride = int64_t(s.B) * s.Hkv * rows_total;
    const int64_t row0 = (int64_t(b) * s.Hkv + hk) * rows_total + p;

    // A warp's first kEarlySplits rows go out before the LSE reductions (whose barriers the
    // loads could not pass), so that the block waits on L2 once for the LSEs and the rows
    // together instead of once for each. Splits beyond those (more than kEarlySplits x
    // kCombineWarps) are read after the reductions.
    constexpr int kEarlySplits = 2;
    float early[kEarlySplits][kMaxDimsPerLane];
#pragma unroll
    for (int j = 0; j < kEarlySplits; ++j) {
        const int sp = warp + j * kCombineWarps;
        const float* src = a.part_o + (row0 + sp * split_stride) * s.Dv;
#pragma unroll
        for (int k = 0; k < kMaxDimsPerLane; ++k)
            early[j][k] = sp < a.n_split && lane + 32 * k < s.Dv ? src[lane + 32 * k] : 0.0f;
    }

    float m = -INFINITY;
    for (int sp = int(threadIdx.x); sp < a.n_split; sp += blockDim.x)
        m = fmaxf(m, a.part_lse[row0 + sp * split_stride]);
    m = block_reduce<true>(m, scratch);
    const float sink = a.sinks ? a.sinks[h] * fa::kLog2e : -INFINITY;
    m = fmaxf(m, sink);
    const float m_use = m == -INFINITY ? 0.0f : m;
    float total = 0.0f;
    for (int sp = int(threadIdx.x); sp < a.n_split; sp += blockDim.x)
        total += exp2f(a.part_lse[row0 + sp * split_stride] - m_use);
    total = block_reduce<false>(total, scratch);
    if (a.sinks) total += exp2f(sink - m_use);

    float acc[kMaxDimsPerLane];
#pragma unroll
    for (int k = 0; k < kMaxDimsPerLane; ++k) acc[k] = 0.0f;
#pragma unroll
    for (int j = 0; j < kEarlySplits; ++j) {
        const int sp = warp + j * kCombineWarps;
        if (sp >= a.n_split) break;
        const float w = exp2f(a.part_lse[row0 + sp * split_stride] - m_use);
#pragma unroll
        for (int k = 0; k < kMaxDimsPerLane; ++k) acc[k] += w > 0.0f ? w * early[j][k] : 0.0f;
    }
#pragma unroll 2
    for (int sp = warp + kEarlySplits * kCombineWarps; sp < a.n_split; sp += kCombineWarps) {
        const int64_t r = row0 + sp * split_stride;
        const float w = exp2f(a.part_lse[r] - m_use);
        const float* src = a.part_o + r * s.Dv;
        // The loads do not wait on w (they go out together with the lse load); a split that
        // saw nothing (w = 0) is dropped by the select, whatever its rows hold.
#pragma unroll
        for (int k = 0; k < kMaxDimsPerLane; ++k)
            if (lane + 32 * k < s.Dv) {
                const float x = src[lane + 32 * k];
                acc[k] += w > 0.0f ? w * x : 0.0f;
            }
    }
#pragma unroll
    for (int k = 0; k < kMaxDimsPerLane; ++k)
        if (lane + 32 * k < s.Dv) partial[warp][lane + 32 * k] = acc[k];
    __syncthreads();

    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    char* dst = a.o + b * a.o_nb3 + int64_t(i) * a.o_nb2 + int64_t(h) * a.o_nb1;
    // With o_q, the row's blocks of 32 are rounded here for the product behind (Dv % 32 == 0
    // and Dv <= blockDim: whole warps take one d each).
    const int64_t column_at = (int64_t(b) * s.Sq + i) * int64_t(s.Hq) * s.Dv + int64_t(h) * s.Dv;
    for (int d = int(threadIdx.x); d < s.Dv; d += blockDim.x) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kCombineWarps; ++w) sum += partial[w][d];
        const float value = sum * inv;
        fa::store_elem(dst, d, value, a.o_code);
        if (a.o_q)
            round_block_to_int8(value, lane, a.o_q + column_at + d - lane,
                                reinterpret_cast<float2*>(a.o_ds) + (column_at + d) / 32);
    }
    if (a.lse && threadIdx.x == 0)
        a.lse[b * a.lse_nb2 + h * a.lse_nb1 + i] =
            total > 0.0f ? (m_use + log2f(total)) * fa::kLn2 : -INFINITY;
}

// ---- backward helpers -------------------------------------------------------------------

// One warp per (b, h, i) row of the padded row arrays: delta = rowsum(dO * O), lse2, and
// the row's term of dSinks; and the row of the dQ accumulator set to zero (a memset of its own
// was one more pass over as many bytes as dQ's fp32 form).
__global__ void bwd_preprocess_kernel(const fa::BwdArgs a) {
    const fa::Shape& s = a.s;
    const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = int(threadIdx.x) & 31;
    if (row >= int64_t(s.B) * s.Hq * a.Sq_pad) return;
    const int i = int(row % a.Sq_pad), h = int((row / a.Sq_pad) % s.Hq),
              b = int(row / (int64_t(a.Sq_pad) * s.Hq));
    if (a.dq_accum && i < s.Sq) { // dq_ld is a multiple of 16: whole float4s
        float4* acc = reinterpret_cast<float4*>(a.dq_accum + ((int64_t(b) * s.Hq + h) * s.Sq + i) * a.dq_ld);
        for (int c = lane; c < a.dq_ld / 4; c += 32) acc[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    if (i >= s.Sq) {
        if (lane == 0) {
            a.delta[row] = 0.0f;
            a.lse2[row] = INFINITY; // padded rows: P = 0
        }
        return;
    }
    const char* o_row = a.o.data + b * a.o.nb3 + int64_t(i) * a.o.nb2 + int64_t(h) * a.o.nb1;
    const char* do_row = a.dO.data + b * a.dO.nb3 + int64_t(i) * a.dO.nb2 + int64_t(h) * a.dO.nb1;
    float acc = 0.0f;
    for (int d = lane; d < s.Dv; d += 32)
        acc += fa::load_elem(o_row, d, a.o.code & ~fa::kUnaligned) *
               fa::load_elem(do_row, d, a.dO.code & ~fa::kUnaligned);
#pragma unroll
    for (int w = 16; w > 0; w >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, w);
    if (lane == 0) {
        const float lse = a.lse[b * a.lse_nb2 + h * a.lse_nb1 + i];
        a.delta[row] = acc;
        a.lse2[row] = lse == -INFINITY ? INFINITY : lse * fa::kLog2e; // no visible key: no gradient
        if (a.dsink_rows) {
            const float term = lse == -INFINITY ? 0.0f : -expf(a.sinks[h] - lse) * acc;
            a.dsink_rows[int64_t(h) * s.B * s.Sq + int64_t(b) * s.Sq + i] = term;
        }
    }
}

// dQ = scale * the accumulator, one warp per (b, h, i) row: the row's place is worked out
// once per row (per element, its 64-bit divisions cost more than the element's bytes).
__global__ void dq_convert_kernel(const fa::BwdArgs a) {
    const fa::Shape& s = a.s;
    const int64_t rows = int64_t(s.B) * s.Hq * s.Sq;
    const int warps = int(blockDim.x) / 32, lane = int(threadIdx.x) & 31;
    for (int64_t r = int64_t(blockIdx.x) * warps + threadIdx.x / 32; r < rows;
         r += int64_t(gridDim.x) * warps) {
        const int i = int(r % s.Sq), h = int((r / s.Sq) % s.Hq), b = int(r / (int64_t(s.Sq) * s.Hq));
        char* row = a.dq + b * a.dq_nb3 + h * a.dq_nb2 + int64_t(i) * a.dq_nb1;
        const float* acc = a.dq_accum + r * a.dq_ld;
        for (int d = lane; d < s.Dk; d += 32)
            fa::store_elem(row, d, acc[fa::dq_accum_col(d)] * s.scale, a.dq_code);
    }
}

// dSinks[h] = sum of the row terms of head h, in a fixed order (deterministic).
__global__ void dsinks_reduce_kernel(const fa::BwdArgs a) {
    const int h = int(blockIdx.x);
    const int64_t n = int64_t(a.s.B) * a.s.Sq;
    const float* terms = a.dsink_rows + int64_t(h) * n;
    double acc = 0.0;
    for (int64_t idx = threadIdx.x; idx < n; idx += blockDim.x) acc += terms[idx];
    __shared__ double partial[256];
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int w = int(blockDim.x) / 2; w > 0; w >>= 1) {
        if (int(threadIdx.x) < w) partial[threadIdx.x] += partial[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) a.dsinks[h] = float(partial[0]);
}

} // namespace

// ---- forward ----------------------------------------------------------------------------

size_t flash_attn_forward_workspace_size(const Problem& p) {
    const fa::Shape s = validate(p);
    return plan_forward(p, s).workspace;
}

bool flash_attn_forward(const Problem& p, void* stream, void* workspace, size_t workspace_bytes,
                        Int8Columns columns) {
    const fa::Shape s = validate(p);
    const FwdPlan plan = plan_forward(p, s);
    const auto st = static_cast<cudaStream_t>(stream);

    fa::FwdArgs a;
    a.s = s;
    a.q = operand(p.q, operand_code(p.q, "q", false));
    a.k = operand(p.k, operand_code(p.k, "k", true));
    a.v = operand(p.v, operand_code(p.v, "v", true));
    if (p.mask.present()) {
        a.mask = operand(p.mask, p.mask.type == Type::F32 ? fa::kF32 : fa::kF16);
        if (p.mask.ne[2] == 1) a.mask.nb2 = 0;
        if (p.mask.ne[3] == 1) a.mask.nb3 = 0;
    }
    a.sinks = p.sinks.present() ? static_cast<const float*>(p.sinks.data) : nullptr;
    a.o = static_cast<char*>(p.o.data);
    a.o_nb1 = p.o.nb[1], a.o_nb2 = p.o.nb[2], a.o_nb3 = p.o.nb[3];
    a.o_code = output_code(p.o, "o");
    if (p.lse.present()) {
        a.lse = static_cast<float*>(p.lse.data);
        a.lse_nb1 = p.lse.nb[1] / 4, a.lse_nb2 = p.lse.nb[2] / 4;
    }

    // The int8 columns come from the combine kernel, so only split-KV writes them.
    const bool rounds = columns.q && plan.n_split > 1 && s.Dv % 32 == 0 && a.o_code == fa::kF32 &&
                        p.o.nb[0] == 4 && p.o.nb[1] == 4 * p.Dv && p.o.nb[2] == p.o.nb[1] * p.Hq &&
                        p.o.nb[3] == p.o.nb[2] * p.Sq;
    if (rounds) a.o_q = columns.q, a.o_ds = columns.ds;
    Scratch scratch(plan.workspace, workspace, workspace_bytes, st);
    a.n_split = plan.n_split;
    a.split_keys = plan.split_keys;
    if (plan.n_split > 1) {
        const size_t part_rows = size_t(plan.n_split) * s.B * s.Hkv * s.Sq * s.G;
        a.part_lse = reinterpret_cast<float*>(scratch.get());
        a.part_o = a.part_lse + ((part_rows + 63) / 64) * 64;
    }
    a.k = staged_or_direct(plan.stage_k, p.k, a.k, plan.bf16, scratch.get(), st);
    a.v = staged_or_direct(plan.stage_v, p.v, a.v, plan.bf16, scratch.get(), st);
    if (plan.mask_tiles_at)
        a.mask_tiles =
            fa::classify_mask_tiles(a.mask, s, plan.mask_grid, scratch.get() + *plan.mask_tiles_at, st);
    if (plan.decode_kernel) {
        const dim3 grid(unsigned(plan.n_split), unsigned(s.Hkv), unsigned(s.B));
        const fa::DecodeSel& sel = *plan.decode_kernel;
        if (plan.tile == 64)
            fa::decode_launch_d64(sel, a, plan.split_begin, grid, st);
        else if (plan.tile == 128)
            fa::decode_launch_d128(sel, a, plan.split_begin, grid, st);
        else
            fa::decode_launch_d256(sel, a, plan.split_begin, grid, st);
    } else {
        // One flat grid dimension (the kernel unpacks head, batch x split and row tile).
        // (a classified mask: as a causal mask, the last rows probably see the most keys)
        a.longest_first = s.has_hi || s.has_lo || a.mask_tiles.cls;
        a.tile_group =
            tile_group(a.longest_first, int64_t(s.Hkv) * s.B * plan.n_split, plan.row_tiles,
                       int64_t(sm_count()) * std::max(1, plan.info.blocks_per_sm), kForwardGroupWaves);
        const dim3 grid(unsigned(int64_t(s.Hkv) * s.B * plan.n_split * plan.row_tiles));
        if (plan.hopper)
            fa::fwd_hopper_launch(plan.tile, plan.bf16, *plan.hopper, a, grid, st);
        else if (plan.tile == 64)
            fa::fwd_launch_d64(plan.bf16, plan.decode, a, grid, st);
        else if (plan.tile == 128)
            fa::fwd_launch_d128(plan.bf16, plan.decode, a, grid, st);
        else
            fa::fwd_launch_d256(plan.bf16, plan.decode, a, grid, st);
    }

    if (plan.n_split > 1) {
        const int64_t rows = int64_t(s.B) * s.Hkv * s.Sq * s.G;
        launch_early(combine_kernel, unsigned(rows), 32 * kCombineWarps, 0, st, a);
    }
    return rounds;
}

bool flash_attn_forward_uses_decode_kernel(const Problem& p) {
    const fa::Shape s = validate(p);
    return decode_selection(p, s).has_value();
}

bool flash_attn_forward_uses_hopper_kernel(const Problem& p) {
    const fa::Shape s = validate(p);
    return plan_forward(p, s).hopper.has_value();
}

// ---- backward ---------------------------------------------------------------------------

namespace {

struct BwdPlan {
    int tile = 0;
    bool bf16 = false;
    bool wide = false;   // the 8-warp dK/dV kernel (else the 4-warp one, for softcap)
    bool hopper = false; // the warpgroup dK/dV kernel instead of either
    fa::BwdInfo info;
    int Sq_pad = 0;
    size_t off_delta = 0, off_dq = 0, off_dsink = 0, total = 0;
    std::optional<size_t> stage_q, stage_dO, stage_k, stage_v; // converted copies (staging)
    std::optional<size_t> mask_tiles_at; // the mask's tile classes for the 8-warp dK/dV kernel
    fa::MaskTileGrid mask_grid;
};

fa::BwdInfo bwd_info(int tile) {
    return tile == 64 ? fa::bwd_info_d64() : tile == 128 ? fa::bwd_info_d128() : fa::bwd_info_d256();
}

BwdPlan plan_backward(const BackwardProblem& bp, const fa::Shape& s) {
    const Problem& p = bp.fwd;
    BwdPlan plan;
    plan.tile = head_dim_tile(p);
    plan.bf16 = compute_bf16(p);
    plan.info = bwd_info(plan.tile);
    // The 8-warp dK/dV kernel (faster at every measured shape) has no softcap path; softcap
    // takes the 4-warp kernel.
    plan.wide = s.softcap <= 0.0f && plan.info.wide_bn > 0;
    // On Hopper the warpgroup kernel takes the problems without an explicit mask or softcap
    // of its head-dim tile.
    plan.hopper = !p.mask.present() && s.softcap <= 0.0f && fa::hopper_backward_wanted(plan.tile);
    if (plan.hopper) plan.wide = false;
    const int flat_bn = plan.hopper ? fa::bwd_hopper_info(plan.tile).bn : plan.info.wide_bn;
    if ((plan.wide || plan.hopper) && int64_t(s.Hkv) * s.B * ((s.Skv + flat_bn - 1) / flat_bn) > INT32_MAX)
        unsupported("the backward grid (KV heads x batch x key tiles) exceeds the launch limit");
    plan.Sq_pad = (s.Sq + 127) / 128 * 128;
    auto align = [](size_t x) { return (x + 255) / 256 * 256; };
    const size_t row_arr = align(size_t(s.B) * s.Hq * plan.Sq_pad * sizeof(float));
    plan.off_delta = row_arr;
    plan.off_dq = 2 * row_arr;
    const size_t dq_bytes =
        bp.deterministic ? 0 : align(size_t(s.B) * s.Hq * s.Sq * fa::dq_accum_ld(s.Dk) * sizeof(float));
    plan.off_dsink = plan.off_dq + dq_bytes;
    const bool want_dsinks = p.sinks.present() && bp.dsinks.present();
    plan.total = plan.off_dsink + (want_dsinks ? align(size_t(s.Hq) * s.B * s.Sq * sizeof(float)) : 0);
    // The dK/dV kernels read Q and dO once per key tile; the deterministic dQ pass reads K and
    // V once per query tile.
    plan.stage_q = reserve_stage(plan.total, p.q, plan.bf16, true);
    plan.stage_dO = reserve_stage(plan.total, bp.dO, plan.bf16, true);
    plan.stage_k = reserve_stage(plan.total, p.k, plan.bf16, bp.deterministic);
    plan.stage_v = reserve_stage(plan.total, p.v, plan.bf16, bp.deterministic);
    const auto grid =
        plan.wide ? mask_tiles_for(p, s, plan.info.wide_bm, plan.info.wide_bn, 1, false) : std::nullopt;
    if (grid) {
        plan.mask_grid = *grid;
        plan.mask_tiles_at = reserve_mask_tiles(plan.total, *grid);
    }
    return plan;
}

fa::Shape validate_backward(const BackwardProblem& bp) {
    const Problem& p = bp.fwd;
    const fa::Shape s = validate(p);
    if (!p.lse.present()) unsupported("the backward needs the forward's lse");
    if (!bp.dO.present() || !bp.dq.present() || !bp.dk.present() || !bp.dv.present())
        unsupported("the backward needs dO, dq, dk and dv");
    expect_shape(bp.dO, "dO", p.Dv, p.Hq, p.Sq, p.B);
    expect_shape(bp.dq, "dq", p.Dk, p.Sq, p.Hq, p.B);
    expect_shape(bp.dk, "dk", p.Dk, p.Skv, p.Hkv, p.B);
    expect_shape(bp.dv, "dv", p.Dv, p.Skv, p.Hkv, p.B);
    for (const View* v : {&bp.dq, &bp.dk, &bp.dv})
        if (v->nb[1] % 4 != 0 || reinterpret_cast<uintptr_t>(v->data) % 4 != 0)
            unsupported("gradient outputs need 4-byte aligned rows");
    if (bp.dsinks.present()) {
        if (!p.sinks.present()) unsupported("dsinks requested without sinks");
        if (bp.dsinks.type != Type::F32 || bp.dsinks.ne[0] != p.Hq) unsupported("dsinks must be f32 [Hq]");
    }
    return s;
}

} // namespace

bool flash_attn_backward_uses_hopper_kernel(const BackwardProblem& bp) {
    const fa::Shape s = validate_backward(bp);
    return plan_backward(bp, s).hopper;
}

size_t flash_attn_backward_workspace_size(const BackwardProblem& bp) {
    const fa::Shape s = validate_backward(bp);
    return plan_backward(bp, s).total;
}

void flash_attn_backward(const BackwardProblem& bp, void* stream, void* workspace, size_t workspace_bytes) {
    const fa::Shape s = validate_backward(bp);
    const BwdPlan plan = plan_backward(bp, s);
    const Problem& p = bp.fwd;
    const auto st = static_cast<cudaStream_t>(stream);

    fa::BwdArgs a;
    a.s = s;
    a.q = operand(p.q, operand_code(p.q, "q", false));
    a.k = operand(p.k, operand_code(p.k, "k", true));
    a.v = operand(p.v, operand_code(p.v, "v", true));
    a.o = operand(p.o, operand_code(p.o, "o", false));
    a.dO = operand(bp.dO, operand_code(bp.dO, "dO", false));
    if (p.mask.present()) {
        a.mask = operand(p.mask, p.mask.type == Type::F32 ? fa::kF32 : fa::kF16);
        if (p.mask.ne[2] == 1) a.mask.nb2 = 0;
        if (p.mask.ne[3] == 1) a.mask.nb3 = 0;
    }
    a.lse = static_cast<const float*>(p.lse.data);
    a.lse_nb1 = p.lse.nb[1] / 4, a.lse_nb2 = p.lse.nb[2] / 4;
    a.sinks = p.sinks.present() ? static_cast<const float*>(p.sinks.data) : nullptr;
    a.dq = static_cast<char*>(bp.dq.data), a.dq_nb1 = bp.dq.nb[1], a.dq_nb2 = bp.dq.nb[2],
    a.dq_nb3 = bp.dq.nb[3];
    a.dk = static_cast<char*>(bp.dk.data), a.dk_nb1 = bp.dk.nb[1], a.dk_nb2 = bp.dk.nb[2],
    a.dk_nb3 = bp.dk.nb[3];
    a.dv = static_cast<char*>(bp.dv.data), a.dv_nb1 = bp.dv.nb[1], a.dv_nb2 = bp.dv.nb[2],
    a.dv_nb3 = bp.dv.nb[3];
    a.dq_code = output_code(bp.dq, "dq");
    a.dk_code = output_code(bp.dk, "dk");
    a.dv_code = output_code(bp.dv, "dv");
    a.dsinks = bp.dsinks.present() ? static_cast<float*>(bp.dsinks.data) : nullptr;

    Scratch scratch(plan.total, workspace, workspace_bytes, st);
    a.Sq_pad = plan.Sq_pad;
    a.lse2 = reinterpret_cast<float*>(scratch.get());
    a.delta = reinterpret_cast<float*>(scratch.get() + plan.off_delta);
    a.accumulate_dq = !bp.deterministic;
    a.dq_accum = bp.deterministic ? nullptr : reinterpret_cast<float*>(scratch.get() + plan.off_dq);
    a.dq_ld = fa::dq_accum_ld(s.Dk);
    a.dsink_rows = a.dsinks ? reinterpret_cast<float*>(scratch.get() + plan.off_dsink) : nullptr;
    // Every kernel below reads the staged copies, the preprocess too: delta = rowsum(dO * O)
    // then uses the same dO as dP = dO V^T, so their difference in dS = P (dP - delta) holds
    // no rounding of dO that the other side lacks.
    a.q = staged_or_direct(plan.stage_q, p.q, a.q, plan.bf16, scratch.get(), st);
    a.dO = staged_or_direct(plan.stage_dO, bp.dO, a.dO, plan.bf16, scratch.get(), st);
    a.k = staged_or_direct(plan.stage_k, p.k, a.k, plan.bf16, scratch.get(), st);
    a.v = staged_or_direct(plan.stage_v, p.v, a.v, plan.bf16, scratch.get(), st);

    // 1. preprocess: delta, lse2, dSinks row terms; zero the dQ accumulator
    const int64_t rows = int64_t(s.B) * s.Hq * plan.Sq_pad;
    bwd_preprocess_kernel<<<unsigned((rows + 7) / 8), 256, 0, st>>>(a);
    check_cuda(cudaGetLastError(), "launching the backward preprocess kernel");

    // 2. dK, dV (and dQ through atomics)
    auto launch = [&](fa::BwdKernel which, dim3 grid) {
        if (plan.tile == 64)
            fa::bwd_launch_d64(plan.bf16, which, a, grid, st);
        else if (plan.tile == 128)
            fa::bwd_launch_d128(plan.bf16, which, a, grid, st);
        else
            fa::bwd_launch_d256(plan.bf16, which, a, grid, st);
    };
    const fa::BwdInfo& info = plan.info;
    if (plan.mask_tiles_at)
        a.mask_tiles =
            fa::classify_mask_tiles(a.mask, s, plan.mask_grid, scratch.get() + *plan.mask_tiles_at, st);
    // (a classified mask: as a causal mask, the first keys probably are seen the most)
    if (plan.wide)
        a.tile_group = tile_group(s.has_hi || s.has_lo || a.mask_tiles.cls, int64_t(s.Hkv) * s.B,
                                  (s.Skv + info.wide_bn - 1) / info.wide_bn, sm_count(), kBackwardGroupWaves);
    if (plan.hopper) {
        const int bn = fa::bwd_hopper_info(plan.tile).bn, key_tiles = (s.Skv + bn - 1) / bn;
        a.tile_group = tile_group(s.has_hi || s.has_lo, int64_t(s.Hkv) * s.B, key_tiles, sm_count(),
                                  kBackwardGroupWaves);
        fa::bwd_hopper_launch(plan.tile, plan.bf16, a, dim3(unsigned(int64_t(s.Hkv) * s.B * key_tiles)), st);
    } else if (plan.wide)
        launch(fa::BwdKernel::KeyTileWide,
               dim3(unsigned(int64_t(s.Hkv) * s.B * ((s.Skv + info.wide_bn - 1) / info.wide_bn))));
    else
        launch(fa::BwdKernel::KeyTile,
               dim3(unsigned((s.Skv + info.bn - 1) / info.bn), unsigned(s.Hkv * info.dsplit), unsigned(s.B)));

    // 3. dQ: convert the accumulator, or the deterministic dQ pass
    if (bp.deterministic) {
        launch(fa::BwdKernel::QueryTile,
               dim3(unsigned((s.Sq + info.bm - 1) / info.bm), unsigned(s.Hq * info.dsplit), unsigned(s.B)));
    } else {
        const int64_t dq_rows = int64_t(s.B) * s.Hq * s.Sq;
        const unsigned blocks = unsigned(std::min<int64_t>((dq_rows + 7) / 8, 65535));
        dq_convert_kernel<<<blocks, 256, 0, st>>>(a);
        check_cuda(cudaGetLastError(), "launching the dQ conversion kernel");
    }
    if (a.dsinks) {
        dsinks_reduce_kernel<<<unsigned(s.Hq), 256, 0, st>>>(a);
        check_cuda(cudaGetLastError(), "launching the dSinks reduction kernel");
    }
}

} // namespace gfa::cuda
