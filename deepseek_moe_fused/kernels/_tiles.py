"""Tile sizes for the expert kernels: a tuned table per card where `make tune` measured one, else a
heuristic from the problem's shape."""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import triton

from .._env import env_choice

# "block_m=16,block_n=16,..." overrides every other choice, for both stages: for tuning
# experiments and for showing that the benchmark gate catches a slow configuration.
FORCE_TILES_ENV = "DEEPSEEK_MOE_FORCE_TILES"
# "auto" (default): an expert's last routed tile runs half height where its rows fit (`tail_block_m`);
# "off": every routed tile is block_m high, for same-process comparisons.
TAIL_TILES_ENV = "DEEPSEEK_MOE_TAIL_TILES"
# Written by tools/tune.py (`make tune`); read once per process.
TUNED_TABLE = Path(__file__).with_name("tuned_tiles.json")


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows (tokens) per tile; also the routing metadata's tile height
    block_n: int  # output columns per program
    block_k: int  # reduction step
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class RowsWsTiles:
    """The warp-specialized row-tiled GEMM's tiles (launch_rows_matmul_ws.py); its tile height is
    the routing metadata's."""

    block_n: int  # output columns per work item
    block_k: int  # reduction step: one TMA box of the rows and one of the weight
    stages: int  # ring depth
    mma_groups: int  # MMA partitions: 1 (of block_m // 16 warps) or 2 (of 4 warps each)
    split_rows: bool = False  # with 2: each owns half of every item's rows, else they take items in turn

    def __post_init__(self) -> None:
        if self.mma_groups not in (1, 2):  # the kernel is built for one partition or a pair
            raise ValueError(f"RowsWsTiles.mma_groups: 1 or 2 MMA partitions, got {self.mma_groups}")
        if self.split_rows and self.mma_groups != 2:
            raise ValueError("RowsWsTiles.split_rows needs mma_groups=2")


# From this many mean rows per expert, dX and the forward's down projection run on the
# warp-specialized row-tiled GEMM where it can (launch_rows_matmul_ws.py). On the H100 it was 5%
# (dX) and 5-17% (down) faster at 1536 rows (v2-lite N=16384) over three runs, and within the
# runs' spread of the Triton kernel from 192 to 2048 rows; slower at 48-128 rows and on
# DeepSeek-V3's down projection at 64-256 rows (docs/perf-notes.md, session 15).
ROWS_WS_MIN_ROWS = 1536
ROWS_WS = RowsWsTiles(256, 64, 3, 1)


# Stage 1 on the warp-specialized gate/up kernel (launch_gate_up_ws.py) from this many mean rows
# per expert; the forward then gathers X into sorted rows first (the backward's weight gradients
# reuse them). block_n is the width of each of the gate and up boxes: a stage holds the rows box
# and 32 KB of weights, 4 stages 224 KB. On an H200 (gather included) the stage was 1-3% faster
# than the Triton kernel at 2048-4096 rows (seed N = 8192-16384) and as fast at v2-lite N=16384's
# 1536, where the training step gained 2-4%; slower at 192-768 rows (docs/perf-notes.md, session 16).
GATE_UP_WS_MIN_ROWS = 1536
GATE_UP_WS = RowsWsTiles(128, 64, 4, 1)


def _long_experts(
    rows_per_expert: float | None, enabled: bool, min_rows: int, tiles: RowsWsTiles
) -> RowsWsTiles | None:
    """`tiles` where `enabled` and experts average at least `min_rows` rows, else None."""
    if not enabled or rows_per_expert is None or rows_per_expert < min_rows:
        return None
    return tiles


def gate_up_ws_tiles(rows_per_expert: float | None, enabled: bool) -> RowsWsTiles | None:
    """The warp-specialized gate/up kernel's tiles where the rule picks it (`enabled`: the card and
    Triton can run it, launch_gate_up_ws.gate_up_ws_enabled); None for the Triton kernel."""
    return _long_experts(rows_per_expert, enabled, GATE_UP_WS_MIN_ROWS, GATE_UP_WS)


