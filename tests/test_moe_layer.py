"""DeepSeekMoELayer end to end: the oracle, transformers' blocks, gradients, the seed's API."""

import pytest
import torch
from conftest import compile_bound
from hypothesis import assume, example, given
from hypothesis import strategies as st
from strategies import MAX_ROWS, TOKENS, assume_well_conditioned, moe_configs, num_tokens, seeds

from deepseek_moe_fused import DeepSeekMoELayer, MoEConfig
from deepseek_moe_fused.moe_layer import BACKWARDS, backward_selected
from deepseek_moe_fused.reference import naive_moe_experts, oracle_moe_experts, oracle_topk_weights
from deepseek_moe_fused.router import router_selected
from deepseek_moe_fused.testing import TOLERANCES, Tolerance, error_stats


def _layer(config, device, seed):
    torch.manual_seed(seed)
    layer = DeepSeekMoELayer(config, device=device)
    if layer.gate.e_score_correction_bias is not None:
        layer.gate.e_score_correction_bias.normal_(std=0.1)
    return layer


def _shared(layer):
    s = layer.shared_experts
    return () if s is None else (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)


def _oracle(layer, x, logits, topk_ids):
    """float64 output given the layer's expert choice (selection near ties is precision-dependent;
    the router has its own tests), with weights recomputed in float64 from the logits."""
    weights64 = oracle_topk_weights(logits, topk_ids, layer.config)
    return oracle_moe_experts(
        x, weights64, topk_ids, layer.experts.gate_up_proj, layer.experts.down_proj, *_shared(layer)
    )


@given(config=moe_configs(), data=st.data(), seed=seeds)
def test_layer_matches_oracle(device, config, data, seed):
    T = data.draw(num_tokens(config))
    layer = _layer(config, device, seed)
    x = torch.randn(T, config.hidden_dim, device=device).to(config.dtype)
    with torch.no_grad():
        out, logits = layer(x, return_router_logits=True)
        _, _, topk_ids = layer.gate(x)
    assert out.dtype == config.dtype and out.shape == x.shape and logits.shape == (T, config.num_experts)
    weights64 = oracle_topk_weights(logits, topk_ids, layer.config)
    kernel_args = (x, weights64, topk_ids, layer.experts.gate_up_proj, layer.experts.down_proj, *_shared(layer))
    ref = oracle_moe_experts(*kernel_args)
    # Found by fuzzing: H=1 with 55 slots summed whose terms cancel 500x (fp32 error 46 u).
    assume_well_conditioned(kernel_args, ref)
    stats = error_stats(out, ref)
    tolerance = TOLERANCES[config.dtype]
    if not stats.within(tolerance):
        # Found by fuzzing on the GPU: fp16, H=3, one token, terms 14x the typical cancellation. The
        # kernel missed the table (rel_norm 4.10e-3) and PyTorch's own loop in fp16 did too (3.97e-3):
        # the data, not the kernel. Past the table, come within 1.5x of that loop's error (the
        # kernel's median over 400 such draws was 0.73x the loop's).
        naive = error_stats(naive_moe_experts(x, weights64.to(config.dtype), *kernel_args[2:]), ref)
        tolerance = Tolerance(
            max(tolerance.rel_norm, 1.5 * naive.rel_norm), max(tolerance.rel_max, 1.5 * naive.rel_max)
        )
    assert stats.within(tolerance), (stats, tolerance)


