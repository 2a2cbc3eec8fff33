"""Correctness check + benchmark of the fused MoE layer: ``python -m deepseek_moe_fused.benchmark``.

For each batch size N: the fused kernels against an fp32 reference (PASS/FAIL), then median times
of the naive per-expert loop, the unfused ablation (same kernels, shared MLP launched apart), the
torch._grouped_mm pipeline, the fused kernels and the whole layer (router included), with the
roofline floor measured on this card. On a GPU the times are CUDA-graph replays (device time;
the naive loop syncs, so it runs eagerly) and the fused forward's eager time is shown beside them.
Without a CUDA device it runs small sizes through the Triton interpreter and says so.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch

from . import baselines
from ._interpret import interpreter_active
from .config import PRESETS, MoEConfig
from .kernels.launch import down_proj, gate_up_swiglu, moe_experts_forward, routing_metadata_for, tiles_for
from .moe_layer import DeepSeekMoELayer
from .reference import naive_moe_experts
from .testing import TOLERANCES, error_stats, make_activations, make_expert_weights
from .timing import median_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_BATCH_SIZES = [512, 1024, 4096]
# What runs without a GPU: small enough for the interpreter to finish in about a minute on 2 cores.
CPU_SHAPE = {"hidden_dim": 64, "intermediate_dim": 32, "num_experts": 8, "top_k": 2}
CPU_BATCH_SIZES = [1, 16, 64]
IMPLEMENTATIONS = ("naive", "unfused", "grouped_mm", "fused")


@dataclass
class Ceilings:
    matmul_tflops: float  # bf16 dense matmul on random 8192^3 operands
    copy_gbps: float  # device-to-device copy, bytes read + written


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepseek_moe_fused.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="seed", help="base configuration (default: seed)")
    p.add_argument("--batch_sizes", type=int, nargs="+", help=f"tokens N (default {GPU_BATCH_SIZES} on GPU)")
    p.add_argument("--hidden_dim", type=int, help="H (overrides the preset)")
    p.add_argument("--intermediate_dim", type=int, help="I (overrides the preset)")
    p.add_argument("--num_experts", type=int, help="E (overrides the preset)")
    p.add_argument("--top_k", type=int, help="K (overrides the preset)")
    p.add_argument("--n_shared_experts", type=int, help="shared experts (overrides the preset)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--detailed", action="store_true", help="per-expert and per-slot error statistics")
    p.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    p.add_argument("--plot", metavar="PATH", help="plot time vs N per implementation (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ep", type=int, metavar="W", help="expert parallel over W ranks (launch with torchrun)")
    p.add_argument("--backward", action="store_true", help="also time forward+backward (PyTorch/Triton/grouped_mm)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, on_gpu: bool) -> MoEConfig:
    overrides = {
        name: getattr(args, name)
        for name in ("hidden_dim", "intermediate_dim", "num_experts", "top_k", "n_shared_experts")
        if getattr(args, name) is not None
    }
    if not on_gpu:
        overrides = {**CPU_SHAPE, **overrides}
    return MoEConfig.from_preset(args.preset, dtype=DTYPES[args.dtype], **overrides)


def measure_ceilings(device: torch.device) -> Ceilings:
    """The card's two ceilings, measured here rather than taken from a datasheet."""

    def median_of(fn):
        return median_ms(fn, warmup_ms=50, rep_ms=200, device=device)

    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul_tflops = 2 * n**3 / (median_of(lambda: a @ b) * 1e-3) / 1e12
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() / (median_of(lambda: dst.copy_(src)) * 1e-3) / 1e9
    return Ceilings(matmul_tflops, copy_gbps)


def config_json(config: MoEConfig) -> dict:
    """`config` as the --json report writes it: its fields, the dtype as a string."""
    return {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(config).items()}


def roofline_floor_us(config: MoEConfig, topk_ids: torch.Tensor, ceilings: Ceilings) -> float:
    """max(FLOPs / matmul ceiling, bytes of the expert weights actually touched / copy ceiling)."""
    T, K = topk_ids.shape
    H, I, S = config.hidden_dim, config.intermediate_dim, config.shared_intermediate_dim
    flops = 6 * H * (T * K * I + T * S)  # gate, up, down: 2 flops per multiply-add
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    touched = int(topk_ids.unique().numel())
    weight_bytes = 3 * H * (touched * I + S) * itemsize
    return max(flops / (ceilings.matmul_tflops * 1e12), weight_bytes / (ceilings.copy_gbps * 1e9)) * 1e6


