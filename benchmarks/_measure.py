"""Everything the asv tracks report for one (preset, N), measured once per `make bench` run.

asv starts a fresh process for every (benchmark, parameters) pair. Building a DeepSeek-V3 layer
(21 GB) and warming the kernels in each of them would cost far more than the measurements, so the
first process of a run measures all numbers for its (preset, N) and leaves them in a JSON file
keyed by the run id (`DEEPSEEK_MOE_BENCH_RUN`, set by `make bench`); the other tracks of the same
run read it. Without a run id every process measures for itself (slower, never stale).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

RUN_ENV = "DEEPSEEK_MOE_BENCH_RUN"
FORCE_TILES_ENV = "DEEPSEEK_MOE_FORCE_TILES"  # read by deepseek_moe_fused.kernels._tiles; part of the cache key
SIZES_ENV = "DEEPSEEK_MOE_BENCH_SIZES"
FULL_SIZES = {
    "seed": [1, 16, 128, 512, 2048, 8192, 16384],
    "deepseek-v2-lite": [1, 16, 128, 512, 2048, 8192, 16384],
    # One V3 layer (E=256, H=7168, I=2048, k=8, 1 shared): 21 GB of bf16 weights, fits one card.
    "deepseek-v3": [16, 2048, 8192],
}


def _sizes_from_env(spec: str) -> dict[str, list[int]]:
    """'seed=1,2048;deepseek-v3=16' -> a subset of FULL_SIZES (a quick run, e.g. on pull requests)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        preset, _, numbers = part.partition("=")
        if preset not in FULL_SIZES:
            raise ValueError(f"{SIZES_ENV}: unknown preset {preset!r}; choose from {sorted(FULL_SIZES)}")
        sizes[preset] = [int(n) for n in numbers.split(",") if n.strip()]
    return sizes


PRESET_SIZES = _sizes_from_env(os.environ[SIZES_ENV]) if os.environ.get(SIZES_ENV) else FULL_SIZES


class NoGPU(NotImplementedError):
    """Raised in setup: asv then skips the benchmark instead of failing it."""


def require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise NoGPU("these benchmarks time CUDA kernels; no CUDA device here")


def _cache_file(key: str) -> Path | None:
    run = os.environ.get(RUN_ENV)
    if not run:
        return None
    folder = Path(tempfile.gettempdir()) / "deepseek_moe_fused_asv" / run
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.json"


def measurements(preset: str, num_tokens: int) -> dict:
    key = f"{preset}-{num_tokens}-{os.environ.get(FORCE_TILES_ENV, 'default').replace(',', '_').replace('=', '')}"
    path = _cache_file(key)
    if path is not None and path.exists():
        return json.loads(path.read_text())
    result = _measure(preset, num_tokens)
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    return result


def ceilings():
    """The card's ceilings, measured once per run like the rest."""
    from deepseek_moe_fused.benchmark import Ceilings, measure_ceilings

    path = _cache_file("ceilings")
    if path is not None and path.exists():
        return Ceilings(**json.loads(path.read_text()))
    import torch

    measured = measure_ceilings(torch.device("cuda"))
    if path is not None:
        path.write_text(json.dumps(measured.__dict__))
    return measured