# Found by fuzzing: top_k=1 with norm_topk_prob makes the routing weight a constant, so the router
# gradient cancels to zero in float64 and to rounding noise in fp32 (needs the absolute floor).
@example(
    config=MoEConfig(
        hidden_dim=1, intermediate_dim=1, num_experts=5, top_k=1, n_shared_experts=0,
        norm_topk_prob=True, routed_scaling_factor=16.0, dtype=torch.float32,
    ),
    T=17,
    seed=0,
).via("discovered failure")  # fmt: skip
@given(config=moe_configs(dtypes=[torch.float32]), T=st.sampled_from(TOKENS), seed=seeds)
@compile_bound(gpu_examples=20)
@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradients_match_float64_autograd(device, backward, config, T, seed):
    """dX, every expert and shared weight, and the router weight, against autograd through the
    float64 oracle (the same routing choice), for each backward implementation."""
    T = min(T, MAX_ROWS // config.top_k)
    assume(T > 0)
    layer = _layer(config, device, seed)
    x = torch.randn(T, config.hidden_dim, device=device, requires_grad=True)
    with backward_selected(backward):
        out, _logits = layer(x, return_router_logits=True)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    _, _, topk_ids = layer.gate(x)

    params = dict(layer.named_parameters())
    params64 = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    x64 = x.detach().double().requires_grad_()
    logits64 = x64 @ params64["gate.weight"].T
    weights64 = oracle_topk_weights(logits64, topk_ids, config)
    shared = [params64[f"shared_experts.{n}_proj.weight"] for n in ("gate", "up", "down")] if _shared(layer) else []
    ref = oracle_moe_experts(
        x64, weights64, topk_ids, params64["experts.gate_up_proj"], params64["experts.down_proj"], *shared
    )
    ref.backward(grad_out.double())
    pairs = [("x", x.grad, x64.grad)] + [(n, params[n].grad, params64[n].grad) for n in params]
    # The problem's gradient scale: the largest float64 gradient norm of any tensor.
    scale = max(float(want.norm()) for _, _, want in pairs)
    for name, got, want in pairs:
        assert got is not None, f"no gradient for {name}"
        diff = float((got.detach().double() - want).norm())
        # fp32 backward over sums of up to T*K*H products: 1e-5 relative in norm. The absolute
        # floor covers gradients that cancel to exactly zero in float64 (top_k=1 with
        # norm_topk_prob makes the routing weight constant): fp32 leaves eps32 (~1e-7) times the
        # terms that cancel, which are of the problem's gradient scale; 1e-6 leaves room for sums.
        bound = 1e-5 * float(want.norm()) + 1e-6 * scale
        assert diff <= bound and torch.isfinite(got).all(), f"{name}: |diff| {diff:.3e} > {bound:.3e}"
    if layer.gate.e_score_correction_bias is not None:
        assert not layer.gate.e_score_correction_bias.requires_grad


@given(config=moe_configs(), data=st.data(), seed=seeds)
@compile_bound(gpu_examples=20)
def test_layer_equals_transformers_block(device, config, data, seed):
    """Load transformers' DeepseekV3MoE / DeepseekV2Moe state_dict as is, compare outputs."""
    from hf_reference import hf_moe_block

    assume(config.scoring_func != "sigmoid" or config.num_experts // config.n_group >= 2)
    assume(config.scoring_func == "sigmoid" or not config.norm_topk_prob)
    T = data.draw(num_tokens(config))
    torch.manual_seed(seed)
    block = hf_moe_block(config).to(device)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=max(p.shape[-1], 1) ** -0.5)
        for name, b in block.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(std=0.1)
    state = block.state_dict()
    if config.n_shared_experts == 0:  # transformers keeps a zero-width shared MLP
        state = {k: v for k, v in state.items() if not k.startswith("shared_experts.")}
    layer = DeepSeekMoELayer(config, device=device)
    layer.load_state_dict(state, strict=True)
    x = torch.randn(2, max(T // 2, 0), config.hidden_dim, device=device).to(config.dtype)  # (batch, seq, H)
    with torch.no_grad():
        ours, theirs = layer(x), block(x)
        logits, _, topk_ids = layer.gate(x.reshape(-1, config.hidden_dim))
        with router_selected("torch"):
            _, _, hf_ids = layer.gate(x.reshape(-1, config.hidden_dim))
    # transformers' choice (test_router proves the torch router makes it) vs the Triton router's:
    # their fp32 logits differ by rounding, so a near-tie may go either way. Not a bug to hide: the
    # Triton choice is checked exactly in test_router_kernels, and a systematic difference would
    # filter out every example (Hypothesis reports that).
    assume(torch.equal(topk_ids.sort(-1).values, hf_ids.sort(-1).values))
    oracle = _oracle(layer, x.reshape(-1, config.hidden_dim), logits, topk_ids).view(x.shape)
    # Both within the dtype's tolerance of the float64 oracle (transformers rounds differently).
    assert error_stats(ours, oracle).within(TOLERANCES[config.dtype])
    if config.dtype == torch.float32:
        stats = error_stats(ours, theirs)
        assert stats.within(TOLERANCES[torch.float32]), stats


def test_seed_snippet_small(device):
    """The seed's "Use in Your Code" example at a size the interpreter runs quickly."""
    config = MoEConfig(hidden_dim=64, intermediate_dim=64, num_experts=8, top_k=2)
    moe = DeepSeekMoELayer(config).to(device)
    x = torch.randn(32, 64, dtype=torch.bfloat16, device=device)
    output, router_logits = moe(x, return_router_logits=True)
    assert output.shape == (32, 64) and output.dtype == torch.bfloat16
    assert router_logits.shape == (32, 8) and router_logits.dtype == torch.float32
    assert torch.isfinite(output).all()


@pytest.mark.gpu
def test_seed_snippet_full_size(device):
    from deepseek_moe_fused.config import MoEConfig as SeedConfig

    config = SeedConfig(hidden_dim=2048, intermediate_dim=2048, num_experts=8, top_k=2)
    moe = DeepSeekMoELayer(config).cuda()
    x = torch.randn(1024, 2048, dtype=torch.bfloat16, device="cuda")
    output, router_logits = moe(x, return_router_logits=True)
    assert output.shape == (1024, 2048) and router_logits.shape == (1024, 8)


def test_state_dict_names_match_transformers():
    config = MoEConfig(hidden_dim=8, intermediate_dim=4, num_experts=4, top_k=2, scoring_func="sigmoid",
                       topk_method="noaux_tc", dtype=torch.float32)  # fmt: skip
    names = set(DeepSeekMoELayer(config).state_dict())
    assert names == {
        "gate.weight", "gate.e_score_correction_bias", "experts.gate_up_proj", "experts.down_proj",
        "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight", "shared_experts.down_proj.weight",
    }  # fmt: skip
    no_shared = DeepSeekMoELayer(config.replace(n_shared_experts=0, scoring_func="softmax", topk_method="greedy"))
    assert set(no_shared.state_dict()) == {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}


def test_empty_batch_and_leading_dims(device):
    config = MoEConfig(hidden_dim=16, intermediate_dim=8, num_experts=4, top_k=2, dtype=torch.float32)
    layer = DeepSeekMoELayer(config, device=device)
    assert layer(torch.randn(0, 16, device=device)).shape == (0, 16)
    assert layer(torch.randn(2, 0, 16, device=device)).shape == (2, 0, 16)
    x = torch.randn(2, 3, 16, device=device)
    torch.testing.assert_close(layer(x), layer(x.view(6, 16)).view(2, 3, 16), rtol=0, atol=0)


def test_bad_inputs(device):
    config = MoEConfig(hidden_dim=16, intermediate_dim=8, num_experts=4, top_k=2, dtype=torch.float32)
    layer = DeepSeekMoELayer(config, device=device)
    with pytest.raises(TypeError, match="x must have dtype"):
        layer(torch.randn(3, 16, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 16\)"):
        layer(torch.randn(3, 15, device=device))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        layer([[1.0] * 16])
    with pytest.raises(TypeError, match="config must be a MoEConfig"):
        DeepSeekMoELayer({"hidden_dim": 16})
