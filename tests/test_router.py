"""The router against an independent float64 oracle and against transformers' routers."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import moe_configs, seeds

from deepseek_moe_fused import select_experts
from deepseek_moe_fused.reference import oracle_select_experts


def _separated_logits(T, E, seed):
    """Logits whose (biased) scores, group scores and top-k are far from ties at fp32 precision.
    Not symmetric about 0: sigmoid(-v) + sigmoid(v) = 1, so two groups holding a pair (-v, v) each
    would tie on their group score (found by fuzzing: E=4, 2 groups)."""
    g = torch.Generator().manual_seed(seed)
    spaced = torch.linspace(-3.9, 4.3, E, dtype=torch.float64)
    return torch.stack([spaced[torch.randperm(E, generator=g)] for _ in range(T)]).float()


@given(config=moe_configs(), T=st.integers(1, 9), seed=seeds)
def test_router_matches_float64_oracle(config, T, seed):
    logits = _separated_logits(T, config.num_experts, seed)
    bias = None
    if config.scoring_func == "sigmoid":
        # Coarse steps keep biased scores apart; the bias must change the choice, not the weights.
        bias = torch.randint(-2, 3, (config.num_experts,), generator=torch.Generator().manual_seed(seed)) * 0.05
    weights, ids = select_experts(logits, config, bias)
    ref_weights, ref_ids = oracle_select_experts(logits, config, bias)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    # Order within the K slots is unspecified (topk sorted=False): compare the sets, aligned.
    ids_sorted, perm = ids.sort(dim=-1)
    ref_sorted, ref_perm = ref_ids.sort(dim=-1)
    assert torch.equal(ids_sorted, ref_sorted)
    torch.testing.assert_close(weights.gather(1, perm).double(), ref_weights.gather(1, ref_perm), rtol=1e-6, atol=1e-7)


def test_router_bias_changes_choice_not_weight():
    from deepseek_moe_fused import PRESETS

    config = PRESETS["deepseek-v3"].replace(num_experts=8, n_group=2, topk_group=2, top_k=2)
    logits = torch.tensor([[4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0])
    weights, ids = select_experts(logits, config, bias)
    assert sorted(ids[0].tolist()) == [0, 7]
    sig = torch.sigmoid(logits[0, [0, 7]])
    expected = sig / sig.sum() * config.routed_scaling_factor
    torch.testing.assert_close(weights[0].sort().values, expected.sort().values)


@given(config=moe_configs(dtypes=[torch.float32]), T=st.integers(1, 9), seed=seeds, tied=st.booleans())
def test_router_equals_transformers(config, T, seed, tied):
    """Same ops as transformers' routers, so the result is identical, ties included."""
    from hf_reference import hf_router

    # transformers takes the top-2 scores of each group, so it needs groups of two experts or more.
    assume(config.scoring_func != "sigmoid" or config.num_experts // config.n_group >= 2)
    # transformers' DeepseekV2 router ignores norm_topk_prob (DeepSeek's own V2 code applies it).
    assume(config.scoring_func == "sigmoid" or not config.norm_topk_prob)
    router = hf_router(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.normal_(generator=g)
        if config.scoring_func == "sigmoid":
            router.e_score_correction_bias.copy_(torch.randn(config.num_experts, generator=g) * 0.1)
    x = torch.randn(T, config.hidden_dim, generator=g)
    if tied:  # whole-number logits make many exact ties
        with torch.no_grad():
            router.weight.copy_(router.weight.round())
        x = x.round()
    hf_logits, hf_weights, hf_ids = router(x)
    bias = router.e_score_correction_bias if config.scoring_func == "sigmoid" else None
    logits = torch.nn.functional.linear(x.float(), router.weight.float())
    weights, ids = select_experts(logits, config, bias)
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=0)
    torch.testing.assert_close(ids, hf_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, hf_weights, rtol=0, atol=0)


def test_router_weights_carry_gradient_to_logits():
    from deepseek_moe_fused import PRESETS

    g = torch.Generator().manual_seed(0)
    for name in ("deepseek-v3", "deepseek-v2", "seed"):
        config = PRESETS[name]
        logits = torch.randn(3, config.num_experts, generator=g).requires_grad_()
        weights, _ = select_experts(logits, config, None)
        # A weighted sum: with norm_topk_prob (V3) each token's weights sum to a constant, so the
        # plain sum has an exactly-zero gradient and would test only rounding noise.
        (weights * torch.randn(weights.shape, generator=g)).sum().backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2", "deepseek-v2-lite"])
def test_presets_route_like_the_oracle(name):
    from deepseek_moe_fused import PRESETS

    config = PRESETS[name]
    logits = _separated_logits(4, config.num_experts, 0)
    _, ids = select_experts(logits, config, None)
    _, ref_ids = oracle_select_experts(logits, config, None)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
