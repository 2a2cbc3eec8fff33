"""`DeepSeekMoELayer`: router + routed experts + shared MLP, with the expert math in Triton."""

from __future__ import annotations

import math
from dataclasses import fields

import torch
from torch import nn

from ._backward_torch import experts_backward
from ._checks import check_tensor
from ._env import env_choice, env_set
from ._interpret import interpreter_active
from .config import MoEConfig
from .kernels.launch import (
    ExpertWeights,
    PreActivations,
    moe_experts_forward,
    new_preactivations,
    routing_metadata_for,
    runs_decode,
    tiles_for,
)
from .kernels.launch_backward import moe_experts_backward
from .router import DeepSeekRouter

# "triton" (default): the Triton backward kernels (kernels/_backward.py), from the forward's saved
# pre-activations. "torch": the fp32 PyTorch backward, one expert at a time (the reference; it
# recomputes instead, so it also allows a second backward through one forward).
BACKWARD_ENV = "DEEPSEEK_MOE_BACKWARD"
BACKWARDS = ("torch", "triton")


def selected_backward() -> str:
    return env_choice(BACKWARD_ENV, BACKWARDS, "triton")


def backward_selected(name: str):
    """Run forwards with this backward (the layer reads the choice at forward time); the
    environment is restored afterwards."""
    return env_set(BACKWARD_ENV, name)


# Every PreActivations field goes through save_for_backward, in field order (None where absent).
_PREACT_FIELDS = tuple(f.name for f in fields(PreActivations))


def _preact_tensors(preacts: PreActivations) -> tuple[torch.Tensor | None, ...]:
    return tuple(getattr(preacts, name) for name in _PREACT_FIELDS)


class FusedMoEExpertsFunction(torch.autograd.Function):
    """Autograd boundary around the three expert kernels; the router stays in plain autograd, so
    the gradient reaches the router weight through `topk_weights`."""

    @staticmethod
    def forward(
        ctx, will_backward, x, topk_weights, topk_ids, gate_up_proj, down_proj, shared_gate, shared_up, shared_down
    ):
        weights = ExpertWeights(gate_up_proj, down_proj, shared_gate, shared_up, shared_down)
        tiles = tiles_for(x.shape[0], weights, topk_ids.shape[1])  # once: the metadata, buffers and kernels follow it
        ctx.backward = selected_backward()  # read at forward time: one choice per step
        # The Triton backward starts from stage 1's pre-activations, which the forward kernel
        # writes beside its output only when a backward can follow (see experts_autograd).
        save = ctx.backward == "triton" and will_backward
        # Either backward reads the metadata; a forward that none follows may skip building it.
        metadata = None if runs_decode(tiles) and not will_backward else routing_metadata_for(topk_ids, weights, tiles)
        preacts = new_preactivations(x, weights, metadata, tiles) if save else None
        out = moe_experts_forward(x, topk_weights, topk_ids, weights, metadata, preacts=preacts, tiles=tiles)
        # The metadata is neither an input nor an output: it is kept on ctx as autograd allows
        # for intermediates; tensors go through save_for_backward.
        ctx.routing = metadata  # (ctx.metadata is taken: autograd keeps anomaly data there)
        ctx.preacts_consumed = False
        saved_preacts = _preact_tensors(preacts) if save else (None,) * len(_PREACT_FIELDS)
        ctx.save_for_backward(
            x, topk_weights, gate_up_proj, down_proj, shared_gate, shared_up, shared_down, *saved_preacts
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # unpacked once: each read of the property checks every tensor again
        num_preacts = len(_PREACT_FIELDS)
        x, topk_weights, *weight_tensors = saved[:-num_preacts]
        weights, metadata = ExpertWeights(*weight_tensors), ctx.routing
        if ctx.backward == "triton":
            if ctx.preacts_consumed:  # the first backward overwrote them with their gradients
                raise RuntimeError(
                    f"the fused MoE layer's Triton backward can run once per forward (retain_graph=True "
                    f"and a second backward need {BACKWARD_ENV}=torch)"
                )
            ctx.preacts_consumed = True
            preacts = PreActivations(*saved[-num_preacts:])
            grads = moe_experts_backward(grad_out, x, topk_weights, weights, metadata, preacts)
        else:
            grads = experts_backward(grad_out, x, topk_weights, metadata.sorted_slot, metadata.expert_offsets, weights)
        dx, d_topk, *d_weights = grads
        return (None, dx, d_topk, None, *d_weights)


def experts_autograd(x, topk_weights, topk_ids, weights: ExpertWeights) -> torch.Tensor:
    """The fused experts as an autograd op. Inside `Function.forward` grad mode is always off and
    `needs_input_grad` ignores no_grad, so whether a backward can follow is decided here: only
    then does the forward save its pre-activations."""
    tensors = (x, topk_weights, weights.gate_up_proj, weights.down_proj, weights.shared_gate, weights.shared_up,
               weights.shared_down)  # fmt: skip
    will_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return FusedMoEExpertsFunction.apply(
        will_backward, x, topk_weights, topk_ids, weights.gate_up_proj, weights.down_proj,
        weights.shared_gate, weights.shared_up, weights.shared_down,
    )  # fmt: skip


class RoutedExperts(nn.Module):
    """``experts``: the routed experts' weights as two 3-D parameters (transformers' layout).

    With expert parallelism it holds experts [first, first + count) only; loading a state_dict
    with all E experts keeps that slice."""

    def __init__(self, config: MoEConfig, device=None, dtype=None, first: int = 0, count: int | None = None):
        super().__init__()
        H, I = config.hidden_dim, config.intermediate_dim
        self.num_experts_total = config.num_experts
        self.first = first
        count = config.num_experts if count is None else count
        factory = {"device": device, "dtype": dtype or config.dtype}
        self.gate_up_proj = nn.Parameter(torch.empty(count, 2 * I, H, **factory))  # gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(count, H, I, **factory))
        self._register_load_state_dict_pre_hook(self._keep_local_shard)
        self.reset_parameters()

    def _keep_local_shard(self, state_dict, prefix, *args, **kwargs):
        count = self.gate_up_proj.shape[0]
        for name in ("gate_up_proj", "down_proj"):
            full = state_dict.get(prefix + name)
            if full is not None and full.shape[0] == self.num_experts_total != count:
                state_dict[prefix + name] = full[self.first : self.first + count]

    def reset_parameters(self) -> None:
        # nn.Linear's default init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for weight in (self.gate_up_proj, self.down_proj):
            bound = 1 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)


