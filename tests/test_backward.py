"""The Triton backward (kernels/launch_backward.py) against the PyTorch backward run in float64
(the layer's `torch` backward runs the same code in fp32; test_moe_layer.py checks it against
float64 autograd)."""

from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F
from conftest import compile_bound
from hypothesis import assume, example, given
from hypothesis import strategies as st
from strategies import TAIL_EDGE_COUNTS, TAIL_EDGE_TILES, moe_configs, num_tokens, routing_kinds, seeds

from deepseek_moe_fused import DeepSeekMoELayer, MoEConfig, moe_layer
from deepseek_moe_fused._backward_torch import experts_backward, swiglu_backward
from deepseek_moe_fused.kernels import _tiles, launch_backward
from deepseek_moe_fused.kernels._alloc import poisoned_outputs
from deepseek_moe_fused.kernels.launch import (
    PreActivations,
    moe_experts_forward,
    new_preactivations,
    routing_metadata_for,
    tiles_for,
)
from deepseek_moe_fused.kernels.launch_backward import moe_experts_backward
from deepseek_moe_fused.moe_layer import BACKWARD_ENV, backward_selected, selected_backward
from deepseek_moe_fused.routing_metadata import build_routing_metadata
from deepseek_moe_fused.testing import (
    TOLERANCES,
    error_stats,
    make_activations,
    make_moe_inputs,
    make_routing,
    routing_with_counts,
)

GRAD_NAMES = ("x", "topk_weights", "gate_up_proj", "down_proj", "shared_gate", "shared_up", "shared_down")


def _bound(dtype: torch.dtype) -> float:
    """Relative (in norm) bound on the Triton gradients against the float64 PyTorch ones. fp32:
    fp32 sums of up to T*K*H products, 1e-5. (Against the fp32 PyTorch backward it failed: with
    H=1000, I=1 and g ~1 summed from terms of ~20, that reference's own gradient errors were
    3-10x the Triton ones' against float64, and past the bound.) 16-bit: the Triton path rounds
    dG/dU, the SwiGLU output and each slot's dX to the input dtype (the oracle keeps float64),
    about two roundings more than the forward's table allows for: twice its bound."""
    return 1e-5 if dtype == torch.float32 else 2 * TOLERANCES[dtype].rel_norm


def _run_both(config, T, routing, seed, device):
    """Triton and PyTorch gradients of one problem; `routing` a kind of make_routing, or a given
    (topk_weights, topk_ids)."""
    if isinstance(routing, str):
        inputs = make_moe_inputs(config, T, routing=routing, seed=seed, device=device)
    else:
        inputs = make_moe_inputs(config, T, seed=seed, device=device)
        inputs.topk_weights, inputs.topk_ids = routing
    w = inputs.weights
    metadata = routing_metadata_for(inputs.topk_ids, w)
    grad_out = make_activations(T, config.hidden_dim, seed=seed + 7, dtype=config.dtype, device=device)
    with poisoned_outputs():  # an element no kernel writes stays NaN
        preacts = new_preactivations(inputs.x, w, metadata)
        moe_experts_forward(inputs.x, inputs.topk_weights, inputs.topk_ids, w, metadata, preacts=preacts)
        got = moe_experts_backward(grad_out, inputs.x, inputs.topk_weights, w, metadata, preacts)
    want = experts_backward(
        grad_out, inputs.x, inputs.topk_weights, metadata.sorted_slot, metadata.expert_offsets, w, torch.float64
    )
    return got, want, _rounding_terms(inputs, grad_out)


