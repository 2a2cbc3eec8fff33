"""Baselines the benchmark times the fused kernels against (besides `reference.naive_moe_experts`).

Shape legend: T=tokens, E=experts, K=top_k, H=hidden, I=intermediate, S=shared intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels.launch import ExpertWeights


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_mm_moe_experts(
    x: torch.Tensor,  # (T, H)
    topk_weights: torch.Tensor,  # (T, K)
    topk_ids: torch.Tensor,  # (T, K)
    weights: ExpertWeights,
) -> torch.Tensor:
    """The usual PyTorch pipeline: sort slots by expert, gather X, torch._grouped_mm for gate/up,
    SwiGLU, torch._grouped_mm for down, scale, un-permute, sum the K slots, add the shared MLP
    computed by separate GEMMs. No host sync; writes every intermediate to memory."""
    T, K = topk_ids.shape
    E, I = weights.num_experts, weights.intermediate_dim
    ids = topk_ids.reshape(-1)
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, ids, torch.ones_like(ids, dtype=torch.int32)
    )
    offs = counts.cumsum(0, dtype=torch.int32)
    x_sorted = x[order // K]
    gate_up = torch._grouped_mm(x_sorted, weights.gate_up_proj.transpose(1, 2), offs=offs)
    h = F.silu(gate_up[:, :I]) * gate_up[:, I:]
    y_sorted = torch._grouped_mm(h, weights.down_proj.transpose(1, 2), offs=offs)
    y_sorted = y_sorted * topk_weights.reshape(-1)[order, None].to(y_sorted.dtype)
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    out = y.view(T, K, -1).sum(1)
    if weights.has_shared:
        out = out + F.linear(
            F.silu(F.linear(x, weights.shared_gate)) * F.linear(x, weights.shared_up), weights.shared_down
        )
    return out
