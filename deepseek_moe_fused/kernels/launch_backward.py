"""Launchers of the Triton backward (kernels/_backward.py): routed and shared experts together.

Saved from the forward: X, the routing weights, the routing metadata, the weights, stage 1's
gate/up pre-activations and its SwiGLU outputs h (`PreActivations`: (T*K, 2I) + (T, 2S) and (T*K,
I) + (T, S) in X's dtype), written by the forward kernel beside and as its output. Saving the
pre-activations instead of recomputing them skips one gate/up GEMM (a quarter of the backward's
GEMM work); the backward overwrites them with dG/dU, so they cost no second buffer. Keeping h (the
down projection's input, which the forward frees otherwise) spares the SwiGLU backward writing it
again for the down weights' gradients: a sixth of that pass's bytes, for (T*K, I) + (T, S) held
from the forward to the backward. Transient in the backward: dA = dY W_down (T*K, I) + (T, S),
freed after the SwiGLU backward reads it, and the per-slot dX (T, K, H) + (T, H), all in X's
dtype; then, in the memory dX's slots held, X and dY (times each row's routing weight) copied into
sorted row order for the weight gradients (T*K, H). Each buffer is released after its last read, the
saved ones included, so the gradients allocated last do not add to them. Launches: dY W_down
(routed + shared), the SwiGLU backward (elementwise), dX (routed + shared) and its combine, two
sorted-row copies (one where the forward's stage 1 copied X and saved it:
`PreActivations.x_sorted`) and two grouped weight-gradient GEMMs (their sorted rows read as TMA
boxes where experts have enough rows: kernels/_tiles.py `_weight_grad_tiles`; on Hopper a
warp-specialized Gluon kernel instead, launch_weight_grad_ws.py); the shared MLP's weight
gradients are dense GEMMs (cuBLAS).
"""

from __future__ import annotations

import torch
import triton

from .._interpret import interpreter_active
from ..routing_metadata import RoutingMetadata
from . import _tiles, _tma
from ._alloc import new_output
from ._backward import _grouped_weight_grad_kernel, _swiglu_bwd_kernel
from .launch import (
    ExpertWeights,
    PreActivations,
    RowsMatmul,
    _kernel_flags,
    combine,
    gather_sorted_rows,
    launch_rows_matmul,
)
from .launch_rows_matmul_ws import rows_ws_enabled
from .launch_weight_grad_ws import grouped_weight_grad_ws, ws_enabled


def grouped_weight_grad(a, b, out, expert_offsets, tiles: _tiles.TileConfig, tma: bool = True):
    """out[e] = a_e^T b_e over each expert's sorted rows of `a` and `b` (rows
    expert_offsets[e] to expert_offsets[e + 1]); tiles: (block_m, block_n) output tile, block_k
    rows per step. `tma`: read the operands through TMA boxes where the card and layout allow."""
    E, P, Q = out.shape
    grid = (E * triton.cdiv(P, tiles.block_m) * triton.cdiv(Q, tiles.block_n),)
    operands = (a, b)
    boxes = [(a, tiles.block_k, tiles.block_m), (b, tiles.block_k, tiles.block_n)]
    descriptors = _tma.descriptors_for(a.device, boxes) if tma else None
    if descriptors is not None:
        operands = tuple(descriptors)
    _grouped_weight_grad_kernel[grid](
        *operands, out, expert_offsets,
        P, Q, a.stride(0), b.stride(0), out.stride(0), out.stride(1), TMA=descriptors is not None,
        BLOCK_P=tiles.block_m, BLOCK_Q=tiles.block_n, BLOCK_R=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **_kernel_flags(a.dtype),
    )  # fmt: skip


def _weight_grad(
    a, b, out, expert_offsets, tiles: _tiles.TileConfig, tma: bool, ws: _tiles.WeightGradWsTiles | None
) -> None:
    """`grouped_weight_grad`, on the warp-specialized kernel where `ws` is given and the layouts allow."""
    if not (ws is not None and grouped_weight_grad_ws(a, b, out, expert_offsets, ws)):
        grouped_weight_grad(a, b, out, expert_offsets, tiles, tma)


def _down_grad_stage(dy, weights: ExpertWeights, metadata, tiles: _tiles.TileConfig):
    """dA = dY W_down for each sorted row (dY read by token) and for the shared MLP: one launch."""
    T = dy.shape[0]
    d_act_routed = new_output(dy, (metadata.num_rows, weights.intermediate_dim))
    d_act_shared = new_output(dy, (T, weights.shared_dim)) if weights.has_shared else None
    launch_rows_matmul(
        RowsMatmul(dy, weights.down_proj, d_act_routed),
        RowsMatmul(dy, weights.shared_down, d_act_shared) if weights.has_shared else None,
        metadata, T, tiles, a_by_token=True, out_by_slot=False,
    )  # fmt: skip
    return d_act_routed, d_act_shared


