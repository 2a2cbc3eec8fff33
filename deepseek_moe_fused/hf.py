"""Drop-in for transformers' DeepSeek models (optional extra `[hf]`).

    from deepseek_moe_fused.hf import patch_model
    replaced = patch_model(model)   # every DeepseekV3MoE / DeepseekV2Moe now runs the fused kernels

The fused layers share the original parameters (no copy): training the patched model trains the
original weights, and `model.state_dict()` keeps its keys.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig
from .moe_layer import DeepSeekMoELayer

HF_MOE_CLASSES = ("DeepseekV3MoE", "DeepseekV2Moe")


def config_from_hf(hf_config, dtype: torch.dtype | None = None) -> MoEConfig:
    """MoEConfig from a transformers DeepseekV3Config or DeepseekV2Config."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise TypeError(f"hf_config must be a DeepseekV3Config or DeepseekV2Config, got model_type={model_type!r}")
    common = dict(
        hidden_dim=hf_config.hidden_size,
        intermediate_dim=hf_config.moe_intermediate_size,
        num_experts=hf_config.n_routed_experts,
        top_k=hf_config.num_experts_per_tok,
        n_shared_experts=hf_config.n_shared_experts or 0,
        routed_scaling_factor=float(hf_config.routed_scaling_factor),
        dtype=dtype
        or (hf_config.dtype if isinstance(getattr(hf_config, "dtype", None), torch.dtype) else torch.float32),
    )
    if model_type == "deepseek_v3":
        return MoEConfig(
            **common,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            n_group=hf_config.n_group or 1,
            topk_group=hf_config.topk_group or 1,
            norm_topk_prob=bool(hf_config.norm_topk_prob),
        )
    grouped = hf_config.topk_method == "group_limited_greedy"
    return MoEConfig(
        **common,
        scoring_func="softmax",
        topk_method=hf_config.topk_method,
        n_group=(hf_config.n_group or 1) if grouped else 1,
        topk_group=(hf_config.topk_group or 1) if grouped else 1,
        norm_topk_prob=False,  # transformers' DeepseekV2 router does not renormalise
    )


def layer_from_hf(module: nn.Module) -> DeepSeekMoELayer:
    """A DeepSeekMoELayer that shares `module`'s parameters (a DeepseekV3MoE or DeepseekV2Moe)."""
    if type(module).__name__ not in HF_MOE_CLASSES:
        raise TypeError(f"module must be one of {HF_MOE_CLASSES}, got {type(module).__name__}")
    weight = module.experts.gate_up_proj
    config = config_from_hf(module.config, dtype=weight.dtype)
    layer = DeepSeekMoELayer(config, device="meta")
    layer.gate.weight = module.gate.weight
    if config.scoring_func == "sigmoid":
        layer.gate.e_score_correction_bias = module.gate.e_score_correction_bias  # the same buffer tensor
    layer.experts.gate_up_proj = module.experts.gate_up_proj
    layer.experts.down_proj = module.experts.down_proj
    if layer.shared_experts is not None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.shared_experts, name, getattr(module.shared_experts, name))
    return layer


def patch_model(model: nn.Module) -> int:
    """Replace every DeepSeek MoE block of a transformers model in place; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ in HF_MOE_CLASSES]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer_from_hf(module))
    return len(targets)
