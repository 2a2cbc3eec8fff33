"""The routing metadata's tile map as the row-tiled kernels read it."""

import triton
import triton.language as tl


@triton.jit
def _tile_rows(tile, sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr, expert, BLOCK_M: tl.constexpr):
    """The sorted rows of a routed tile of `expert`, which of them exist, and their slots."""
    rows = tl.load(tile_row_start_ptr + tile) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(expert_offsets_ptr + expert + 1)
    slots = tl.load(sorted_slot_ptr + rows, mask=row_mask, other=0)
    return rows, row_mask, slots


@triton.jit
def _tile_rows_left(tile, expert, tile_row_start_ptr, expert_offsets_ptr):
    """Rows of `expert` from the first row of `tile` on: the tile's height where that is less."""
    return tl.load(expert_offsets_ptr + expert + 1) - tl.load(tile_row_start_ptr + tile)
