"""The fused expert kernels against the float64 oracle and the naive loop, on fuzzed problems."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st
from strategies import (
    TAIL_EDGE_COUNTS,
    TAIL_EDGE_TILES,
    assume_little_cancellation,
    assume_well_conditioned,
    moe_configs,
    num_tokens,
    routing_kinds,
    seeds,
    x_scales,
)

from deepseek_moe_fused import MoEConfig, fused_gate_up_swiglu, fused_moe_experts
from deepseek_moe_fused._env import env_set
from deepseek_moe_fused.kernels import _tiles
from deepseek_moe_fused.kernels._alloc import poisoned_outputs
from deepseek_moe_fused.kernels.launch import ExpertWeights
from deepseek_moe_fused.reference import naive_moe_experts, oracle_moe_experts
from deepseek_moe_fused.routing_metadata import build_routing_metadata
from deepseek_moe_fused.testing import TOLERANCES, error_stats, make_moe_inputs, routing_with_counts


@st.composite
def problems(draw):
    config = draw(moe_configs())
    T = draw(num_tokens(config))
    return config, T, draw(routing_kinds), draw(x_scales(config.dtype)), draw(seeds)


def _inputs(problem, device):
    config, T, kind, scale, seed = problem
    return make_moe_inputs(config, T, routing=kind, seed=seed, x_scale=scale, device=device)


def _assert_matches(out, ref, dtype, what="fused"):
    stats = error_stats(out, ref)
    tol = TOLERANCES[dtype]
    assert stats.within(tol), f"{what} vs reference: {stats} exceeds {tol}"


def _prime_e_config(dtype=torch.float32, n_shared_experts=1):
    return MoEConfig(
        hidden_dim=33, intermediate_dim=17, num_experts=7, top_k=3, n_shared_experts=n_shared_experts, dtype=dtype
    )


@given(problem=problems())
@example(problem=(_prime_e_config(), 17, "uniform", 1.0, 0))  # prime E, non-pow2 H and I
@example(problem=(_prime_e_config(n_shared_experts=0), 1, "one_expert", 1.0, 0))  # decode, no shared
@example(problem=(_prime_e_config(torch.float16), 64, "repeated_expert", 10.0, 3))  # same expert in all slots
def test_fused_matches_oracle_and_naive(device, problem):
    inputs = _inputs(problem, device)
    dtype = problem[0].dtype
    with poisoned_outputs():  # any element the kernels skip stays NaN and fails the comparison
        out = fused_moe_experts(*inputs.kernel_args())
    assert out.shape == inputs.x.shape and out.dtype == inputs.x.dtype
    ref = oracle_moe_experts(*inputs.kernel_args())
    assume_well_conditioned(inputs.kernel_args(), ref)
    _assert_matches(out, ref, dtype)
    naive = naive_moe_experts(*inputs.kernel_args(), compute_dtype=torch.float64)
    _assert_matches(out, naive, dtype, "fused vs naive loop")


@given(problem=problems())
def test_every_intermediate_is_written(device, problem):
    """Stage 1 and 2 buffers too, not only the final output (which could mask a missed row)."""
    from deepseek_moe_fused.kernels.launch import down_proj, gate_up_swiglu, routing_metadata_for

    inputs = _inputs(problem, device)
    w = inputs.weights
    metadata = routing_metadata_for(inputs.topk_ids, w)
    with poisoned_outputs():
        h_routed, h_shared = gate_up_swiglu(inputs.x, w, metadata)
        y_routed, y_shared = down_proj(h_routed, h_shared, inputs.topk_weights, w, metadata)
    for name, t in {"h_routed": h_routed, "h_shared": h_shared, "y_routed": y_routed, "y_shared": y_shared}.items():
        if t is not None:
            assert not t.isnan().any(), f"{name} has unwritten (NaN) elements"


@given(problem=problems())
def test_stage1_matches_reference(device, problem):
    inputs = _inputs(problem, device)
    w = inputs.weights
    with poisoned_outputs():
        result = fused_gate_up_swiglu(inputs.x, inputs.topk_ids, w.gate_up_proj, w.shared_gate, w.shared_up)
    # T=tokens, K=top_k, H=hidden, I=intermediate. Every expert runs densely over all tokens and
    # each slot takes its expert's row (float64 on x's device): gathering each slot's weights as
    # (T, K, 2I, H) took up to 65 GB of host memory at the GPU tier's sizes and killed a worker.
    x64, ids = inputs.x.double(), inputs.topk_ids.long()
    x_abs = x64.abs()
    I = w.intermediate_dim
    g = torch.zeros((*ids.shape, I), dtype=torch.float64, device=x64.device)
    u, terms = torch.zeros_like(g), torch.zeros_like(g)
    for expert in range(w.num_experts):
        gate, up = w.gate_up_proj[expert].double().split(I)
        mine = (ids == expert)[..., None]  # (T, K, 1)
        g = torch.where(mine, (x64 @ gate.T)[:, None], g)
        u = torch.where(mine, (x64 @ up.T)[:, None], u)
        # |silu(g) u| <= |g| |u| <= (|x| |W_gate|) (|x| |W_up|): a product of two H-term sums.
        terms = torch.where(mine, ((x_abs @ gate.abs().T) * (x_abs @ up.abs().T))[:, None], terms)
    h_routed = F.silu(g) * u
    assume_little_cancellation(terms, h_routed, x64.shape[1])  # found by fuzzing: H=3, x ~ 1e-3, one token
    _assume_above_underflow(h_routed, problem[0].dtype)
    _assert_matches(result.routed_by_slot(), h_routed, problem[0].dtype, "h_routed")
    if w.has_shared:
        h_shared = F.silu(x64 @ w.shared_gate.double().T) * (x64 @ w.shared_up.double().T)
        _assume_above_underflow(h_shared, problem[0].dtype)
        _assert_matches(result.h_shared, h_shared, problem[0].dtype, "h_shared")


def _assume_above_underflow(ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Discard outputs that lie wholly at the dtype's underflow threshold: silu of a large negative
    pre-activation is g e^g, -7e-39 at H = S = 1, x ~ 100 (found by fuzzing), which fp32 rounds to
    a subnormal or zero in any implementation. Elements that underflow beside normal ones add
    nothing measurable to the relative errors, so only whole outputs are discarded."""
    if ref.numel():
        assume(float(ref.norm()) > 1e3 * torch.finfo(dtype).tiny)