def rows_ws_tiles(rows_per_expert: float | None, enabled: bool) -> RowsWsTiles | None:
    """The warp-specialized row-tiled GEMM's tiles where the rule picks it (`enabled`: the card
    and Triton can run it, launch_rows_matmul_ws.rows_ws_enabled); None for the Triton kernel."""
    return _long_experts(rows_per_expert, enabled, ROWS_WS_MIN_ROWS, ROWS_WS)


@dataclass(frozen=True)
class GemvTiles:
    """One launch of the decode forward (kernels/_decode.py): matrix-vector products, no block_m."""

    block_n: int  # weight rows (output columns) per program
    block_k: int  # reduction step
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DecodeTiles:
    """The decode forward's two launches (launch_decode.py)."""

    gate_up: GemvTiles
    down: GemvTiles


# "auto" (default): batches of up to DECODE_MAX_TOKENS tokens take the two-launch decode forward
# (launch_decode.py) where no backward follows; "off": the three-stage forward at every size.
# On the H100 it was 3-12% faster than the three stages at N = 1-2 (seed, v2-lite, V3) and 2-9%
# slower at N=4, where each slot re-reads the weights its expert shares with other slots.
DECODE_ENV = "DEEPSEEK_MOE_DECODE"
DECODE_MAX_TOKENS = 2
# Thin tiles of few warps: many programs, each with its loads in flight, stream best. Of 13
# candidates these two were within 4% of each N's best (docs/perf-notes.md, "The decode forward").
DECODE = DecodeTiles(GemvTiles(2, 512, 2, 3), GemvTiles(1, 512, 1, 3))


def decode_tiles(num_tokens: int, interpret: bool) -> DecodeTiles | None:
    """The decode forward's tiles where the rule picks it, else None (the three-stage forward)."""
    if num_tokens > DECODE_MAX_TOKENS or tiles_forced() or env_choice(DECODE_ENV, ("auto", "off"), "auto") == "off":
        return None
    if interpret:  # small tiles: the interpreter's cost grows with the tile, not the grid
        return DecodeTiles(GemvTiles(16, 32, 4, 1), GemvTiles(16, 32, 4, 1))
    return DECODE


@dataclass(frozen=True)
class ExpertTiles:
    """Both stages' tiles for one problem; they share block_m (the routing metadata's tile height)."""

    gate_up: TileConfig
    down: TileConfig
    source: str  # "tuned (<card>)", "heuristic" or "interpreter": the benchmark prints it
    down_ws: RowsWsTiles | None = None  # the down projection on the warp-specialized kernel instead
    gate_up_ws: RowsWsTiles | None = None  # stage 1 on the warp-specialized kernel, over X in sorted rows
    decode: DecodeTiles | None = None  # the two-launch decode forward, where no backward follows

    @property
    def block_m(self) -> int:
        return self.gate_up.block_m


# Longest reduction with tail tiles. A tail program multiplies half the rows over the same
# weight tiles as the expert's full tiles beside it, so it runs ahead of them, and L2 must hold
# the weight tiles from its read to theirs: at DeepSeek-V3's gate/up (H=7168) that cost 10-12%
# (N = 8192-16384), where reductions of 1408-2048 gained 2-5% (docs/perf-notes.md, "Tail tiles").
TAIL_MAX_REDUCTION = 4096


def tail_block_m(block_m: int, reduction: int) -> int:
    """Height of the row-tiled kernels' tile for an expert's last rows when they fit in it: half
    of block_m, so an expert with 192 rows runs 128 + 64 rows of MMA, not 128 + 128. block_m
    itself (no tail tiles) below 32 rows, since tl.dot needs 16 rows; for reductions longer than
    TAIL_MAX_REDUCTION; or when TAIL_TILES_ENV is off."""
    if env_choice(TAIL_TILES_ENV, ("auto", "off"), "auto") == "off":
        return block_m
    if block_m < 32 or reduction > TAIL_MAX_REDUCTION:
        return block_m
    return block_m // 2


