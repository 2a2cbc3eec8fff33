"""The README's two speed tables from benchmark JSON reports (`python -m deepseek_moe_fused.benchmark --json f`).

    python tools/perf_table.py seed.json deepseek-v2-lite.json deepseek-v3.json

Prints the forward table (experts-only) for every row, then the training table for the rows of
reports made with `--backward`.
"""

import json
import sys

from deepseek_moe_fused.benchmark import config_json
from deepseek_moe_fused.config import PRESETS

# SGLang's fused_moe on an H100 80GB HBM3 (torch 2.11, triton 3.6, its own routing, shared expert
# appended as an extra expert, best of several tile configs), us: the reference points issue #6
# quotes. Not re-measured by the benchmark; shown for reports of those presets' own shapes only.
SGLANG_REFERENCE_US = {
    ("seed", 1): 106,
    ("seed", 8192): 1390,
    ("deepseek-v2-lite", 1): 239,
    ("deepseek-v2-lite", 16): 375,
    ("deepseek-v2-lite", 2048): 1059,
    ("deepseek-v2-lite", 8192): 2682,
    ("deepseek-v3", 16): 2844,
    ("deepseek-v3", 2048): 9241,
    ("deepseek-v3", 8192): 15730,
}


def _ratio(num, den):
    return "n/a" if num is None or not den else f"{num / den:.2f}x"


def _floor(us):
    return "n/a" if us is None else f"{us:.0f}"  # None: no ceilings measured (no GPU)


def _us_with_speedup(ms, fused_ms):
    return "n/a" if ms is None else f"{ms * 1e3:.0f} ({_ratio(ms, fused_ms)})"


def _is_issue_shape(report: dict) -> bool:
    """The preset itself (no overrides, its bf16) on an H100, as the SGLang reference points were measured."""
    preset = PRESETS.get(report["preset"])
    return "H100" in report["device"] and preset is not None and report["config"] == config_json(preset)


def forward_rows(report: dict) -> list[str]:
    preset, lines = report["preset"], []
    references = SGLANG_REFERENCE_US if _is_issue_shape(report) else {}
    for row in report["rows"]:
        fused = row["fused_ms"]
        pct = row.get("pct_of_floor")
        reference = references.get((preset, row["N"]))
        lines.append(
            f"| {preset} | {row['N']} | {fused * 1e3:.0f} | {_floor(row.get('floor_us'))} | "
            f"{'n/a' if pct is None else f'{pct:.0f}%'} | {_us_with_speedup(row.get('grouped_mm_ms'), fused)} | "
            f"{_ratio(row.get('unfused_ms'), fused)} | {_ratio(row.get('layer_ms'), fused)} | "
            f"{'' if reference is None else f'{reference} ({reference / (fused * 1e3):.2f}x)'} |"
            + ("" if row["pass"] else " FAIL")
        )
    return lines


def training_rows(report: dict) -> list[str]:
    preset, lines = report["preset"], []
    for row in report["rows"]:
        if "fwd_bwd_triton_bwd_graph_ms" not in row:
            continue
        graph, eager = row["fwd_bwd_triton_bwd_graph_ms"], row["fwd_bwd_triton_bwd_ms"]
        base_graph, base_eager = row["fwd_bwd_grouped_mm_graph_ms"], row["fwd_bwd_grouped_mm_ms"]
        torch_ms = row["fwd_bwd_torch_bwd_ms"]  # eager, tens of ms: three significant digits
        torch_txt = f"{torch_ms:.1f}" if torch_ms < 100 else f"{torch_ms:.0f}"
        lines.append(
            f"| {preset} | {row['N']} | {graph:.3f} / {eager:.3f} ms | {base_graph:.3f} / {base_eager:.3f} ms | "
            f"{_ratio(base_graph, graph)} / {_ratio(base_eager, eager)} | "
            f"{row['fwd_bwd_triton_bwd_peak_mb']:.0f} / {row['fwd_bwd_grouped_mm_peak_mb']:.0f} | "
            f"{row['bwd_triton_ms']:.3f} ms ({row['bwd_pct_of_floor']:.0f}%) | "
            f"{torch_txt} ms |"
        )
    return lines


def main(paths: list[str]) -> None:
    forward, training, devices = [], [], set()
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        devices.add(report["device"])
        forward += forward_rows(report)
        training += training_rows(report)
    print(
        "| preset | N | fused µs | floor µs | % of floor | grouped_mm µs (fused speedup) | fused vs unfused "
        "| layer / experts | SGLang fused_moe µs, issue #6 (speedup) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(forward))
    if training:
        print(
            "\n| preset | N | Triton fwd+bwd graph / eager | grouped_mm autograd graph / eager | speedup graph / eager "
            "| peak MB Triton / grouped_mm | backward alone (% of floor) | PyTorch bwd eager |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        print("\n".join(training))
    print(f"\nDevice: {', '.join(sorted(devices))}")


if __name__ == "__main__":
    main(sys.argv[1:])
