"""Launchers of the Triton backward (kernels/_backward.py): routed and shared experts together.

Saved from the forward: X, the routing weights, the routing metadata, the weights, and stage 1's
gate/up pre-activations (`PreActivations`: (T*K, 2I) + (T, 2S) in X's dtype), written by the
forward kernel beside its output. Saving them instead of recomputing them skips one gate/up GEMM
(a quarter of the backward's GEMM work); the backward overwrites them with dG/dU, so they cost no
second buffer. Transient in the backward: the SwiGLU outputs (T*K, I) + (T, S) and the per-slot
dX (T, K, H) + (T, H), all in X's dtype. The shared MLP's weight gradients are dense GEMMs
(cuBLAS); everything else runs in three Triton launches plus two grouped weight-gradient GEMMs.
"""

from __future__ import annotations

import torch
import triton

from .._interpret import interpreter_active
from ..routing_metadata import RoutingMetadata
from . import _tiles
from ._alloc import new_output
from ._backward import _bwd_dx_kernel, _bwd_swiglu_kernel, _grouped_weight_grad_kernel
from .launch import ExpertWeights, PreActivations, _kernel_flags, combine


def _grouped_weight_grad(a, b, out, metadata, tiles, *, a_by_token, b_by_token):
    E, P, Q = out.shape
    grid = (E * triton.cdiv(P, tiles.block_m) * triton.cdiv(Q, tiles.block_n),)
    _grouped_weight_grad_kernel[grid](
        a, b, out, metadata.sorted_slot, metadata.expert_offsets,
        P, Q, metadata.top_k, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
        A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token,
        BLOCK_P=tiles.block_m, BLOCK_Q=tiles.block_n, BLOCK_R=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **_kernel_flags(a.dtype),
    )  # fmt: skip


def _swiglu_backward_stage(dy, flat_weights, weights: ExpertWeights, metadata, preacts, tiles: _tiles.TileConfig):
    """Turns `preacts` into [dG | dU] in place; returns the SwiGLU outputs (routed ones times
    their routing weight; sorted rows) and d(routing weight) (T*K,)."""
    T, H = dy.shape
    I, S = weights.intermediate_dim, weights.shared_dim
    shared = weights.has_shared
    # Every buffer below is written whole by the kernel (NaN-poisoned under poisoned_outputs()).
    act_routed = new_output(dy, (metadata.num_rows, I))
    act_shared = new_output(dy, (T, S)) if shared else None
    n_tiles_i = triton.cdiv(I, tiles.block_n)
    partial = new_output(flat_weights, (metadata.num_rows, n_tiles_i))
    grid = metadata.max_tiles * n_tiles_i + (
        triton.cdiv(T, tiles.block_m) * triton.cdiv(S, tiles.block_n) if shared else 0
    )
    # Pointer arguments of an absent shared MLP get tensors that exist; SHARED keeps them unread.
    shared_down = weights.shared_down if shared else weights.down_proj
    pre_shared = preacts.shared if shared else preacts.routed
    act_shared_arg = act_shared if shared else act_routed
    _bwd_swiglu_kernel[(grid,)](
        dy, weights.down_proj, shared_down, flat_weights,
        preacts.routed, pre_shared, act_routed, act_shared_arg, partial,
        metadata.sorted_slot, metadata.tile_expert, metadata.tile_row_start, metadata.expert_offsets,
        T, H, I, S, metadata.top_k, metadata.max_tiles,
        dy.stride(0), weights.down_proj.stride(0), weights.down_proj.stride(1), shared_down.stride(0),
        preacts.routed.stride(0), pre_shared.stride(0), act_routed.stride(0), act_shared_arg.stride(0),
        SHARED=shared, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **_kernel_flags(dy.dtype),
    )  # fmt: skip
    return act_routed, act_shared, partial.sum(dim=1)  # fixed order over the I tiles


