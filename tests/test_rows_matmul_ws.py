"""The warp-specialized row-tiled GEMM (kernels/_rows_matmul_ws.py, Gluon on Hopper) against a
float64 per-expert loop, for dX's form ([dG | dU] @ [W_gate; W_up], output by slot) and the forward
down projection's (a transposed weight, routing weights in the epilogue), and the rule of where
it runs. Gluon has no interpreter, so the kernel's tests need a Hopper GPU; the CPU tier runs the
rule's tests and the Triton twin (test_fused_moe.py, test_backward.py)."""

import pytest
import torch
from conftest import assert_switch_sides_agree, check_switch_runs_only_where_built, layer_step_with
from hypothesis import given
from hypothesis import strategies as st
from strategies import WS_SHAPES, ws_expert_rows, ws_widths

from deepseek_moe_fused._env import env_set
from deepseek_moe_fused.kernels import _tiles, launch
from deepseek_moe_fused.kernels import launch_rows_matmul_ws as rows_ws
from deepseek_moe_fused.kernels._alloc import new_output, poisoned_outputs
from deepseek_moe_fused.kernels.launch import RowsMatmul
from deepseek_moe_fused.routing_metadata import build_routing_metadata
from deepseek_moe_fused.testing import TOLERANCES, error_stats, make_activations, routing_with_counts

# T=tokens, E=experts, K=top_k, H=hidden (output columns), I=reduction of one half, S=shared's


def _skip_unless_rows_ws(device, dtype=torch.bfloat16):
    if not rows_ws.rows_ws_enabled(device, dtype):
        pytest.skip("the warp-specialized row-tiled GEMM needs a Hopper GPU (sm_90) and a verified Triton")


TILES = [
    _tiles.ROWS_WS,  # one MMA partition of 8 warps
    _tiles.RowsWsTiles(256, 64, 4, 2, split_rows=True),  # two partitions, half of each tile's rows each
    _tiles.RowsWsTiles(128, 64, 4, 2),  # two partitions taking tiles in turn
]


def _tiles_id(t):
    return f"n{t.block_n}-s{t.stages}-{'split' if t.split_rows else f'{t.mma_groups}mma'}"


def _oracle_rows(a, b, metadata, scale=None):
    """float64: out[slot of row r] = scale[slot] * a[r] @ b[expert of r] (b (E, red, cols))."""
    offsets = metadata.expert_offsets.tolist()
    rows_out = torch.zeros(a.shape[0], b.shape[-1], dtype=torch.float64, device=a.device)
    for e in range(metadata.num_experts):
        lo, hi = offsets[e], offsets[e + 1]
        rows_out[lo:hi] = a[lo:hi].double() @ b[e].double()
    if scale is not None:
        rows_out *= scale.reshape(-1)[metadata.sorted_slot.long()].double()[:, None]
    out = torch.empty_like(rows_out)
    out[metadata.sorted_slot.long()] = rows_out
    return out


def _problem(device, counts, K, H, I, S, block_m, dtype):
    E = len(counts)
    topk_weights, topk_ids = routing_with_counts(counts, K, device=device)
    metadata = build_routing_metadata(topk_ids, E, block_m)
    T, R = topk_ids.shape[0], metadata.num_rows
    w = {
        "gate_up": make_activations(E * 2 * I, H, seed=3, scale=H**-0.5, dtype=dtype, device=device).view(E, 2 * I, H),
        "down": make_activations(E * H, I, seed=4, scale=I**-0.5, dtype=dtype, device=device).view(E, H, I),
        "shared_gate": make_activations(S, H, seed=5, scale=H**-0.5, dtype=dtype, device=device),
        "shared_up": make_activations(S, H, seed=6, scale=H**-0.5, dtype=dtype, device=device),
        "shared_down": make_activations(H, S, seed=7, scale=S**-0.5, dtype=dtype, device=device),
    }
    acts = {
        "dgu": make_activations(R, 2 * I, seed=8, dtype=dtype, device=device),
        "dgu_shared": make_activations(T, 2 * S, seed=9, dtype=dtype, device=device),
        "h": make_activations(R, I, seed=10, dtype=dtype, device=device),
        "h_shared": make_activations(T, S, seed=11, dtype=dtype, device=device),
    }
    return topk_weights, metadata, T, w, acts


def _check_both_forms(device, counts, K, H, I, S, block_m, dtype, tiles):
    topk_weights, metadata, T, w, a = _problem(device, counts, K, H, I, S, block_m, dtype)
    gate_up = w["gate_up"]
    with poisoned_outputs():
        dx_slot, dx_shared = new_output(a["dgu"], (T, K, H)), new_output(a["dgu"], (T, H))
        y_slot, y_shared = new_output(a["h"], (T, K, H)), new_output(a["h"], (T, H))
    # dX's form: a reduction over a's 2I columns against gate's rows, then up's.
    assert rows_ws.rows_matmul_ws(
        RowsMatmul(a["dgu"], gate_up[:, :I], dx_slot, b2=gate_up[:, I:]),
        RowsMatmul(a["dgu_shared"], w["shared_gate"], dx_shared, b2=w["shared_up"]),
        metadata, T, tiles,
    )  # fmt: skip
    # The forward down projection's: W_down read transposed, routing weights in the epilogue.
    assert rows_ws.rows_matmul_ws(
        RowsMatmul(a["h"], w["down"], y_slot, b_transposed=True),
        RowsMatmul(a["h_shared"], w["shared_down"], y_shared, b_transposed=True),
        metadata, T, tiles, topk_weights=topk_weights.contiguous(),
    )  # fmt: skip
    shared_gate_up = torch.cat([w["shared_gate"], w["shared_up"]]).double()
    results = [
        (dx_slot.view(T * K, H), _oracle_rows(a["dgu"], gate_up, metadata)),
        (dx_shared, a["dgu_shared"].double() @ shared_gate_up),
        (y_slot.view(T * K, H), _oracle_rows(a["h"], w["down"].transpose(1, 2), metadata, topk_weights)),
        (y_shared, a["h_shared"].double() @ w["shared_down"].double().T),
    ]
    return [error_stats(got, want) for got, want in results]


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", TILES, ids=_tiles_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("counts", "K", "H", "I", "S", "block_m"), WS_SHAPES)
def test_matches_oracle(device, counts, K, H, I, S, block_m, dtype, tiles):
    _skip_unless_rows_ws(device, dtype)
    for stats in _check_both_forms(device, counts, K, H, I, S, block_m, dtype, tiles):
        assert stats.within(TOLERANCES[dtype]), stats


