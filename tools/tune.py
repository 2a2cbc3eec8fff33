"""Measure tile configs for both expert stages and write the tuned table (`make tune`, on a GPU).

For each preset and batch size N in {1, 2, 4, ..., 16384}: for each tile height block_m that fits
the mean rows per expert, time every stage-1 (gate/up + SwiGLU) and stage-2 (down) candidate as a
CUDA-graph replay of that one launch, keep each stage's best, and keep the block_m with the smallest
sum. The entry lands in deepseek_moe_fused/kernels/tuned_tiles.json under this card's name, merged
with what other cards measured. Usage:

    python tools/tune.py [--presets seed deepseek-v2-lite deepseek-v3] [--max-tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import torch
import triton

from deepseek_moe_fused import MoEConfig
from deepseek_moe_fused.kernels import _tiles
from deepseek_moe_fused.kernels._tiles import ExpertTiles, TileConfig
from deepseek_moe_fused.kernels.launch import ExpertWeights, down_proj, gate_up_swiglu, routing_metadata_for
from deepseek_moe_fused.testing import MoEInputs, make_activations, make_expert_weights, make_routing
from deepseek_moe_fused.timing import median_ms

# (block_n, block_k, num_warps, num_stages). Stage 1 holds two fp32 accumulators, so its widest
# tiles are narrower than stage 2's. Small block_n fills the SMs in decode; wide ones reuse X in prefill.
GATE_UP_CANDIDATES = [
    (16, 128, 4, 4),
    (32, 128, 4, 4),
    (32, 64, 4, 5),
    (64, 64, 4, 3),
    (64, 64, 4, 4),
    (64, 128, 4, 3),
    (64, 64, 8, 3),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
]
DOWN_CANDIDATES = [
    (32, 128, 4, 4),
    (64, 64, 4, 4),
    (64, 128, 4, 3),
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 128, 8, 3),
    (256, 64, 8, 3),
]


def block_m_candidates(num_rows: int, num_experts: int) -> list[int]:
    """Tile heights around the mean rows per expert: padding waste below, tensor-core reuse above."""
    mean = num_rows / num_experts
    return [bm for bm in (16, 32, 64, 128) if bm <= max(16, 4 * mean) and (bm >= 64 or mean < 256)]


def time_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, warmup_ms=10, rep_ms=40) * 1e3


def best_stage(run, candidates, block_m) -> tuple[tuple, float]:
    best, best_us = None, float("inf")
    for candidate in candidates:
        config = TileConfig(block_m, *candidate)
        tiles = ExpertTiles(config, config, "tuning")
        try:
            us = time_us(lambda tiles=tiles: run(tiles))
        except Exception as error:  # e.g. out of shared memory for this config
            print(f"    skip {candidate}: {str(error).splitlines()[0][:80]}", file=sys.stderr)
            continue
        if us < best_us:
            best, best_us = candidate, us
    return best, best_us


def tune_problem(config: MoEConfig, w: ExpertWeights, num_tokens: int) -> dict:
    x = make_activations(num_tokens, config.hidden_dim, seed=num_tokens, dtype=config.dtype, device="cuda")
    topk_weights, topk_ids = make_routing("uniform", num_tokens, config.num_experts, config.top_k, seed=num_tokens)
    inputs = MoEInputs(x, topk_weights.cuda(), topk_ids.cuda(), w)
    results = []
    for block_m in block_m_candidates(num_tokens * config.top_k, config.num_experts):
        seed_tiles = ExpertTiles(TileConfig(block_m, 64, 64, 4, 3), TileConfig(block_m, 64, 64, 4, 3), "tuning")
        metadata = routing_metadata_for(inputs.topk_ids, w, seed_tiles)
        h_routed, h_shared = gate_up_swiglu(inputs.x, w, metadata, tiles=seed_tiles)
        stage1 = partial(gate_up_swiglu, inputs.x, w, metadata)
        stage2 = partial(down_proj, h_routed, h_shared, inputs.topk_weights, w, metadata)
        gate_up, gate_up_us = best_stage(lambda tiles, run=stage1: run(tiles=tiles), GATE_UP_CANDIDATES, block_m)
        down, down_us = best_stage(lambda tiles, run=stage2: run(tiles=tiles), DOWN_CANDIDATES, block_m)
        results.append((gate_up_us + down_us, block_m, gate_up, down, gate_up_us, down_us))
    total, block_m, gate_up, down, gate_up_us, down_us = min(results)
    print(
        f"  N={num_tokens:>6}: block_m {block_m:>3} gate_up {gate_up} {gate_up_us:8.1f} us"
        f" | down {down} {down_us:8.1f} us",
        flush=True,
    )
    return {"block_m": block_m, "gate_up": list(gate_up), "down": list(down), "us": round(total, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["seed", "deepseek-v2-lite", "deepseek-v3"])
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--out", default=str(_tiles.TUNED_TABLE))
    args = parser.parse_args()
    name = torch.cuda.get_device_name()
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    try:
        with open(args.out) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {"cards": {}}
    card = table["cards"].setdefault(name, {"capability": capability, "problems": {}})
    card["measured_with"] = f"torch {torch.__version__}, triton {triton.__version__}, {time.strftime('%Y-%m-%d')}"
    for preset in args.presets:
        config = MoEConfig.from_preset(preset)
        S = config.shared_intermediate_dim
        key = _tiles.problem_key(config.num_experts, config.hidden_dim, config.intermediate_dim, S, config.top_k)
        print(f"{name} | {preset} ({key})", flush=True)
        entries = card["problems"].setdefault(key, {})
        weights = make_expert_weights(config, seed=0, device="cuda")
        n = 1
        while n <= args.max_tokens:
            entries[str(n)] = tune_problem(config, weights, n)
            torch.cuda.empty_cache()
            n *= 2
        write_table(table, args.out)  # after each preset: a cut-off run keeps what it measured


def write_table(table: dict, path: str) -> None:
    """JSON with one line per (problem, N): diffs of a re-tune show which entries moved."""
    lines = ['{"cards": {']
    cards = sorted(table["cards"].items())
    for i, (name, card) in enumerate(cards):
        lines.append(f"  {json.dumps(name)}: {{")
        for field in ("capability", "measured_with"):
            lines.append(f"    {json.dumps(field)}: {json.dumps(card.get(field, ''))},")
        lines.append('    "problems": {')
        problems = sorted(card["problems"].items())
        for j, (key, by_tokens) in enumerate(problems):
            lines.append(f"      {json.dumps(key)}: {{")
            entries = sorted(by_tokens.items(), key=lambda kv: int(kv[0]))
            for k, (n, entry) in enumerate(entries):
                comma = "," if k < len(entries) - 1 else ""
                lines.append(f"        {json.dumps(n)}: {json.dumps(entry, sort_keys=True)}{comma}")
            lines.append("      }" + ("," if j < len(problems) - 1 else ""))
        lines.append("    }")
        lines.append("  }" + ("," if i < len(cards) - 1 else ""))
    lines.append("}}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