def time_ms(fn, on_gpu: bool) -> float:
    if on_gpu:
        return median_ms(fn)
    fn()  # the interpreter has nothing to warm up but Python's caches
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class GraphReplay:
    """A CUDA graph and the callable it was captured from. The graph reads and writes the tensors
    that the callable's closure holds, at the addresses they had during capture: holding the
    callable here keeps them allocated as long as the replay can run (a caller that dropped them
    would otherwise replay into freed, maybe reused, memory)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, captured) -> None:
        self.graph = graph
        self.captured = captured  # owns the graph's inputs and outputs

    def __call__(self) -> None:
        self.graph.replay()


def replayable(fn):
    """`fn` captured in a CUDA graph, as a `GraphReplay`: the kernels without the Python launch
    overhead (the forward makes no host sync, so it captures). `fn` itself where it cannot be
    captured."""
    fn()  # compile and allocate before capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return fn
    return GraphReplay(graph, fn)


def graph_median_ms(fn) -> float:
    """Device time of `fn` replayed from a CUDA graph (eager where it cannot be captured)."""
    return time_ms(replayable(fn), on_gpu=True)


def peak_mb(fn, layer=None, x=None) -> float:
    """Peak device memory of one warm call of `fn` over what was allocated before it; with `layer`
    and `x`, a training step's, whose gradients are cleared first so that the peak counts its own.
    Measured around a single call, not inside a timing loop (whose repeated calls and L2-flush
    reads would count too), after a first call has allocated the once-per-process state (cuBLAS
    workspaces) that a training loop pays once."""
    fn()
    if layer is not None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# Rounds of the interleaved timing: each implementation's median is the median of its rounds.
TIMING_ROUNDS = 3


def interleaved_medians_ms(replays: dict) -> dict:
    """Times of several implementations (from `replayable`), taken in turn for TIMING_ROUNDS
    rounds rather than one after another: the card's state drifts over a long sequence of heavy
    GEMMs (V3 N=8192 timed the layer, last of five, at 1.21-1.29x the experts, and at 1.03x in a
    fresh process), and interleaving gives every implementation the same share of each state."""
    rounds = {name: [] for name in replays}
    for _ in range(TIMING_ROUNDS):
        for name, replay in replays.items():
            rounds[name].append(time_ms(replay, on_gpu=True))
    return {name: statistics.median(times) for name, times in rounds.items()}


def _available(name: str, timer, fn):
    """timer(fn), or None where the implementation cannot run here (e.g. grouped_mm on this card)."""
    try:
        return timer(fn)
    except RuntimeError as error:
        print(f"  ({name} unavailable: {str(error).splitlines()[0]})", file=sys.stderr)
        return None


def make_layer(config: MoEConfig, device: torch.device, seed: int) -> DeepSeekMoELayer:
    """The layer with the benchmark's shared-factory weights (same as the tests use)."""
    layer = DeepSeekMoELayer(config, device=device)
    weights = make_expert_weights(config, seed=seed, device=device)
    with torch.no_grad():
        layer.experts.gate_up_proj.copy_(weights.gate_up_proj)
        layer.experts.down_proj.copy_(weights.down_proj)
        if layer.shared_experts is not None:
            layer.shared_experts.gate_proj.weight.copy_(weights.shared_gate)
            layer.shared_experts.up_proj.weight.copy_(weights.shared_up)
            layer.shared_experts.down_proj.weight.copy_(weights.shared_down)
    return layer