@given(problem=problems())
def test_deterministic_and_fusion_invariant(device, problem):
    """Two runs are bitwise equal, and so is the unfused launch order of the three stages (same
    tiles, same sums; the decode path, which sums slots in registers, is only run-to-run equal)."""
    inputs = _inputs(problem, device)
    first = fused_moe_experts(*inputs.kernel_args())
    assert torch.equal(first, fused_moe_experts(*inputs.kernel_args()))
    with env_set(_tiles.DECODE_ENV, "off"):
        fused = fused_moe_experts(*inputs.kernel_args())
        unfused = fused_moe_experts(*inputs.kernel_args(), fuse_shared=False)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=0)


@given(problem=problems(), data=st.data())
def test_token_permutation_equivariance(device, problem, data):
    inputs = _inputs(problem, device)
    T = inputs.x.shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(T))), dtype=torch.long, device=device)
    out = fused_moe_experts(*inputs.kernel_args())
    args = list(inputs.kernel_args())
    args[0], args[1], args[2] = inputs.x[perm], inputs.topk_weights[perm], inputs.topk_ids[perm]
    _assert_matches(fused_moe_experts(*args), out[perm], problem[0].dtype, "permuted tokens")


@given(problem=problems(), data=st.data())
def test_expert_relabelling_invariance(device, problem, data):
    """Renaming experts (weights and ids together) changes nothing."""
    inputs = _inputs(problem, device)
    E = inputs.weights.num_experts
    relabel = torch.tensor(data.draw(st.permutations(range(E))), dtype=torch.long, device=device)
    w = inputs.weights
    inverse = torch.empty_like(relabel)
    inverse[relabel] = torch.arange(E, device=device)
    # new expert relabel[e] holds old expert e's weights
    args = list(inputs.kernel_args())
    args[2] = relabel[inputs.topk_ids]
    args[3], args[4] = w.gate_up_proj[inverse].contiguous(), w.down_proj[inverse].contiguous()
    out = fused_moe_experts(*inputs.kernel_args())
    _assert_matches(fused_moe_experts(*args), out, problem[0].dtype, "relabelled experts")


@given(problem=problems(), data=st.data())
def test_nan_stays_in_its_token(device, problem, data):
    config, T = problem[0], problem[1]
    assume(T > 0)  # an empty batch has no token to poison; test_empty_batch covers it
    inputs = _inputs(problem, device)
    bad = data.draw(st.integers(0, T - 1))
    inputs.x[bad, data.draw(st.integers(0, config.hidden_dim - 1))] = float("nan")
    out = fused_moe_experts(*inputs.kernel_args())
    others = torch.arange(T, device=device) != bad
    assert out[bad].isnan().any()
    assert not out[others].isnan().any()


def test_empty_batch(device):
    inputs = make_moe_inputs(_prime_e_config(), 0, device=device)
    out = fused_moe_experts(*inputs.kernel_args())
    assert out.shape == (0, 33)
    h = fused_gate_up_swiglu(inputs.x, inputs.topk_ids, inputs.weights.gate_up_proj)
    assert h.h_routed.shape == (0, 17) and h.h_shared is None


def test_shared_weights_with_other_row_strides(device):
    # The gate/up kernel reads both shared weights through one set of strides: a shared_up that
    # is a column slice of a wider matrix (row stride 48, not 33) must still give the oracle.
    config = _prime_e_config()
    inputs = make_moe_inputs(config, 17, seed=2, device=device)
    args = list(inputs.kernel_args())
    wider = torch.randn(args[6].shape[0], 48, device=device, dtype=args[6].dtype)
    wider[:, :33] = args[6]
    args[6] = wider[:, :33]
    with poisoned_outputs():
        out = fused_moe_experts(*args)
    _assert_matches(out, oracle_moe_experts(*args), config.dtype)


