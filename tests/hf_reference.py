"""transformers' own DeepSeek MoE modules, built to match a MoEConfig (tests skip without it)."""

from __future__ import annotations

import pytest

from deepseek_moe_fused import MoEConfig


def transformers_modeling():
    """(modeling_deepseek_v2, modeling_deepseek_v3), or a loud skip when transformers is absent."""
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -e .[hf]")
    from transformers.models.deepseek_v2 import modeling_deepseek_v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    return modeling_deepseek_v2, modeling_deepseek_v3


def hf_config(config: MoEConfig):
    """A transformers DeepseekV3Config (sigmoid routing) or DeepseekV2Config (softmax) for `config`."""
    v2, v3 = transformers_modeling()
    common = dict(
        hidden_size=config.hidden_dim,
        moe_intermediate_size=config.intermediate_dim,
        n_routed_experts=config.num_experts,
        num_experts_per_tok=config.top_k,
        n_shared_experts=config.n_shared_experts,
        n_group=config.n_group,
        topk_group=config.topk_group,
        routed_scaling_factor=config.routed_scaling_factor,
        norm_topk_prob=config.norm_topk_prob,
        hidden_act="silu",
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    if config.scoring_func == "sigmoid":
        return v3.DeepseekV3Config(**common)
    return v2.DeepseekV2Config(topk_method=config.topk_method, **common)


def hf_moe_block(config: MoEConfig):
    """transformers' DeepseekV3MoE or DeepseekV2Moe for `config` (random weights, config dtype)."""
    v2, v3 = transformers_modeling()
    hf = hf_config(config)
    block = v3.DeepseekV3MoE(hf) if config.scoring_func == "sigmoid" else v2.DeepseekV2Moe(hf)
    return block.to(config.dtype)


def hf_router(config: MoEConfig):
    v2, v3 = transformers_modeling()
    hf = hf_config(config)
    return v3.DeepseekV3TopkRouter(hf) if config.scoring_func == "sigmoid" else v2.DeepseekV2TopkRouter(hf)