def problem_key(num_experts: int, hidden_dim: int, inner_dim: int, shared_dim: int, top_k: int) -> str:
    """Key of the tuned table: everything but the batch size that changes the best tiles."""
    return f"E{num_experts}_H{hidden_dim}_I{inner_dim}_S{shared_dim}_K{top_k}"


def _forced(config: TileConfig, spec: str) -> TileConfig:
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


def heuristic_tiles(block_m: int, hidden_dim: int, inner_dim: int, interpret: bool) -> ExpertTiles:
    """Stage 1 holds two (block_m, block_n) fp32 accumulators (gate and up), stage 2 one."""
    if interpret:  # small tiles: the interpreter's cost grows with the tile, not the grid
        gate_up = TileConfig(block_m, _pow2_clamp(inner_dim, 16, 64), _pow2_clamp(hidden_dim, 16, 64), 4, 1)
        down = TileConfig(block_m, _pow2_clamp(hidden_dim, 16, 64), _pow2_clamp(inner_dim, 16, 64), 4, 1)
        return ExpertTiles(gate_up, down, "interpreter")
    warps = 8 if block_m >= 128 else 4
    gate_up = TileConfig(block_m, 64, 64, warps, 3)
    down = TileConfig(block_m, 128 if block_m >= 64 else 64, 64, warps, 3)
    return ExpertTiles(gate_up, down, "heuristic")


def heuristic_block_m(num_rows: int, num_experts: int, interpret: bool) -> int:
    """Tile height from the mean rows per expert: small batches waste less on padded rows. An
    expert-parallel rank can hold no experts (fewer experts than ranks): it gets rows for none."""
    return 16 if interpret else _pow2_clamp(int(num_rows / max(num_experts, 1)), 16, 128)


@functools.cache
def _tuned_table() -> dict:
    if not TUNED_TABLE.exists():
        return {}
    return json.loads(TUNED_TABLE.read_text())


def select_card(table: dict, name: str, capability: str) -> tuple[str, dict]:
    """The tuned problems for a card: its own, else a measured card of the same architecture (an
    H200 uses the H100's: same SM count and instructions), else none (the heuristic)."""
    cards = table.get("cards", {})
    if name in cards:
        return name, cards[name]["problems"]
    for other, entry in sorted(cards.items()):
        if entry.get("capability") == capability:
            return other, entry["problems"]
    return "", {}


def nearest_batch(measured: list[str], num_tokens: int) -> str:
    """The measured batch size nearest to `num_tokens` on a log scale (the smaller one on a tie)."""
    target = math.log2(max(num_tokens, 1))
    return min(measured, key=lambda n: (abs(math.log2(int(n)) - target), int(n)))


@functools.cache
def num_sms(device) -> int:
    """Streaming multiprocessors of `device` (a torch.device); 132 off CUDA, where the interpreter
    gets the tiles an H100 would."""
    import torch

    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _device_entry() -> tuple[str, dict]:
    import torch

    if not torch.cuda.is_available():
        return "", {}
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    return select_card(_tuned_table(), torch.cuda.get_device_name(), capability)


def _tuned(num_tokens: int, key: str) -> ExpertTiles | None:
    card, problems = _device_entry()
    by_tokens = problems.get(key)
    if not by_tokens:
        return None
    best = nearest_batch(list(by_tokens), num_tokens)
    entry = by_tokens[best]
    block_m = entry["block_m"]
    return ExpertTiles(
        TileConfig(block_m, *entry["gate_up"]), TileConfig(block_m, *entry["down"]), f"tuned ({card}, N={best})"
    )


def _force_spec() -> str:
    return os.environ.get(FORCE_TILES_ENV, "").strip()


def tiles_forced() -> bool:
    """Whether FORCE_TILES_ENV overrides the tiles (which are then the Triton kernels')."""
    return bool(_force_spec())


def _apply_force(tiles: ExpertTiles, spec: str) -> ExpertTiles:
    if not spec:
        return tiles
    return ExpertTiles(_forced(tiles.gate_up, spec), _forced(tiles.down, spec), f"forced by {FORCE_TILES_ENV}")


