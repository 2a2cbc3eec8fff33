"""tools/perf_table.py: benchmark JSON reports to the README's tables (exact strings)."""

import importlib.util
import pathlib

import pytest

from deepseek_moe_fused.benchmark import config_json
from deepseek_moe_fused.config import PRESETS

_PATH = pathlib.Path(__file__).parents[1] / "tools" / "perf_table.py"
_spec = importlib.util.spec_from_file_location("perf_table", _PATH)
perf_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(perf_table)

SEED_CONFIG = config_json(PRESETS["seed"])  # as a report of the preset itself records it


def _report(device, config, **row):
    base = {"N": 1, "pass": True, "fused_ms": 0.039, "floor_us": 24.9, "pct_of_floor": 63.4}
    return {"device": device, "preset": "seed", "config": config, "rows": [{**base, **row}]}


def test_forward_row_with_the_issue_reference():
    report = _report(
        "NVIDIA H100 80GB HBM3", SEED_CONFIG,
        grouped_mm_ms=0.1131, unfused_ms=0.0491, layer_ms=0.0460,
    )  # fmt: skip
    assert perf_table.forward_rows(report) == [
        "| seed | 1 | 39 | 25 | 63% | 113 (2.90x) | 1.26x | 1.18x | 106 (2.72x) |"
    ]


@pytest.mark.parametrize(
    "device, config",
    [
        ("cpu (triton interpreter)", {**SEED_CONFIG, "hidden_dim": 64, "dtype": "torch.float32"}),  # CPU shape
        ("NVIDIA H100 80GB HBM3", {**SEED_CONFIG, "top_k": 4}),  # preset overridden
    ],
)
def test_no_reference_for_other_shapes_and_no_floor_without_ceilings(device, config):
    report = _report(device, config, floor_us=None, pct_of_floor=None, grouped_mm_ms=None)
    assert perf_table.forward_rows(report) == ["| seed | 1 | 39 | n/a | n/a | n/a | n/a | n/a |  |"]


def test_training_row_only_for_backward_reports():
    report = _report("NVIDIA H100 80GB HBM3", SEED_CONFIG)
    assert perf_table.training_rows(report) == []
    report["rows"][0].update(
        fwd_bwd_triton_bwd_graph_ms=0.419, fwd_bwd_triton_bwd_ms=3.86, fwd_bwd_grouped_mm_graph_ms=0.758,
        fwd_bwd_grouped_mm_ms=2.967, fwd_bwd_torch_bwd_ms=179.1, fwd_bwd_triton_bwd_peak_mb=228.0,
        fwd_bwd_grouped_mm_peak_mb=240.2, bwd_triton_ms=0.2764, bwd_pct_of_floor=54.1,
    )  # fmt: skip
    assert perf_table.training_rows(report) == [
        "| seed | 1 | 0.419 / 3.860 ms | 0.758 / 2.967 ms | 1.81x / 0.77x | 228 / 240 | 0.276 ms (54%) | 179 ms |"
    ]