class SharedExpertMLP(nn.Module):
    """``shared_experts``: the shared experts fused into one SwiGLU MLP of width S = I * n_shared."""

    def __init__(self, config: MoEConfig, device=None, dtype=None):
        super().__init__()
        H, S = config.hidden_dim, config.shared_intermediate_dim
        factory = {"bias": False, "device": device, "dtype": dtype or config.dtype}
        self.gate_proj = nn.Linear(H, S, **factory)
        self.up_proj = nn.Linear(H, S, **factory)
        self.down_proj = nn.Linear(S, H, **factory)


class DeepSeekMoELayer(nn.Module):
    """A DeepSeek MoE block equal to transformers' ``DeepseekV3MoE`` / ``DeepseekV2Moe``.

    Parameter names match transformers (``gate.weight``, ``gate.e_score_correction_bias``,
    ``experts.gate_up_proj``, ``experts.down_proj``, ``shared_experts.{gate,up,down}_proj.weight``),
    so their state_dict loads directly. The forward makes no host synchronisation.
    """

    def __init__(self, config: MoEConfig, device=None, dtype=None, ep_group=None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.ep_group = ep_group  # torch.distributed group sharding the routed experts; None = all here
        first, count = 0, config.num_experts
        if ep_group is not None:
            import torch.distributed as dist

            from .expert_parallel import expert_bounds

            bounds = expert_bounds(config.num_experts, dist.get_world_size(ep_group))
            rank = dist.get_rank(ep_group)
            first, count = bounds[rank], bounds[rank + 1] - bounds[rank]
        self.gate = DeepSeekRouter(config, device=device, dtype=dtype)
        self.experts = RoutedExperts(config, device=device, dtype=dtype, first=first, count=count)
        self.shared_experts = SharedExpertMLP(config, device, dtype) if config.n_shared_experts else None

    @classmethod
    def from_hf(cls, module: nn.Module) -> DeepSeekMoELayer:
        """From a transformers DeepseekV3MoE / DeepseekV2Moe, sharing its parameters (no copy)."""
        from .hf import layer_from_hf

        return layer_from_hf(module)

    def expert_weights(self) -> ExpertWeights:
        shared = self.shared_experts
        return ExpertWeights(
            self.experts.gate_up_proj,
            self.experts.down_proj,
            *(
                (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
                if shared is not None
                else (None, None, None)
            ),
        )

    def forward(self, x: torch.Tensor, return_router_logits: bool = False):
        """x (..., H) -> out (..., H) in x's dtype; with `return_router_logits`, also (T, E) fp32 logits."""
        weights = self.expert_weights()
        param = weights.gate_up_proj
        check_tensor("x", x, dtypes=(param.dtype,))
        if x.dim() < 1 or x.shape[-1] != self.config.hidden_dim:
            raise ValueError(f"x must have shape (..., {self.config.hidden_dim}), got {tuple(x.shape)}")
        if x.device != param.device:
            raise ValueError(f"x is on {x.device} but the layer's parameters are on {param.device}")
        if x.device.type == "cpu" and not interpreter_active():
            raise ValueError(
                "x is on the CPU: the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set "
                "before triton is imported to run them in the interpreter"
            )
        orig_shape = x.shape
        x2d = x.reshape(-1, self.config.hidden_dim)
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        router_logits, topk_weights, topk_ids = self.gate(x2d)
        if self.ep_group is not None:  # every rank joins the collectives, with or without tokens
            from .expert_parallel import ep_moe_experts

            out = ep_moe_experts(x2d, topk_weights, topk_ids, weights, self.config.num_experts, self.ep_group)
        else:
            out = experts_autograd(x2d, topk_weights, topk_ids, weights)
        out = out.view(orig_shape)
        return (out, router_logits) if return_router_logits else out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"H={c.hidden_dim}, I={c.intermediate_dim}, E={c.num_experts}, top_k={c.top_k}, "
            f"shared={c.n_shared_experts}, scoring={c.scoring_func}/{c.topk_method}"
        )