def detailed_errors(x, topk_weights, topk_ids, weights, config) -> list[str]:
    """Error of each slot's weighted expert output, grouped per expert and per slot."""
    metadata = routing_metadata_for(topk_ids, weights)
    h_routed, h_shared = gate_up_swiglu(x, weights, metadata)
    y_routed, _ = down_proj(h_routed, h_shared, topk_weights, weights, metadata)
    T, K = topk_ids.shape
    ref = torch.empty(T, K, config.hidden_dim, dtype=torch.float32, device=x.device)
    for k in range(K):
        one_slot = naive_moe_experts(
            x, topk_weights[:, k : k + 1], topk_ids[:, k : k + 1], weights.gate_up_proj, weights.down_proj,
            compute_dtype=torch.float32,
        )  # fmt: skip
        ref[:, k] = one_slot
    lines = ["    per expert: rows, rel error, max error"]
    for expert in range(config.num_experts):
        mask = topk_ids == expert
        if mask.any():
            stats = error_stats(y_routed[mask], ref[mask])
            lines.append(
                f"      expert {expert:3d}: {int(mask.sum()):6d} rows  {stats.rel_norm:.2e}  {stats.max_abs:.2e}"
            )
    lines.append("    per slot: rel error, max error")
    for k in range(K):
        stats = error_stats(y_routed[:, k], ref[:, k])
        lines.append(f"      slot {k}: {stats.rel_norm:.2e}  {stats.max_abs:.2e}")
    if h_shared is not None:
        ws = (weights.shared_gate, weights.shared_up, weights.shared_down)
        shared_ref = naive_moe_experts(
            x, topk_weights[:, :0], topk_ids[:, :0], weights.gate_up_proj, weights.down_proj, *ws,
            compute_dtype=torch.float32,
        )  # fmt: skip
        shared_out = moe_experts_forward(x, topk_weights[:, :0], topk_ids[:, :0], weights)
        stats = error_stats(shared_out, shared_ref)
        lines.append(f"    shared MLP: {stats.rel_norm:.2e}  {stats.max_abs:.2e}")
    return lines


def bench_batch(config, num_tokens, layer, ceilings, on_gpu, args) -> tuple[dict, list[str]]:
    device = layer.experts.gate_up_proj.device
    weights = layer.expert_weights()
    x = make_activations(num_tokens, config.hidden_dim, seed=args.seed + 1, dtype=config.dtype, device=device)
    with torch.no_grad():
        _, topk_weights, topk_ids = layer.gate(x)
        fused = moe_experts_forward(x, topk_weights, topk_ids, weights)
        shared = (weights.shared_gate, weights.shared_up, weights.shared_down)
        args_ = (x, topk_weights, topk_ids, weights.gate_up_proj, weights.down_proj, *shared)
        reference = naive_moe_experts(*args_, compute_dtype=torch.float32)
        stats = error_stats(fused, reference)
        passed = stats.within(TOLERANCES[config.dtype])
        runs = {
            "naive": lambda: naive_moe_experts(*args_),
            "unfused": lambda: moe_experts_forward(x, topk_weights, topk_ids, weights, fuse_shared=False),
            "fused": lambda: moe_experts_forward(x, topk_weights, topk_ids, weights),
        }
        if baselines.grouped_mm_available():
            runs["grouped_mm"] = lambda: baselines.grouped_mm_moe_experts(x, topk_weights, topk_ids, weights)
        runs["layer"] = lambda: layer(x)
        eager = partial(time_ms, on_gpu=on_gpu)
        if on_gpu:
            # CUDA-graph replays where they capture (device time, how decode is served), timed
            # interleaved; the naive loop syncs on the host, so it runs eagerly, on its own.
            replays = {name: _available(name, replayable, fn) for name, fn in runs.items() if name != "naive"}
            times = interleaved_medians_ms({name: replay for name, replay in replays.items() if replay is not None})
            times["naive"] = _available("naive", eager, runs["naive"])
        else:
            times = {name: _available(name, eager, fn) for name, fn in runs.items()}
        times = {name: times.get(name) for name in (*IMPLEMENTATIONS, "layer")}
        times["fused_eager"] = time_ms(runs["fused"], on_gpu)  # with Python launch overhead
    floor = roofline_floor_us(config, topk_ids, ceilings) if ceilings else None
    row = {
        "N": num_tokens,
        "pass": passed,
        "max_error": stats.max_abs,
        "rel_error": stats.rel_norm,
        **{f"{name}_ms": t for name, t in times.items()},
        "floor_us": floor,
        "pct_of_floor": 100 * floor / (times["fused"] * 1e3) if floor else None,
    }
    lines = [
        f"Benchmarking N={num_tokens}...",
        f"  {'✓ PASS' if passed else '✗ FAIL'} | Max Error: {stats.max_abs:.2e} | Rel Error: {stats.rel_norm:.2e}",
        "  "
        + " | ".join(
            f"{name.replace('_', ' ').title()}: {_fmt_ms(times[name])}"
            for name in (*IMPLEMENTATIONS, "layer", "fused_eager")
        ),
        f"  Tiles: {_tiles_line(tiles_for(num_tokens, weights, config.top_k))}",
        "  Speedup: "
        + " | ".join(f"{_ratio(times[base], times['fused'])} vs {base}" for base in ("naive", "unfused", "grouped_mm"))
        + (f" | Floor: {floor:.1f}us ({row['pct_of_floor']:.0f}% of floor)" if floor else ""),
    ]
    if args.detailed:
        lines += detailed_errors(x, topk_weights, topk_ids, weights, config)
    return row, lines


