"""Routing metadata: the (token, slot) rows grouped by expert, and the tile map the kernels walk.

Built from ``topk_ids`` by one to three Triton launches (kernels/_routing.py) with no host
synchronisation, so a forward pass stays CUDA-graph capturable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

from ._interpret import interpreter_active
from .kernels._routing import _chunk_histogram_kernel, _chunk_scan_kernel, _scatter_rows_kernel

# Tile slots past the last real tile get these: a kernel that forgets the `expert < 0` early-out
# reads no valid row (start == T*K) and no valid expert.
PAD_EXPERT = -1


@dataclass(frozen=True)
class RoutingMetadata:
    """Slots (token t, choice k) -> slot id ``t*K + k``; rows = slots sorted by expert (stable)."""

    num_experts: int  # E
    top_k: int  # K
    block_m: int  # rows per routed tile that the tile map was cut for
    sorted_slot: torch.Tensor  # (T*K,) int32: slot id of each expert-sorted row
    slot_to_row: torch.Tensor  # (T*K,) int32: inverse permutation, sorted row of each slot
    expert_offsets: torch.Tensor  # (E+1,) int32: first sorted row of each expert; [E] == T*K
    tile_expert: torch.Tensor  # (max_tiles,) int32: expert of each routed tile; PAD_EXPERT past the last
    tile_row_start: torch.Tensor  # (max_tiles,) int32: first sorted row of each tile; T*K past the last

    def __post_init__(self) -> None:
        for name in ("sorted_slot", "slot_to_row", "expert_offsets", "tile_expert", "tile_row_start"):
            tensor = getattr(self, name)
            if tensor.dtype != torch.int32:
                raise TypeError(f"RoutingMetadata.{name} must be int32, got {tensor.dtype}")
            if tensor.dim() != 1:
                raise ValueError(f"RoutingMetadata.{name} must be 1-D, got shape {tuple(tensor.shape)}")
        if self.expert_offsets.numel() != self.num_experts + 1:
            raise ValueError("RoutingMetadata.expert_offsets must have num_experts + 1 entries")
        if self.tile_expert.shape != self.tile_row_start.shape:
            raise ValueError("RoutingMetadata.tile_expert and tile_row_start must have the same length")

    @property
    def num_rows(self) -> int:
        """T*K: routed rows."""
        return self.sorted_slot.numel()

    @property
    def max_tiles(self) -> int:
        return self.tile_expert.numel()

    @property
    def expert_counts(self) -> torch.Tensor:
        """(E,) int32 rows routed to each expert."""
        return self.expert_offsets[1:] - self.expert_offsets[:-1]


def max_routed_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on tiles over all experts, known from shapes alone (no host sync).

    Each non-empty expert with c rows needs ceil(c / block_m) <= floor(c / block_m) + 1 tiles, the
    floors add up to at most floor(rows / block_m), and at most min(E, rows) experts are non-empty.
    """
    return num_rows // block_m + min(num_experts, num_rows)


# The metadata is one launch where every program of the row-placing kernel can count all slots,
# and those of the chunks before its own, itself (two histograms) in place of the histogram and
# scan launches: up to ONE_LAUNCH_MAX_ROWS slots, and up to ONE_LAUNCH_MAX_COUNTS (slots rounded up
# to a power of two) x bins. A single chunk is always one launch. Session 21 set the bounds at 2048
# slots and 2^17 counts for 128-slot chunks of 4 warps (v2-lite N=256, 2048 x 128, took 18.8 us
# in one launch against 16.3 in three). With the 32-slot chunks of 8 warps below, one launch took
# (H100, session 27, us, one / three launches) 8.5 / 15.3 at seed N=2048, 12.2 / 15.6 at N=4096
# (8192 x 16), 9.8 / 16.6 at v2-lite N=256 and 11.5 / 16.9 at N=512 (4096 x 128), but 17.8 /
# 16.9 at N=1024 (8192 x 128); V3 N = 128 / 256: 15.2 / 18.0 (1024 x 512) and 17.3 / 18.7.
ONE_LAUNCH_MAX_ROWS = 8192
ONE_LAUNCH_MAX_COUNTS = 2**19
# Slots per chunk of the row-placing kernel (each ranks its slots by a CHUNK_ROWS^2 comparison).
CHUNK_ROWS = 128
# The one-launch path cuts finer, with more warps: each program counts every slot either way, so
# more programs with a 32^2 rank each finish sooner than a few with a 128^2 one. On the H100
# (session 27, graph replays, 128-slot chunks of 4 warps -> these) the build took 8.4 -> 6.2, 8.8
# -> 6.3 and 10.5 -> 7.2 us at seed N = 64 / 256 / 1024 and 14.3 -> 8.7 at v2-lite N=128, against
# 5.0 for a graph of one fill kernel; 16-slot chunks and fewer warps were no faster.
ONE_LAUNCH_CHUNK_ROWS = 32
ONE_LAUNCH_WARPS = 8


def _num_bins(num_experts: int) -> int:
    return triton.next_power_of_2(num_experts + 1)  # + the past-the-end bin


def _all_slots_block(num_rows: int) -> int:
    """Slots one program loads to count them all (a power of two, at least tl.histogram's 16)."""
    return max(16, triton.next_power_of_2(num_rows))


