"""The Triton router (kernels/_router.py) against the float64 oracle, on both of its paths."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import TOKENS, moe_configs, seeds

from deepseek_moe_fused import MoEConfig
from deepseek_moe_fused.kernels._alloc import poisoned_outputs
from deepseek_moe_fused.kernels.launch_router import MAX_EXPERTS, RouterTiles, route_tokens, router_backward
from deepseek_moe_fused.reference import oracle_select_experts, oracle_topk_weights
from deepseek_moe_fused.router import ROUTER_ENV, DeepSeekRouter

# fp32 sigmoid/exp and the renormalising division, a few ulp each (the GPU's exp is ex2.approx).
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-7


# Tied logits: equal logits tie exactly in any precision, and two different pairs of them never
# sum to the same group score (the closest two pair sums are 0.0095 apart), which fp32 and float64
# would round apart. With them the bias is zero: a bias would add such coincidences.
TIED_LOGITS = (-3.0, -1.0, 0.0, 2.0)


BIASES = (-0.1, -0.05, 0.0, 0.05, 0.1)


def _bias(config: MoEConfig, seed: int, device, values=BIASES) -> torch.Tensor | None:
    """Coarse steps: the bias must change choices, not the weights' precision."""
    if config.scoring_func != "sigmoid":
        return None
    pick = torch.randint(len(values), (config.num_experts,), generator=torch.Generator().manual_seed(seed))
    return torch.tensor(values)[pick].float().to(device)


# The router's paths, each with tiles small enough that the test shapes cross tile edges.
PATHS = ("one_launch", "two_launches", "split_h")


def _tiles(path: str, num_experts: int) -> RouterTiles:
    if path == "one_launch":  # the GEMM's epilogue selects: one program column holds every expert
        return RouterTiles(16, max(16, 1 << (num_experts - 1).bit_length()), 1, True, block_h=16)
    if path == "two_launches":  # expert tiles of 16, the selection kernel reads whole rows
        return RouterTiles(16, 16, 1, False, block_h=16)
    return RouterTiles(16, 16, 3, False, block_h=16)  # three partial sums over H, added in order


