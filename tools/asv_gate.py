"""Benchmark regression gate over asv results files (asv's own loader, no text scraping).

    python tools/asv_gate.py --base SHA --head SHA [--factor 1.10] [--base-results DIR]

Exits 1 when any tracked number of HEAD is worse than BASE by more than `factor`: times and
memory lower is better, `pct_of_floor` and `tflops` higher is better. `asv compare` prints a table
but always exits 0, hence this script. `--base-results` reads BASE from another results folder,
which is how two runs of the same commit are compared.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

from asv import results as asv_results

HIGHER_IS_BETTER = ("pct_of_floor", "tflops")
# Recorded in the history but not gating by default: first-call compile time (host CPU load), the
# baselines (grouped_mm, naive, the PyTorch router: not our code), and the eager whole-layer times,
# whose Python launch overhead moved by up to 1.5x between two runs of one commit on one H100
# (layer fwd+bwd at N=1: 2.78 -> 4.26 ms). The experts-only and router times are CUDA-graph replays
# and gate. `--ignore` with no words gates everything.
DEFAULT_IGNORE = ("compile", "grouped_mm", "naive", "router_torch", "LayerForwardBackward")


def load(results_dir: str, machine: str, commit: str) -> dict[tuple[str, tuple], float]:
    """{(benchmark, params): value} of every finite result for `commit` on `machine`."""
    values = {}
    found = False
    for result in asv_results.iter_results_for_machine_and_hash(results_dir, machine, commit):
        found = True
        for key in result.get_all_result_keys():
            params = result.get_result_params(key)
            combos = list(itertools.product(*params)) if params else [()]
            for combo, value in zip(combos, result.get_result_value(key, params)):
                if value is not None and math.isfinite(value):
                    values[(key, combo)] = value
    if not found:
        raise SystemExit(f"no asv results for {commit} on machine {machine!r} in {results_dir}")
    return values


def only_machine(results_dir: str) -> str:
    machines = [d for d in os.listdir(results_dir) if os.path.isdir(os.path.join(results_dir, d))]
    if len(machines) != 1:
        raise SystemExit(f"pass --machine: {results_dir} holds {sorted(machines) or 'no machines'}")
    return machines[0]


def worse_by(name: str, base: float, head: float) -> float:
    """How many times worse HEAD is than BASE (1.0 = equal, < 1 = better)."""
    if name.endswith(HIGHER_IS_BETTER):
        return base / head if head else math.inf
    return head / base if base else (1.0 if head == base else math.inf)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--head", required=True)
    p.add_argument("--factor", type=float, default=1.10)
    p.add_argument("--results", default=".asv/results", help="results folder of HEAD (and BASE)")
    p.add_argument("--base-results", help="results folder of BASE, if not --results")
    p.add_argument("--machine")
    p.add_argument("--ignore", nargs="*", default=list(DEFAULT_IGNORE), help="substrings of names not gated")
    p.add_argument("--markdown", action="store_true", help="print a GitHub-flavoured table")
    args = p.parse_args(argv)
    machine = args.machine or only_machine(args.results)
    head = load(args.results, machine, args.head)
    base = load(args.base_results or args.results, machine, args.base)
    rows, regressions = [], 0
    for key in sorted(base.keys() & head.keys()):
        name, params = key
        ratio = worse_by(name, base[key], head[key])
        gated = not any(word in name for word in args.ignore)
        verdict = "REGRESSION" if gated and ratio > args.factor else ("" if gated else "not gated")
        regressions += verdict == "REGRESSION"
        short = name.split(".", 1)[-1]
        rows.append(
            (short, ", ".join(map(str, params)), f"{base[key]:.4g}", f"{head[key]:.4g}", f"{ratio:.3f}", verdict)
        )
    header = ("benchmark", "params", "base", "head", "worse by", "")
    sep = " | " if args.markdown else "  "
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print(("| " if args.markdown else "") + sep.join(str(c).ljust(w) for c, w in zip(row, widths)))
        if i == 0 and args.markdown:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(
        f"\n{len(rows)} results compared, {regressions} slower than {args.factor}x (base {args.base}, head {args.head})"
    )
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
