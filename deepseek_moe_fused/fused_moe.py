"""Checked entry points to the fused expert kernels, given a routing (weights and expert ids)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import FLOAT_DTYPES, check_tensor
from .kernels.launch import ExpertWeights, check_routing, gate_up_swiglu, moe_experts_forward, routing_metadata_for
from .routing_metadata import RoutingMetadata


class GateUpOutput(NamedTuple):
    h_routed: torch.Tensor  # (T*K, I) SwiGLU activations, rows in metadata's expert-sorted order
    h_shared: torch.Tensor | None  # (T, S) shared MLP activations; None without a shared expert
    metadata: RoutingMetadata  # how rows map to (token, slot)

    def routed_by_slot(self) -> torch.Tensor:
        """(T, K, I) routed activations in slot order (a gather; for inspection, not the hot path)."""
        T_times_K, I = self.h_routed.shape
        by_slot = self.h_routed[self.metadata.slot_to_row.long()]
        return by_slot.view(T_times_K // max(self.metadata.top_k, 1), self.metadata.top_k, I)


def _checked(x, topk_ids, gate_up_proj, down_proj, shared, topk_weights=None, validate_ids=True):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, contiguous_last=True)
    weights = ExpertWeights(gate_up_proj, down_proj, *shared)
    weights.check(x)
    check_routing(x, topk_weights, topk_ids, weights.num_experts, validate_ids)
    return weights


def fused_moe_experts(
    x: torch.Tensor,  # (T, H)
    topk_weights: torch.Tensor,  # (T, K) float
    topk_ids: torch.Tensor,  # (T, K) int32/int64 in [0, E)
    gate_up_proj: torch.Tensor,  # (E, 2I, H)
    down_proj: torch.Tensor,  # (E, H, I)
    shared_gate: torch.Tensor | None = None,  # (S, H)
    shared_up: torch.Tensor | None = None,  # (S, H)
    shared_down: torch.Tensor | None = None,  # (H, S)
    *,
    fuse_shared: bool = True,
    validate_ids: bool = True,
) -> torch.Tensor:
    """Routed experts + shared MLP for a given routing: (T, H) in x's dtype.

    out[t] = sum_k topk_weights[t, k] * expert_{ids[t, k]}(x[t]) + shared(x[t]), where each MLP
    is down(silu(gate(x)) * up(x)). Three launches: gate/up+SwiGLU for routed and shared rows
    together, down with the routing weight applied, and a fixed-order combine; at a few tokens
    two (the decode forward, kernels/launch_decode.py: no routing metadata, no combine).

    `validate_ids` reads the ids' range back to the host (a sync): pass False on a hot path whose
    ids are valid by construction. `fuse_shared=False` runs the shared MLP as separate launches.
    """
    weights = _checked(
        x, topk_ids, gate_up_proj, down_proj, (shared_gate, shared_up, shared_down), topk_weights, validate_ids
    )
    return moe_experts_forward(x, topk_weights, topk_ids, weights, fuse_shared=fuse_shared)


def fused_gate_up_swiglu(
    x: torch.Tensor,  # (T, H)
    topk_ids: torch.Tensor,  # (T, K)
    gate_up_proj: torch.Tensor,  # (E, 2I, H)
    shared_gate: torch.Tensor | None = None,  # (S, H)
    shared_up: torch.Tensor | None = None,  # (S, H)
    *,
    validate_ids: bool = True,
) -> GateUpOutput:
    """Stage 1 alone, the seed's "X loaded once" kernel: the routed experts' and the shared MLP's
    gate/up projections in one launch over the same X, SwiGLU applied before anything is stored."""
    weights = _checked(x, topk_ids, gate_up_proj, None, (shared_gate, shared_up, None), validate_ids=validate_ids)
    metadata = routing_metadata_for(topk_ids, weights)
    h_routed, h_shared = gate_up_swiglu(x, weights, metadata)
    return GateUpOutput(h_routed, h_shared, metadata)
