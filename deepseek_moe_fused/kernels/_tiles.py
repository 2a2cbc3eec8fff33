"""Tile sizes for the expert kernels, chosen from the problem's shape (no autotuning yet)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

import triton

# "block_m=16,block_n=16,..." overrides the heuristic's choice for every stage: for tuning
# experiments and for showing that the benchmark gate catches a slow configuration.
FORCE_TILES_ENV = "DEEPSEEK_MOE_FORCE_TILES"


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows (tokens) per tile; also the routing metadata's tile height
    block_n: int  # output columns per program
    block_k: int  # reduction step
    num_warps: int
    num_stages: int


def _forced(config: TileConfig) -> TileConfig:
    spec = os.environ.get(FORCE_TILES_ENV, "").strip()
    if not spec:
        return config
    names = {f.name for f in fields(TileConfig)}
    changes = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in names or not value.strip().isdigit():
            raise ValueError(f"{FORCE_TILES_ENV}: expected comma-separated NAME=INT with NAME in {sorted(names)}")
        changes[name.strip()] = int(value)
    return replace(config, **changes)


def _pow2_clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(n, 1))))


def choose_block_m(num_rows: int, num_experts: int, interpret: bool) -> int:
    """Tile height from the mean rows per expert: small batches waste less on padded rows."""
    block_m = 16 if interpret else _pow2_clamp(int(num_rows / num_experts), 16, 128)
    return _forced(TileConfig(block_m, 16, 16, 4, 1)).block_m


def gate_up_tiles(block_m: int, hidden_dim: int, inner_dim: int, interpret: bool) -> TileConfig:
    """Stage 1 holds two (block_m, block_n) fp32 accumulators: gate and up."""
    if interpret:
        return _forced(TileConfig(block_m, _pow2_clamp(inner_dim, 16, 64), _pow2_clamp(hidden_dim, 16, 64), 4, 1))
    return _forced(TileConfig(block_m, 64, 64, 8 if block_m >= 128 else 4, 3))


def down_tiles(block_m: int, hidden_dim: int, inner_dim: int, interpret: bool) -> TileConfig:
    if interpret:
        return _forced(TileConfig(block_m, _pow2_clamp(hidden_dim, 16, 64), _pow2_clamp(inner_dim, 16, 64), 4, 1))
    return _forced(TileConfig(block_m, 128 if block_m >= 64 else 64, 64, 8 if block_m >= 128 else 4, 3))


def combine_block_h(hidden_dim: int) -> int:
    return _pow2_clamp(hidden_dim, 16, 1024)