@pytest.mark.gpu
@given(
    counts=ws_expert_rows,
    H=ws_widths(40),
    I=ws_widths(24),
    S=ws_widths(24),
    block_m=st.sampled_from([64, 128]),
    tiles=st.sampled_from(TILES),
)
def test_fuzzed_routings_match_oracle(device, counts, H, I, S, block_m, tiles):
    _skip_unless_rows_ws(device)
    for stats in _check_both_forms(device, counts, 2, H, I, S, block_m, torch.bfloat16, tiles):
        assert stats.within(TOLERANCES[torch.bfloat16]), stats


@pytest.mark.gpu
def test_no_rows_launch_nothing(device):
    _skip_unless_rows_ws(device)
    _, metadata, T, w, a = _problem(device, [0, 0], 2, 64, 64, 64, 128, torch.bfloat16)
    out = torch.empty(T, 2, 64, dtype=torch.bfloat16, device=device)
    gate_up = w["gate_up"]
    routed = RowsMatmul(a["dgu"], gate_up[:, :64], out, b2=gate_up[:, 64:])
    assert T == 0 and rows_ws.rows_matmul_ws(routed, None, metadata, T, _tiles.ROWS_WS)  # done: nothing to do


@pytest.mark.gpu
def test_misaligned_rows_fall_back(device):
    _skip_unless_rows_ws(device)
    _, metadata, T, w, a = _problem(device, [4, 6], 2, 20, 8, 8, 64, torch.bfloat16)  # H=20: 40-byte weight rows
    out = torch.zeros(T, 2, 20, dtype=torch.bfloat16, device=device)
    gate_up = w["gate_up"]
    assert not rows_ws.rows_matmul_ws(
        RowsMatmul(a["dgu"], gate_up[:, :8], out, b2=gate_up[:, 8:]), None, metadata, T, _tiles.ROWS_WS
    )
    assert not out.any()  # nothing launched


@pytest.mark.gpu
def test_layer_runs_it_and_matches_the_triton_kernel(device, monkeypatch):
    """A step with 1600 rows per expert: the forward's down projection and dX take the kernel,
    and the output and every gradient agree with the step on the Triton kernels."""
    _skip_unless_rows_ws(device)
    launched = []  # what each call of the kernel's launcher returned

    def spy(launcher):
        def launch_and_record(*args, **kwargs):
            launched.append(launcher(*args, **kwargs))
            return launched[-1]

        return launch_and_record

    monkeypatch.setattr(launch, "rows_matmul_ws", spy(launch.rows_matmul_ws))  # launch_rows_matmul's dispatch
    results = layer_step_with(device, rows_ws.ROWS_WS_ENV)
    assert launched == [True, True]  # the down projection and dX ran on it, in the "auto" step only
    assert_switch_sides_agree(results)


def test_runs_only_where_it_was_built_for(device):
    check_switch_runs_only_where_built(rows_ws.rows_ws_enabled, rows_ws.ROWS_WS_ENV, device)


@pytest.mark.parametrize(
    ("rows_per_expert", "picked"),
    [
        (192, False),  # v2-lite N=2048: within the spread of the Triton kernel
        (1535, False),
        (1536, True),  # v2-lite N=16384: dX 5%, the down projection 5-17% faster
        (4096, True),  # seed N=16384
        (None, False),  # unknown
    ],
)
def test_rule_picks_it_from_the_measured_rows(monkeypatch, rows_per_expert, picked):
    monkeypatch.delenv(_tiles.FORCE_TILES_ENV, raising=False)
    want = _tiles.ROWS_WS if picked else None
    assert _tiles.rows_ws_tiles(rows_per_expert, True) == want
    assert _tiles.rows_ws_tiles(rows_per_expert, False) is None
    assert _tiles.backward_tiles(128, 2048, 1408, False, 2, rows_per_expert, rows_ws=True).dx_ws == want
    with env_set(_tiles.FORCE_TILES_ENV, "block_n=128"):  # forced tiles are the Triton kernel's
        assert _tiles.backward_tiles(128, 2048, 1408, False, 2, rows_per_expert, rows_ws=True).dx_ws is None


def test_rejects_an_unbuilt_mma_layout():
    with pytest.raises(ValueError, match="mma_groups"):
        _tiles.RowsWsTiles(256, 64, 3, 3)
    with pytest.raises(ValueError, match="split_rows"):
        _tiles.RowsWsTiles(256, 64, 3, 1, split_rows=True)
