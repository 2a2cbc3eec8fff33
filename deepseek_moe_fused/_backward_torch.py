"""Backward of the fused expert forward in PyTorch (fp32 math, float64 for the tests; one expert at a time).

Recomputes gate/up/SwiGLU from the saved X instead of saving the (T*K, 2I) pre-activations: the
forward never materialises them, and recompute costs one extra gate/up GEMM. Deterministic:
per-slot dX rows are summed over the K slots in a fixed order, without index_add.
"""

from __future__ import annotations

import torch

from .kernels.launch import ExpertWeights


def swiglu_backward(g: torch.Tensor, u: torch.Tensor, d_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """act = silu(g) * u: returns (d_g, d_u, act) from d_act, elementwise in g's dtype."""
    sig = torch.sigmoid(g)
    silu = g * sig
    d_g = d_act * u * (sig * (1 + g * (1 - sig)))  # d silu(g) / dg = sig * (1 + g * (1 - sig))
    return d_g, d_act * silu, silu * u


def _mlp_backward(x, w_gate, w_up, w_down, grad_y, row_weight):
    """One MLP's gradients for rows x (n, H) and output gradient grad_y (n, H), all in one float dtype.

    Returns (dx, d_gate, d_up, d_down, d_row_weight) where the MLP's output was row_weight * y."""
    g, u = x @ w_gate.T, x @ w_up.T
    dy = grad_y * row_weight[:, None]
    dg, du, a = swiglu_backward(g, u, dy @ w_down)
    d_row_weight = (grad_y * (a @ w_down.T)).sum(-1)
    dx = dg @ w_gate + du @ w_up
    return dx, dg.T @ x, du.T @ x, dy.T @ a, d_row_weight


def experts_backward(
    grad_out: torch.Tensor,  # (T, H)
    x: torch.Tensor,  # (T, H)
    topk_weights: torch.Tensor,  # (T, K)
    sorted_slot: torch.Tensor,  # (T*K,) int32 from the forward's routing metadata
    expert_offsets: torch.Tensor,  # (E+1,) int32
    weights: ExpertWeights,
    compute_dtype: torch.dtype = torch.float32,  # float64: the tests' oracle
) -> tuple[torch.Tensor, ...]:
    """Gradients of (x, topk_weights, gate_up_proj, down_proj, shared_gate, shared_up, shared_down),
    computed in `compute_dtype`, returned in the dtypes of the tensors they belong to."""
    T, K = topk_weights.shape
    I = weights.intermediate_dim
    grad = grad_out.to(compute_dtype)
    xf = x.to(compute_dtype)
    flat_weights = topk_weights.reshape(-1).to(compute_dtype)
    dx_slot = torch.zeros(T * K, x.shape[1], dtype=compute_dtype, device=x.device)
    d_topk = torch.zeros(T * K, dtype=compute_dtype, device=x.device)
    d_gate_up = torch.zeros_like(weights.gate_up_proj, dtype=compute_dtype)
    d_down = torch.zeros_like(weights.down_proj, dtype=compute_dtype)
    slots = sorted_slot.long()
    offsets = expert_offsets.tolist()  # host sync: acceptable in this reference-speed backward
    for expert in range(weights.num_experts):
        lo, hi = offsets[expert], offsets[expert + 1]
        if lo == hi:
            continue
        slot = slots[lo:hi]
        token = slot // K
        w = weights.gate_up_proj[expert].to(compute_dtype)
        dx, d_gate_up[expert, :I], d_gate_up[expert, I:], d_down[expert], d_topk[slot] = _mlp_backward(
            xf[token], w[:I], w[I:], weights.down_proj[expert].to(compute_dtype), grad[token], flat_weights[slot]
        )
        dx_slot[slot] = dx
    dx = dx_slot.view(T, K, x.shape[1]).sum(1)
    shared_grads = (None, None, None)
    if weights.has_shared:
        ones = torch.ones(T, dtype=compute_dtype, device=x.device)
        sw = (weights.shared_gate, weights.shared_up, weights.shared_down)
        dx_shared, *shared_grads, _ = _mlp_backward(xf, *(w.to(compute_dtype) for w in sw), grad, ones)
        dx += dx_shared
        shared_grads = tuple(g.to(w.dtype) for g, w in zip(shared_grads, sw))
    return (
        dx.to(x.dtype),
        d_topk.view(T, K).to(topk_weights.dtype),
        d_gate_up.to(weights.gate_up_proj.dtype),
        d_down.to(weights.down_proj.dtype),
        *shared_grads,
    )
