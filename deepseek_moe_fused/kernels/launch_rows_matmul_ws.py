"""Launcher of the warp-specialized row-tiled GEMM (kernels/_rows_matmul_ws.py): the same product as
`launch.launch_rows_matmul` for launches whose routed left operand is in sorted-row order, on
Hopper. It runs where `launch_weight_grad_ws.ws_enabled` says Gluon can (`DEEPSEEK_MOE_ROWS_WS=off`
keeps the Triton kernel everywhere) and every operand's layout suits TMA; `launch_rows_matmul`,
which dispatches here, runs the Triton kernel when it returns False."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import torch
import triton

from . import _tma
from ._tiles import RowsWsTiles, num_sms
from .launch_weight_grad_ws import switched_ws_enabled

if TYPE_CHECKING:  # launch.py imports this module
    from ..routing_metadata import RoutingMetadata
    from .launch import RowsMatmul

ROWS_WS_ENV = "DEEPSEEK_MOE_ROWS_WS"  # "auto" (default) or "off"


@functools.cache
def _gluon_kernel():
    from ._rows_matmul_ws import _rows_matmul_ws_kernel

    return _rows_matmul_ws_kernel


def rows_ws_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `rows_matmul_ws` may run for operands of `dtype` on `device`."""
    return switched_ws_enabled(ROWS_WS_ENV, device, dtype)


def _side_descriptors(side: RowsMatmul, tiles: RowsWsTiles, block_m: int):
    """(a, b, b2) descriptors of one side; b views of (E, rows, cols), a 2-D weight as E = 1."""
    b, b2 = side.b, side.b2 if side.b2 is not None else side.b
    if b.dim() == 2:
        b, b2 = b.unsqueeze(0), b2.unsqueeze(0)
    bn, bk = tiles.block_n, tiles.block_k
    box = [1, bn, bk] if side.b_transposed else [1, bk, bn]
    descriptor = _tma.gluon_descriptor
    return descriptor(side.a, [block_m, bk]), descriptor(b, box), descriptor(b2, box)


def _layout_ok(side: RowsMatmul | None) -> bool:
    if side is None:
        return True
    b2 = side.b2 if side.b2 is not None else side.b
    return all(_tma.fits_descriptor(t) for t in (side.a, side.b, b2)) and side.out.stride(-1) == 1


class WorkItems(NamedTuple):
    """A persistent row-tiled launch's work items, numbered as `_rows_matmul_ws._work_item` reads
    them: the shared MLP's token tiles, then the routing metadata's tiles, each times a column tile."""

    n_n: int  # column tiles of the routed side
    n_n_s: int  # column tiles of the shared side
    num_shared: int  # the shared MLP's items (0 without it)
    num_items: int  # all of them, the routed padding tiles included


def work_items(
    metadata: RoutingMetadata, num_tokens: int, n_cols: int, n_cols_s: int, block_n: int, routed: bool, shared: bool
) -> WorkItems:
    n_n, n_n_s = triton.cdiv(n_cols, block_n), triton.cdiv(n_cols_s, block_n)
    num_shared = triton.cdiv(num_tokens, metadata.block_m) * n_n_s if shared else 0
    return WorkItems(n_n, n_n_s, num_shared, num_shared + (metadata.max_tiles * n_n if routed else 0))


def rows_matmul_ws(
    routed: RowsMatmul | None,
    shared: RowsMatmul | None,
    metadata: RoutingMetadata,
    num_tokens: int,
    tiles: RowsWsTiles,
    *,
    topk_weights: torch.Tensor | None = None,  # (T, K) contiguous: routed output rows times their slot's weight
    out_by_slot: bool = True,
) -> bool:
    """`launch_rows_matmul` with the routed left operand in sorted-row order (not by token), on the
    warp-specialized kernel. Returns False, launching nothing, where a layout breaks TMA's rules
    or the routing metadata's tile height is not one the kernel is built for; call only where
    `rows_ws_enabled`."""
    block_m = metadata.block_m
    if block_m not in (64, 128):
        return False
    r, s = routed or shared, shared or routed
    if r.b_transposed != s.b_transposed or (r.b2 is None) != (s.b2 is None):  # one kernel variant serves both
        return False
    two = r.b2 is not None
    n_red, n_cols, *_ = r.right_operand()
    n_red_s, n_cols_s, *_ = s.right_operand()
    n_n, n_n_s, num_shared, num_items = work_items(
        metadata, num_tokens, n_cols, n_cols_s, tiles.block_n, routed is not None, shared is not None
    )  # fmt: skip
    if num_items == 0:  # no rows (a descriptor needs positive extents)
        return True
    if not (_layout_ok(routed) and _layout_ok(shared)):
        return False
    a, b, b2 = _side_descriptors(r, tiles, block_m)
    a_s, sb, sb2 = _side_descriptors(s, tiles, block_m)
    scale = topk_weights is not None
    groups, split = tiles.mma_groups, tiles.split_rows
    if split and block_m == 64:  # one warpgroup's rows: nothing to split
        groups, split = 1, False
    # One MMA partition of a warp per 16 rows, or two of 4 warps.
    warps = block_m // 16 if groups == 1 else 4
    _gluon_kernel()[(min(num_items, num_sms(r.a.device)),)](
        a, b, b2, a_s, sb, sb2, r.out, s.out, topk_weights if scale else r.out,
        metadata.sorted_slot, metadata.tile_expert, metadata.tile_row_start, metadata.expert_offsets,
        num_tokens, num_items, num_shared, n_n, n_n_s, n_red, n_red_s, n_cols, n_cols_s,
        r.out.stride(-2), s.out.stride(-2), 1.0,
        STAGES=tiles.stages, TWO=two, B_NK=r.b_transposed, SCALE=scale, OUT_BY_SLOT=out_by_slot,
        GROUPS=groups, SPLIT_M=split, num_warps=warps,
    )  # fmt: skip
    return True