def expert_tiles(
    num_tokens: int, num_experts: int, hidden_dim: int, inner_dim: int, shared_dim: int, top_k: int, interpret: bool
) -> ExpertTiles:
    """Tiles for both stages of one problem: tuned table, else heuristic; the env override last."""
    # Cached: launchers ask on every call, and decode latency is host-bound.
    spec = _force_spec()
    return _expert_tiles(num_tokens, num_experts, hidden_dim, inner_dim, shared_dim, top_k, interpret, spec)


@functools.lru_cache(maxsize=4096)
def _expert_tiles(num_tokens, num_experts, hidden_dim, inner_dim, shared_dim, top_k, interpret, spec) -> ExpertTiles:
    key = problem_key(num_experts, hidden_dim, inner_dim, shared_dim, top_k)
    tiles = None if interpret else _tuned(num_tokens, key)
    if tiles is None:
        block_m = heuristic_block_m(num_tokens * top_k, num_experts, interpret)
        tiles = heuristic_tiles(block_m, hidden_dim, max(inner_dim, shared_dim), interpret)
    return _apply_force(tiles, spec)


def _forced_at_height(config: TileConfig, spec: str) -> TileConfig:
    """The override applied to a row-tiled kernel whose routing metadata is already cut: its tile
    height is fixed, so a forced block_m cannot apply."""
    return replace(_forced(config, spec), block_m=config.block_m)


def tiles_for_block_m(block_m: int, hidden_dim: int, inner_dim: int, interpret: bool) -> ExpertTiles:
    """For routing metadata cut with a tile height the table did not pick (built by a caller)."""
    tiles = heuristic_tiles(block_m, hidden_dim, inner_dim, interpret)
    spec = _force_spec()
    if not spec:
        return tiles
    forced = (_forced_at_height(t, spec) for t in (tiles.gate_up, tiles.down))
    return ExpertTiles(*forced, f"forced by {FORCE_TILES_ENV}")


@dataclass(frozen=True)
class ElementwiseTiles:
    block_m: int  # whole rows per program
    block_n: int  # columns per step along the row
    num_warps: int


@dataclass(frozen=True)
class WeightGradWsTiles:
    """The warp-specialized weight-gradient kernel's ring (launch_weight_grad_ws.py); its output
    tile is 128 x 128."""

    block_r: int  # expert rows per ring stage: one TMA box of a and one of b
    stages: int  # ring depth
    mma_groups: int  # MMA warpgroups taking the output tiles in turn (2: ping-pong)

    def __post_init__(self) -> None:
        if self.mma_groups not in (1, 2):  # the kernel is built for one warpgroup or a pair
            raise ValueError(f"WeightGradWsTiles.mma_groups: 1 or 2 MMA warpgroups, got {self.mma_groups}")


# Both fill the 227 KB of shared memory a block may take: 6 stages of two 16 KB boxes and one
# 32 KB output tile; 10 stages of two 8 KB boxes and one output tile per warpgroup.
WS_ONE_GROUP = WeightGradWsTiles(64, 6, 1)
WS_PING_PONG = WeightGradWsTiles(32, 10, 2)


@dataclass(frozen=True)
class BackwardTiles:
    """Tiles of the backward kernels. In `weight_grad`, block_m/block_n are the output tile
    (rows of d W, columns of d W) and block_k the step over an expert's token rows."""

    down_grad: TileConfig  # dY W_down: (routed tile, I columns); block_m is the metadata's tile height
    swiglu: ElementwiseTiles  # the SwiGLU backward over whole rows
    dx: TileConfig  # (routed tile, H columns); same block_m
    weight_grad: TileConfig
    weight_grad_tma: bool  # weight gradients read through TMA boxes where the card and layout allow
    source: str
    weight_grad_ws: WeightGradWsTiles | None = None  # the weight gradients on the Gluon kernel instead
    dx_ws: RowsWsTiles | None = None  # dX on the warp-specialized row-tiled GEMM instead