def _measure(preset: str, num_tokens: int) -> dict:
    import torch

    from deepseek_moe_fused import DeepSeekMoELayer, MoEConfig, baselines
    from deepseek_moe_fused.benchmark import graph_median_ms, make_layer, peak_mb, time_ms
    from deepseek_moe_fused.kernels.launch import moe_experts_forward
    from deepseek_moe_fused.reference import naive_moe_experts
    from deepseek_moe_fused.router import router_selected
    from deepseek_moe_fused.testing import make_activations

    # First call in a fresh Triton cache: what a user pays the first time this shape runs.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")
    device = torch.device("cuda")
    config = MoEConfig.from_preset(preset)
    layer: DeepSeekMoELayer = make_layer(config, device, seed=0)
    weights = layer.expert_weights()
    x = make_activations(num_tokens, config.hidden_dim, seed=1, dtype=config.dtype, device=device)
    with torch.no_grad():
        _, topk_weights, topk_ids = layer.gate(x)
    out = {}

    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    moe_experts_forward(x, topk_weights, topk_ids, weights)
    end.record()
    end.synchronize()
    out["compile_s"] = start.elapsed_time(end) / 1e3

    with torch.no_grad():

        def fused():
            return moe_experts_forward(x, topk_weights, topk_ids, weights)

        out["fused_peak_mb"] = peak_mb(fused)
        # CUDA-graph replays: eager small-batch times (mostly Python launch overhead) moved by up to
        # 1.6x between two runs of one commit on one H100, which no gate can work with.
        out["fused_ms"] = graph_median_ms(fused)
        out["unfused_ms"] = graph_median_ms(
            lambda: moe_experts_forward(x, topk_weights, topk_ids, weights, fuse_shared=False)
        )
        out["grouped_mm_ms"] = graph_median_ms(
            lambda: baselines.grouped_mm_moe_experts(x, topk_weights, topk_ids, weights)
        )
        # The seed's per-expert loop syncs with the host for every expert: eager, as it is used.
        shared = (weights.shared_gate, weights.shared_up, weights.shared_down)
        naive_args = (x, topk_weights, topk_ids, weights.gate_up_proj, weights.down_proj, *shared)
        out["naive_ms"] = time_ms(lambda: naive_moe_experts(*naive_args), on_gpu=True)
        out["layer_ms"] = time_ms(lambda: layer(x), on_gpu=True)  # eager on purpose: what a caller sees
        out["router_ms"] = graph_median_ms(lambda: layer.gate(x))
        with router_selected("torch"):  # transformers' op sequence, the baseline
            out["router_torch_ms"] = graph_median_ms(lambda: layer.gate(x))

    from deepseek_moe_fused.benchmark_backward import (
        GRAPHED_STEP_MAX_BYTES,
        TORCH_BACKWARD_MAX_BYTES,
        graph_fwd_bwd_times,
        grouped_mm_fwd_bwd_step,
        layer_fwd_bwd_step,
    )

    # Forward + backward of the whole layer (PyTorch and Triton backward), and of the grouped_mm
    # pipeline under autograd, each with its peak device memory.
    x_grad = x.detach().clone().requires_grad_()
    grad = torch.randn_like(x)

    def timed_with_peak(key, fn):
        out[f"{key}_peak_mb"] = peak_mb(fn, layer, x_grad)
        out[f"{key}_ms"] = time_ms(fn, on_gpu=True)

    # The PyTorch backward keeps fp32 gradients of every expert (45 GB for a V3 layer beside its
    # 22.5 GB of weights): only where they fit.
    if config.weight_bytes()[0] <= TORCH_BACKWARD_MAX_BYTES:
        timed_with_peak("fwd_bwd", layer_fwd_bwd_step(layer, x_grad, grad, "torch"))
    timed_with_peak("fwd_bwd_triton", layer_fwd_bwd_step(layer, x_grad, grad, "triton"))
    timed_with_peak("grouped_mm_fwd_bwd", grouped_mm_fwd_bwd_step(layer, x_grad, grad))
    # The same steps replayed from CUDA graphs: device time, steady enough to gate on (where the
    # captured step's gradients fit beside the eager ones).
    if config.weight_bytes()[0] <= GRAPHED_STEP_MAX_BYTES:
        graphed = graph_fwd_bwd_times(layer, x_grad, grad, graph_median_ms)
        out["fwd_bwd_triton_graph_ms"] = graphed["fwd_bwd_triton_bwd_graph_ms"]
        out["grouped_mm_fwd_bwd_graph_ms"] = graphed["fwd_bwd_grouped_mm_graph_ms"]
        out["bwd_triton_graph_ms"] = graphed["bwd_triton_ms"]
    return _finish(out, config, topk_ids, num_tokens)


def _finish(out: dict, config, topk_ids, num_tokens: int) -> dict:
    from deepseek_moe_fused.benchmark import roofline_floor_us

    floor_us = roofline_floor_us(config, topk_ids, ceilings())
    H, I, S, K = config.hidden_dim, config.intermediate_dim, config.shared_intermediate_dim, config.top_k
    out["pct_of_floor"] = 100 * floor_us / (out["fused_ms"] * 1e3)
    if "bwd_triton_graph_ms" in out:  # the backward's floor is twice the forward's (bench_fwd_bwd says why)
        out["bwd_triton_pct_of_floor"] = 100 * 2 * floor_us / (out["bwd_triton_graph_ms"] * 1e3)
    out["tflops"] = 6 * H * num_tokens * (K * I + S) / (out["fused_ms"] * 1e-3) / 1e12
    return out
