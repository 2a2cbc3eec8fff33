"""Routing metadata: exact equality with the loop-built twin, and its invariants."""

from unittest.mock import patch

import pytest
import torch
import triton
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import routing_kinds, seeds

from deepseek_moe_fused import routing_metadata
from deepseek_moe_fused.reference import routing_metadata_twin
from deepseek_moe_fused.routing_metadata import PAD_EXPERT, RoutingMetadata, build_routing_metadata, max_routed_tiles
from deepseek_moe_fused.testing import make_routing


def _assert_equals_twin(meta: RoutingMetadata, twin: RoutingMetadata) -> None:
    """Every index array of `meta` equal, exactly, to the loop-built twin's."""
    for name in ("sorted_slot", "slot_to_row", "expert_offsets", "tile_expert", "tile_row_start"):
        assert torch.equal(getattr(meta, name).cpu(), getattr(twin, name)), name


@given(
    T=st.integers(0, 70),
    E=st.integers(1, 40),
    K=st.integers(1, 8),
    block_m=st.sampled_from([1, 2, 16, 64]),
    kind=routing_kinds,
    seed=seeds,
)
@example(T=0, E=3, K=1, block_m=16, kind="uniform", seed=0)  # no rows at all
@example(T=17, E=1, K=1, block_m=16, kind="uniform", seed=0)  # one expert, one partial tile
def test_metadata_equals_twin_and_invariants(device, T, E, K, block_m, kind, seed):
    K = min(K, E)
    _, ids = make_routing(kind, T, E, K, seed=seed, device=device)
    meta = build_routing_metadata(ids, E, block_m)
    twin = routing_metadata_twin(ids.cpu(), E, block_m)
    _assert_equals_twin(meta, twin)
    # Past one chunk these sizes take the one-launch path; forced onto histogram + scan + scatter
    # (a single chunk stays one launch) they must give the same.
    with patch.object(routing_metadata, "ONE_LAUNCH_MAX_ROWS", 0):
        three_launches = build_routing_metadata(ids, E, block_m)
    _assert_equals_twin(three_launches, twin)

    flat = ids.reshape(-1).cpu()
    sorted_slot, offsets = meta.sorted_slot.cpu().long(), meta.expert_offsets.cpu().long()
    # counts and offsets
    assert torch.equal(meta.expert_counts.cpu().long(), torch.bincount(flat, minlength=E))
    assert offsets[0] == 0 and offsets[-1] == T * K
    # a permutation, its inverse, and every row in its expert's range
    assert torch.equal(sorted_slot.sort().values, torch.arange(T * K))
    assert torch.equal(meta.slot_to_row.cpu().long()[sorted_slot], torch.arange(T * K))
    for e in range(E):
        assert (flat[sorted_slot[offsets[e] : offsets[e + 1]]] == e).all()
    # tiles cover each expert's rows exactly once; padding tiles are poisoned
    tile_expert, tile_start = meta.tile_expert.cpu().long(), meta.tile_row_start.cpu().long()
    real = tile_expert != PAD_EXPERT
    assert meta.max_tiles == max_routed_tiles(T * K, E, block_m)
    assert (tile_start[~real] == T * K).all() and (real[: int(real.sum())]).all()
    covered = torch.zeros(T * K, dtype=torch.long)
    for e, start in zip(tile_expert[real].tolist(), tile_start[real].tolist()):
        end = min(start + block_m, int(offsets[e + 1]))
        assert offsets[e] <= start < end
        covered[start:end] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize(
    "T, E, K, tile_elements",
    [
        (300, 100, 3, 16),  # 8 chunks, 16 programs of 8 columns, 8 total steps and 4 scan steps each
        (257, 7, 2, 8),  # one program (NUM_BINS 8), an odd last chunk, one chunk per step
        (600, 250, 8, 64),  # 38 chunks, NUM_BINS 256: 16 programs of 16 columns, ragged last steps
    ],
)
def test_chunk_scan_steps_and_programs(device, monkeypatch, T, E, K, tile_elements):
    """The chunk scan's many-program, many-step paths (a real batch needs thousands of slots per
    step to reach them), forced by a small tile budget."""
    monkeypatch.setattr(routing_metadata, "SCAN_TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(routing_metadata, "ONE_LAUNCH_MAX_ROWS", 0)  # these sizes would take one launch
    steps = routing_metadata.scan_steps(triton.next_power_of_2(E + 1))
    assert steps.scan_step * steps.bins_per_program <= max(tile_elements, steps.bins_per_program)
    _, ids = make_routing("uniform", T, E, K, seed=T, device=device)
    meta = build_routing_metadata(ids, E, 16)
    twin = routing_metadata_twin(ids.cpu(), E, 16)
    _assert_equals_twin(meta, twin)


@pytest.mark.parametrize(
    "T, E, K, block_m",
    [
        (1024, 8, 2, 128),  # seed N=1024: 2048 slots, 64 chunks
        (4096, 8, 2, 128),  # seed N=4096: ONE_LAUNCH_MAX_ROWS slots, 256 chunks
        (680, 64, 6, 64),  # v2-lite: 4080 slots (4096 x 128 counts), the last chunk of 16
        (129, 8, 2, 32),  # 258 slots: 9 chunks, the last of 2 slots
        (32, 256, 8, 16),  # V3-wide: NUM_BINS 512, 256 slots in 8 chunks
        (170, 64, 6, 64),  # v2-lite: 1020 slots, 32 chunks, the last of 28
    ],
)
def test_metadata_in_one_launch_over_several_chunks(device, monkeypatch, T, E, K, block_m):
    """Up to ONE_LAUNCH_MAX_ROWS slots each program places its chunk (ONE_LAUNCH_CHUNK_ROWS slots)
    from counts of its own: the histogram and scan kernels must not run, and the result is the twin's."""
    monkeypatch.setattr(routing_metadata, "_chunk_histogram_kernel", None)  # a launch would raise
    monkeypatch.setattr(routing_metadata, "_chunk_scan_kernel", None)
    _, ids = make_routing("uniform", T, E, K, seed=T, device=device)
    meta = build_routing_metadata(ids, E, block_m)
    twin = routing_metadata_twin(ids.cpu(), E, block_m)
    _assert_equals_twin(meta, twin)


@pytest.mark.parametrize(
    "num_rows, num_experts, one_launch",
    [
        (8192, 8, True),  # seed N=4096: ONE_LAUNCH_MAX_ROWS slots exactly
        (8194, 8, False),  # seed N=4097: past ONE_LAUNCH_MAX_ROWS
        (4092, 64, True),  # v2-lite N=682: 4096 x 128 counts
        (4098, 64, False),  # v2-lite N=683: 8192 x 128, measured slower in one launch (N=1024)
        (1024, 256, True),  # V3 N=128: 1024 x 512
        (2048, 256, False),  # V3 N=256: 2048 x 512
        (512, 1023, True),  # 512 x 1024 counts
        (1024, 1023, False),  # 1024 x 1024 counts
        (128, 4095, True),  # a single chunk is always one launch
    ],
)
def test_one_launch_rule(num_rows, num_experts, one_launch):
    assert routing_metadata.metadata_in_one_launch(num_rows, num_experts) == one_launch


def test_metadata_rejects_wrong_dtypes(device):
    meta = build_routing_metadata(torch.tensor([[0, 1]], device=device), 2, 16)
    with pytest.raises(TypeError, match="sorted_slot"):
        RoutingMetadata(**{**meta.__dict__, "sorted_slot": meta.sorted_slot.long()})
    with pytest.raises(ValueError, match="expert_offsets"):
        RoutingMetadata(**{**meta.__dict__, "expert_offsets": meta.expert_offsets[:-1]})
