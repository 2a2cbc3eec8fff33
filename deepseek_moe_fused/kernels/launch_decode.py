"""Launcher of the decode forward (kernels/_decode.py): gate/up + SwiGLU, then down + combine."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton

from . import _tiles
from ._alloc import new_output
from ._decode import _decode_down_kernel, _decode_gate_up_kernel

if TYPE_CHECKING:
    from .launch import ExpertWeights


def decode_forward(
    x: torch.Tensor,  # (T, H)
    topk_weights: torch.Tensor,  # (T, K)
    topk_ids: torch.Tensor,  # (T, K) int32/int64 in [0, E)
    weights: ExpertWeights,
    tiles: _tiles.DecodeTiles,
    *,
    routed: bool = True,
    shared: bool = True,
) -> torch.Tensor:
    """(T, H) experts output in two launches and no routing metadata (callers validate). Routed
    and shared rows share each launch, as in the three-stage forward; the down launch also sums
    them, so nothing of (T, K, H) is written. With `routed` or `shared` off, that part is left
    out: the unfused ablation runs each part's two launches and adds the outputs after."""
    T, H = x.shape
    K = topk_ids.shape[1]
    I, S = weights.intermediate_dim, weights.shared_dim
    shared = shared and weights.has_shared
    out = new_output(x, (T, H))
    if not (routed or shared):  # nothing left to compute: the sum of no parts
        return out.zero_()
    if T == 0:
        return out
    ids, slot_weights = topk_ids.contiguous().view(-1), topk_weights.contiguous().view(-1)
    h_routed = new_output(x, (T * K, I)) if routed else None
    h_shared = new_output(x, (T, S)) if shared else None
    # An absent part's pointers get a present tensor; ROUTED/SHARED keep them unread.
    h_routed_arg, h_shared_arg = h_routed if routed else h_shared, h_shared if shared else h_routed
    shared_gate, shared_up = weights.shared_gate_up() if shared else (weights.gate_up_proj, weights.gate_up_proj)
    shared_down = weights.shared_down if shared else weights.down_proj
    gate_up, w = tiles.gate_up, weights.gate_up_proj
    grid = (T * K * triton.cdiv(I, gate_up.block_n) if routed else 0) + (
        T * triton.cdiv(S, gate_up.block_n) if shared else 0
    )
    if grid:
        _decode_gate_up_kernel[(grid,)](
            x, ids, w, shared_gate, shared_up, h_routed_arg, h_shared_arg,
            T, K, H, I, S, x.stride(0), w.stride(0), w.stride(1), shared_gate.stride(0),
            h_routed_arg.stride(0), h_shared_arg.stride(0),
            ROUTED=routed, SHARED=shared, BLOCK_N=gate_up.block_n, BLOCK_K=gate_up.block_k,
            num_warps=gate_up.num_warps, num_stages=gate_up.num_stages,
        )  # fmt: skip
    down, wd = tiles.down, weights.down_proj
    _decode_down_kernel[(T * triton.cdiv(H, down.block_n),)](
        h_routed_arg, h_shared_arg, ids, slot_weights, wd, shared_down, out,
        T, H, I, S, h_routed_arg.stride(0), h_shared_arg.stride(0), wd.stride(0), wd.stride(1),
        shared_down.stride(0), out.stride(0),
        TOP_K=K, ROUTED=routed, SHARED=shared, BLOCK_N=down.block_n, BLOCK_K=down.block_k,
        num_warps=down.num_warps, num_stages=down.num_stages,
    )  # fmt: skip
    return out
