// The pass that classifies an explicit mask's tiles before an attention kernel (MaskTiles in
// fa_args.h): host side.
#pragma once

#include "fa_args.h"

#include <cuda_runtime.h>

#include <cstddef>

namespace gfa::cuda::fa {

// The tiles of one kernel: `rows` packed query rows (query position p / G, p < Sq * G) by
// `keys` keys, with spans along the key tiles of each row tile (the forward) or along the
// row tiles of each key tile (the backward).
struct MaskTileGrid {
    int rows = 0, keys = 0, G = 1;
    int n_row_tiles = 0, n_key_tiles = 0, slices = 1;
    bool spans_over_keys = true;

    // Whether the classifying pass can be launched over this grid.
    bool fits() const;
    size_t class_bytes() const;
    size_t span_bytes() const;
    size_t bytes() const { return class_bytes() + span_bytes(); }
};

// The grid for a mask [Skv, >= Sq, 1, 1 or B] (shared by all heads; one slice per batch
// entry when per_batch). keys must divide 128.
MaskTileGrid mask_tile_grid(const Shape& s, bool per_batch, int rows, int keys, int G, bool spans_over_keys);

// Classifies every tile into workspace (grid.bytes(), 256-byte aligned) on the stream and
// returns the classes for the kernel's arguments.
MaskTiles classify_mask_tiles(const Operand& mask, const Shape& s, const MaskTileGrid& grid, char* workspace,
                              cudaStream_t st);

// GFA_CUDA_MASK_TILES: on unless it is 0 (for measuring; results are the same bit for bit).
bool mask_tiles_enabled();

} // namespace gfa::cuda::fa
