"""Tile choice: the tuned table's lookup, its fallbacks, and the env override."""

import json
from dataclasses import replace

import pytest
import torch

from deepseek_moe_fused.kernels import _tiles
from deepseek_moe_fused.kernels.launch import ExpertWeights, gate_up_swiglu
from deepseek_moe_fused.routing_metadata import build_routing_metadata
from deepseek_moe_fused.testing import make_moe_inputs

TABLE = {
    "cards": {
        "NVIDIA H100 80GB HBM3": {"capability": "9.0", "problems": {"E8_H64_I32_S0_K2": {}}},
        "NVIDIA A100-SXM4-80GB": {"capability": "8.0", "problems": {}},
    }
}


def test_card_falls_back_to_its_architecture_then_to_none():
    assert _tiles.select_card(TABLE, "NVIDIA H100 80GB HBM3", "9.0")[0] == "NVIDIA H100 80GB HBM3"
    # An H200 (same architecture, same SM count) borrows the H100's measurements.
    assert _tiles.select_card(TABLE, "NVIDIA H200", "9.0")[0] == "NVIDIA H100 80GB HBM3"
    assert _tiles.select_card(TABLE, "NVIDIA GeForce RTX 4070", "8.9") == ("", {})
    assert _tiles.select_card({}, "NVIDIA H100 80GB HBM3", "9.0") == ("", {})


@pytest.mark.parametrize(
    "num_tokens, expected",
    [
        (1, "1"),
        (0, "1"),  # empty batch: the smallest entry
        (3, "4"),  # log2 3 = 1.58: nearer log2 4 than log2 2
        (8, "4"),  # exactly between 4 and 16 on a log scale: the smaller
        (12, "16"),
        (100000, "16384"),  # past the last entry: the last
    ],
)
def test_nearest_batch_on_a_log_scale(num_tokens, expected):
    measured = ["1", "2", "4", "16", "16384"]
    assert _tiles.nearest_batch(measured, num_tokens) == expected


@pytest.mark.parametrize(
    "num_rows, num_experts, expected",
    [
        (0, 0, 16),  # an expert-parallel rank holding no experts (fewer experts than ranks)
        (1, 64, 16),  # decode: the smallest height
        (8 * 300, 8, 128),  # prefill: the largest
        (6 * 64, 8, 64),  # mean 48 rows per expert: next power of two
    ],
)
def test_heuristic_tile_height_follows_rows_per_expert(num_rows, num_experts, expected):
    assert _tiles.heuristic_block_m(num_rows, num_experts, interpret=False) == expected


def test_table_file_is_well_formed():
    """Every tuned entry names a block_m and two (block_n, block_k, num_warps, num_stages) configs."""
    if not _tiles.TUNED_TABLE.exists():
        pytest.skip("no tuned table committed yet (make tune on a GPU writes it)")
    table = json.loads(_tiles.TUNED_TABLE.read_text())
    for card, entry in table["cards"].items():
        assert entry["capability"].count(".") == 1, card
        for key, by_tokens in entry["problems"].items():
            for n, tiles in by_tokens.items():
                assert int(n) >= 1
                for stage in ("gate_up", "down"):
                    assert len(tiles[stage]) == 4, (card, key, n, stage)
                # Block sizes and warp counts are powers of two (tl.arange, tl.dot); stages need not be.
                values = [tiles["block_m"], *tiles["gate_up"][:3], *tiles["down"][:3]]
                assert all(v > 0 and v & (v - 1) == 0 for v in values), (card, key, n, values)


