"""The warp-specialized gate/up kernel (kernels/_gate_up_ws.py, Gluon on Hopper) against a float64
per-expert loop: h = silu(X gate^T) * (X up^T) and the pre-activations, for the routed experts'
sorted rows and the shared MLP's tokens; the layer with it on and off; and the rule of where it
runs. Gluon has no interpreter, so the kernel's tests need a Hopper GPU; the CPU tier runs the
rule's tests and the Triton twin (test_fused_moe.py, test_backward.py)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_switch_sides_agree, check_switch_runs_only_where_built, layer_step_with
from hypothesis import given
from hypothesis import strategies as st
from strategies import WS_SHAPES, ws_expert_rows, ws_widths

from deepseek_moe_fused import MoEConfig
from deepseek_moe_fused.benchmark import make_layer
from deepseek_moe_fused.kernels import _tiles, launch
from deepseek_moe_fused.kernels import launch_gate_up_ws as gate_up_ws
from deepseek_moe_fused.kernels._alloc import new_output, poisoned_outputs
from deepseek_moe_fused.kernels.launch import gather_sorted_rows
from deepseek_moe_fused.routing_metadata import build_routing_metadata
from deepseek_moe_fused.testing import TOLERANCES, error_stats, make_activations, routing_with_counts

# T=tokens, E=experts, K=top_k, H=hidden (the reduction), I=routed columns, S=shared columns


def _skip_unless_gate_up_ws(device, dtype=torch.bfloat16):
    if not gate_up_ws.gate_up_ws_enabled(device, dtype):
        pytest.skip("the warp-specialized gate/up kernel needs a Hopper GPU (sm_90) and a verified Triton")


def _oracle(x, gate, up):
    """float64 (h, [gate | up] pre-activations) of rows x against one expert's (n, H) weights."""
    g, u = x.double() @ gate.double().T, x.double() @ up.double().T
    return F.silu(g) * u, torch.cat([g, u], dim=1)


def _check(device, counts, K, H, I, S, block_m, dtype, save=True, tiles=_tiles.GATE_UP_WS):
    E = len(counts)
    _, topk_ids = routing_with_counts(counts, K, device=device)
    metadata = build_routing_metadata(topk_ids, E, block_m)
    T, R = topk_ids.shape[0], metadata.num_rows
    x = make_activations(T, H, seed=1, dtype=dtype, device=device)
    w = make_activations(E * 2 * I, H, seed=3, scale=H**-0.5, dtype=dtype, device=device).view(E, 2 * I, H)
    shared_gate = make_activations(S, H, seed=5, scale=H**-0.5, dtype=dtype, device=device)
    shared_up = make_activations(S, H, seed=6, scale=H**-0.5, dtype=dtype, device=device)
    x_sorted = gather_sorted_rows(x, metadata)
    with poisoned_outputs():
        h, h_s = new_output(x, (R, I)), new_output(x, (T, S))
        pre, pre_s = (new_output(x, (R, 2 * I)), new_output(x, (T, 2 * S))) if save else (None, None)
    routed = gate_up_ws.GateUpSide(x_sorted, w[:, :I], w[:, I:], h, pre)
    shared = gate_up_ws.GateUpSide(x, shared_gate.unsqueeze(0), shared_up.unsqueeze(0), h_s, pre_s)
    assert gate_up_ws.gate_up_ws(routed, shared, metadata, T, tiles)
    offsets = metadata.expert_offsets.tolist()
    want_h = torch.empty(R, I, dtype=torch.float64, device=device)
    want_pre = torch.empty(R, 2 * I, dtype=torch.float64, device=device)
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        want_h[lo:hi], want_pre[lo:hi] = _oracle(x_sorted[lo:hi], w[e, :I], w[e, I:])
    want_h_s, want_pre_s = _oracle(x, shared_gate, shared_up)
    results = [(h, want_h), (h_s, want_h_s)]
    if save:
        results += [(pre, want_pre), (pre_s, want_pre_s)]
    return [error_stats(got, want) for got, want in results]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("save", [True, False], ids=["preacts", "inference"])
@pytest.mark.parametrize(("counts", "K", "H", "I", "S", "block_m"), WS_SHAPES)
def test_matches_oracle(device, counts, K, H, I, S, block_m, dtype, save):
    _skip_unless_gate_up_ws(device, dtype)
    for stats in _check(device, counts, K, H, I, S, block_m, dtype, save):
        assert stats.within(TOLERANCES[dtype]), stats


