"""DeepSeek router: fp32 logits -> (top-k weights, top-k expert ids), as transformers computes it."""

from __future__ import annotations

import torch
from torch import nn

from ._env import env_choice, env_set
from ._interpret import interpreter_active
from .config import MoEConfig

# "triton" (default): one or two kernels (kernels/_router.py) compute the logits and select the
# experts. "torch": transformers' own op sequence (`select_experts`), ties broken exactly as there.
ROUTER_ENV = "DEEPSEEK_MOE_ROUTER"
ROUTERS = ("torch", "triton")


def selected_router() -> str:
    return env_choice(ROUTER_ENV, ROUTERS, "triton")


def router_selected(name: str):
    """Route with this implementation inside the block (read per call); restored afterwards."""
    return env_set(ROUTER_ENV, name)


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
    scores = _weight_scores(router_logits, config)
    if config.scoring_func == "sigmoid":
        choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias
        choice = choice.detach()
        # Group score = sum of the two best (biased) scores in the group; a one-expert group has one.
        best = min(2, E // G)
        group_scores = choice.view(T, G, E // G).topk(best, dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~_kept_experts(group_scores, config), float("-inf"))
        topk_ids = torch.topk(choice, k=config.top_k, dim=-1, sorted=False)[1]
    else:  # transformers takes topk's values; gathering them at its ids gives the same numbers
        topk_ids = torch.topk(scores, k=config.top_k, dim=-1, sorted=False)[1]
    return _weights_at(scores, topk_ids, config), topk_ids


def _weight_scores(router_logits: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """(T, E) fp32 scores whose entries at the chosen experts are their routing weights before
    renormalisation: the sigmoid, or the softmax with dropped groups' scores zeroed (not -inf),
    as transformers does."""
    if config.scoring_func == "sigmoid":
        return router_logits.sigmoid()
    scores = router_logits.softmax(dim=-1, dtype=torch.float32)
    if config.grouped:
        T, E, G = scores.shape[0], config.num_experts, config.n_group
        group_scores = scores.detach().view(T, G, E // G).max(dim=-1).values
        scores = scores.masked_fill(~_kept_experts(group_scores, config), 0.0)
    return scores


def _weights_at(scores: torch.Tensor, topk_ids: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """(T, K) routing weights: the chosen scores, renormalised if configured, scaled."""
    weights = scores.gather(1, topk_ids)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * config.routed_scaling_factor


class TritonRouterFunction(torch.autograd.Function):
    """Autograd boundary around the router kernels. Backward in Triton (kernels/_router_backward.py,
    fp32): through the routing weights and the returned logits to the logits, then to x and the
    router weight; `_weights_at(_weight_scores(logits))` is the function it differentiates."""

    @staticmethod
    def forward(ctx, x, weight, e_score_correction_bias, config):
        from .kernels.launch_router import route_tokens

        logits, topk_weights, topk_ids = route_tokens(x, weight, e_score_correction_bias, config)
        ctx.config = config
        ctx.save_for_backward(x, weight, logits, topk_ids)
        ctx.mark_non_differentiable(topk_ids)
        return logits, topk_weights, topk_ids

    @staticmethod
    def backward(ctx, grad_logits, grad_weights, _grad_ids):
        from .kernels.launch_router import router_backward

        x, weight, logits, topk_ids = ctx.saved_tensors
        # autograd passes zeros for an output without a gradient (materialized grads): no None here.
        dx, dweight = router_backward(
            x, weight, logits, topk_ids, grad_logits, grad_weights, ctx.config, *ctx.needs_input_grad[:2]
        )
        return dx, dweight, None, None


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
        """x (T, H) -> router_logits (T, E) fp32, topk_weights (T, K) fp32, topk_ids (T, K) int64.

        The Triton router unless DEEPSEEK_MOE_ROUTER=torch (read per call) or x is on the CPU with
        the interpreter off; both apply the same rule to fp32 logits, so they differ only where two
        choices tie to within fp32 rounding (and on exact ties, which the Triton router breaks
        towards the lower expert id)."""
        if selected_router() == "triton" and (x.is_cuda or interpreter_active()):
            return TritonRouterFunction.apply(x, self.weight, self.e_score_correction_bias, self.config)
        router_logits = nn.functional.linear(x.float(), self.weight.float())
        topk_weights, topk_ids = select_experts(router_logits, self.config, self.e_score_correction_bias)
        return router_logits, topk_weights, topk_ids
