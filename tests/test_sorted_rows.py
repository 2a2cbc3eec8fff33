"""The sorted-rows copy (kernels/_sorted_rows.py) against indexing by each sorted row's token."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import routing_kinds, seeds

from deepseek_moe_fused.kernels import _tiles
from deepseek_moe_fused.kernels._alloc import poisoned_outputs
from deepseek_moe_fused.kernels.launch import gather_sorted_rows
from deepseek_moe_fused.routing_metadata import build_routing_metadata
from deepseek_moe_fused.testing import make_activations, make_routing


def _assert_rows_in_sorted_order(T, E, K, H, kind, seed, dtype, device):
    _, ids = make_routing(kind, T, E, K, seed=seed, device=device)
    metadata = build_routing_metadata(ids, E, 16)
    src = make_activations(T, H, seed=seed + 1, dtype=dtype, device=device)
    with poisoned_outputs():  # a row or column the kernel skips stays NaN
        got = gather_sorted_rows(src, metadata)
    assert torch.equal(got, src[metadata.sorted_slot.long() // K])


@given(
    T=st.integers(0, 40),
    E=st.integers(1, 12),
    K=st.integers(1, 6),
    H=st.integers(1, 80),
    kind=routing_kinds,
    seed=seeds,
    dtype=st.sampled_from([torch.float16, torch.float32]),
)
def test_sorted_rows_equal_indexing(device, T, E, K, H, kind, seed, dtype):
    _assert_rows_in_sorted_order(T, E, min(K, E), H, kind, seed, dtype, device)


@pytest.mark.parametrize(
    "H",
    [
        2048,  # one program per token: the widest block
        2100,  # two column programs, the second 52 columns wide
    ],
)
def test_sorted_rows_past_one_block(device, H):
    assert _tiles.sorted_rows_block_h(H) == 2048
    _assert_rows_in_sorted_order(9, 5, 3, H, "uniform", 4, torch.bfloat16, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sorted_rows_times_their_slots_weight(device, dtype):
    """dY's copy for the down weights' gradient: each sorted row times its own slot's routing
    weight, in fp32, rounded once (rows of one token get different factors)."""
    _, ids = make_routing("repeated_expert", 13, 6, 3, seed=7, device=device)
    metadata = build_routing_metadata(ids, 6, 16)
    src = make_activations(13, 40, seed=8, dtype=dtype, device=device)
    scale = torch.rand(13 * 3, generator=torch.Generator().manual_seed(9)).to(device) + 0.5
    with poisoned_outputs():
        got = gather_sorted_rows(src, metadata, scale=scale)
    slots = metadata.sorted_slot.long()
    assert torch.equal(got, (src[slots // 3].float() * scale[slots, None]).to(dtype))


def test_sorted_rows_into_a_given_buffer_with_row_stride(device):
    """The backward writes dY into X's buffer; a wider buffer's column view works the same."""
    _, ids = make_routing("uniform", 11, 4, 2, seed=3, device=device)
    metadata = build_routing_metadata(ids, 4, 16)
    src = make_activations(11, 24, seed=5, dtype=torch.float16, device=device)
    wide = torch.full((22, 40), float("nan"), dtype=torch.float16, device=device)
    gather_sorted_rows(src, metadata, out=wide[:, :24])
    assert torch.equal(wide[:, :24], src[metadata.sorted_slot.long() // 2])
    assert wide[:, 24:].isnan().all()
