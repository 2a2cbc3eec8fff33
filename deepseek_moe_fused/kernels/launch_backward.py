"""Launchers of the Triton backward (kernels/_backward.py) for the routed experts; the shared MLP,
one dense SwiGLU MLP, goes through cuBLAS matmuls with the same fused elementwise algebra.

Saved from the forward: X, the routing weights, the routing metadata and the weights. Recomputed:
the gate/up pre-activations (one more gate/up GEMM, fused into the SwiGLU backward), so no
(T*K, 2I) activation outlives the forward. Transient in the backward: dG/dU (T*K, 2I), the SwiGLU
output (T*K, I) and the per-slot dX (T*K, H), all in X's dtype.
"""

from __future__ import annotations

import torch
import triton

from .._backward_torch import swiglu_backward
from .._interpret import interpreter_active
from ..routing_metadata import RoutingMetadata
from . import _tiles
from ._alloc import new_output
from ._backward import _bwd_dx_kernel, _bwd_swiglu_kernel, _grouped_weight_grad_kernel
from .launch import ExpertWeights, _kernel_flags, combine


def _grouped_weight_grad(a, b, out, topk_weights, metadata, *, a_by_token, b_by_token, scale_a):
    E, P, Q = out.shape
    block_p, block_q, block_r, warps = _tiles.weight_grad_tiles(interpreter_active())
    grid = (E * triton.cdiv(P, block_p) * triton.cdiv(Q, block_q),)
    _grouped_weight_grad_kernel[grid](
        a, b, out, topk_weights, metadata.sorted_slot, metadata.expert_offsets,
        P, Q, metadata.top_k, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
        A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token, SCALE_A=scale_a,
        BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_R=block_r, num_warps=warps, num_stages=1 if interpreter_active() else 3,
        **_kernel_flags(a.dtype),
    )  # fmt: skip


def _shared_backward(x, dy, weights: ExpertWeights):
    """Dense SwiGLU MLP backward; elementwise in fp32, GEMMs in X's dtype."""
    gate, up, down = weights.shared_gate, weights.shared_up, weights.shared_down
    d_g, d_u, act = (
        t.to(x.dtype) for t in swiglu_backward((x @ gate.T).float(), (x @ up.T).float(), (dy @ down).float())
    )
    return d_g @ gate + d_u @ up, d_g.T @ x, d_u.T @ x, dy.T @ act


def moe_experts_backward(
    grad_out: torch.Tensor,  # (T, H)
    x: torch.Tensor,  # (T, H)
    topk_weights: torch.Tensor,  # (T, K)
    weights: ExpertWeights,
    metadata: RoutingMetadata,  # the forward's
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (x, topk_weights, gate_up_proj, down_proj, shared_gate, shared_up, shared_down)."""
    T, H = x.shape
    K, I = metadata.top_k, weights.intermediate_dim
    dy = grad_out.to(x.dtype).contiguous()
    flat_weights = topk_weights.reshape(-1).float().contiguous()
    interpret = interpreter_active()
    tiles = _tiles.tiles_for_block_m(metadata.block_m, H, I, interpret)
    flags = _kernel_flags(x.dtype)
    rows = T * K
    shared_grads, dx_shared = (None, None, None), None
    if weights.has_shared:
        dx_shared, *shared_grads = _shared_backward(x, dy, weights)
    if rows == 0:  # no tokens or no routed slots: only the shared MLP has gradients
        dx = dx_shared if dx_shared is not None else torch.zeros_like(x)
        zeros = (torch.zeros_like(t) for t in (topk_weights, weights.gate_up_proj, weights.down_proj))
        return (dx, *zeros, *shared_grads)
    # Every buffer below is written whole by the kernels (NaN-poisoned under poisoned_outputs()).
    gate, up = weights.gate_up_proj[:, :I], weights.gate_up_proj[:, I:]
    dgu = new_output(x, (rows, 2 * I))
    act = new_output(x, (rows, I))
    t1 = tiles.gate_up
    n_tiles_i = triton.cdiv(I, t1.block_n)
    partial = new_output(flat_weights, (rows, n_tiles_i))
    _bwd_swiglu_kernel[(metadata.max_tiles * n_tiles_i,)](
        x, dy, gate, up, weights.down_proj, flat_weights, dgu, act, partial,
        metadata.sorted_slot, metadata.tile_expert, metadata.tile_row_start, metadata.expert_offsets,
        H, I, K, x.stride(0), dy.stride(0), gate.stride(0), gate.stride(1),
        weights.down_proj.stride(0), weights.down_proj.stride(1), dgu.stride(0), act.stride(0),
        BLOCK_M=t1.block_m, BLOCK_N=t1.block_n, BLOCK_K=t1.block_k,
        num_warps=t1.num_warps, num_stages=t1.num_stages, **flags,
    )  # fmt: skip
    d_topk = partial.sum(dim=1).view(T, K)  # fixed order over the I tiles
    t2 = tiles.down
    dx_slot = new_output(x, (T, K, H))
    _bwd_dx_kernel[(metadata.max_tiles * triton.cdiv(H, t2.block_n),)](
        dgu, gate, up, dx_slot,
        metadata.sorted_slot, metadata.tile_expert, metadata.tile_row_start, metadata.expert_offsets,
        H, I, dgu.stride(0), gate.stride(0), gate.stride(1), H,
        BLOCK_M=t2.block_m, BLOCK_N=t2.block_n, BLOCK_K=t2.block_k,
        num_warps=t2.num_warps, num_stages=t2.num_stages, **flags,
    )  # fmt: skip
    # d gate_up[e] = dGU_e^T X_e (rows of X by token); d down[e] = (w dY)_e^T act_e.
    d_gate_up = new_output(weights.gate_up_proj, weights.gate_up_proj.shape)
    d_down = new_output(weights.down_proj, weights.down_proj.shape)
    grad_args = (flat_weights, metadata)
    _grouped_weight_grad(dgu, x, d_gate_up, *grad_args, a_by_token=False, b_by_token=True, scale_a=False)
    _grouped_weight_grad(dy, act, d_down, *grad_args, a_by_token=True, b_by_token=False, scale_a=True)
    dx = combine(dx_slot, dx_shared)  # the K slots, then the shared MLP, in a fixed order
    return (dx, d_topk.to(topk_weights.dtype), d_gate_up, d_down, *shared_grads)