@pytest.mark.gpu
@given(
    counts=ws_expert_rows,
    H=ws_widths(40),
    I=ws_widths(24),
    S=ws_widths(24),
    block_m=st.sampled_from([64, 128]),
    stages=st.sampled_from([2, 3, 4]),
)
def test_fuzzed_routings_match_oracle(device, counts, H, I, S, block_m, stages):
    _skip_unless_gate_up_ws(device)
    tiles = _tiles.RowsWsTiles(128, 64, stages, 1)
    for stats in _check(device, counts, 2, H, I, S, block_m, torch.bfloat16, tiles=tiles):
        assert stats.within(TOLERANCES[torch.bfloat16]), stats


@pytest.mark.gpu
def test_no_rows_launch_nothing(device):
    _skip_unless_gate_up_ws(device)
    _, topk_ids = routing_with_counts([0, 0], 2, device=device)
    metadata = build_routing_metadata(topk_ids, 2, 128)
    w = make_activations(2 * 128, 64, seed=3, device=device).view(2, 128, 64)
    rows = torch.empty(0, 64, dtype=torch.bfloat16, device=device)
    h = torch.empty(0, 64, dtype=torch.bfloat16, device=device)
    side = gate_up_ws.GateUpSide(rows, w[:, :64], w[:, 64:], h, None)
    assert gate_up_ws.gate_up_ws(side, None, metadata, 0, _tiles.GATE_UP_WS)  # done: nothing to do


@pytest.mark.gpu
def test_misaligned_rows_fall_back(device):
    _skip_unless_gate_up_ws(device)
    _, topk_ids = routing_with_counts([4, 6], 2, device=device)
    metadata = build_routing_metadata(topk_ids, 2, 64)
    x = make_activations(5, 20, seed=1, device=device)  # H=20: 40-byte rows
    w = make_activations(2 * 16, 20, seed=3, device=device).view(2, 16, 20)
    h = torch.zeros(10, 8, dtype=torch.bfloat16, device=device)
    side = gate_up_ws.GateUpSide(gather_sorted_rows(x, metadata), w[:, :8], w[:, 8:], h, None)
    assert not gate_up_ws.gate_up_ws(side, None, metadata, 5, _tiles.GATE_UP_WS)
    assert not h.any()  # nothing launched


@pytest.mark.gpu
def test_layer_runs_it_and_matches_the_triton_kernel(device, monkeypatch):
    """A step with 1600 rows per expert: stage 1 takes the kernel, the backward reads the X rows
    it gathered, and the output and every gradient agree with the step on the Triton kernels."""
    _skip_unless_gate_up_ws(device)
    launched = []  # what each call of the kernel's launcher returned

    def spy(*args, **kwargs):
        launched.append(gate_up_ws.gate_up_ws(*args, **kwargs))
        return launched[-1]

    monkeypatch.setattr(launch, "gate_up_ws", spy)  # gate_up_swiglu's dispatch
    results = layer_step_with(device, gate_up_ws.GATE_UP_WS_ENV)
    assert launched == [True]  # stage 1 ran on it, in the "auto" step only
    assert_switch_sides_agree(results)


def test_runs_only_where_it_was_built_for(device):
    check_switch_runs_only_where_built(gate_up_ws.gate_up_ws_enabled, gate_up_ws.GATE_UP_WS_ENV, device)


@pytest.mark.parametrize(
    ("rows_per_expert", "picked"),
    [
        (192, False),  # v2-lite N=2048
        (1535, False),
        (1536, True),  # v2-lite N=16384
        (4096, True),  # seed N=16384
        (None, False),  # unknown
    ],
)
def test_rule_picks_it_from_the_rows(rows_per_expert, picked):
    want = _tiles.GATE_UP_WS if picked else None
    assert _tiles.gate_up_ws_tiles(rows_per_expert, True) == want
    assert _tiles.gate_up_ws_tiles(rows_per_expert, False) is None


def test_forward_buffers_follow_the_rule(device):
    """X in sorted rows is a buffer the forward fills exactly where the tiles put stage 1 on the kernel."""
    config = MoEConfig(64, 32, 2, 1, n_shared_experts=1, dtype=torch.bfloat16)
    w = make_layer(config, device, seed=0).expert_weights()
    _, topk_ids = routing_with_counts([40, 24], 1, device=device)
    x = make_activations(topk_ids.shape[0], 64, seed=1, device=device)
    tiles = launch.tiles_for(x.shape[0], w, 1)
    metadata = build_routing_metadata(topk_ids, 2, tiles.block_m)
    assert launch.new_preactivations(x, w, metadata, replace(tiles, gate_up_ws=None)).x_sorted is None
    buffers = launch.new_preactivations(x, w, metadata, replace(tiles, gate_up_ws=_tiles.GATE_UP_WS))
    assert buffers.x_sorted.shape == (metadata.num_rows, 64)
