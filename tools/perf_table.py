"""Markdown table of benchmark JSON reports (`python -m deepseek_moe_fused.benchmark --json f`).

python tools/perf_table.py seed.json deepseek-v2-lite.json deepseek-v3.json
"""

import json
import sys


def _us(ms):
    return "n/a" if ms is None else f"{ms * 1e3:.0f}"


def _ratio(num, den):
    return "n/a" if num is None or not den else f"{num / den:.2f}x"


def main(paths: list[str]) -> None:
    print(
        "| preset | N | fused µs | floor µs | % of floor | grouped_mm µs | vs grouped_mm | vs unfused "
        "| layer / experts | fused eager µs |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    devices = set()
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        devices.add(report["device"])
        for row in report["rows"]:
            fused = row["fused_ms"]
            pct = row.get("pct_of_floor")
            print(
                f"| {report['preset']} | {row['N']} | {_us(fused)} | {row['floor_us']:.0f} | "
                f"{'n/a' if pct is None else f'{pct:.0f}%'} | {_us(row.get('grouped_mm_ms'))} | "
                f"{_ratio(row.get('grouped_mm_ms'), fused)} | {_ratio(row.get('unfused_ms'), fused)} | "
                f"{_ratio(row.get('layer_ms'), fused)} | {_us(row.get('fused_eager_ms'))} |"
                + ("" if row["pass"] else " FAIL")
            )
    print(f"\nDevice: {', '.join(sorted(devices))}")


if __name__ == "__main__":
    main(sys.argv[1:])