def _dx_stage(num_tokens: int, preacts, weights: ExpertWeights, metadata, tiles: _tiles.TileConfig):
    """Each slot's share of dX (T, K, H) in slot order, and the shared MLP's (T, H)."""
    dgu, dgu_s = preacts.routed, preacts.shared
    T, K = num_tokens, metadata.top_k
    H, I, S = weights.hidden_dim, weights.intermediate_dim, weights.shared_dim
    shared = weights.has_shared
    gate, up = weights.gate_up_proj[:, :I], weights.gate_up_proj[:, I:]
    dx_slot = new_output(dgu, (T, K, H))
    dx_shared = new_output(dgu, (T, H)) if shared else None
    n_tiles_h = triton.cdiv(H, tiles.block_n)
    grid = metadata.max_tiles * n_tiles_h + (triton.cdiv(T, tiles.block_m) * n_tiles_h if shared else 0)
    shared_gate, shared_up = (weights.shared_gate, weights.shared_up) if shared else (gate, up)
    dgu_s = dgu_s if shared else dgu
    dx_shared_arg = dx_shared if shared else dx_slot
    _bwd_dx_kernel[(grid,)](
        dgu, dgu_s, gate, up, shared_gate, shared_up, dx_slot, dx_shared_arg,
        metadata.sorted_slot, metadata.tile_expert, metadata.tile_row_start, metadata.expert_offsets,
        T, H, I, S, metadata.max_tiles,
        dgu.stride(0), dgu_s.stride(0), gate.stride(0), gate.stride(1), shared_gate.stride(0),
        H, dx_shared_arg.stride(0),
        SHARED=shared, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **_kernel_flags(dgu.dtype),
    )  # fmt: skip
    return dx_slot, dx_shared


def _weight_grad_stage(x, dy, dgu, act_routed, weights: ExpertWeights, metadata, tiles: _tiles.TileConfig):
    """d gate_up[e] = dGU_e^T X_e (rows of X by token); d down[e] = dY_e^T (w act)_e."""
    d_gate_up = new_output(weights.gate_up_proj, weights.gate_up_proj.shape)
    d_down = new_output(weights.down_proj, weights.down_proj.shape)
    _grouped_weight_grad(dgu, x, d_gate_up, metadata, tiles, a_by_token=False, b_by_token=True)
    _grouped_weight_grad(dy, act_routed, d_down, metadata, tiles, a_by_token=True, b_by_token=False)
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
    preacts: PreActivations,  # the forward's; overwritten (a second backward cannot reuse them)
    tiles: _tiles.BackwardTiles | None = None,  # None: _tiles.backward_tiles' choice
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (x, topk_weights, gate_up_proj, down_proj, shared_gate, shared_up, shared_down)."""
    T, H = x.shape
    dy = grad_out.to(x.dtype).contiguous()
    if T == 0:
        zeros = (torch.zeros_like(t) for t in (x, topk_weights, weights.gate_up_proj, weights.down_proj))
        shared = (weights.shared_gate, weights.shared_up, weights.shared_down) if weights.has_shared else ()
        return (*zeros, *(torch.zeros_like(w) for w in shared)) + (None,) * (3 - len(shared))
    flat_weights = topk_weights.reshape(-1).float().contiguous()
    if tiles is None:
        inner = max(weights.intermediate_dim, weights.shared_dim)
        tiles = _tiles.backward_tiles(metadata.block_m, H, inner, interpreter_active(), x.element_size())
    act_routed, act_shared, d_topk = _swiglu_backward_stage(dy, flat_weights, weights, metadata, preacts, tiles.swiglu)
    dx_slot, dx_shared = _dx_stage(T, preacts, weights, metadata, tiles.dx)
    d_gate_up, d_down = _weight_grad_stage(x, dy, preacts.routed, act_routed, weights, metadata, tiles.weight_grad)
    shared_grads = (None, None, None)
    if weights.has_shared:
        shared_grads = _shared_weight_grads(x, dy, preacts.shared, act_shared)
    dx = combine(dx_slot, dx_shared)  # the K slots, then the shared MLP, in a fixed order
    return (dx, d_topk.view(topk_weights.shape).to(topk_weights.dtype), d_gate_up, d_down, *shared_grads)