def _swiglu_backward_stage(
    d_act_routed, d_act_shared, flat_weights, metadata, preacts: PreActivations, tiles: _tiles.ElementwiseTiles
):
    """In place: `preacts`' pre-activations become [dG | dU]; the dA buffers are only read.
    Returns d(routing weight) (T*K,) fp32 by slot."""
    shared = preacts.shared is not None
    T = preacts.shared.shape[0] if shared else 0
    d_topk = new_output(flat_weights, (metadata.num_rows,))  # each slot written once
    grid = triton.cdiv(metadata.num_rows, tiles.block_m) + (triton.cdiv(T, tiles.block_m) if shared else 0)
    if grid == 0:
        return d_topk
    # Pointer arguments of an absent shared MLP get tensors that exist; SHARED keeps them unread.
    pre_shared = preacts.shared if shared else preacts.routed
    d_act_shared = d_act_shared if shared else d_act_routed
    _swiglu_bwd_kernel[(grid,)](
        preacts.routed, pre_shared, d_act_routed, d_act_shared, flat_weights, d_topk, metadata.sorted_slot,
        T, metadata.num_rows, d_act_routed.shape[1], d_act_shared.shape[1],
        preacts.routed.stride(0), pre_shared.stride(0), d_act_routed.stride(0), d_act_shared.stride(0),
        SHARED=shared, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
    )  # fmt: skip
    return d_topk


def _dx_stage(
    num_tokens: int,
    preacts,
    weights: ExpertWeights,
    metadata,
    tiles: _tiles.TileConfig,
    ws: _tiles.RowsWsTiles | None = None,
):
    """Each slot's share of dX (T, K, H) in slot order, and the shared MLP's (T, H):
    [dG | dU] @ [W_gate; W_up], one reduction over the 2I (2S) columns. `ws`: on the
    warp-specialized kernel with these tiles where the layouts allow (launch_rows_matmul_ws.py)."""
    I, H = weights.intermediate_dim, weights.hidden_dim
    dx_slot = new_output(preacts.routed, (num_tokens, metadata.top_k, H))
    dx_shared = new_output(preacts.routed, (num_tokens, H)) if weights.has_shared else None
    w = weights.gate_up_proj
    shared = None
    if weights.has_shared:
        gate_s, up_s = weights.shared_gate_up()
        shared = RowsMatmul(preacts.shared, gate_s, dx_shared, b2=up_s)
    launch_rows_matmul(
        RowsMatmul(preacts.routed, w[:, :I], dx_slot, b2=w[:, I:]), shared, metadata, num_tokens, tiles,
        out_by_slot=True, ws=ws,
    )  # fmt: skip
    return dx_slot, dx_shared


def _release(t: torch.Tensor) -> None:
    """Hand a buffer's memory back to the allocator while something (autograd's saved tensors)
    still holds the tensor object: the layer's backward frees the pre-activations it has consumed
    this way, so the gradients allocated after them do not add to them. Stream-ordered: kernels
    already queued on the stream that read the buffer run before anything reuses the memory."""
    t.untyped_storage().resize_(0)


def _weight_grad_stage(
    x,
    dy,
    dgu,
    h_routed,
    flat_weights,
    weights: ExpertWeights,
    metadata,
    tiles: _tiles.TileConfig,
    tma: bool = True,
    consume: bool = False,
    ws: _tiles.WeightGradWsTiles | None = None,
    x_sorted: torch.Tensor | None = None,
):
    """d gate_up[e] = dGU_e^T X_e; d down[e] = (w dY)_e^T h_e, h the forward's SwiGLU outputs and
    w each row's routing weight (put on dY's rows as they are copied, so h is read as the forward
    wrote it). `consume`: release dGU's memory once read, before d down is allocated (the layer's
    backward owns it; timing tools reuse it). `ws`: on the warp-specialized kernel with this ring
    where the layouts allow (launch_weight_grad_ws.py).

    X and dY are copied into expert-sorted row order first (one buffer of (T*K, H), X's rows
    then dY's, by `gather_sorted_rows`), so the grouped GEMMs read contiguous rows: on the H100
    the copy cost 50 us at seed N=8192 (as torch.index_select) and the two GEMMs gain 350 us over
    gathering rows inside their loop. `x_sorted`: X already in sorted rows (the forward's,
    `PreActivations.x_sorted`), and the buffer dY's go to."""
    d_gate_up = new_output(weights.gate_up_proj, weights.gate_up_proj.shape)
    sorted_rows = gather_sorted_rows(x, metadata) if x_sorted is None else x_sorted
    _weight_grad(dgu, sorted_rows, d_gate_up, metadata.expert_offsets, tiles, tma, ws)
    if consume:
        _release(dgu)
    d_down = new_output(weights.down_proj, weights.down_proj.shape)  # after the release: not beside dGU
    # Same buffer: the stream runs the GEMM above before this overwrites its operand.
    gather_sorted_rows(dy, metadata, out=sorted_rows, scale=flat_weights)
    _weight_grad(sorted_rows, h_routed, d_down, metadata.expert_offsets, tiles, tma, ws)
    return d_gate_up, d_down


