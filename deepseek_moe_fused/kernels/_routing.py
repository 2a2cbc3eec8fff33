"""Routing metadata in three small launches (a stable counting sort by expert plus the tile map),
or in one where every program can count all the slots itself (`routing_metadata.metadata_in_one_launch`).

It replaces ~16 torch ops (sort, scatter_add, cumsums, searchsorted) that cost more than the
expert GEMMs themselves in decode. The slots are cut into chunks of BLOCK_R; a slot's sorted row is
its expert's first row + the count of that expert in earlier chunks + its rank among the chunk's
slots of that expert, so rows of one expert stay in slot order (a stable sort, deterministic).
"""

import triton
import triton.language as tl


@triton.jit
def _chunk_histogram_kernel(
    topk_ids_ptr,  # (T*K,) int32/int64: expert of each slot
    chunk_counts_ptr,  # (num_chunks, NUM_BINS) int32 out: slots of each expert in each chunk
    num_rows,
    num_experts,
    BLOCK_R: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    """Grid: (num_chunks,); one program owns BLOCK_R consecutive slots. Bin `num_experts`
    collects the slots past the end, so no bin sees an out-of-range value."""
    chunk = tl.program_id(0)
    offs = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_rows, other=num_experts).to(tl.int32)
    counts = tl.histogram(ids, NUM_BINS)
    tl.store(chunk_counts_ptr + chunk * NUM_BINS + tl.arange(0, NUM_BINS), counts)


@triton.jit
def _chunk_scan_kernel(
    chunk_counts_ptr,  # (num_chunks, NUM_BINS) int32: slots of each expert in each chunk
    chunk_base_ptr,  # (num_chunks, NUM_BINS) int32 out: first row of each (chunk, expert)
    expert_offsets_ptr,  # (E+1,) int32 out: first sorted row of each expert
    tile_offsets_ptr,  # (NUM_BINS,) int32 out: first tile of each expert
    num_experts,
    num_chunks,
    block_m,
    NUM_BINS: tl.constexpr,
    TOTAL_STEP: tl.constexpr,  # chunks per step of the expert totals
    BINS_PER_PROGRAM: tl.constexpr,
    SCAN_STEP: tl.constexpr,  # chunks per step of the prefix over chunks
):
    """Grid: (NUM_BINS // BINS_PER_PROGRAM,); one program owns BINS_PER_PROGRAM experts' columns.

    Each program sums every chunk's counts (the expert totals, which all programs need for the
    experts' first rows; program 0 writes them out), then writes the prefix over chunks of its own
    columns only: one program scanning every column is a serial loop of dependent steps (82 us at
    768 chunks x 128 bins on an H100). The bases go to their own buffer because other programs may
    still be reading the counts.
    """
    pid = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    total = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for c0 in range(0, num_chunks, TOTAL_STEP):
        chunks = c0 + tl.arange(0, TOTAL_STEP)
        ptrs = chunk_counts_ptr + chunks[:, None] * NUM_BINS + bins[None, :]
        total += tl.sum(tl.load(ptrs, mask=chunks[:, None] < num_chunks, other=0), axis=0)
    total = tl.where(bins < num_experts, total, 0)  # drop the past-the-end bin
    expert_start = tl.cumsum(total, axis=0) - total
    if pid == 0:
        tl.store(expert_offsets_ptr + bins, expert_start, mask=bins < num_experts)
        tl.store(expert_offsets_ptr + num_experts, tl.sum(total, axis=0))
        tiles = (total + block_m - 1) // block_m
        tl.store(tile_offsets_ptr + bins, tl.cumsum(tiles, axis=0) - tiles)
    mine = pid * BINS_PER_PROGRAM + tl.arange(0, BINS_PER_PROGRAM)
    # expert_start at this program's columns: a register tensor cannot be indexed, so a one-hot sum.
    running = tl.sum(tl.where(mine[:, None] == bins[None, :], expert_start[None, :], 0), axis=1)
    for c0 in range(0, num_chunks, SCAN_STEP):
        chunks = c0 + tl.arange(0, SCAN_STEP)
        offsets = chunks[:, None] * NUM_BINS + mine[None, :]
        mask = chunks[:, None] < num_chunks
        counts = tl.load(chunk_counts_ptr + offsets, mask=mask, other=0)
        inclusive = tl.cumsum(counts, axis=0)
        tl.store(chunk_base_ptr + offsets, running[None, :] + inclusive - counts, mask=mask)
        running += tl.sum(counts, axis=0)


