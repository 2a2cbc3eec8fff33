"""Independent references: the seed's naive per-expert loop, a float64 oracle, and a torch twin
of the routing metadata. None of them shares code with the kernels or their launchers.

Shape legend: T=tokens, E=experts, K=top_k, H=hidden, I=intermediate, S=shared intermediate.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from .config import MoEConfig
from .routing_metadata import PAD_EXPERT, RoutingMetadata


def _mlp(x, gate, up, down, activation=F.silu):
    """down(silu(gate(x)) * up(x)) with torch Linear layouts: gate/up (I, H), down (H, I)."""
    return F.linear(activation(F.linear(x, gate)) * F.linear(x, up), down)


def naive_moe_experts(
    x: torch.Tensor,  # (T, H)
    topk_weights: torch.Tensor,  # (T, K)
    topk_ids: torch.Tensor,  # (T, K)
    gate_up_proj: torch.Tensor,  # (E, 2I, H)
    down_proj: torch.Tensor,  # (E, H, I)
    shared_gate: torch.Tensor | None = None,  # (S, H)
    shared_up: torch.Tensor | None = None,
    shared_down: torch.Tensor | None = None,  # (H, S)
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The seed's baseline: a PyTorch loop over the experts hit (a host sync each), reading X once
    for the routed experts and again for the shared one. Computes in x's dtype unless
    `compute_dtype` is given (weights are upcast one expert at a time, so memory stays small)."""
    dtype = compute_dtype or x.dtype
    T, H = x.shape
    I = gate_up_proj.shape[1] // 2
    xc = x.to(dtype)
    out = torch.zeros(T, H, dtype=torch.float32 if compute_dtype is None else dtype, device=x.device)
    for expert in topk_ids.unique().tolist():
        token, slot = torch.where(topk_ids == expert)
        w = gate_up_proj[expert].to(dtype)
        y = _mlp(xc[token], w[:I], w[I:], down_proj[expert].to(dtype))
        out.index_add_(0, token, (y * topk_weights[token, slot, None].to(dtype)).to(out.dtype))
    if shared_gate is not None:
        out += _mlp(xc, *(w.to(dtype) for w in (shared_gate, shared_up, shared_down))).to(out.dtype)
    return out.to(compute_dtype or x.dtype)


def oracle_moe_experts(
    x: torch.Tensor,  # (T, H)
    topk_weights: torch.Tensor,  # (T, K)
    topk_ids: torch.Tensor,  # (T, K)
    gate_up_proj: torch.Tensor,  # (E, 2I, H)
    down_proj: torch.Tensor,  # (E, H, I)
    *shared: torch.Tensor | None,  # shared gate (S, H), up (S, H), down (H, S), or nothing
) -> torch.Tensor:
    """The same function in float64 on x's device, the ground truth for tests: every expert runs
    densely over all tokens and a (T, E) routing-weight matrix picks the result, so it shares no
    gather, sort or index_add with the kernels or with the naive loop. Returns float64 (T, H).
    (Dense float64 over all experts is E times the routed work: on a GPU tier's shapes the CPU
    took minutes per test; a GPU's float64 is IEEE too.)"""
    return _dense_oracle(x, topk_weights, topk_ids, gate_up_proj, down_proj, *shared)


def oracle_grouped_weight_grad(
    a: torch.Tensor,  # (R, P) rows sorted by expert
    b: torch.Tensor,  # (R, Q) the same rows
    expert_offsets: torch.Tensor,  # (E+1,) each expert's first row, then R
) -> torch.Tensor:
    """float64 (E, P, Q): a_e^T b_e over each expert's rows, the weight gradients' ground truth."""
    bounds = expert_offsets.tolist()
    return torch.stack([a[lo:hi].double().T @ b[lo:hi].double() for lo, hi in itertools.pairwise(bounds)])


def oracle_magnitude(x, topk_weights, topk_ids, gate_up_proj, down_proj, *shared) -> torch.Tensor:
    """`oracle_moe_experts` (same arguments) over absolute values, with |g| for silu(g)
    (|silu(g)| <= |g|): a bound on the size of the terms each output sums. Rounding error scales
    with it, not with the output, so `norm(magnitude) / norm(output)` says how much cancellation a
    problem has. Float64 (T, H)."""
    absolute = [t.abs() if t is not None else None for t in (x, topk_weights, gate_up_proj, down_proj, *shared)]
    x, topk_weights, gate_up_proj, down_proj, *shared = absolute
    return _dense_oracle(x, topk_weights, topk_ids, gate_up_proj, down_proj, *shared, activation=torch.abs)