# Mean rows per expert: up to SHORT_EXPERT_ROWS the weight gradients take the short-expert tiles;
# up to POINTER_ROWS they keep pointer loads even where TMA is on; from LONG_EXPERT_ROWS, with TMA,
# the long-expert tile.
POINTER_ROWS = 256
SHORT_EXPERT_ROWS = 512
LONG_EXPERT_ROWS = 1024
# Between these mean rows per expert (the lower bound excluded) the warp-specialized kernel
# (launch_weight_grad_ws.py) runs the weight gradients where it can. On the H100 it was 5-22%
# faster alone from 96 rows (v2-lite N=1024) to 2048 (seed N=8192) and 4% slower at 48 (v2-lite
# N=512); in the training step it took 19-146 us off at 96-768 rows, while at 1536-4096 rows
# (v2-lite / seed N=16384) the steps stayed within their spread (docs/perf-notes.md, session 13).
WS_MIN_ROWS = 64
WS_MAX_ROWS = 2048
# Between these (the lower bound excluded) two MMA warpgroups take the tiles in turn. On the H100
# the two GEMMs ran 3-9% faster that way at 192-768 rows (v2-lite N = 2048-8192), as fast at 128
# and 512 (seed N = 512, 2048), 6% slower at 96 and 10% slower at 2048 (docs/perf-notes.md,
# session 14).
PING_PONG_MIN_ROWS = 128
PING_PONG_MAX_ROWS = 1024


def _weight_grad_ws_tiles(rows_per_expert: float | None, ws: bool) -> WeightGradWsTiles | None:
    if not ws or rows_per_expert is None or not WS_MIN_ROWS < rows_per_expert <= WS_MAX_ROWS:
        return None
    if PING_PONG_MIN_ROWS < rows_per_expert <= PING_PONG_MAX_ROWS:
        return WS_PING_PONG
    return WS_ONE_GROUP


def _weight_grad_tiles(itemsize: int, rows_per_expert: float | None, tma: bool) -> tuple[TileConfig, bool]:
    """Measured on the H100 (docs/perf-notes.md, backward v3 and "Weight gradients through TMA").
    Without TMA: 128 x 128 tiles; experts with few rows (up to 512 each: seed and v2-lite at
    N <= 2048, a few reduction steps per output tile) do 10-30% better with a 32-row step, 4
    warps and 4 stages, from 768 rows on the 8-warp tile with a 64-row step is faster. With TMA:
    the shortest experts (48-192 rows measured) keep pointer loads, since their last, partial
    step is a box the kernel masks in registers outside the pipelined loop, which cost up to 27%
    there; at 384-512 rows TMA with a 16-row step and 6 stages is 7-13% faster than pointers, from
    768 rows TMA wins by 8-24% with the short-expert tile, and from 1024 rows with 128 x 256.
    fp32 operands keep their measured fit (half the 64-row step: shared memory is the limit)."""
    rows = math.inf if rows_per_expert is None else rows_per_expert
    if itemsize > 2:
        return TileConfig(128, 128, 32, 8, 3), False
    if rows <= POINTER_ROWS or (rows <= SHORT_EXPERT_ROWS and not tma):
        return TileConfig(128, 128, 32, 4, 4), False
    if not tma:
        return TileConfig(128, 128, 64, 8, 3), False
    if rows <= SHORT_EXPERT_ROWS:
        return TileConfig(128, 128, 16, 4, 6), True
    if rows < LONG_EXPERT_ROWS:
        return TileConfig(128, 128, 32, 4, 4), True
    return TileConfig(128, 256, 32, 8, 4), True


# Below this many mean rows per expert, dY W_down takes 128-column tiles (two programs per SM)
# instead of 256: on the H100, 138 against 154 us at v2-lite N=512 (48 rows), equal at 96 and 128
# rows, slower from 192 (tools/sweep_backward.py, docs/perf-notes.md, session 21).
SHORT_DOWN_GRAD_ROWS = 128
# Elements of a row one SwiGLU-backward program loads per step. One row of 1024 per program gives
# the grid 16x the programs of 16 rows x 256 (v2-lite N=1024 had 448 of those for 132 SMs). On the
# H100 it ran at 2.86-2.96 TB/s against 2.1-2.8 for 16 x 256 at seed and v2-lite N = 1024-16384
# (v2-lite N=1024 65 -> 48 us, seed N=16384 435 -> 408; docs/perf-notes.md, session 21).
SWIGLU_STEP_ELEMENTS = 1024