def test_metadata_cut_for_another_tile_height_still_runs(device):
    """Metadata a caller built with its own block_m gets tiles of that height, not the table's."""
    from deepseek_moe_fused import MoEConfig

    config = MoEConfig(hidden_dim=24, intermediate_dim=20, num_experts=5, top_k=2, dtype=torch.float32)
    inputs = make_moe_inputs(config, 9, device=device)
    w: ExpertWeights = inputs.weights
    metadata = build_routing_metadata(inputs.topk_ids, w.num_experts, block_m=32)
    h_routed, _ = gate_up_swiglu(inputs.x, w, metadata)
    gate, up = w.gate_up_proj[:, :20], w.gate_up_proj[:, 20:]
    rows = metadata.sorted_slot.long()
    tokens, experts = rows // 2, inputs.topk_ids.reshape(-1)[rows].long()
    x = inputs.x[tokens]
    want = torch.nn.functional.silu(torch.einsum("rh,rih->ri", x, gate[experts])) * torch.einsum(
        "rh,rih->ri", x, up[experts]
    )
    torch.testing.assert_close(h_routed, want, rtol=1e-5, atol=1e-5)


def test_forced_tiles_reject_unknown_names(monkeypatch):
    monkeypatch.setenv(_tiles.FORCE_TILES_ENV, "block_q=3")
    with pytest.raises(ValueError, match="DEEPSEEK_MOE_FORCE_TILES"):
        _tiles.expert_tiles(120, 7, 33, 17, 0, 3, interpret=False)


def test_backward_tiles_fit_the_element_size(monkeypatch):
    monkeypatch.delenv(_tiles.FORCE_TILES_ENV, raising=False)
    half = _tiles.backward_tiles(128, 2048, 1408, False, itemsize=2)
    full = _tiles.backward_tiles(128, 2048, 1408, False, itemsize=4)
    assert half.down_grad.block_m == half.dx.block_m == full.dx.block_m == 128  # the metadata's height

    def pipeline_bytes(tile, itemsize):  # operand tiles held in shared memory, all stages
        return (tile.block_m + tile.block_n) * tile.block_k * itemsize * tile.num_stages

    # The bf16 tiles are the ones measured to fit on an H100; fp32 ones must need no more (bf16's
    # 128 x 256 dX tiles in 4 stages asked for 288 KB in fp32, past the card's 227 KB).
    for stage in ("down_grad", "dx", "weight_grad"):
        assert pipeline_bytes(getattr(full, stage), 4) <= pipeline_bytes(getattr(half, stage), 2), stage


def test_short_experts_get_the_short_weight_gradient_tile(monkeypatch):
    monkeypatch.delenv(_tiles.FORCE_TILES_ENV, raising=False)
    many = _tiles.backward_tiles(128, 2048, 1408, False, rows_per_expert=768)  # v2-lite N=8192
    short = _tiles.backward_tiles(128, 2048, 1408, False, rows_per_expert=192)  # v2-lite N=2048
    edge = _tiles.backward_tiles(128, 2048, 2048, False, rows_per_expert=512)  # seed N=2048, measured short
    assert many.weight_grad == _tiles.backward_tiles(128, 2048, 1408, False).weight_grad
    assert (short.weight_grad.block_k, short.weight_grad.num_warps) == (32, 4)
    assert edge.weight_grad == short.weight_grad
    # fp32 keeps its measured fit: the short tile was only measured in 16 bits.
    fp32 = _tiles.backward_tiles(128, 2048, 1408, False, itemsize=4, rows_per_expert=192)
    assert fp32.weight_grad == _tiles.backward_tiles(128, 2048, 1408, False, itemsize=4).weight_grad


def test_short_experts_get_narrow_dy_w_down_tiles(monkeypatch):
    monkeypatch.delenv(_tiles.FORCE_TILES_ENV, raising=False)
    short = _tiles.backward_tiles(128, 2048, 1408, False, rows_per_expert=48)  # v2-lite N=512
    edge = _tiles.backward_tiles(128, 2048, 2048, False, rows_per_expert=128)  # seed N=512: measured even
    many = _tiles.backward_tiles(128, 2048, 1408, False)  # unknown: many rows
    assert short.down_grad == replace(many.down_grad, block_n=128)
    assert edge.down_grad.block_n == many.down_grad.block_n == 256
    assert short.dx == many.dx  # dX measured no better with 128 columns


