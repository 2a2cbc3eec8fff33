"""Tile sizes for the expert kernels, chosen from the problem's shape (no autotuning yet)."""

from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows (tokens) per tile; also the routing metadata's tile height
    block_n: int  # output columns per program
    block_k: int  # reduction step
    num_warps: int
    num_stages: int


def _pow2_clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(n, 1))))


def choose_block_m(num_rows: int, num_experts: int, interpret: bool) -> int:
    """Tile height from the mean rows per expert: small batches waste less on padded rows."""
    if interpret:
        return 16
    mean_rows = num_rows / num_experts
    return _pow2_clamp(int(mean_rows), 16, 128)


def gate_up_tiles(block_m: int, hidden_dim: int, inner_dim: int, interpret: bool) -> TileConfig:
    """Stage 1 holds two (block_m, block_n) fp32 accumulators: gate and up."""
    if interpret:
        return TileConfig(block_m, _pow2_clamp(inner_dim, 16, 64), _pow2_clamp(hidden_dim, 16, 64), 4, 1)
    return TileConfig(block_m, 64, 64, 8 if block_m >= 128 else 4, 3)


def down_tiles(block_m: int, hidden_dim: int, inner_dim: int, interpret: bool) -> TileConfig:
    if interpret:
        return TileConfig(block_m, _pow2_clamp(hidden_dim, 16, 64), _pow2_clamp(inner_dim, 16, 64), 4, 1)
    return TileConfig(block_m, 128 if block_m >= 64 else 64, 64, 8 if block_m >= 128 else 4, 3)


def combine_block_h(hidden_dim: int) -> int:
    return _pow2_clamp(hidden_dim, 16, 1024)
