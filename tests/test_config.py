import pytest
import torch

from deepseek_moe_fused import PRESETS, MoEConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_sized(name):
    config = MoEConfig.from_preset(name)
    routed, shared = config.weight_bytes()
    assert routed == config.num_experts * 3 * config.hidden_dim * config.intermediate_dim * 2
    assert shared == config.n_shared_experts * 3 * config.hidden_dim * config.intermediate_dim * 2


def test_published_values():
    v3 = PRESETS["deepseek-v3"]
    assert (v3.hidden_dim, v3.intermediate_dim, v3.num_experts, v3.top_k) == (7168, 2048, 256, 8)
    assert (v3.n_group, v3.topk_group, v3.routed_scaling_factor, v3.norm_topk_prob) == (8, 4, 2.5, True)
    lite = PRESETS["deepseek-v2-lite"]
    assert (lite.hidden_dim, lite.intermediate_dim, lite.num_experts, lite.top_k, lite.n_shared_experts) == (
        2048, 1408, 64, 6, 2,
    )  # fmt: skip
    seed = PRESETS["seed"]
    assert (seed.hidden_dim, seed.intermediate_dim, seed.num_experts, seed.top_k) == (2048, 2048, 8, 2)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"top_k": 9}, ValueError, "top_k"),  # more choices than experts
        ({"num_experts": 6, "n_group": 4, "topk_method": "group_limited_greedy"}, ValueError, "divisible"),
        ({"n_group": 2, "topk_group": 3, "topk_method": "group_limited_greedy"}, ValueError, "topk_group"),
        ({"n_group": 2}, ValueError, "greedy"),  # groups given but not used
        ({"scoring_func": "relu"}, ValueError, "scoring_func"),
        ({"scoring_func": "sigmoid"}, ValueError, "topk_method"),  # sigmoid needs noaux_tc
        ({"hidden_dim": 0}, ValueError, "hidden_dim"),
        ({"hidden_dim": 2.0}, TypeError, "hidden_dim"),
        ({"n_shared_experts": -1}, ValueError, "n_shared_experts"),
        ({"dtype": torch.int8}, TypeError, "dtype"),
        # 8 experts in 4 groups, 1 group kept -> only 2 candidates for top_k=3
        ({"top_k": 3, "n_group": 4, "topk_group": 1, "topk_method": "group_limited_greedy"}, ValueError, "kept groups"),
    ],
)
def test_invalid_configs_raise(changes, error, match):
    with pytest.raises(error, match=match):
        PRESETS["seed"].replace(**changes)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        MoEConfig.from_preset("gpt-5")
