"""The warp-specialized weight-gradient kernel (kernels/_weight_grad_ws.py, Gluon on Hopper)
against the float64 oracle, and the rule of where it runs. Gluon has no interpreter, so the
kernel's tests need a Hopper GPU; the CPU tier runs the rule's tests and the Triton twin
(test_tma.py, test_backward.py)."""

import itertools

import pytest
import torch
from conftest import assert_switch_sides_agree, check_switch_runs_only_where_built
from hypothesis import given
from hypothesis import strategies as st

from deepseek_moe_fused import MoEConfig
from deepseek_moe_fused._env import env_set
from deepseek_moe_fused.benchmark import make_layer
from deepseek_moe_fused.kernels import _tiles, launch_backward
from deepseek_moe_fused.kernels import launch_weight_grad_ws as ws
from deepseek_moe_fused.kernels._alloc import new_output, poisoned_outputs
from deepseek_moe_fused.reference import oracle_grouped_weight_grad
from deepseek_moe_fused.testing import TOLERANCES, error_stats, make_activations


def _skip_unless_ws(device, dtype=torch.bfloat16):
    if not ws.ws_enabled(device, dtype):
        pytest.skip(f"the warp-specialized kernel needs a Hopper GPU (sm_90) and Triton {ws.VERIFIED_TRITON}")


def _weight_grad_ws_vs_oracle(device, counts, P, Q, dtype, tiles):
    offsets = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=device)
    rows = sum(counts)
    a = make_activations(rows, P, seed=1, dtype=dtype, device=device)
    b = make_activations(rows, Q, seed=2, dtype=dtype, device=device)
    with poisoned_outputs():
        out = new_output(a, (len(counts), P, Q))
    assert ws.grouped_weight_grad_ws(a, b, out, offsets, tiles)
    return error_stats(out, oracle_grouped_weight_grad(a, b, offsets))


RINGS = [
    _tiles.WS_ONE_GROUP,
    _tiles.WS_PING_PONG,  # two warpgroups hand the ring to each other tile by tile
]


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", RINGS, ids=lambda t: f"{t.mma_groups}mma-r{t.block_r}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("counts", "P", "Q"),
    [
        ([0, 1, 63, 64, 65, 200, 0, 300], 200, 136),  # empty, one row, both sides of a 32- or 64-row step; P,Q off tile
        ([96] * 5, 256, 128),  # every expert ends mid-step: its partial box holds the next expert's rows
        ([700, 3], 2816, 2048),  # v2-lite's d gate_up; the last partial box runs past the matrix
        ([0, 0, 0], 128, 128),  # no rows at all: zeros
        ([40, 0, 33, 130, 64, 1] * 22, 256, 256),  # 528 tiles, 4 per program: turns over every kind of tile
    ],
)  # fmt: skip
def test_matches_oracle(device, counts, P, Q, dtype, tiles):
    _skip_unless_ws(device, dtype)
    stats = _weight_grad_ws_vs_oracle(device, counts, P, Q, dtype, tiles)
    assert stats.within(TOLERANCES[dtype]), stats


@pytest.mark.gpu
@given(
    counts=st.lists(st.integers(0, 300), min_size=1, max_size=9),
    P=st.integers(1, 48).map(lambda n: 8 * n),  # TMA needs 16-byte rows: multiples of 8 elements
    Q=st.integers(1, 48).map(lambda n: 8 * n),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    tiles=st.sampled_from(RINGS),
)
def test_fuzzed_routings_match_oracle(device, counts, P, Q, dtype, tiles):
    _skip_unless_ws(device, dtype)
    stats = _weight_grad_ws_vs_oracle(device, counts, P, Q, dtype, tiles)
    assert stats.within(TOLERANCES[dtype]), stats


@pytest.mark.gpu
def test_misaligned_rows_fall_back(device):
    _skip_unless_ws(device)
    a = make_activations(10, 20, dtype=torch.bfloat16, device=device)  # 40-byte rows
    b = make_activations(10, 16, dtype=torch.bfloat16, device=device)
    out = torch.zeros(2, 20, 16, dtype=torch.bfloat16, device=device)
    offsets = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    assert not ws.grouped_weight_grad_ws(a, b, out, offsets)
    assert not out.any()  # nothing launched


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("num_tokens", "ring"),
    [
        (192, _tiles.WS_ONE_GROUP),  # 96 rows per expert
        (512, _tiles.WS_PING_PONG),  # 256 rows per expert
    ],
)
def test_layer_backward_runs_it_and_matches_the_triton_kernel(device, monkeypatch, num_tokens, ring):
    _skip_unless_ws(device)
    rings = []
    launcher = launch_backward.grouped_weight_grad_ws
    monkeypatch.setattr(
        launch_backward, "grouped_weight_grad_ws", lambda *args: rings.append(args[4]) or launcher(*args)
    )
    config = MoEConfig(256, 192, 4, 2, n_shared_experts=1, dtype=torch.bfloat16)
    layer = make_layer(config, device, seed=0)
    x = make_activations(num_tokens, 256, seed=3, device=device)
    grads = {}
    for choice in ("auto", "off"):
        layer.zero_grad(set_to_none=True)
        with env_set(ws.WS_ENV, choice):
            layer(x).float().square().sum().backward()
        grads[choice] = (layer.experts.gate_up_proj.grad.clone(), layer.experts.down_proj.grad.clone())
    assert rings == [ring, ring]  # d gate_up and d down, in the "auto" step only
    # Same rows, same fp32 accumulation; the kernels step over them 32 or 64 rows at a time.
    assert_switch_sides_agree(grads)


def test_runs_only_where_it_was_built_for(device):
    check_switch_runs_only_where_built(ws.ws_enabled, ws.WS_ENV, device)


@pytest.mark.parametrize(
    ("rows_per_expert", "ring"),
    [
        (48, None),  # v2-lite N=512: measured 4% slower than the Triton kernel
        (96, _tiles.WS_ONE_GROUP),  # v2-lite N=1024: ping-pong measured 6% slower
        (128, _tiles.WS_ONE_GROUP),  # seed N=512: the two measured alike
        (192, _tiles.WS_PING_PONG),  # v2-lite N=2048
        (1024, _tiles.WS_PING_PONG),
        (2048, _tiles.WS_ONE_GROUP),  # seed N=8192: the longest experts measured faster; ping-pong 10% slower
        (4096, None),  # seed N=16384: not measured faster
        (None, None),  # unknown: many rows
    ],
)
def test_backward_tiles_pick_it_within_the_measured_range(monkeypatch, rows_per_expert, ring):
    monkeypatch.delenv(_tiles.FORCE_TILES_ENV, raising=False)
    tiles = _tiles.backward_tiles(128, 2048, 1408, False, 2, rows_per_expert, tma=True, ws=True)
    assert tiles.weight_grad_ws == ring
    assert _tiles.backward_tiles(128, 2048, 1408, False, 2, rows_per_expert, tma=True, ws=False).weight_grad_ws is None


def test_rejects_an_unbuilt_number_of_mma_groups(device):
    a = torch.zeros(0, 8, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="mma_groups"):
        ws.grouped_weight_grad_ws(
            a,
            a,
            torch.zeros(1, 8, 8, dtype=torch.bfloat16, device=device),
            torch.zeros(2, dtype=torch.int32, device=device),
            _tiles.WeightGradWsTiles(32, 4, 3),
        )