def swiglu_backward_tiles(inner_dim: int) -> ElementwiseTiles:
    """One row per program over widths from 1024 up; several rows per program under it, keeping
    SWIGLU_STEP_ELEMENTS per step."""
    block_n = _pow2_clamp(inner_dim, 16, SWIGLU_STEP_ELEMENTS)
    return ElementwiseTiles(SWIGLU_STEP_ELEMENTS // block_n, block_n, 4)


def backward_tiles(
    block_m: int,
    hidden_dim: int,
    inner_dim: int,
    interpret: bool,
    itemsize: int = 2,
    rows_per_expert: float | None = None,  # mean routed rows per expert; None: many
    tma: bool = False,  # whether the card and Triton can read TMA boxes (_tma.tma_enabled)
    ws: bool = False,  # whether the warp-specialized weight-gradient kernel can run (ws_enabled)
    rows_ws: bool = False,  # whether the warp-specialized row-tiled GEMM can run (rows_ws_enabled)
) -> BackwardTiles:
    """dY W_down and dX are row-tiled GEMMs (the forward's down-stage shape, dX reducing over
    [dG | dU]'s 2I columns); the weight gradients are plain GEMMs over each expert's sorted rows
    (`_weight_grad_tiles`). Measured on the H100 (docs/perf-notes.md, backward v1-v3 and "dX in
    one reduction"): wide tiles, a 64-column k step. fp32 operands (itemsize 4) take half the
    k step and fewer pipeline stages: shared memory is the limit."""
    if interpret:  # the forward's interpreter tiles: dY W_down has stage 1's shape, dX stage 2's
        tiles = heuristic_tiles(block_m, hidden_dim, inner_dim, interpret)
        swiglu = ElementwiseTiles(16, _pow2_clamp(inner_dim, 16, 64), 4)
        # TMA on whatever the rows: the CPU tier runs the TMA weight gradients' masked last step.
        return BackwardTiles(tiles.gate_up, swiglu, tiles.down, TileConfig(16, 16, 16, 4, 1), tma, tiles.source)
    warps = 8 if block_m >= 128 else 4
    wide = itemsize <= 2
    block_n = 256 if block_m >= 128 and wide else 128
    down_grad = TileConfig(block_m, block_n, 64 if wide else 32, warps, 3)
    if rows_per_expert is not None and rows_per_expert < SHORT_DOWN_GRAD_ROWS:
        down_grad = replace(down_grad, block_n=min(block_n, 128))
    dx = TileConfig(block_m, block_n, 64 if wide else 32, warps, 4 if wide else 3)
    weight_grad, weight_grad_tma = _weight_grad_tiles(itemsize, rows_per_expert, tma)
    weight_grad_ws = _weight_grad_ws_tiles(rows_per_expert, ws)
    tiles = BackwardTiles(
        down_grad, swiglu_backward_tiles(inner_dim), dx, weight_grad, weight_grad_tma, "heuristic", weight_grad_ws,
        rows_ws_tiles(rows_per_expert, rows_ws),
    )  # fmt: skip
    spec = _force_spec()
    if spec:  # the forward's override, for the two row-tiled GEMMs (on the Triton kernel)
        tiles = replace(
            tiles,
            down_grad=_forced_at_height(tiles.down_grad, spec),
            dx=_forced_at_height(tiles.dx, spec),
            source=f"forced by {FORCE_TILES_ENV}",
            dx_ws=None,
        )
    return tiles


def combine_block_h(hidden_dim: int) -> int:
    return _pow2_clamp(hidden_dim, 16, 1024)


def sorted_rows_block_h(hidden_dim: int) -> int:
    """Columns per program of the sorted-rows copy: a whole row up to 2048 (every width from
    256 x 4 tokens to 2048 x 1 timed the same on the H100, docs/perf-notes.md, session 22)."""
    return _pow2_clamp(hidden_dim, 16, 2048)