def _tiles_line(tiles) -> str:
    if tiles.decode is None:
        return tiles.source
    return f"{tiles.source}; decode path: fused in two launches, unfused in four and an add"


def _fmt_ms(ms):
    return "n/a" if ms is None else f"{ms:.3f}ms"


def _ratio(base, fused):
    return "n/a" if base is None or not fused else f"{base / fused:.2f}x"


def plot(rows, path, config, preset):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = [r["N"] for r in rows]
    for name in (*IMPLEMENTATIONS, "layer"):
        pts = [(r["N"], r[f"{name}_ms"]) for r in rows if r.get(f"{name}_ms")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    if all(r["floor_us"] for r in rows):
        ax.plot(ns, [r["floor_us"] / 1e3 for r in rows], "k--", label="roofline floor")
    shape = f"E={config.num_experts} H={config.hidden_dim} I={config.intermediate_dim} k={config.top_k}"
    ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="time (ms)", title=f"{preset}: {shape}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available() and not interpreter_active()
    if args.ep:
        from .benchmark_ep import run_ep

        return run_ep(args, build_config(args, on_gpu), make_layer)
    device = torch.device("cuda" if on_gpu else "cpu")
    import triton

    if on_gpu:
        print(f"Using GPU: {torch.cuda.get_device_name(device)}")
        print(f"CUDA Version: {torch.version.cuda}")
    else:
        print("No CUDA device: running the Triton kernels in the interpreter (TRITON_INTERPRET=1) at small")
        print("sizes. This checks correctness; the times are interpreter times, not kernel performance.")
    print(f"PyTorch: {torch.__version__} | Triton: {triton.__version__}")
    config = build_config(args, on_gpu)
    batch_sizes = args.batch_sizes or (GPU_BATCH_SIZES if on_gpu else CPU_BATCH_SIZES)
    routed_bytes, shared_bytes = config.weight_bytes()
    print("\nConfiguration:")
    print(f"  Preset: {args.preset} | dtype: {args.dtype}")
    print(f"  Hidden Dim (H): {config.hidden_dim}")
    print(f"  Intermediate Dim (I): {config.intermediate_dim}")
    print(f"  Num Experts (E): {config.num_experts}")
    print(f"  Top-K: {config.top_k}")
    print(f"  Shared Experts: {config.n_shared_experts} (MLP width {config.shared_intermediate_dim})")
    print(f"  Routing: {config.scoring_func}/{config.topk_method}")
    print(f"  Routed Weights: {routed_bytes / 2**20:.1f} MB")
    print(f"  Shared Weights: {shared_bytes / 2**20:.1f} MB")
    ceilings = measure_ceilings(device) if on_gpu else None
    if ceilings:
        print(
            f"  Measured ceilings: {ceilings.matmul_tflops:.0f} TFLOP/s bf16 matmul, {ceilings.copy_gbps:.0f} GB/s copy"
        )
    torch.manual_seed(args.seed)
    layer = make_layer(config, device, args.seed)
    print("\nRunning benchmark suite...\n")
    rows, all_passed = [], True
    try:
        from tqdm import tqdm

        progress = tqdm(batch_sizes, desc="batch sizes", file=sys.stderr, leave=False)
    except ImportError:
        progress = batch_sizes
    for n in progress:
        row, lines = bench_batch(config, n, layer, ceilings, on_gpu, args)
        if args.backward:
            from .benchmark_backward import bench_fwd_bwd

            backward_row, backward_lines = bench_fwd_bwd(
                config, n, layer, on_gpu, args.seed, time_ms, graph_ms=graph_median_ms, floor_us=row["floor_us"]
            )
            row.update(backward_row)
            lines += backward_lines
            all_passed &= backward_row["grad_pass"] is not False
        rows.append(row)
        all_passed &= row["pass"]
        print("\n".join(lines) + "\n", flush=True)
    if args.json:
        report = {
            "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (triton interpreter)",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "preset": args.preset,
            "config": config_json(config),
            "ceilings": asdict(ceilings) if ceilings else None,
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    if args.plot:
        plot(rows, args.plot, config, args.preset)
    print("All batch sizes PASS." if all_passed else "Some batch sizes FAILED.")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
