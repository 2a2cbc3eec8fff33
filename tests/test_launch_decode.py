"""The two-launch decode forward (kernels/launch_decode.py) against the float64 oracle, and the rule
that picks it."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import assume_well_conditioned, moe_configs, routing_kinds, seeds, x_scales

from deepseek_moe_fused import MoEConfig, fused_moe_experts
from deepseek_moe_fused._env import env_set
from deepseek_moe_fused.kernels import _tiles, launch
from deepseek_moe_fused.kernels._alloc import poisoned_outputs
from deepseek_moe_fused.kernels._tiles import DECODE_ENV, DecodeTiles, GemvTiles
from deepseek_moe_fused.kernels.launch import moe_experts_forward, runs_decode, tiles_for
from deepseek_moe_fused.kernels.launch_decode import decode_forward
from deepseek_moe_fused.reference import oracle_moe_experts
from deepseek_moe_fused.testing import TOLERANCES, error_stats, make_moe_inputs

# Tiles that leave partial column tiles and several reduction steps at the shapes drawn below.
SMALL = DecodeTiles(GemvTiles(16, 32, 4, 1), GemvTiles(8, 16, 2, 1))


def _check(out, ref, dtype):
    stats = error_stats(out, ref)
    assert stats.within(TOLERANCES[dtype]), f"decode vs oracle: {stats} exceeds {TOLERANCES[dtype]}"


def _forbidden(message: str):
    """A stand-in for a function the code under test must not call."""

    def call(*args, **kwargs):
        raise AssertionError(message)

    return call


@st.composite
def decode_problems(draw):
    config = draw(moe_configs())
    T = draw(st.integers(0, 5))  # past the rule's batches: the kernels serve any T
    return config, T, draw(routing_kinds), draw(x_scales(config.dtype)), draw(seeds)


# Prime E, non-pow2 H and I, two shared experts (one MLP of 2I), every slot on one expert.
@given(problem=decode_problems())
@example(problem=(MoEConfig(33, 17, 7, 3, n_shared_experts=2), 2, "repeated_expert", 1.0, 0))
def test_decode_matches_oracle(device, problem):
    config, T, kind, scale, seed = problem
    inputs = make_moe_inputs(config, T, routing=kind, seed=seed, x_scale=scale, device=device)
    with poisoned_outputs():  # an output column or an activation the kernels skip stays NaN
        out = decode_forward(inputs.x, inputs.topk_weights, inputs.topk_ids, inputs.weights, SMALL)
    assert out.shape == inputs.x.shape and out.dtype == inputs.x.dtype
    ref = oracle_moe_experts(*inputs.kernel_args())
    assume_well_conditioned(inputs.kernel_args(), ref)
    _check(out, ref, config.dtype)


@given(problem=decode_problems())
@example(problem=(MoEConfig(33, 17, 7, 3, n_shared_experts=2), 2, "repeated_expert", 1.0, 0))
@example(problem=(MoEConfig(33, 17, 7, 3, n_shared_experts=0), 2, "uniform", 1.0, 1))  # no shared part
def test_decode_parts_add_up_to_the_layer(device, problem):
    """The unfused ablation's parts, each its own two launches: the routed slots alone against the
    oracle without a shared MLP, the shared MLP alone against the oracle with every routing weight
    zero. Each part rounds once, so each meets the table on its own; their sum need not meet it
    against the layer's oracle, since the parts can cancel (an fp16 draw with H=1: tenfold)."""
    config, T, kind, scale, seed = problem
    inputs = make_moe_inputs(config, T, routing=kind, seed=seed, x_scale=scale, device=device)
    args = (inputs.x, inputs.topk_weights, inputs.topk_ids, inputs.weights, SMALL)
    with poisoned_outputs():
        routed = decode_forward(*args, shared=False)
        shared = decode_forward(*args, routed=False)
    if not config.n_shared_experts:
        assert torch.equal(shared, torch.zeros_like(shared))  # no part left: zeros, not the poison
    x, topk_weights, topk_ids, gate_up, down, *shared_weights = inputs.kernel_args()
    parts = [(routed, (x, topk_weights, topk_ids, gate_up, down))]
    if config.n_shared_experts:
        parts.append((shared, (x, torch.zeros_like(topk_weights), topk_ids, gate_up, down, *shared_weights)))
    for out, oracle_args in parts:
        ref = oracle_moe_experts(*oracle_args)
        assume_well_conditioned(oracle_args, ref)
        _check(out, ref, config.dtype)