def _shared_weight_grads(x, dy, dgu_shared, act_shared):
    """Dense GEMMs (cuBLAS): d [gate; up] = [dG | dU]^T X, d down = dY^T act."""
    d_gate_up = dgu_shared.T @ x
    S = act_shared.shape[1]
    return d_gate_up[:S], d_gate_up[S:], dy.T @ act_shared


def moe_experts_backward(
    grad_out: torch.Tensor,  # (T, H)
    x: torch.Tensor,  # (T, H)
    topk_weights: torch.Tensor,  # (T, K)
    weights: ExpertWeights,
    metadata: RoutingMetadata,  # the forward's
    preacts: PreActivations,  # the forward's; consumed: overwritten, then their memory released
    tiles: _tiles.BackwardTiles | None = None,  # None: _tiles.backward_tiles' choice
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (x, topk_weights, gate_up_proj, down_proj, shared_gate, shared_up, shared_down).

    Every transient is released once read, and the weight gradients come last, so the peak is
    the gradients plus what their GEMMs read: the per-slot dX and the shared MLP's pre-activations
    and SwiGLU outputs are gone before the routed gradients are allocated, and dG/dU before d down."""
    T, H = x.shape
    dy = grad_out.to(x.dtype).contiguous()
    if T == 0:
        zeros = (torch.zeros_like(t) for t in (x, topk_weights, weights.gate_up_proj, weights.down_proj))
        shared = (weights.shared_gate, weights.shared_up, weights.shared_down) if weights.has_shared else ()
        return (*zeros, *(torch.zeros_like(w) for w in shared)) + (None,) * (3 - len(shared))
    flat_weights = topk_weights.reshape(-1).float().contiguous()
    if tiles is None:
        inner = max(weights.intermediate_dim, weights.shared_dim)
        rows_per_expert = metadata.num_rows / max(weights.num_experts, 1)
        tiles = _tiles.backward_tiles(
            metadata.block_m, H, inner, interpreter_active(), x.element_size(), rows_per_expert,
            _tma.tma_enabled(x.device), ws_enabled(x.device, x.dtype), rows_ws_enabled(x.device, x.dtype),
        )  # fmt: skip
    d_act_routed, d_act_shared = _down_grad_stage(dy, weights, metadata, tiles.down_grad)
    d_topk = _swiglu_backward_stage(d_act_routed, d_act_shared, flat_weights, metadata, preacts, tiles.swiglu)
    del d_act_routed, d_act_shared  # read once: the down weights' gradients take the forward's h
    dx_slot, dx_shared = _dx_stage(T, preacts, weights, metadata, tiles.dx, tiles.dx_ws)
    dx = combine(dx_slot, dx_shared)  # the K slots, then the shared MLP, in a fixed order
    # Freed before the weight gradients: their sorted-row buffer, (T*K, H) like dx_slot, reuses it.
    del dx_slot, dx_shared
    shared_grads = (None, None, None)
    if weights.has_shared:
        shared_grads = _shared_weight_grads(x, dy, preacts.shared, preacts.h_shared)
        _release(preacts.shared)
        _release(preacts.h_shared)
    d_gate_up, d_down = _weight_grad_stage(
        x, dy, preacts.routed, preacts.h_routed, flat_weights, weights, metadata, tiles.weight_grad,
        tiles.weight_grad_tma, consume=True, ws=tiles.weight_grad_ws, x_sorted=preacts.x_sorted,
    )  # fmt: skip
    _release(preacts.h_routed)
    if preacts.x_sorted is not None:
        _release(preacts.x_sorted)
    return (dx, d_topk.view(topk_weights.shape).to(topk_weights.dtype), d_gate_up, d_down, *shared_grads)