@pytest.mark.parametrize(
    ("inner_dim", "tile"),
    [
        (1408, (1, 1024, 4)),  # v2-lite: one row per program in two steps, the second part masked
        (2048, (1, 1024, 4)),  # seed
        (96, (8, 128, 4)),  # narrow rows: several per program, 1024 elements a step
        (8, (64, 16, 4)),  # narrower than the 16-column floor
    ],
)
def test_swiglu_backward_tiles_step_over_1024_elements(inner_dim, tile):
    tiles = _tiles.swiglu_backward_tiles(inner_dim)
    assert tiles == _tiles.ElementwiseTiles(*tile)
    assert _tiles.backward_tiles(128, 2048, inner_dim, False).swiglu == tiles


@pytest.mark.parametrize(
    ("rows_per_expert", "itemsize", "tile", "tma"),
    [
        (192, 2, (128, 128, 32, 4, 4), False),  # v2-lite N=2048: the masked last box costs more than TMA gains
        (384, 2, (128, 128, 16, 4, 6), True),  # v2-lite N=4096
        (512, 2, (128, 128, 16, 4, 6), True),  # seed N=2048: the edge of "short"
        (768, 2, (128, 128, 32, 4, 4), True),  # v2-lite N=8192
        (1536, 2, (128, 256, 32, 8, 4), True),  # v2-lite N=16384
        (None, 2, (128, 256, 32, 8, 4), True),  # unknown: many rows
        (768, 4, (128, 128, 32, 8, 3), False),  # fp32: measured without TMA only
    ],
)
def test_weight_gradient_tiles_with_tma(monkeypatch, rows_per_expert, itemsize, tile, tma):
    monkeypatch.delenv(_tiles.FORCE_TILES_ENV, raising=False)
    tiles = _tiles.backward_tiles(128, 2048, 1408, False, itemsize, rows_per_expert, tma=True)
    assert (tiles.weight_grad, tiles.weight_grad_tma) == (_tiles.TileConfig(*tile), tma)
    # Without TMA no tile asks for it, and long experts keep the tile measured for pointer loads.
    no_tma = _tiles.backward_tiles(128, 2048, 1408, False, itemsize, rows_per_expert, tma=False)
    assert not no_tma.weight_grad_tma
    assert no_tma.weight_grad == _tiles.backward_tiles(128, 2048, 1408, False, itemsize, rows_per_expert).weight_grad


def test_backward_tiles_take_the_override_but_keep_the_metadata_height(monkeypatch):
    monkeypatch.setenv(_tiles.FORCE_TILES_ENV, "block_m=16,block_n=32,num_stages=2")
    tiles = _tiles.backward_tiles(64, 256, 128, False)
    assert tiles.source.startswith("forced")
    for stage in (tiles.down_grad, tiles.dx):
        assert (stage.block_m, stage.block_n, stage.num_stages) == (64, 32, 2)


@pytest.mark.parametrize(
    ("block_m", "reduction", "tail"),
    [
        (128, 2048, 64),  # prefill: 192-row experts run 128 + 64 rows
        (32, 33, 16),  # the smallest tail: tl.dot needs 16 rows
        (16, 2048, 16),  # decode tiles have none
        (128, 4096, 64),  # the longest reduction with tails
        (128, 7168, 128),  # DeepSeek-V3's gate/up: the tail's weight tiles fall out of L2
    ],
)
def test_tail_height_and_its_switch(monkeypatch, block_m, reduction, tail):
    monkeypatch.delenv(_tiles.TAIL_TILES_ENV, raising=False)
    assert _tiles.tail_block_m(block_m, reduction) == tail
    monkeypatch.setenv(_tiles.TAIL_TILES_ENV, "off")
    assert _tiles.tail_block_m(block_m, reduction) == block_m
    monkeypatch.setenv(_tiles.TAIL_TILES_ENV, "half")
    with pytest.raises(ValueError, match=_tiles.TAIL_TILES_ENV):
        _tiles.tail_block_m(block_m, reduction)
