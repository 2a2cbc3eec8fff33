"""Routing metadata: the (token, slot) rows grouped by expert, and the tile map the kernels walk.

Built from ``topk_ids`` with device-side torch ops only (sort, scatter_add, cumsum, searchsorted):
no host synchronisation, so a forward pass stays CUDA-graph capturable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def build_routing_metadata(
    topk_ids: torch.Tensor,  # (T, K) int: expert of each slot, all in [0, E)
    num_experts: int,
    block_m: int,
) -> RoutingMetadata:
    """Group the T*K slots by expert and cut each expert's rows into tiles of `block_m`."""
    device = topk_ids.device
    T, K = topk_ids.shape
    num_rows = T * K
    ids = topk_ids.reshape(-1).to(torch.int64)
    # Stable, so rows of one expert stay in slot order: the result is deterministic.
    order = torch.sort(ids, stable=True)[1]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, ids, torch.ones_like(ids))
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    expert_offsets = torch.cat([zero, counts.cumsum(0)])
    tile_offsets = torch.cat([zero, ((counts + block_m - 1) // block_m).cumsum(0)])

    tile = torch.arange(max_routed_tiles(num_rows, num_experts, block_m), device=device)
    tile_expert = torch.searchsorted(tile_offsets[1:], tile, right=True)
    is_real = tile < tile_offsets[-1]
    expert = tile_expert.clamp(max=num_experts - 1)
    tile_row_start = expert_offsets[expert] + (tile - tile_offsets[expert]) * block_m

    slot_to_row = torch.empty_like(order)
    slot_to_row[order] = torch.arange(num_rows, device=device)
    int32 = torch.int32
    return RoutingMetadata(
        num_experts=num_experts,
        top_k=K,
        block_m=block_m,
        sorted_slot=order.to(int32),
        slot_to_row=slot_to_row.to(int32),
        expert_offsets=expert_offsets.to(int32),
        tile_expert=torch.where(is_real, tile_expert, PAD_EXPERT).to(int32),
        tile_row_start=torch.where(is_real, tile_row_start, num_rows).to(int32),
    )
