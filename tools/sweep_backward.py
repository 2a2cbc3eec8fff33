"""Time each stage of the Triton backward for candidate tiles (GPU): the numbers behind the
backward's tile heuristic (kernels/_tiles.py `backward_tiles`, docs/perf-notes.md).

    python tools/sweep_backward.py --presets seed deepseek-v2-lite --batch_sizes 2048 8192
    python tools/sweep_backward.py --stages weight_grad   # one stage; weight gradients TMA on and off
    python tools/sweep_backward.py --stages router --batch_sizes 2048 8192 16384
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import triton

from deepseek_moe_fused._env import env_set
from deepseek_moe_fused.benchmark import graph_median_ms, make_layer, measure_ceilings
from deepseek_moe_fused.config import PRESETS, MoEConfig
from deepseek_moe_fused.kernels import _tiles, _tma
from deepseek_moe_fused.kernels import launch_backward as launchers
from deepseek_moe_fused.kernels.launch import moe_experts_forward, new_preactivations, routing_metadata_for
from deepseek_moe_fused.kernels.launch_router import (
    route_tokens,
    router_backward,
    router_backward_tiles_for,
    split_products,
)
from deepseek_moe_fused.testing import make_activations

# (block_n, block_k, num_warps, num_stages) of the two row-tiled GEMMs; (block_m, block_n,
# num_warps) of the elementwise SwiGLU backward; weight-gradient tiles as (block_p, block_q,
# block_r, num_warps, num_stages).
DOWN_GRAD = [
    (256, 64, 8, 3),
    (256, 32, 8, 4),
    (256, 64, 8, 4),
    (128, 64, 8, 4),
    (128, 64, 4, 4),
    (128, 64, 8, 3),  # two programs per SM: one's epilogue beside the other's loads
    (128, 128, 8, 3),
    (64, 128, 4, 4),
]
SWIGLU = [
    (16, 256, 4),
    (8, 512, 4),
    (32, 128, 4),
    (4, 1024, 4),
    (32, 256, 8),
    (4, 512, 4),  # more programs: a one-wave grid balanced over the SMs
    (2, 1024, 4),
    (8, 256, 4),
    (4, 256, 2),
    (2, 512, 2),
    (2, 2048, 8),
    (4, 1024, 8),
    (1, 1024, 4),
]
DX = [
    (256, 32, 8, 4),
    (256, 32, 8, 3),
    (128, 64, 8, 3),
    (128, 32, 4, 5),
    (256, 64, 8, 4),
    (256, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 128, 8, 3),
]
WEIGHT_GRAD = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (128, 256, 32, 8, 4),
    (256, 128, 32, 8, 4),
    (128, 128, 32, 8, 4),
    (64, 256, 32, 4, 4),
    (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 4),
    (128, 128, 16, 4, 6),
]
# The router's backward: (block_t, block_h) of its logits-gradient + dx kernel and (w_block_t,
# w_block_h) of its weight-gradient kernel (kernels/launch_router.py `router_backward_tiles`).
ROUTER_DX = [(16, 64), (16, 128), (32, 128), (64, 64)]
ROUTER_WEIGHT = [(32, 64), (64, 128), (32, 128), (128, 64)]
STAGES = ("down_grad", "swiglu", "dx", "weight_grad", "shared_weight_grad", "router")


def median_ms(fn) -> float:
    """Device time from CUDA-graph replays: timed eagerly, a stage of tens of microseconds reads
    its launcher's host time instead (docs/perf-notes.md, "The router's backward on split products")."""
    return graph_median_ms(fn)