def _check_weights(weights, ids, logits, config):
    want = oracle_topk_weights(logits, ids, config)
    torch.testing.assert_close(weights.double().cpu(), want.cpu(), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


@given(config=moe_configs(), T=st.sampled_from(TOKENS), seed=seeds, tied=st.booleans(), path=st.sampled_from(PATHS))
def test_selection_matches_float64_oracle(device, config, T, seed, tied, path):
    """Exact ids (best first, ties to the lower id, as the oracle ranks them) on logits known
    exactly: X holds the logits and the weight is the identity, so X W^T = X in any precision."""
    E = config.num_experts
    config = config.replace(hidden_dim=E)
    g = torch.Generator().manual_seed(seed)
    if tied:  # four values: many exact ties between experts and between groups
        logits = torch.tensor(TIED_LOGITS)[torch.randint(len(TIED_LOGITS), (T, E), generator=g)]
    else:  # a permutation of well-spaced values per token: no ties at fp32 precision
        logits = torch.linspace(-4.0, 4.0, E)[torch.rand(T, E, generator=g).argsort(dim=-1)]
    x = logits.to(config.dtype).to(device)
    weight = torch.eye(E, dtype=config.dtype, device=device)
    bias = _bias(config, seed, device, values=(0.0,) if tied else BIASES)
    with poisoned_outputs():
        got_logits, weights, ids = route_tokens(x, weight, bias, config, tiles=_tiles(path, config.num_experts))
    torch.testing.assert_close(got_logits, x.float(), rtol=0, atol=0)
    want_weights, want_ids = oracle_select_experts(got_logits, config, bias)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(weights.double().cpu(), want_weights, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


@given(config=moe_configs(), T=st.sampled_from(TOKENS), seed=seeds, path=st.sampled_from(PATHS))
def test_logits_and_weights_on_random_data(device, config, T, seed, path):
    """Logits within the fp32 summation bound of float64 X W^T; K distinct ids in range per token
    whose weights are the oracle's weights of those ids. (Which ids, near ties, depends on
    rounding: the exact choice is the test above.)"""
    g = torch.Generator().manual_seed(seed)
    H, E, K = config.hidden_dim, config.num_experts, config.top_k
    x = torch.randn(T, H, generator=g).to(config.dtype).to(device)
    weight = (torch.randn(E, H, generator=g) * H**-0.5).to(config.dtype).to(device)
    bias = _bias(config, seed, device)
    with poisoned_outputs():
        logits, weights, ids = route_tokens(x, weight, bias, config, tiles=_tiles(path, config.num_experts))
    x64, w64 = x.double(), weight.double()
    # A sum of H products accumulated in fp32 is off by at most (H + 1) u times the sum of the
    # products' magnitudes (u = 2^-24; the +1 is fp32 inputs' own product rounding).
    bound = (H + 1) * 2.0**-24 * (x64.abs() @ w64.abs().T)
    assert ((logits.double() - x64 @ w64.T).abs() <= bound).all()
    assert ((ids >= 0) & (ids < E)).all()
    assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all(), "an expert chosen twice for one token"
    assert ids.shape == weights.shape == (T, K)
    _check_weights(weights, ids, logits, config)


@pytest.mark.parametrize(
    "name, E",
    [
        ("deepseek-v3", 256),  # sigmoid, 8 groups of 32: two launches
        ("deepseek-v2", 160),  # softmax group-limited, 8 groups of 20 (not a power of two)
        ("deepseek-v2-lite", 64),  # softmax greedy, one launch
        ("seed", 8),  # softmax greedy, fewer experts than tl.dot's 16 columns
    ],
)
def test_presets_route_like_the_oracle(device, name, E):
    from deepseek_moe_fused import PRESETS

    config = PRESETS[name].replace(hidden_dim=96, dtype=torch.float32)
    assert config.num_experts == E
    g = torch.Generator().manual_seed(3)
    x = torch.randn(65, 96, generator=g).to(device)
    weight = torch.randn(E, 96, generator=g).to(device) * 0.1
    bias = _bias(config, 3, device)
    logits, weights, ids = route_tokens(x, weight, bias, config)
    # The oracle ranks the kernel's own logits, so only the scores' precision differs (fp32 vs
    # float64): a fixed seed, since random logits can tie to within fp32 rounding.
    want_weights, want_ids = oracle_select_experts(logits, config, bias)
    assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(weights.double().cpu(), want_weights, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


@given(config=moe_configs(dtypes=[torch.float32]), T=st.sampled_from(TOKENS[1:]), seed=seeds)
def test_gradients_match_float64_autograd(device, config, T, seed):
    """Gradients of x and the router weight through both outputs that carry one: the routing
    weights and the logits (an auxiliary loss reads those)."""
    router = DeepSeekRouter(config, device=device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, config.hidden_dim, generator=g).to(device).requires_grad_()
    logits, weights, ids = router(x)
    grad_logits, grad_weights = torch.randn(logits.shape, generator=g), torch.randn(weights.shape, generator=g)
    torch.autograd.backward((logits, weights), (grad_logits.to(device), grad_weights.to(device)))
    x64 = x.detach().double().requires_grad_()
    w64 = router.weight.detach().double().requires_grad_()
    logits64 = x64 @ w64.T
    weights64 = oracle_topk_weights(logits64, ids, config)
    torch.autograd.backward((logits64, weights64), (grad_logits.double().to(device), grad_weights.double().to(device)))
    for name, got, want in (("x", x.grad, x64.grad), ("weight", router.weight.grad, w64.grad)):
        diff = float((got.double() - want).norm())
        # fp32 backward: sums of E (dx) or T (dweight) products, 1e-5 relative in norm; the absolute
        # floor covers a gradient that cancels to zero (norm_topk_prob with top_k=1).
        bound = 1e-5 * float(want.norm()) + 1e-6 * float(grad_logits.norm() + grad_weights.norm())
        assert diff <= bound, f"{name}: |diff| {diff:.3e} > {bound:.3e}"


@pytest.mark.parametrize(
    "x_dtype, weight_dtype",
    [
        (torch.float32, torch.bfloat16),  # dx in fp32 from a bf16 weight: the dx GEMM's split products
        (torch.bfloat16, torch.float32),  # d weight in fp32 from bf16 x: the weight GEMM's split products
    ],
)
@pytest.mark.parametrize("num_experts", [8, 64])  # the seed's E; v2-lite's, where the GEMMs cost most
def test_bf16_operand_gradients_keep_fp32_accuracy(device, x_dtype, weight_dtype, num_experts):
    """With a bf16 operand the backward GEMMs split the fp32 logits' gradient into three bf16
    terms (on a GPU); the gradient that comes out in fp32 must still match float64 to fp32's
    1e-5, where one bf16 term alone (2^-9 relative per product) would be ~1e-3 off. The
    interpreter takes fp32 products."""
    config = MoEConfig(hidden_dim=256, intermediate_dim=16, num_experts=num_experts, top_k=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 256, generator=g).to(device=device, dtype=x_dtype)
    weight = (torch.randn(num_experts, 256, generator=g) * 0.1).to(device=device, dtype=weight_dtype)
    logits, _, ids = route_tokens(x, weight, None, config)
    grad_logits = torch.randn(logits.shape, generator=g).to(device)
    grad_weights = torch.randn(ids.shape, generator=g).to(device)
    with poisoned_outputs():
        dx, dweight = router_backward(x, weight, logits, ids, grad_logits, grad_weights, config)
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    logits64 = x64 @ w64.T
    torch.autograd.backward(
        (logits64, oracle_topk_weights(logits64, ids, config)), (grad_logits.double(), grad_weights.double())
    )
    fp32_side = ("x", dx, x64.grad) if x_dtype == torch.float32 else ("weight", dweight, w64.grad)
    name, got, want = fp32_side
    diff = float((got.double() - want).norm())
    bound = 1e-5 * float(want.norm())
    assert diff <= bound, f"{name}: |diff| {diff:.3e} > {bound:.3e}"


@pytest.mark.parametrize(
    "config",
    [
        MoEConfig(hidden_dim=48, intermediate_dim=16, num_experts=8, top_k=2, scoring_func="sigmoid",
                  topk_method="noaux_tc", norm_topk_prob=True, dtype=torch.float32),  # sigmoid, renormalised
        MoEConfig(hidden_dim=48, intermediate_dim=16, num_experts=12, top_k=3, n_group=4, topk_group=2,
                  scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
                  dtype=torch.float32),  # grouped softmax, no renormalisation
    ],
)  # fmt: skip
def test_backward_is_deterministic_and_each_gradient_stands_alone(device, config):
    """150 tokens: the weight gradient sums several token splits (added in a fixed order), so two
    runs must agree bit for bit; with x frozen the kernel skips dx, and the weight gradient must
    not change."""
    router = DeepSeekRouter(config, device=device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(150, config.hidden_dim, generator=g).to(device)
    upstream = [torch.randn(150, n, generator=g).to(device) for n in (config.num_experts, config.top_k)]

    def grads(x_requires_grad: bool):
        router.weight.grad = None
        leaf = x.clone().requires_grad_(x_requires_grad)
        logits, weights, _ = router(leaf)
        torch.autograd.backward((logits, weights), upstream)
        return leaf.grad, router.weight.grad.clone()

    (dx1, dw1), (dx2, dw2), (dx_frozen, dw_frozen) = grads(True), grads(True), grads(False)
    assert torch.equal(dx1, dx2) and torch.equal(dw1, dw2)
    assert dx_frozen is None and torch.equal(dw_frozen, dw1)


def test_bias_cast_to_a_16bit_dtype_counts_as_its_fp32_value(device):
    """A model cast with .to(torch.bfloat16) casts the bias buffer too; transformers adds it to
    fp32 scores, so the router must use its exact value, not reject it."""
    config = MoEConfig(hidden_dim=32, intermediate_dim=16, num_experts=8, top_k=2, scoring_func="sigmoid",
                       topk_method="noaux_tc", n_group=2, topk_group=1, dtype=torch.float32)  # fmt: skip
    g = torch.Generator().manual_seed(4)
    x, weight = torch.randn(9, 32, generator=g).to(device), torch.randn(8, 32, generator=g).to(device)
    bias = torch.randn(8, generator=g).to(device=device, dtype=torch.bfloat16)
    got = route_tokens(x, weight, bias, config)
    want = route_tokens(x, weight, bias.float(), config)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_torch_router_is_selectable(device, monkeypatch):
    config = MoEConfig(hidden_dim=32, intermediate_dim=16, num_experts=8, top_k=2, dtype=torch.float32)
    router = DeepSeekRouter(config, device=device)
    x = torch.randn(5, 32, device=device)
    monkeypatch.setenv(ROUTER_ENV, "torch")
    with torch.no_grad():
        _, _, torch_ids = router(x)
    monkeypatch.setenv(ROUTER_ENV, "nonsense")
    with pytest.raises(ValueError, match=ROUTER_ENV):
        router(x)
    monkeypatch.setenv(ROUTER_ENV, "triton")
    with torch.no_grad():
        _, _, triton_ids = router(x)
    assert torch.equal(torch_ids.sort(-1).values, triton_ids.sort(-1).values)


def test_bad_inputs(device):
    config = MoEConfig(hidden_dim=32, intermediate_dim=16, num_experts=8, top_k=2, dtype=torch.float32)
    x = torch.randn(5, 32, device=device)
    weight = torch.randn(8, 32, device=device)
    with pytest.raises(ValueError, match="weight"):
        route_tokens(x, weight[:7], None, config)
    with pytest.raises(ValueError, match="x must have shape"):
        route_tokens(x[:, :31], weight, None, config)
    with pytest.raises(TypeError, match="x must have dtype"):
        route_tokens(x.int(), weight, None, config)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        route_tokens(x, weight, torch.zeros(7, device=device), config)
    big = config.replace(num_experts=2 * MAX_EXPERTS)
    with pytest.raises(ValueError, match="at most"):
        route_tokens(x, torch.randn(2 * MAX_EXPERTS, 32, device=device), None, big)
