"""DeepSeek router: fp32 logits -> (top-k weights, top-k expert ids), as transformers computes it."""

from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig


def select_experts(
    router_logits: torch.Tensor,  # (T, E) fp32
    config: MoEConfig,
    e_score_correction_bias: torch.Tensor | None = None,  # (E,) fp32, sigmoid scoring only
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing weights (T, K) fp32 and expert ids (T, K) int64 from router logits.

    Mirrors transformers' ``DeepseekV3TopkRouter`` (sigmoid) and ``DeepseekV2TopkRouter`` (softmax)
    op for op, so that ties break the same way. Differentiable in the weights; ids carry no gradient.
    """
    T, E = router_logits.shape
    G = config.n_group
    if config.scoring_func == "sigmoid":
        scores = router_logits.sigmoid()
        choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias
        choice = choice.detach()
        # Group score = sum of the two best (biased) scores in the group; a one-expert group has one.
        best = min(2, E // G)
        group_scores = choice.view(T, G, E // G).topk(best, dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~_kept_experts(group_scores, config), float("-inf"))
        topk_ids = torch.topk(choice, k=config.top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_ids)
        if config.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        scores = router_logits.softmax(dim=-1, dtype=torch.float32)
        if config.grouped:
            group_scores = scores.detach().view(T, G, E // G).max(dim=-1).values
            # transformers zeroes (not -inf) the dropped groups' scores for softmax routing.
            scores = scores.masked_fill(~_kept_experts(group_scores, config), 0.0)
        topk_weights, topk_ids = torch.topk(scores, k=config.top_k, dim=-1, sorted=False)
        if config.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * config.routed_scaling_factor, topk_ids


def _kept_experts(group_scores: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """(T, E) bool: experts inside each token's best `topk_group` groups."""
    T, G = group_scores.shape
    group_idx = torch.topk(group_scores, k=config.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    per_group = config.num_experts // G
    return group_mask.unsqueeze(-1).expand(T, G, per_group).reshape(T, config.num_experts).bool()


class DeepSeekRouter(nn.Module):
    """The ``gate`` of a DeepSeek MoE block: ``weight`` (E, H) and, for sigmoid scoring, the
    ``e_score_correction_bias`` buffer (E,) fp32, named as in transformers."""

    def __init__(self, config: MoEConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        E, H = config.num_experts, config.hidden_dim
        self.weight = nn.Parameter(torch.empty(E, H, device=device, dtype=dtype or config.dtype))
        if config.scoring_func == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(E, device=device, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.config.hidden_dim**-0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, H) -> router_logits (T, E) fp32, topk_weights (T, K) fp32, topk_ids (T, K) int64."""
        router_logits = nn.functional.linear(x.float(), self.weight.float())
        topk_weights, topk_ids = select_experts(router_logits, self.config, self.e_score_correction_bias)
        return router_logits, topk_weights, topk_ids