def sweep(config: MoEConfig, num_tokens: int, matmul_tflops: float, stages: tuple[str, ...]) -> None:
    layer = make_layer(config, torch.device("cuda"), 0)
    w = layer.expert_weights()
    H, I, S, K = config.hidden_dim, config.intermediate_dim, config.shared_intermediate_dim, config.top_k
    x = make_activations(num_tokens, H, seed=1, device="cuda")
    dy = make_activations(num_tokens, H, seed=2, device="cuda")
    with torch.no_grad():
        _, topk_weights, topk_ids = layer.gate(x)
    metadata = routing_metadata_for(topk_ids, w)
    preacts = new_preactivations(x, w, metadata)
    moe_experts_forward(x, topk_weights, topk_ids, w, metadata, preacts=preacts)
    flat_weights = topk_weights.reshape(-1).float().contiguous()
    rows = num_tokens * K
    base = _tiles.backward_tiles(
        metadata.block_m, H, max(I, S), False, rows_per_expert=rows / config.num_experts, tma=_tma.tma_enabled(x.device)
    )
    print(f"\n== N={num_tokens} block_m={metadata.block_m} heuristic {base}")
    # Timing repeats a stage on the same buffers: the SwiGLU stage rewrites the pre-activations in
    # place each time, which changes their values but not the work.
    d_act_routed, d_act_shared = launchers._down_grad_stage(dy, w, metadata, base.down_grad)

    def report(name, tiles, fn, flops=None, nbytes=None):
        try:
            ms = median_ms(fn)
        except triton.runtime.errors.OutOfResources:
            print(f"  {name} {tiles}: out of resources")
            return
        if flops is not None:
            rate = flops / ms / 1e9
            share = 100 * rate / matmul_tflops
            print(f"  {name} {tiles}: {ms * 1e3:7.0f} us {rate:5.0f} TF/s ({share:.0f}% of ceiling)")
        elif nbytes is not None:
            print(f"  {name} {tiles}: {ms * 1e3:7.0f} us {nbytes / ms / 1e9:5.2f} TB/s")
        else:
            print(f"  {name} {tiles}: {ms * 1e3:7.1f} us")

    down_grad_flops = 2 * (rows * I + num_tokens * S) * H
    for bn, bk, warps, st in DOWN_GRAD if "down_grad" in stages else ():
        t = replace(base.down_grad, block_n=bn, block_k=bk, num_warps=warps, num_stages=st)
        fn = lambda t=t: launchers._down_grad_stage(dy, w, metadata, t)  # noqa: E731
        report("dY W_down", (bn, bk, warps, st), fn, down_grad_flops)
    # Per element of (rows x I) + (T x S): reads dA, g, u; writes dg, du.
    swiglu_bytes = 5 * (rows * I + num_tokens * S) * x.element_size()
    for bm, bn, warps in SWIGLU if "swiglu" in stages else ():
        t = _tiles.ElementwiseTiles(bm, bn, warps)

        def fn(t=t):
            return launchers._swiglu_backward_stage(d_act_routed, d_act_shared, flat_weights, metadata, preacts, t)

        report("swiglu", (bm, bn, warps), fn, nbytes=swiglu_bytes)
    for bn, bk, warps, st in DX if "dx" in stages else ():
        t = replace(base.dx, block_n=bn, block_k=bk, num_warps=warps, num_stages=st)
        report(
            "dx",
            (bn, bk, warps, st),
            lambda t=t: launchers._dx_stage(num_tokens, preacts, w, metadata, t),
            2 * down_grad_flops,
        )
    for cfg in WEIGHT_GRAD if "weight_grad" in stages else ():
        t = _tiles.TileConfig(*cfg)

        def fn(t=t):
            return launchers._weight_grad_stage(x, dy, preacts.routed, preacts.h_routed, flat_weights, w, metadata, t)

        for tma in ("off", "auto"):  # the switch is read at each launch
            with env_set(_tma.TMA_ENV, tma):
                report(f"weight grad, TMA {tma}", cfg, fn, 6 * rows * H * I)
    if w.has_shared and "shared_weight_grad" in stages:
        fn = lambda: launchers._shared_weight_grads(x, dy, preacts.shared, preacts.h_shared)  # noqa: E731
        report("shared weight grad (cuBLAS)", "-", fn, 6 * num_tokens * S * H)
    if "router" in stages:
        sweep_router_backward(layer, x, report)


def sweep_router_backward(layer, x, report) -> None:
    """Each router-backward kernel with candidate tiles: dx's (without the weight gradient), then
    the weight gradient's (with the logits-gradient kernel, without dx)."""
    config, weight = layer.config, layer.gate.weight.detach()
    logits, routing_weights, ids = route_tokens(x, weight, layer.gate.e_score_correction_bias, config)
    grad_logits = torch.zeros_like(logits)  # no auxiliary loss reads the logits, as in the benchmark
    grad_weights = torch.randn(
        routing_weights.shape, device=x.device, generator=torch.Generator(x.device).manual_seed(3)
    )
    args = (x, weight, logits, ids, grad_logits, grad_weights, config)
    base = router_backward_tiles_for(x, weight, config.num_experts)
    print(f"  router backward: split products dx {split_products(weight)}, d weight {split_products(x)}; {base}")
    kernels = (
        ("router dx", ROUTER_DX, ("block_t", "block_h"), {"need_dweight": False}),
        ("router d weight", ROUTER_WEIGHT, ("w_block_t", "w_block_h"), {"need_dx": False}),
    )
    for name, candidates, fields, only in kernels:
        for tile in candidates:
            t = base._replace(**dict(zip(fields, tile, strict=True)))
            report(name, tile, lambda t=t, only=only: router_backward(*args, tiles=t, **only))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["seed", "deepseek-v2-lite"], choices=sorted(PRESETS))
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_backward.py times compiled kernels: it needs a CUDA device")
    ceilings = measure_ceilings(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()} | bf16 matmul ceiling {ceilings.matmul_tflops:.0f} TF/s")
    for preset in args.presets:
        print(f"\n#### {preset}")
        for n in args.batch_sizes:
            sweep(MoEConfig.from_preset(preset), n, ceilings.matmul_tflops, tuple(args.stages))


if __name__ == "__main__":
    main()