def _dense_oracle(x, topk_weights, topk_ids, gate_up_proj, down_proj, *shared, activation=F.silu):
    f64 = {"dtype": torch.float64, "device": x.device}
    x, gate_up_proj, down_proj = (t.to(**f64) for t in (x, gate_up_proj, down_proj))
    E, I = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    T, _K = topk_ids.shape
    # dense_weights[t, e] = sum_k weight[t, k] * (ids[t, k] == e): repeated ids add up.
    dense_weights = torch.zeros(T, E, **f64)
    dense_weights.scatter_add_(1, topk_ids.to(x.device).long(), topk_weights.to(**f64))
    out = torch.zeros(T, x.shape[1], **f64)
    for expert in range(E):
        w = gate_up_proj[expert]
        out += dense_weights[:, expert, None] * _mlp(x, w[:I], w[I:], down_proj[expert], activation)
    if shared and shared[0] is not None:
        out += _mlp(x, *(t.to(**f64) for t in shared), activation)
    return out


def oracle_topk_weights(router_logits: torch.Tensor, topk_ids: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """float64 routing weights of the experts the router chose: checks the weights independently
    of the selection, which near-ties make precision-dependent."""
    logits = router_logits.to(torch.float64)
    ids = topk_ids.long().to(logits.device)
    if config.scoring_func == "sigmoid":
        weights = torch.sigmoid(logits).gather(1, ids)
    else:
        weights = torch.softmax(logits, dim=-1).gather(1, ids)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * config.routed_scaling_factor


def routing_metadata_twin(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> RoutingMetadata:
    """The routing metadata built by plain Python loops, for exact comparison."""
    ids = topk_ids.reshape(-1).tolist()
    rows_of = [[slot for slot, e in enumerate(ids) if e == expert] for expert in range(num_experts)]
    sorted_slot = [slot for rows in rows_of for slot in rows]
    slot_to_row = [0] * len(ids)
    for row, slot in enumerate(sorted_slot):
        slot_to_row[slot] = row
    offsets, tile_expert, tile_row_start = [0], [], []
    for expert, rows in enumerate(rows_of):
        for start in range(0, len(rows), block_m):
            tile_expert.append(expert)
            tile_row_start.append(offsets[-1] + start)
        offsets.append(offsets[-1] + len(rows))
    max_tiles = len(ids) // block_m + min(num_experts, len(ids))
    padding = max_tiles - len(tile_expert)
    tile_expert += [PAD_EXPERT] * padding
    tile_row_start += [len(ids)] * padding

    def int32(values):
        return torch.tensor(values, dtype=torch.int32, device=topk_ids.device)

    return RoutingMetadata(
        num_experts=num_experts,
        top_k=topk_ids.shape[1],
        block_m=block_m,
        sorted_slot=int32(sorted_slot),
        slot_to_row=int32(slot_to_row),
        expert_offsets=int32(offsets),
        tile_expert=int32(tile_expert),
        tile_row_start=int32(tile_row_start),
    )


def oracle_select_experts(
    router_logits: torch.Tensor,  # (T, E)
    config: MoEConfig,
    e_score_correction_bias: torch.Tensor | None = None,  # (E,)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DeepSeek routing rule written token by token in float64 Python, from the papers' text
    rather than from transformers' tensor code. Returns (weights (T, K) float64, ids (T, K) int64)
    with each token's ids in descending score order. Ties break towards the lower expert id."""
    E, K, G = config.num_experts, config.top_k, config.n_group
    per_group = E // G
    logits = router_logits.detach().to(torch.float64).cpu().tolist()
    bias = [0.0] * E if e_score_correction_bias is None else e_score_correction_bias.double().cpu().tolist()
    all_weights, all_ids = [], []
    for row in logits:
        if config.scoring_func == "sigmoid":
            scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
            choice = [s + b for s, b in zip(scores, bias)]
        else:
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            scores = [v / sum(exps) for v in exps]
            choice = list(scores)
        allowed = set(range(E))
        if config.grouped:
            groups = [choice[g * per_group : (g + 1) * per_group] for g in range(G)]
            if config.scoring_func == "sigmoid":
                group_score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
            else:
                group_score = [max(g) for g in groups]
            kept = sorted(range(G), key=lambda g: (-group_score[g], g))[: config.topk_group]
            allowed = {e for g in kept for e in range(g * per_group, (g + 1) * per_group)}
        ranked = sorted(allowed, key=lambda e: (-choice[e], e))[:K]
        weights = [scores[e] for e in ranked]
        if config.norm_topk_prob:
            total = sum(weights) + 1e-20
            weights = [w / total for w in weights]
        all_weights.append([w * config.routed_scaling_factor for w in weights])
        all_ids.append(ranked)
    T = len(logits)
    return (
        torch.tensor(all_weights, dtype=torch.float64).view(T, K),
        torch.tensor(all_ids, dtype=torch.int64).view(T, K),
    )
