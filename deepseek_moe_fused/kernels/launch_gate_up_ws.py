"""Launcher of the warp-specialized gate/up kernel (kernels/_gate_up_ws.py): stage 1 of
`launch.gate_up_swiglu` for a forward whose routed X rows were gathered into sorted-row order, on
Hopper. It runs where `launch_weight_grad_ws.ws_enabled` says Gluon can (`DEEPSEEK_MOE_GATE_UP_WS=off`
keeps the Triton kernel everywhere) and every operand's layout suits TMA; `gate_up_swiglu`, which
dispatches here, runs the Triton kernel when it returns False."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import torch

from . import _tma
from ._tiles import RowsWsTiles, num_sms
from .launch_rows_matmul_ws import work_items
from .launch_weight_grad_ws import switched_ws_enabled

if TYPE_CHECKING:  # launch.py imports this module
    from ..routing_metadata import RoutingMetadata

GATE_UP_WS_ENV = "DEEPSEEK_MOE_GATE_UP_WS"  # "auto" (default) or "off"


@functools.cache
def _gluon_kernel():
    from ._gate_up_ws import _gate_up_ws_kernel

    return _gate_up_ws_kernel


def gate_up_ws_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `gate_up_ws` may run for operands of `dtype` on `device`."""
    return switched_ws_enabled(GATE_UP_WS_ENV, device, dtype)


class GateUpSide(NamedTuple):
    """One side (routed or shared) of a `gate_up_ws` launch."""

    x: torch.Tensor  # (rows, H): expert-sorted X rows (routed) or X (shared)
    gate: torch.Tensor  # (E, n, H) gate rows of each expert; the shared MLP's as E = 1
    up: torch.Tensor  # (E, n, H) up rows, as gate
    h: torch.Tensor  # (rows, n) out
    pre: torch.Tensor | None  # (rows, 2n) out: [gate | up] pre-activations; None: not written

    def fits(self) -> bool:
        """TMA's rules for the three read operands; the outputs' rows need contiguous columns."""
        outputs = (self.h,) if self.pre is None else (self.h, self.pre)
        read_ok = all(_tma.fits_descriptor(t) for t in (self.x, self.gate, self.up))
        return read_ok and all(t.stride(-1) == 1 for t in outputs)

    def descriptors(self, block_m: int, tiles: RowsWsTiles):
        box = [1, tiles.block_n, tiles.block_k]
        descriptor = _tma.gluon_descriptor
        return descriptor(self.x, [block_m, tiles.block_k]), descriptor(self.gate, box), descriptor(self.up, box)


def gate_up_ws(
    routed: GateUpSide | None,
    shared: GateUpSide | None,
    metadata: RoutingMetadata,
    num_tokens: int,
    tiles: RowsWsTiles,
) -> bool:
    """h = silu(x gate^T) * (x up^T) for the routed experts' sorted rows and the shared MLP's
    tokens in one launch (either side may be None), the pre-activations written beside h where
    the sides carry `pre` (both or neither). Returns False, launching nothing, where a layout
    breaks TMA's rules or the metadata's tile height is not one the kernel is built for; call
    only where `gate_up_ws_enabled`."""
    block_m = metadata.block_m
    if block_m not in (64, 128) or tiles.mma_groups != 1:
        return False
    r, s = routed or shared, shared or routed
    if (r.pre is None) != (s.pre is None):
        return False
    I, S = r.gate.shape[1], s.gate.shape[1]
    n_n, n_n_s, num_shared, num_items = work_items(
        metadata, num_tokens, I, S, tiles.block_n, routed is not None, shared is not None
    )  # fmt: skip
    if num_items == 0:  # no rows (a descriptor needs positive extents)
        return True
    if not (r.fits() and s.fits()):
        return False
    save = r.pre is not None
    pre, pre_s = (r.pre, s.pre) if save else (r.h, s.h)  # unread without SAVE_PREACT
    _gluon_kernel()[(min(num_items, num_sms(r.x.device)),)](
        *r.descriptors(block_m, tiles), *s.descriptors(block_m, tiles), r.h, s.h, pre, pre_s,
        metadata.tile_expert, metadata.tile_row_start, metadata.expert_offsets,
        num_tokens, num_items, num_shared, n_n, n_n_s, r.x.shape[1], I, S,
        r.h.stride(0), s.h.stride(0), pre.stride(0), pre_s.stride(0), 1.0,
        STAGES=tiles.stages, SAVE_PREACT=save, num_warps=block_m // 16,
    )  # fmt: skip
    return True