@triton.jit
def _scatter_rows_kernel(
    topk_ids_ptr,  # (T*K,) int32/int64
    chunk_base_ptr,  # (num_chunks, NUM_BINS) int32: first row of each (chunk, expert); unread if ONE_LAUNCH
    expert_offsets_ptr,  # (E+1,) int32: read, or written here if ONE_LAUNCH
    tile_offsets_ptr,  # (NUM_BINS,) int32: first tile of each expert; unread if ONE_LAUNCH
    sorted_slot_ptr,  # (T*K,) int32 out: slot of each expert-sorted row
    slot_to_row_ptr,  # (T*K,) int32 out: sorted row of each slot
    tile_expert_ptr,  # (max_tiles,) int32 out: expert of each tile, PAD_EXPERT past the last
    tile_row_start_ptr,  # (max_tiles,) int32 out: first row of each tile, T*K past the last
    num_rows,
    num_experts,
    num_chunks,
    max_tiles,
    block_m,
    PAD_EXPERT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NUM_BINS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ONE_LAUNCH: tl.constexpr,
    BLOCK_ALL: tl.constexpr,  # ONE_LAUNCH: a power of two >= num_rows; else unused
):
    """Grid: (max(num_chunks, cdiv(max_tiles, BLOCK_T)),). Program p places the slots of chunk p
    (if it exists) and writes tiles [p*BLOCK_T, (p+1)*BLOCK_T) of the tile map (if they exist).

    ONE_LAUNCH (all slots fit BLOCK_ALL, up to a few hundred chunks): each program counts every slot
    itself, and the slots of the chunks before its own, so this is the only launch: no histogram
    or scan launch before it.
    """
    pid = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    is_expert = bins < num_experts
    if ONE_LAUNCH:
        every = tl.arange(0, BLOCK_ALL)
        all_ids = tl.load(topk_ids_ptr + every, mask=every < num_rows, other=num_experts).to(tl.int32)
        total = tl.where(is_expert, tl.histogram(all_ids, NUM_BINS), 0)
        expert_start = tl.cumsum(total, axis=0) - total
        expert_end = expert_start + total
        tiles_per_expert = (total + block_m - 1) // block_m
        tile_start = tl.cumsum(tiles_per_expert, axis=0) - tiles_per_expert
        if pid == 0:
            tl.store(expert_offsets_ptr + bins, expert_start, mask=is_expert)
            tl.store(expert_offsets_ptr + num_experts, num_rows)
        if pid < num_chunks:
            slots = pid * BLOCK_R + tl.arange(0, BLOCK_R)
            ids = tl.load(topk_ids_ptr + slots, mask=slots < num_rows, other=num_experts).to(tl.int32)
            if BLOCK_ALL > BLOCK_R:  # this chunk's rows of an expert follow those of earlier chunks
                earlier = tl.where(every < pid * BLOCK_R, all_ids, num_experts)
                chunk_start = expert_start + tl.where(is_expert, tl.histogram(earlier, NUM_BINS), 0)
            else:
                chunk_start = expert_start
            # A slot's row: its expert's first row in this chunk (picked by a one-hot sum) + its rank.
            base = tl.sum(tl.where(ids[:, None] == bins[None, :], chunk_start[None, :], 0), axis=1)
            _place_chunk(ids, slots, base, sorted_slot_ptr, slot_to_row_ptr, num_rows)
    else:
        if pid < num_chunks:
            local = tl.arange(0, BLOCK_R)
            slots = pid * BLOCK_R + local
            ids = tl.load(topk_ids_ptr + slots, mask=slots < num_rows, other=num_experts).to(tl.int32)
            base = tl.load(chunk_base_ptr + pid * NUM_BINS + ids, mask=slots < num_rows, other=0)
            _place_chunk(ids, slots, base, sorted_slot_ptr, slot_to_row_ptr, num_rows)
        expert_start = tl.load(expert_offsets_ptr + bins, mask=is_expert, other=0)
        expert_end = tl.load(expert_offsets_ptr + bins + 1, mask=is_expert, other=0)
        tile_start = tl.load(tile_offsets_ptr + bins)
    if pid * BLOCK_T < max_tiles:
        _write_tile_map(
            pid, bins, is_expert, expert_start, expert_end, tile_start, tile_expert_ptr, tile_row_start_ptr,
            num_rows, max_tiles, block_m, PAD_EXPERT, BLOCK_T,
        )  # fmt: skip


@triton.jit
def _place_chunk(ids, slots, base, sorted_slot_ptr, slot_to_row_ptr, num_rows):
    """Write the rows of one chunk's slots: `base` (each slot's expert's first row for this chunk)
    + the slot's rank among the chunk's earlier slots of the same expert. The rank is a BLOCK_R^2
    comparison in registers: cheaper than a sort at this size, and exact."""
    earlier = (ids[:, None] == ids[None, :]) & (slots[None, :] < slots[:, None])
    row = base + tl.sum(earlier.to(tl.int32), axis=1)
    real = slots < num_rows
    tl.store(sorted_slot_ptr + row, slots, mask=real)
    tl.store(slot_to_row_ptr + slots, row, mask=real)


@triton.jit
def _write_tile_map(
    pid, bins, is_expert, expert_start, expert_end, tile_start, tile_expert_ptr, tile_row_start_ptr,
    num_rows, max_tiles, block_m, PAD_EXPERT: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Tiles [pid*BLOCK_T, (pid+1)*BLOCK_T): tile t belongs to the expert whose
    [tile_start, tile_end) holds it (empty experts hold none); past the last, the padding values."""
    tiles = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tile_end = tile_start + (expert_end - expert_start + block_m - 1) // block_m
    owns = (tile_start[None, :] <= tiles[:, None]) & (tiles[:, None] < tile_end[None, :]) & is_expert[None, :]
    first_row = expert_start[None, :] + (tiles[:, None] - tile_start[None, :]) * block_m
    tile_expert = tl.sum(tl.where(owns, bins[None, :], 0), axis=1)
    tile_row_start = tl.sum(tl.where(owns, first_row, 0), axis=1)
    is_real = tl.sum(owns.to(tl.int32), axis=1) > 0
    in_range = tiles < max_tiles
    tl.store(tile_expert_ptr + tiles, tl.where(is_real, tile_expert, PAD_EXPERT), mask=in_range)
    tl.store(tile_row_start_ptr + tiles, tl.where(is_real, tile_row_start, num_rows), mask=in_range)
