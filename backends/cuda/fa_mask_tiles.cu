// The pass that classifies an explicit mask's tiles (MaskTiles in fa_args.h).
//
// One block per tile reads the tile's mask values once and finds whether any is not -inf
// (the tile shows some key) and whether any is not 0 (the tile needs the values); a tile
// that shows a key also raises its outer tile's span. A mask shared over heads and batch is
// read once however many heads and batch entries the attention has, so the pass costs one
// read of the mask where the attention kernel would read it once per tile visit.
#include "fa_mask_tiles.h"

#include "cuda_common.h"
#include "fa_forward.cuh"

#include <cstdlib>
#include <cstring>
#include <string>

namespace gfa::cuda::fa {

namespace {

constexpr int kClassifyThreads = 128;

__global__ void __launch_bounds__(kClassifyThreads)
    classify_mask_tiles_kernel(const Operand mask, const Shape s, const MaskTileGrid grid, uint8_t* cls,
                               int* span) {
    const int kt = int(blockIdx.x), rt = int(blockIdx.y), slice = int(blockIdx.z);
    // the query positions of the row tile's packed rows, and the tile's keys
    const int p0 = rt * grid.rows;
    const int i0 = p0 / grid.G, i1 = min(s.Sq - 1, (p0 + grid.rows - 1) / grid.G);
    const int j0 = kt * grid.keys, cols = min(grid.keys, s.Skv - j0);
    const char* base = mask.data + slice * mask.nb3;

    // a column per thread, rows kClassifyThreads / keys apart: a warp reads contiguous keys
    const int c = int(threadIdx.x) % grid.keys;
    const int row_step = kClassifyThreads / grid.keys;
    bool shows = false, varies = false;
    if (c < cols)
        for (int i = i0 + int(threadIdx.x) / grid.keys; i <= i1; i += row_step) {
            const float v = mask_value(base + int64_t(i) * mask.nb1, j0 + c, mask.code);
            shows |= v != -INFINITY; // NaN shows and varies: left to the kernel
            varies |= v != 0.0f;
        }
    shows = __syncthreads_or(shows);
    varies = __syncthreads_or(varies);
    if (threadIdx.x != 0) return;
    const MaskTileClass tile_class = !shows ? kTileHidden : !varies ? kTileZero : kTileMixed;
    cls[(int64_t(slice) * grid.n_row_tiles + rt) * grid.n_key_tiles + kt] = tile_class;
    if (shows) {
        const int outer = grid.spans_over_keys ? rt : kt, inner = grid.spans_over_keys ? kt : rt;
        const int n_outer = grid.spans_over_keys ? grid.n_row_tiles : grid.n_key_tiles;
        const int n_inner = grid.spans_over_keys ? grid.n_key_tiles : grid.n_row_tiles;
        int* pair = span + 2 * (int64_t(slice) * n_outer + outer);
        atomicMax(pair, n_inner - 1 - inner);
        atomicMax(pair + 1, inner);
    }
}

size_t round_up(size_t x) {
    return (x + 255) / 256 * 256;
}

} // namespace

bool MaskTileGrid::fits() const {
    return keys > 0 && kClassifyThreads % keys == 0 && n_row_tiles <= 65535 && slices <= 65535;
}

size_t MaskTileGrid::class_bytes() const {
    return round_up(size_t(slices) * n_row_tiles * n_key_tiles);
}

size_t MaskTileGrid::span_bytes() const {
    const size_t outer = size_t(spans_over_keys ? n_row_tiles : n_key_tiles);
    return round_up(size_t(slices) * outer * 2 * sizeof(int));
}

MaskTileGrid mask_tile_grid(const Shape& s, bool per_batch, int rows, int keys, int G, bool spans_over_keys) {
    MaskTileGrid g;
    g.rows = rows, g.keys = keys, g.G = G;
    g.n_row_tiles = int((int64_t(s.Sq) * G + rows - 1) / rows);
    g.n_key_tiles = (s.Skv + keys - 1) / keys;
    g.slices = per_batch ? s.B : 1;
    g.spans_over_keys = spans_over_keys;
    return g;
}

MaskTiles classify_mask_tiles(const Operand& mask, const Shape& s, const MaskTileGrid& grid, char* workspace,
                              cudaStream_t st) {
    if (!grid.fits())
        fail("flash_attn_ext (CUDA): the mask tile grid (" + std::to_string(grid.n_row_tiles) + " x " +
             std::to_string(grid.n_key_tiles) + " tiles of " + std::to_string(grid.keys) +
             " keys) is outside the classifying pass's launch limits");
    auto* cls = reinterpret_cast<uint8_t*>(workspace);
    auto* span = reinterpret_cast<int*>(workspace + grid.class_bytes());
    GFA_CUDA_CHECK(cudaMemsetAsync(span, 0xff, grid.span_bytes(), st));
    classify_mask_tiles_kernel<<<dim3(unsigned(grid.n_key_tiles), unsigned(grid.n_row_tiles),
                                      unsigned(grid.slices)),
                                 kClassifyThreads, 0, st>>>(mask, s, grid, cls, span);
    GFA_CUDA_CHECK_LAUNCH();
    MaskTiles out;
    out.cls = cls;
    out.span = span;
    out.n_row_tiles = grid.n_row_tiles;
    out.n_key_tiles = grid.n_key_tiles;
    return out;
}

bool mask_tiles_enabled() {
    const char* v = std::getenv("GFA_CUDA_MASK_TILES");
    return v == nullptr || std::strcmp(v, "0") != 0;
}

} // namespace gfa::cuda::fa
