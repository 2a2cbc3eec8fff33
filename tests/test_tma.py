"""TMA tiles: which matrices qualify, the switch, and both load paths of the forward and of the
weight gradients against the oracle."""

import itertools

import pytest
import torch

from deepseek_moe_fused import MoEConfig, fused_moe_experts
from deepseek_moe_fused._env import env_set
from deepseek_moe_fused.kernels import _tiles, _tma
from deepseek_moe_fused.kernels._alloc import new_output, poisoned_outputs
from deepseek_moe_fused.kernels._tiles import TileConfig
from deepseek_moe_fused.kernels.launch_backward import grouped_weight_grad
from deepseek_moe_fused.reference import oracle_grouped_weight_grad, oracle_moe_experts
from deepseek_moe_fused.testing import TOLERANCES, error_stats, make_activations, make_moe_inputs


@pytest.mark.parametrize(
    ("shape", "dtype", "qualifies"),
    [
        ((4, 32, 64), torch.bfloat16, True),  # contiguous experts: one (128, 64) matrix
        ((4, 32, 33), torch.bfloat16, False),  # rows of 66 bytes: not a multiple of 16
        ((4, 32, 36), torch.float32, True),  # rows of 144 bytes
        ((3, 20), torch.float16, False),  # rows of 40 bytes
    ],
)
def test_rows_of_checks_tma_layout(shape, dtype, qualifies):
    weight = torch.randn(shape).to(dtype)
    matrix = _tma.rows_of(weight)
    assert (matrix is not None) == qualifies
    if qualifies:
        assert matrix.shape == (weight.numel() // shape[-1], shape[-1])
        assert torch.equal(matrix, weight.reshape(-1, shape[-1]))


def test_rows_of_on_views():
    weight = torch.randn(8, 32, 64, dtype=torch.bfloat16)
    assert _tma.rows_of(weight[2:6]) is not None  # a run of experts: still one matrix
    assert _tma.rows_of(weight[:, ::2]) is not None  # every other row: one matrix of row stride 128
    assert _tma.rows_of(weight[::2]) is None  # every other expert: rows not evenly strided
    assert _tma.rows_of(weight[:, :16]) is None  # each expert's first half (a gate view): likewise
    assert _tma.rows_of(weight[:, :, :48]) is not None  # a column slice: 48 of each 64-element row
    assert _tma.rows_of(weight.view(-1)[1:1025].view(16, 64)) is None  # base 2 bytes off alignment


def test_switch_turns_tma_off(device, monkeypatch):
    with env_set(_tma.TMA_ENV, "off"):
        assert not _tma.tma_enabled(device)
    monkeypatch.setattr(_tma, "_descriptor_class", lambda: None)  # a Triton without host descriptors
    assert not _tma.tma_enabled(device)
    with env_set(_tma.TMA_ENV, "sometimes"), pytest.raises(ValueError, match=_tma.TMA_ENV):
        _tma.tma_enabled(device)


@pytest.fixture
def built_descriptors(monkeypatch) -> list:
    """The arguments of every TMA descriptor built while the test runs."""
    built = []
    make_descriptor = _tma.descriptor
    monkeypatch.setattr(_tma, "descriptor", lambda *args: built.append(args) or make_descriptor(*args))
    return built


@pytest.mark.parametrize("tma", ["auto", "off"])
@pytest.mark.parametrize(
    ("experts", "top_k", "hidden", "inner", "n_shared", "tokens"),
    [
        (7, 3, 64, 48, 2, 37),  # prime E; I below the column tile: gate tiles reach into up rows
        (4, 2, 96, 16, 0, 17),  # no shared expert
        (5, 2, 48, 32, 1, 1),  # one token, on the three stages (the decode path is off below)
    ],
)
def test_both_weight_load_paths_match_oracle(
    device, built_descriptors, tma, experts, top_k, hidden, inner, n_shared, tokens
):
    dtype = torch.float16
    config = MoEConfig(hidden, inner, experts, top_k, n_shared_experts=n_shared, dtype=dtype)
    inputs = make_moe_inputs(config, tokens, seed=tokens, device=device)
    # The two-launch decode path reads weights through pointers: this test is the three stages'.
    with env_set(_tma.TMA_ENV, tma), env_set(_tiles.DECODE_ENV, "off"), poisoned_outputs():
        out = fused_moe_experts(*inputs.kernel_args())
        tma_here = _tma.tma_enabled(device)
    # Both stages take descriptors wherever TMA is on: the aligned shapes above all qualify.
    assert bool(built_descriptors) == (tma == "auto" and tma_here)
    stats = error_stats(out, oracle_moe_experts(*inputs.kernel_args()))
    assert stats.within(TOLERANCES[dtype]), stats


@pytest.mark.parametrize("tma", ["auto", "off"])
def test_both_weight_gradient_load_paths_match_oracle(device, built_descriptors, tma):
    # Rows per expert against the 16-row step: none; exactly one step; one step and a row (the
    # tail box reaches into the next expert's rows, which must not enter the sum); less than one
    # step; several steps and a tail that runs past the last row of the matrix.
    counts = [0, 16, 17, 5, 40]
    offsets = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=device)
    rows, P, Q = sum(counts), 40, 24  # P and Q not multiples of the 16-wide output tile
    a = make_activations(rows, P, seed=1, dtype=torch.float16, device=device)
    b = make_activations(rows, Q, seed=2, dtype=torch.float16, device=device)
    with env_set(_tma.TMA_ENV, tma), poisoned_outputs():
        out = new_output(a, (len(counts), P, Q))
        grouped_weight_grad(a, b, out, offsets, TileConfig(16, 16, 16, 4, 1))
        tma_here = _tma.tma_enabled(device)
    assert len(built_descriptors) == (2 if tma == "auto" and tma_here else 0)
    stats = error_stats(out, oracle_grouped_weight_grad(a, b, offsets))
    assert stats.within(TOLERANCES[torch.float16]), stats
