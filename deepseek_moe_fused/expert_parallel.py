"""Expert parallelism on torch.distributed: each rank of `ep_group` owns a contiguous shard of the
routed experts and a replica of the router and the shared MLP.

Forward: route locally; sort the (token, slot) rows by owning rank; exchange counts, then rows,
routing weights and local expert ids with `all_to_all_single` (variable splits); run the fused
kernels on the rows received (one slot each); send the weighted outputs back; add the K slots in
slot order and then the shared MLP, so the result does not depend on arrival order. Autograd runs
back through the same collectives (torch.distributed.nn.functional).

Shape legend: T=local tokens, K=top_k, H=hidden, R=rows received by this rank, W=ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from .kernels.launch import ExpertWeights


def expert_bounds(num_experts: int, world_size: int) -> list[int]:
    """Rank r owns experts [bounds[r], bounds[r+1]): contiguous, sizes differing by at most one."""
    return [r * num_experts // world_size for r in range(world_size + 1)]


def _exchange(tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
    if tensor.requires_grad:
        return dist_fn.all_to_all_single(out, tensor, recv_counts, send_counts, group=group)
    dist.all_to_all_single(out, tensor, recv_counts, send_counts, group=group)
    return out


def ep_moe_experts(
    x: torch.Tensor,  # (T, H) this rank's tokens
    topk_weights: torch.Tensor,  # (T, K)
    topk_ids: torch.Tensor,  # (T, K) global expert ids
    local: ExpertWeights,  # this rank's shard (E_local experts) and the shared MLP replica
    num_experts: int,  # E over all ranks
    group,
) -> torch.Tensor:
    """Routed experts across the group + the local shared MLP: (T, H) in x's dtype."""
    from .moe_layer import experts_autograd

    world = dist.get_world_size(group)
    T, K = topk_ids.shape
    bounds = torch.tensor(expert_bounds(num_experts, world), device=x.device)
    ids = topk_ids.reshape(-1)
    owner = torch.searchsorted(bounds[1:], ids, right=True)
    order = torch.argsort(owner, stable=True)  # slot rows grouped by destination rank, in slot order
    send_counts_t = torch.bincount(owner, minlength=world)
    recv_counts_t = torch.empty_like(send_counts_t)
    dist.all_to_all_single(recv_counts_t, send_counts_t, group=group)
    # Host sync: variable split sizes must be known on the host for the collective.
    send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()

    x_recv = _exchange(x[order // K], send_counts, recv_counts, group)
    w_recv = _exchange(topk_weights.reshape(-1)[order].contiguous(), send_counts, recv_counts, group)
    local_ids = _exchange((ids[order] - bounds[owner[order]]).contiguous(), send_counts, recv_counts, group)

    # Each received row is one slot: run it as a K=1 problem on the local experts, weight applied.
    routed_only = ExpertWeights(local.gate_up_proj, local.down_proj)
    y_recv = experts_autograd(x_recv, w_recv[:, None], local_ids[:, None], routed_only)
    y_sorted = _exchange(y_recv, recv_counts, send_counts, group)  # back to the senders, same order
    y_slots = torch.empty_like(y_sorted).index_copy(0, order, y_sorted).view(T, K, x.shape[1])
    out = y_slots.float().sum(dim=1)  # slot 0 first: the same order on every run
    if local.has_shared:
        no_routing = topk_ids[:, :0]
        shared = experts_autograd(x, topk_weights[:, :0], no_routing, local)
        out = out + shared.float()
    return out.to(x.dtype)