def metadata_in_one_launch(num_rows: int, num_experts: int) -> bool:
    """Whether `build_routing_metadata` places `num_rows` slots in one launch."""
    counts = _all_slots_block(num_rows) * _num_bins(num_experts)
    single_chunk = num_rows <= CHUNK_ROWS
    return single_chunk or (num_rows <= ONE_LAUNCH_MAX_ROWS and counts <= ONE_LAUNCH_MAX_COUNTS)


# Elements of the (chunks, bins) tile one step of the chunk scan holds (8 warps: 32 a thread).
SCAN_TILE_ELEMENTS = 8192


class ScanSteps(NamedTuple):
    """How `_chunk_scan_kernel` walks the (num_chunks, NUM_BINS) counts."""

    total_step: int  # chunks per step of the expert totals (a sum only: twice the tile)
    bins_per_program: int  # columns each program scans; NUM_BINS // this programs
    scan_step: int  # chunks per step of a program's prefix over chunks


def scan_steps(num_bins: int) -> ScanSteps:
    """At most 16 programs (each re-reads every count for the totals) of at least 8 columns."""
    bins_per_program = min(num_bins, max(8, num_bins // 16))
    return ScanSteps(
        total_step=max(1, 2 * SCAN_TILE_ELEMENTS // num_bins),
        bins_per_program=bins_per_program,
        scan_step=max(1, SCAN_TILE_ELEMENTS // bins_per_program),
    )


def build_routing_metadata(
    topk_ids: torch.Tensor,  # (T, K) int: expert of each slot, all in [0, E)
    num_experts: int,
    block_m: int,
) -> RoutingMetadata:
    """Group the T*K slots by expert (stable: slot order within an expert) and cut each expert's
    rows into tiles of `block_m`. One small Triton launch where `metadata_in_one_launch`, three
    otherwise; no host synchronisation."""
    device = topk_ids.device
    if device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"topk_ids is on {device}: the routing-metadata kernels need a CUDA device, or "
            "TRITON_INTERPRET=1 set before triton is imported to run them in the interpreter"
        )
    T, K = topk_ids.shape
    num_rows = T * K
    max_tiles = max_routed_tiles(num_rows, num_experts, block_m)
    int32 = {"dtype": torch.int32, "device": device}
    metadata = RoutingMetadata(
        num_experts=num_experts,
        top_k=K,
        block_m=block_m,
        sorted_slot=torch.empty(num_rows, **int32),
        slot_to_row=torch.empty(num_rows, **int32),
        expert_offsets=(torch.zeros if num_rows == 0 else torch.empty)(num_experts + 1, **int32),
        tile_expert=torch.empty(max_tiles, **int32),
        tile_row_start=torch.empty(max_tiles, **int32),
    )
    if num_rows == 0:
        return metadata
    # reshape can return a strided view (e.g. of topk_ids[:, :1]); the kernels read stride 1.
    ids = topk_ids.reshape(-1).contiguous()
    # Chunks of up to CHUNK_ROWS slots (ONE_LAUNCH_CHUNK_ROWS in one launch, which counts all
    # slots, rounded up to BLOCK_ALL).
    one_launch = metadata_in_one_launch(num_rows, num_experts)
    chunk_rows, scatter_warps = (ONE_LAUNCH_CHUNK_ROWS, ONE_LAUNCH_WARPS) if one_launch else (CHUNK_ROWS, 4)
    block_all = _all_slots_block(num_rows)
    block_r = min(chunk_rows, block_all)
    num_chunks = triton.cdiv(num_rows, block_r)
    num_bins = _num_bins(num_experts)
    block_t = 32
    # Scratch: per-chunk counts, then each chunk's first row per expert; first tiles.
    chunk_counts = torch.empty(1 if one_launch else num_chunks * num_bins, **int32)  # 1: a real pointer
    chunk_base = torch.empty_like(chunk_counts)
    tile_offsets = torch.empty(1 if one_launch else num_bins, **int32)
    if not one_launch:
        _chunk_histogram_kernel[(num_chunks,)](
            ids, chunk_counts, num_rows, num_experts, BLOCK_R=block_r, NUM_BINS=num_bins
        )  # fmt: skip
        scan = scan_steps(num_bins)
        _chunk_scan_kernel[(num_bins // scan.bins_per_program,)](
            chunk_counts, chunk_base, metadata.expert_offsets, tile_offsets, num_experts, num_chunks, block_m,
            NUM_BINS=num_bins, TOTAL_STEP=scan.total_step, BINS_PER_PROGRAM=scan.bins_per_program,
            SCAN_STEP=scan.scan_step, num_warps=8,
        )  # fmt: skip
    _scatter_rows_kernel[(max(num_chunks, triton.cdiv(max_tiles, block_t)),)](
        ids, chunk_base, metadata.expert_offsets, tile_offsets,
        metadata.sorted_slot, metadata.slot_to_row, metadata.tile_expert, metadata.tile_row_start,
        num_rows, num_experts, num_chunks, max_tiles, block_m,
        PAD_EXPERT=PAD_EXPERT, BLOCK_R=block_r, NUM_BINS=num_bins, BLOCK_T=block_t, ONE_LAUNCH=one_launch,
        BLOCK_ALL=block_all if one_launch else block_r, num_warps=scatter_warps,
    )  # fmt: skip
    return metadata