def test_backward_reads_the_forwards_sorted_rows(device):
    """Where stage 1 copies X into sorted rows (the warp-specialized gate/up kernel's input), the
    backward's weight gradients read that buffer instead of copying again: the same rows in the
    same order, so every gradient is bitwise the one of a backward that copies X itself from the
    same forward's buffers (the two stage-1 kernels' h need not round alike, so both backwards
    take one forward's). On the CPU the Triton kernel fills the buffer, so the tier checks the
    plumbing."""
    config = MoEConfig(48, 24, 5, 2, n_shared_experts=1, dtype=torch.float16)
    inputs = make_moe_inputs(config, 37, seed=3, device=device)
    w = inputs.weights
    tiles = replace(tiles_for(37, w, 2), gate_up_ws=_tiles.GATE_UP_WS)
    metadata = routing_metadata_for(inputs.topk_ids, w, tiles)
    grad_out = make_activations(37, 48, seed=9, dtype=config.dtype, device=device)
    with poisoned_outputs():
        preacts = new_preactivations(inputs.x, w, metadata, tiles)
        moe_experts_forward(inputs.x, inputs.topk_weights, inputs.topk_ids, w, metadata, preacts=preacts)
    assert torch.equal(preacts.x_sorted, inputs.x[metadata.sorted_slot.long() // 2])
    # The backward overwrites and releases what it reads: the copying one gets clones, no X rows.
    saved = [f.name for f in fields(PreActivations) if f.name != "x_sorted"]
    copying = replace(preacts, x_sorted=None, **{f: getattr(preacts, f).clone() for f in saved})
    with poisoned_outputs():
        got = moe_experts_backward(grad_out, inputs.x, inputs.topk_weights, w, metadata, preacts)
        want = moe_experts_backward(grad_out, inputs.x, inputs.topk_weights, w, metadata, copying)
    assert preacts.x_sorted.untyped_storage().size() == 0  # released once read
    for name, g, wnt in zip(GRAD_NAMES, got, want, strict=True):
        assert torch.equal(g, wnt), name


@pytest.mark.parametrize(
    "swiglu",
    [
        (1, 64, 4),  # one row per program, the GPU rule's shape: one step, 40 of its 64 columns masked
        (4, 16, 4),  # several rows per program: a whole step and a half-masked one
    ],
)
def test_swiglu_backward_tiling_moves_only_the_routing_weight_sums(device, swiglu):
    """The SwiGLU backward is elementwise but for each routing weight's row sum: with other tiles
    every gradient but the routing weights' is bitwise the same, and those are the same sums in
    other orders. Runs the GPU's one-row-per-program shape in the interpreter too."""
    config = MoEConfig(40, 24, 5, 2, n_shared_experts=1, dtype=torch.float16)
    inputs = make_moe_inputs(config, 29, seed=5, device=device)
    w = inputs.weights
    metadata = routing_metadata_for(inputs.topk_ids, w)
    grad_out = make_activations(29, 40, seed=6, dtype=config.dtype, device=device)
    base = _tiles.backward_tiles(metadata.block_m, 40, 24, device.type != "cuda", 2, 29 * 2 / 5)
    grads = []
    for tiles in (base, replace(base, swiglu=_tiles.ElementwiseTiles(*swiglu))):
        with poisoned_outputs():
            preacts = new_preactivations(inputs.x, w, metadata)
            moe_experts_forward(inputs.x, inputs.topk_weights, inputs.topk_ids, w, metadata, preacts=preacts)
            grads.append(moe_experts_backward(grad_out, inputs.x, inputs.topk_weights, w, metadata, preacts, tiles))
    for name, got, want in zip(GRAD_NAMES, *grads, strict=True):
        if name == "topk_weights":  # fp32 sums of 24 terms in other orders: a few ulp of the largest
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        else:
            assert torch.equal(got, want), name


@pytest.mark.parametrize(
    ("I", "swiglu"),
    [
        (24, None),  # the rule's tiles; u's pointers 24 elements past g's, so aligned unlike them
        (24, (1, 64, 4)),  # 64 elements for 128 threads: each held by two
        (40, (4, 16, 4)),  # several rows per program, a whole step and a half-masked one
        (1408, None),  # v2-lite's width: a step of 1024 and a masked one
    ],
)
def test_swiglu_backward_in_place_matches_float64(device, I, swiglu):
    """The SwiGLU backward overwrites [g | u] with [dg | du]: no thread may store before every
    thread has read. On the H100 the kernel without its barrier lost u at I = 24 in every run,
    though the interpreter cannot show a race; three runs against the float64 formulas."""
    T, E, K = 37, 5, 2
    topk_weights, topk_ids = make_routing("uniform", T, E, K, seed=4, device=device)
    metadata = build_routing_metadata(topk_ids, E, 16)
    R = metadata.num_rows
    pre = make_activations(R, 2 * I, seed=5, dtype=torch.float16, device=device)
    pre_shared = make_activations(T, 2 * I, seed=6, dtype=torch.float16, device=device)
    d_act = make_activations(R, I, seed=7, dtype=torch.float16, device=device)
    d_act_shared = make_activations(T, I, seed=8, dtype=torch.float16, device=device)
    flat_weights = topk_weights.reshape(-1).float()
    tiles = _tiles.swiglu_backward_tiles(I) if swiglu is None else _tiles.ElementwiseTiles(*swiglu)
    # float64: the routed rows' dA times their routing weight; the shared MLP's as it is.
    sorted_slot = metadata.sorted_slot.long()
    want_routed = swiglu_backward(*pre.double().chunk(2, dim=1), d_act.double() * flat_weights[sorted_slot, None])
    want_shared = swiglu_backward(*pre_shared.double().chunk(2, dim=1), d_act_shared.double())
    want_pre = torch.cat([torch.cat(want_routed[:2], dim=1), torch.cat(want_shared[:2], dim=1)])
    want_topk = torch.empty(R, dtype=torch.float64, device=device)
    want_topk[sorted_slot] = (want_routed[2] * d_act.double()).sum(1)  # sum_n silu(g) u dA
    for _ in range(3):  # a race need not show in every run
        preacts = PreActivations(pre.clone(), pre_shared.clone())
        with poisoned_outputs():
            got_topk = launch_backward._swiglu_backward_stage(
                d_act, d_act_shared, flat_weights, metadata, preacts, tiles
            )
        for got, want in ((torch.cat([preacts.routed, preacts.shared]), want_pre), (got_topk, want_topk)):
            stats = error_stats(got, want)
            assert stats.within(TOLERANCES[got.dtype]), stats


def _rounding_terms(inputs, grad_out) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 scales of the rounding error of two gradients: (T, K) for the routing weights,
    (T, H) for dX.

    The Triton path rounds the pre-activations g, u, dA = dY W_down, dG/dU and each slot's dX to
    the input dtype; the float64 oracle does not. Each rounding moves a term of a gradient's sum
    by about u of its size, so the error scales with the terms, not with the gradient, which they
    can cancel to near zero (H = I = 3, one token; H = 1, each token's dX ~300 terms summing to
    1/40 of their root-sum-square).
    - routing weight: sum over n of |g_n u_n dA_n| (its gradient sums silu(g_n) u_n dA_n, and
      |silu(g)| <= |g|), a worst case;
    - dX: the root-sum-square over the token's slots and the shared MLP of the terms
      dG_n W_gate[n] and dU_n W_up[n]: independent roundings add in quadrature. On 15 random
      fp16 problems (CPU tier) the dX error's norm was 0.2-1.7 u times this scale's."""
    # T=tokens, K=top_k, H=hidden, I=intermediate, S=shared intermediate
    w, ids = inputs.weights, inputs.topk_ids
    x, dy, scale = inputs.x.double(), grad_out.double(), inputs.topk_weights.double()
    weight_terms = torch.zeros(ids.shape, dtype=torch.float64, device=x.device)
    dx_squares = torch.zeros(x.shape, dtype=torch.float64, device=x.device)

    def add_mlp(rows, gate, up, down, row_scale):  # rows: token ids; gate, up (n, H); down (H, n)
        gate, up, down = gate.double(), up.double(), down.double()
        g, u = x[rows] @ gate.T, x[rows] @ up.T
        d_act = dy[rows] @ down  # (rows, n)
        sig = torch.sigmoid(g)
        d_gate = row_scale * d_act * u * sig * (1 + g * (1 - sig))
        d_up = row_scale * d_act * g * sig
        dx_squares.index_add_(0, rows, d_gate.square() @ gate.square() + d_up.square() @ up.square())
        return (g * u * d_act).abs().sum(dim=1)

    I = w.intermediate_dim
    for expert in range(w.num_experts):
        token, k = (ids == expert).nonzero(as_tuple=True)
        gate_up = w.gate_up_proj[expert]
        weight_terms[token, k] = add_mlp(token, gate_up[:I], gate_up[I:], w.down_proj[expert], scale[token, k, None])
    if w.has_shared:
        add_mlp(torch.arange(x.shape[0], device=x.device), w.shared_gate, w.shared_up, w.shared_down, 1.0)
    return weight_terms, dx_squares.sqrt()


@st.composite
def problems(draw):
    # bf16 only where it runs natively (the GPU tier); the interpreter cannot multiply it.
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
    config = draw(moe_configs(dtypes=dtypes))
    return config, draw(num_tokens(config)), draw(routing_kinds), draw(seeds)


F32 = torch.float32


# H=1000, I=1: each token's g ~1 is a sum of terms of ~20, finer than an fp32 reference resolves.
_ONE_WIDE_EXPERT = MoEConfig(
    hidden_dim=1000,
    intermediate_dim=1,
    num_experts=1,
    top_k=1,
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    n_group=1,
    topk_group=1,
    norm_topk_prob=False,
    dtype=F32,
)


@given(problem=problems())
@compile_bound(gpu_examples=30)
@example(
    problem=(MoEConfig(hidden_dim=33, intermediate_dim=17, num_experts=7, top_k=3, n_shared_experts=1, dtype=F32),
             17, "uniform", 0),
).via("prime E, non-pow2 H and I, shared")  # fmt: skip
@example(
    problem=(MoEConfig(hidden_dim=48, intermediate_dim=16, num_experts=5, top_k=2, dtype=F32), 40, "one_expert", 1),
).via("all rows on one expert: several tiles of one expert, empty experts get zero gradients")  # fmt: skip
@example(
    problem=(MoEConfig(hidden_dim=1, intermediate_dim=48, num_experts=12, top_k=2, n_shared_experts=2,
                       scoring_func="sigmoid", topk_method="noaux_tc", n_group=6, topk_group=4,
                       routed_scaling_factor=16.0, dtype=torch.float16), 2, "one_expert", 23099),
).via("found by fuzzing: H=1, each token's dX a sum of ~300 terms that cancel to 1/40 of their size")  # fmt: skip
@example(
    problem=(_ONE_WIDE_EXPERT, 1, "uniform", 0),
).via("found by fuzzing on the GPU: g ~1 summed from terms of ~20, past an fp32 reference's own error")  # fmt: skip
@example(
    problem=(_ONE_WIDE_EXPERT, 1, "uniform", 31),
).via("the same shape's draw that failed the fp32 reference on the CPU")  # fmt: skip
def test_triton_backward_matches_pytorch(device, problem):
    config, T, kind, seed = problem
    assume(T > 0)
    _assert_gradients_match(*_run_both(config, T, kind, seed, device), config.dtype)


def _assert_gradients_match(got, want, rounding_terms, dtype):
    scale = max(float(w.double().norm()) for w in want if w is not None)
    unit_roundoff = torch.finfo(dtype).eps / 2
    weight_terms, dx_rss = rounding_terms
    for name, g, w in zip(GRAD_NAMES, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert torch.isfinite(g).all(), f"{name} has unwritten (NaN) or non-finite elements"
        diff = float((g.double() - w.double()).norm())
        # Absolute floor at the problem's gradient scale: gradients that cancel to ~0 (top_k=1
        # with tiny dims) keep only rounding noise of their terms.
        bound = _bound(dtype) * float(w.double().norm()) + 1e-6 * scale
        if name == "topk_weights":  # three roundings (g, u, dA) of about u each, per term
            bound += 4 * unit_roundoff * float(weight_terms.norm())
        if name == "x":  # 8: past the 0.2-1.7 measured (docstring of _rounding_terms)
            bound += 8 * unit_roundoff * float(dx_rss.norm())
        assert diff <= bound, f"{name}: |diff| {diff:.3e} > {bound:.3e}"


def test_forward_saves_the_preactivations(device):
    # The Triton backward starts from these: each sorted row's [x W_gate^T | x W_up^T], and the
    # shared MLP's per token. Poisoned first, so a row or column the forward skips shows as NaN.
    config = MoEConfig(hidden_dim=40, intermediate_dim=24, num_experts=5, top_k=2, n_shared_experts=2, dtype=F32)
    inputs = make_moe_inputs(config, 9, routing="zipf", seed=5, device=device)
    w, x = inputs.weights, inputs.x
    metadata = routing_metadata_for(inputs.topk_ids, w)
    with poisoned_outputs():
        preacts = new_preactivations(x, w, metadata)
        moe_experts_forward(x, inputs.topk_weights, inputs.topk_ids, w, metadata, preacts=preacts)
    slots = metadata.sorted_slot.long()
    experts = inputs.topk_ids.reshape(-1)[slots]
    tokens = slots // config.top_k
    want_routed = torch.einsum("rh,rnh->rn", x[tokens].double(), w.gate_up_proj[experts].double())
    want_shared = x.double() @ torch.cat([w.shared_gate, w.shared_up]).double().T
    for got, want in ((preacts.routed, want_routed), (preacts.shared, want_shared)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # And stage 1's output h = silu(g) * u, kept for the down weights' gradients.
    for got, pre in ((preacts.h_routed, want_routed), (preacts.h_shared, want_shared)):
        g, u = pre.chunk(2, dim=1)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), F.silu(g) * u, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [0, 1, 5])  # empty batch, decode, a few tokens
def test_triton_backward_is_deterministic(device, T):
    config = MoEConfig(hidden_dim=32, intermediate_dim=16, num_experts=6, top_k=2, n_shared_experts=1, dtype=F32)
    first, *_ = _run_both(config, T, "zipf", 3, device)
    second, *_ = _run_both(config, T, "zipf", 3, device)
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


def test_backward_releases_the_consumed_preactivations(device):
    # The peak-memory contract: once the backward has read the forward's pre-activations (then
    # their gradients) and SwiGLU outputs, their memory goes back.
    config = MoEConfig(hidden_dim=32, intermediate_dim=16, num_experts=4, top_k=2, n_shared_experts=1, dtype=F32)
    inputs = make_moe_inputs(config, 7, seed=2, device=device)
    w = inputs.weights
    metadata = routing_metadata_for(inputs.topk_ids, w)
    preacts = new_preactivations(inputs.x, w, metadata)
    moe_experts_forward(inputs.x, inputs.topk_weights, inputs.topk_ids, w, metadata, preacts=preacts)
    grad_out = make_activations(7, config.hidden_dim, seed=3, dtype=F32, device=device)
    moe_experts_backward(grad_out, inputs.x, inputs.topk_weights, w, metadata, preacts)
    for saved in (preacts.routed, preacts.shared, preacts.h_routed, preacts.h_shared):
        assert saved.untyped_storage().nbytes() == 0


def test_backward_choice_is_checked(monkeypatch):
    monkeypatch.setenv(BACKWARD_ENV, "cuda")
    with pytest.raises(ValueError, match=BACKWARD_ENV):
        selected_backward()
    monkeypatch.setenv(BACKWARD_ENV, "triton")
    assert selected_backward() == "triton"


def test_second_triton_backward_through_one_forward_raises(device):
    # The first backward overwrites the saved pre-activations with their gradients: a second one
    # (retain_graph=True) must refuse rather than differentiate garbage.
    config = MoEConfig(hidden_dim=32, intermediate_dim=16, num_experts=4, top_k=2, dtype=F32)
    layer = DeepSeekMoELayer(config, device=device)
    x = make_activations(5, config.hidden_dim, seed=4, dtype=F32, device=device)
    with backward_selected("triton"):
        out = layer(x)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=BACKWARD_ENV):
        out.sum().backward()


def test_preactivations_saved_only_when_a_backward_can_follow(device, monkeypatch):
    # Inference (no_grad, inference_mode, nothing requiring grad) must not pay for the saved
    # pre-activations; a training forward must save them.
    saved = []
    monkeypatch.setattr(moe_layer, "new_preactivations", lambda *args: saved.append(args) or new_preactivations(*args))
    config = MoEConfig(hidden_dim=32, intermediate_dim=16, num_experts=4, top_k=2, dtype=F32)
    layer = DeepSeekMoELayer(config, device=device)
    x = make_activations(3, config.hidden_dim, seed=6, dtype=F32, device=device)
    with backward_selected("triton"):
        with torch.no_grad():
            layer(x)
        with torch.inference_mode():
            layer(x)
        layer.requires_grad_(False)
        layer(x)
        assert not saved
        layer.requires_grad_(True)
        layer(x).sum().backward()
    assert len(saved) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tail_tiles_in_backward(device, monkeypatch, dtype):
    """dY W_down and dX run an expert's last rows in half-height tiles where they fit (32-row
    tiles, 16-row tails here): rows on both sides of that edge, gradients as the PyTorch
    backward's."""
    monkeypatch.setenv(_tiles.FORCE_TILES_ENV, TAIL_EDGE_TILES)
    config = MoEConfig(hidden_dim=33, intermediate_dim=17, num_experts=7, top_k=2, n_shared_experts=1, dtype=dtype)
    topk_weights, topk_ids = routing_with_counts(TAIL_EDGE_COUNTS, top_k=2, seed=6, device=device)
    _assert_gradients_match(*_run_both(config, topk_ids.shape[0], (topk_weights, topk_ids), 3, device), dtype)