@pytest.mark.parametrize(
    "H, I, S, K",
    [
        (64, 48, 0, 2),  # no shared MLP
        (40, 24, 24, 0),  # no routed slots: the shared MLP alone
        pytest.param(  # v2-lite's widths at the compiled rule's tiles (the interpreter's take minutes there)
            2048, 1408, 2816, 6, marks=pytest.mark.gpu
        ),
    ],
)
def test_decode_shapes_at_rule_tiles(device, H, I, S, K):
    config = MoEConfig(hidden_dim=H, intermediate_dim=I, num_experts=8, top_k=max(K, 1), n_shared_experts=S // I)
    inputs = make_moe_inputs(config, 2, seed=1, device=device)
    topk_weights, topk_ids = inputs.topk_weights[:, :K], inputs.topk_ids[:, :K]
    inputs.topk_weights, inputs.topk_ids = topk_weights, topk_ids
    tiles = _tiles.decode_tiles(2, device.type == "cpu")
    with poisoned_outputs():
        out = decode_forward(inputs.x, topk_weights, topk_ids, inputs.weights, tiles)
    _check(out, oracle_moe_experts(*inputs.kernel_args()), config.dtype)


@pytest.mark.parametrize("T", [1, _tiles.DECODE_MAX_TOKENS, _tiles.DECODE_MAX_TOKENS + 1])  # both sides of the rule
def test_rule_picks_decode_up_to_max_tokens(device, T):
    inputs = make_moe_inputs(MoEConfig(32, 16, 4, 2), T, device=device)
    tiles = tiles_for(T, inputs.weights, 2)
    assert (tiles.decode is not None) == (T <= _tiles.DECODE_MAX_TOKENS)
    with env_set(DECODE_ENV, "off"):
        assert tiles_for(T, inputs.weights, 2).decode is None
    with env_set(_tiles.FORCE_TILES_ENV, "block_n=16"):  # forced tiles are the three-stage kernels'
        assert tiles_for(T, inputs.weights, 2).decode is None


def test_decode_needs_no_saved_preactivations(device):
    inputs = make_moe_inputs(MoEConfig(32, 16, 4, 2), 1, device=device)
    tiles = tiles_for(1, inputs.weights, 2)
    metadata = launch.routing_metadata_for(inputs.topk_ids, inputs.weights)
    preacts = launch.new_preactivations(inputs.x, inputs.weights, metadata)
    assert runs_decode(tiles)
    assert not runs_decode(tiles, preacts=preacts)


def test_fused_entry_point_takes_decode_and_matches_three_stage(device, monkeypatch):
    """fused_moe_experts at one token runs no routing metadata (the decode path), and agrees with
    the three-stage forward it replaces."""
    config = MoEConfig(48, 40, 6, 2, n_shared_experts=1, dtype=torch.float32)  # the three stages round y at bf16
    inputs = make_moe_inputs(config, 1, seed=5, device=device)
    with env_set(DECODE_ENV, "off"):
        three_stage = fused_moe_experts(*inputs.kernel_args())
    monkeypatch.setattr(launch, "routing_metadata_for", _forbidden("the decode path built routing metadata"))
    out = fused_moe_experts(*inputs.kernel_args())
    _check(out, oracle_moe_experts(*inputs.kernel_args()), config.dtype)
    torch.testing.assert_close(out, three_stage, rtol=1e-4, atol=1e-5)
    # The unfused ablation takes the decode path too: the ratio of the two isolates the fusion.
    with poisoned_outputs():
        unfused = moe_experts_forward(inputs.x, inputs.topk_weights, inputs.topk_ids, inputs.weights, fuse_shared=False)
    torch.testing.assert_close(unfused, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backward", ["triton", "torch"])
def test_layer_decode_forward_and_its_backward(device, monkeypatch, backward):
    """Under no_grad the layer skips the metadata; with a backward to follow it builds it (both
    backwards read it) and the gradients flow."""
    from deepseek_moe_fused import moe_layer
    from deepseek_moe_fused.benchmark import make_layer
    from deepseek_moe_fused.testing import make_activations

    config = MoEConfig(32, 24, 4, 2, n_shared_experts=1, dtype=torch.float32)  # the backward's forward: 3 stages
    layer = make_layer(config, device, seed=0)
    x = make_activations(1, 32, seed=2, dtype=torch.float32, device=device)
    with moe_layer.backward_selected(backward):
        x_grad = x.clone().requires_grad_()
        out_grad = layer(x_grad)
        out_grad.square().sum().backward()
        assert torch.isfinite(x_grad.grad).all() and x_grad.grad.abs().sum() > 0
        with monkeypatch.context() as patch, torch.no_grad():
            patch.setattr(moe_layer, "routing_metadata_for", _forbidden("a forward without backward built metadata"))
            out = layer(x)
    torch.testing.assert_close(out, out_grad.detach(), rtol=1e-4, atol=1e-5)