@pytest.mark.gpu
def test_bf16_large_problem(device):
    """A real-size bf16 problem with int64 indexing pressure on the expert axis."""
    config = MoEConfig(hidden_dim=1024, intermediate_dim=768, num_experts=64, top_k=6, n_shared_experts=2)
    inputs = make_moe_inputs(config, 1031, routing="zipf", device=device)
    out = fused_moe_experts(*inputs.kernel_args())
    ref = naive_moe_experts(*inputs.kernel_args(), compute_dtype=torch.float32)
    _assert_matches(out, ref, torch.bfloat16)


def _good_args(device):
    return list(make_moe_inputs(_prime_e_config(), 5, device=device).kernel_args())


@pytest.mark.parametrize(
    ("index", "bad", "error", "match"),
    [
        (0, lambda a: a[0].double(), TypeError, "x must have dtype"),
        (0, lambda a: a[0][0], ValueError, "x must be 2-D"),
        (0, lambda a: a[0].t().contiguous().t(), ValueError, "x must be contiguous"),
        (0, lambda a: "x", TypeError, "x must be a torch.Tensor"),
        (1, lambda a: a[1][:, :2], ValueError, "topk_weights must have shape"),
        (2, lambda a: a[2].float(), TypeError, "topk_ids must have dtype"),
        (2, lambda a: a[2] + 7, ValueError, r"topk_ids must lie in \[0, 7\)"),
        (2, lambda a: a[2] - 8, ValueError, "topk_ids must lie"),
        (2, lambda a: a[2][:3], ValueError, "topk_ids must have shape"),
        (3, lambda a: a[3].half(), TypeError, "gate_up_proj must have dtype"),
        (3, lambda a: a[3][:, :-1], ValueError, "gate_up_proj must have shape"),
        (4, lambda a: a[4][:, :, :-1], ValueError, "down_proj must have shape"),
        (5, lambda a: a[5][:-1], ValueError, "shared_up must have shape"),
        (7, lambda a: None, ValueError, "must be given together"),
    ],
)
def test_bad_inputs_raise(device, index, bad, error, match):
    args = _good_args(device)
    args[index] = bad(args)
    with pytest.raises(error, match=match):
        fused_moe_experts(*args)


def test_too_many_slots_raise(device):
    args = _good_args(device)
    args[2] = torch.zeros(5, 8, dtype=torch.long, device=device)
    args[1] = torch.ones(5, 8, device=device)
    with pytest.raises(ValueError, match="top_k=8 columns but there are only 7 experts"):
        fused_moe_experts(*args)


def test_expert_weights_on_other_device_raise():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to put a weight elsewhere")
    args = _good_args(torch.device("cuda"))
    args[4] = args[4].cpu()
    with pytest.raises(ValueError, match="down_proj must be on"):
        fused_moe_experts(*args)


def test_expert_weights_dataclass_reports_dims():
    w = ExpertWeights(torch.empty(3, 10, 4), torch.empty(3, 4, 5))
    assert (w.num_experts, w.hidden_dim, w.intermediate_dim, w.shared_dim, w.has_shared) == (3, 4, 5, 0, False)


def test_forced_tiles_change_the_launch_not_the_result(device, monkeypatch):
    """The tuning/gate override really reaches the kernels, which stay correct under it."""
    inputs = make_moe_inputs(_prime_e_config(), 40, device=device)
    monkeypatch.setenv(_tiles.FORCE_TILES_ENV, "block_m=32,block_n=16,block_k=16,num_stages=1")
    tiles = _tiles.expert_tiles(40, 7, 33, 17, 0, 3, interpret=False)
    assert (tiles.block_m, tiles.down.block_n, tiles.gate_up.block_k) == (32, 16, 16)
    with poisoned_outputs():
        out = fused_moe_experts(*inputs.kernel_args())
    _assert_matches(out, oracle_moe_experts(*inputs.kernel_args()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tail", ["auto", "off"])  # "off": the full-height path the tails replace
def test_tail_tiles_match_oracle(device, monkeypatch, dtype, tail):
    """An expert's last tile runs half height when its rows fit; rows at both sides of that edge."""
    monkeypatch.setenv(_tiles.FORCE_TILES_ENV, TAIL_EDGE_TILES)
    monkeypatch.setenv(_tiles.TAIL_TILES_ENV, tail)
    assert _tiles.tail_block_m(32, 33) == (16 if tail == "auto" else 32)
    topk_weights, topk_ids = routing_with_counts(TAIL_EDGE_COUNTS, top_k=2, seed=5, device=device)
    inputs = make_moe_inputs(_prime_e_config(dtype), topk_ids.shape[0], seed=4, device=device)
    inputs.topk_weights, inputs.topk_ids = topk_weights, topk_ids
    metadata = build_routing_metadata(topk_ids, 7, 32)
    assert metadata.expert_counts.tolist() == TAIL_EDGE_COUNTS
    with poisoned_outputs():
        out = fused_moe_experts(*inputs.kernel_args())
    _assert_matches(out, oracle_moe_experts(*inputs.kernel_args()), dtype)
