"""`python -m deepseek_moe_fused.benchmark --backward`: forward + backward of the whole layer.

Per N: the layer's forward+backward with the PyTorch backward and with the Triton backward, the
torch._grouped_mm pipeline under autograd, the peak device memory of each, the Triton backward
alone against its floor, and the Triton gradients against the PyTorch ones (PASS/FAIL). On a GPU
the Triton and grouped_mm steps are timed twice: eagerly (with Python's launch overhead, as a
plain training loop runs them) and as CUDA-graph replays of the whole step (device time, as a
captured training step runs them); the backward alone is the replayed step minus the replayed
forward.
"""

from __future__ import annotations

import statistics
import time

import torch

from . import baselines
from .benchmark import peak_mb
from .moe_layer import backward_selected
from .router import router_selected
from .testing import TOLERANCES, error_stats, make_activations

# The PyTorch backward keeps fp32 gradients of every expert: for a V3 layer 45 GB beside 22.5 GB
# of weights, past an 80 GB card. Skipped above this many routed-weight bytes.
TORCH_BACKWARD_MAX_BYTES = 8 * 2**30
# A captured training step keeps its gradients in the graph's private memory pool, beside the
# eager step's cached ones: for a V3 layer (22.5 GB of experts) three copies of the weights' size
# and the transients, too close to an 80 GB card. Replayed steps are timed below this.
GRAPHED_STEP_MAX_BYTES = 8 * 2**30


def layer_fwd_bwd_step(layer, x, grad, backward: str):
    """One forward+backward of the layer with the named backward, gradients reset first."""

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with backward_selected(backward):
            out = layer(x)
        out.backward(grad)

    return step


def layer_fwd_step(layer, x, backward: str):
    """The forward alone, with autograd recording (and saving for backward) as in training."""

    def step():
        with backward_selected(backward):
            layer(x)

    return step


def grouped_mm_fwd_bwd_step(layer, x, grad):
    """The PyTorch pipeline under autograd on the layer's weights: transformers' router ops, then
    torch._grouped_mm for the experts."""

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with router_selected("torch"):
            _, w, ids = layer.gate(x)
        baselines.grouped_mm_moe_experts(x, w, ids, layer.expert_weights()).backward(grad)

    return step


def graph_fwd_bwd_times(layer, x, grad, graph_ms, with_grouped_mm: bool = True) -> dict[str, float]:
    """CUDA-graph replays (device time) of the whole training step with the Triton backward and of
    the grouped_mm pipeline's, and the Triton backward alone: the replayed step minus the replayed
    forward (with autograd recording, as in training)."""
    times = {"fwd_bwd_triton_bwd_graph_ms": graph_ms(layer_fwd_bwd_step(layer, x, grad, "triton"))}
    if with_grouped_mm:
        times["fwd_bwd_grouped_mm_graph_ms"] = graph_ms(grouped_mm_fwd_bwd_step(layer, x, grad))
    times["bwd_triton_ms"] = times["fwd_bwd_triton_bwd_graph_ms"] - graph_ms(layer_fwd_step(layer, x, "triton"))
    return times


def backward_only_ms(layer, x, grad, backward: str, on_gpu: bool, reps: int, warmup: int) -> float:
    """Median time of the backward alone: a fresh forward before each (the Triton backward
    consumes its forward's saved pre-activations), CUDA events around `backward()` only."""
    times = []
    for i in range(warmup + reps):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with backward_selected(backward):
            out = layer(x)
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out.backward(grad)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            out.backward(grad)
            elapsed = (time.perf_counter() - began) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def _grads(layer, x) -> list[torch.Tensor]:
    return [x.grad] + [p.grad for p in layer.parameters()]


def bench_fwd_bwd(
    config, num_tokens, layer, on_gpu, seed, time_ms, graph_ms=None, floor_us=None
) -> tuple[dict, list[str]]:
    """`floor_us`: the forward's roofline floor. The backward's is twice that: dX and the weight
    gradients are each one GEMM of the forward's size per forward GEMM (and it reads the weights
    and writes their gradients: twice the bytes)."""
    device = layer.experts.gate_up_proj.device
    x = make_activations(num_tokens, config.hidden_dim, seed=seed + 1, dtype=config.dtype, device=device)
    x = x.requires_grad_()
    grad = make_activations(num_tokens, config.hidden_dim, seed=seed + 2, dtype=config.dtype, device=device)

    routed_bytes, _ = config.weight_bytes()
    runs = {"triton_bwd": layer_fwd_bwd_step(layer, x, grad, "triton")}
    if routed_bytes <= TORCH_BACKWARD_MAX_BYTES:
        runs["torch_bwd"] = layer_fwd_bwd_step(layer, x, grad, "torch")
    if on_gpu and baselines.grouped_mm_available():
        runs["grouped_mm"] = grouped_mm_fwd_bwd_step(layer, x, grad)
    row = {}
    for name, fn in runs.items():
        if on_gpu:
            row[f"fwd_bwd_{name}_peak_mb"] = peak_mb(fn, layer, x)
        row[f"fwd_bwd_{name}_ms"] = time_ms(fn, on_gpu)
    if on_gpu and graph_ms is not None and routed_bytes <= GRAPHED_STEP_MAX_BYTES:
        row.update(graph_fwd_bwd_times(layer, x, grad, graph_ms, with_grouped_mm="grouped_mm" in runs))
    else:
        row["bwd_triton_ms"] = backward_only_ms(layer, x, grad, "triton", on_gpu, reps=2, warmup=1)
    row["bwd_floor_us"] = 2 * floor_us if floor_us else None
    row["bwd_pct_of_floor"] = 100 * row["bwd_floor_us"] / (row["bwd_triton_ms"] * 1e3) if floor_us else None
    # Gradients: Triton against PyTorch where both ran (twice the dtype's bound: both round).
    passed, worst = None, None  # None: no PyTorch backward to compare with (too large)
    if "torch_bwd" in runs:
        passed, worst = True, 0.0
        runs["torch_bwd"]()
        want = [g.detach().clone() for g in _grads(layer, x)]
        runs["triton_bwd"]()
        tol = TOLERANCES[config.dtype].rel_norm * 2 if config.dtype != torch.float32 else 1e-5
        for got, ref in zip(_grads(layer, x), want):
            if ref is None or got is None:
                passed &= got is None and ref is None
                continue
            stats = error_stats(got, ref)
            worst = max(worst, stats.rel_norm)
            passed &= not stats.nan_mismatch and stats.rel_norm <= tol
    row.update(grad_pass=passed, grad_worst_rel=worst)

    def fmt(name):
        ms = row.get(f"fwd_bwd_{name}_ms")
        peak = row.get(f"fwd_bwd_{name}_peak_mb")
        return "n/a" if ms is None else f"{ms:.3f}ms" + (f" ({peak:.0f} MB)" if peak is not None else "")

    speedup = ""
    if "grouped_mm" in runs:
        speedup = f" | Triton bwd {row['fwd_bwd_grouped_mm_ms'] / row['fwd_bwd_triton_bwd_ms']:.2f}x vs grouped_mm"
    graphed = ""
    if "fwd_bwd_triton_bwd_graph_ms" in row:
        t, g = row["fwd_bwd_triton_bwd_graph_ms"], row.get("fwd_bwd_grouped_mm_graph_ms")
        graphed = f"  fwd+bwd graph replay: Triton bwd {t:.3f}ms" + (
            f" | grouped_mm autograd {g:.3f}ms | {g / t:.2f}x" if g else ""
        )
    verdict = "grads n/a" if passed is None else f"{'✓ PASS' if passed else '✗ FAIL'} grads (worst rel {worst:.2e})"
    lines = [
        f"  fwd+bwd: {verdict} | "
        f"Triton bwd: {fmt('triton_bwd')} | PyTorch bwd: {fmt('torch_bwd')} | grouped_mm autograd: "
        f"{fmt('grouped_mm')}{speedup}"
    ]
    if graphed:
        lines.append(graphed)
    bwd_floor = f" ({row['bwd_pct_of_floor']:.0f}% of its floor {row['bwd_floor_us']:.0f}us)" if floor_us else ""
    lines.append(f"  Triton backward alone: {row['bwd_triton_ms']:.3f}ms{bwd_floor}")
    return row, lines
