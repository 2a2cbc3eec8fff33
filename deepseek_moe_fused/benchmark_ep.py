"""`python -m deepseek_moe_fused.benchmark --ep W` under torchrun: expert-parallel timings.

    torchrun --nproc_per_node 2 -m deepseek_moe_fused.benchmark --ep 2 --preset deepseek-v2-lite \\
        --batch_sizes 128 2048 8192

Per N tokens per rank: the EP layer's forward time (slowest rank), the time of its two all-to-all
exchanges of the rows alone and their share, and one GPU holding all experts on all W*N tokens
where that fits, with the speedup. NCCL on GPUs, gloo (interpreter, small sizes) without.
Collective calls are timed with a fixed number of iterations so that every rank makes the same
calls (an adaptive timer could stop at different counts on different ranks and hang).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from .expert_parallel import expert_bounds
from .moe_layer import DeepSeekMoELayer
from .testing import make_activations

WARMUP, ITERS = 3, 10


def _timed_ms(fn, on_gpu: bool, barrier: bool = True) -> float:
    """Median over ITERS of one synchronised call, after WARMUP calls; the same on every rank."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(ITERS):
        if barrier:
            dist.barrier()
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if on_gpu:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _slowest(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run_ep(args, config, make_full_layer) -> int:
    if "RANK" not in os.environ:
        raise SystemExit("--ep needs torchrun: torchrun --nproc_per_node W -m deepseek_moe_fused.benchmark --ep W ...")
    on_gpu = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != args.ep:
        raise SystemExit(f"--ep {args.ep} but torchrun started {world} processes")
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    full = make_full_layer(config, device, args.seed)
    layer = DeepSeekMoELayer(config, device=device, ep_group=dist.group.WORLD)
    layer.load_state_dict(full.state_dict())
    # One device holding all experts runs the whole W*N batch on rank 0, where that fits.
    single = full if rank == 0 else None
    del full
    if rank != 0 and on_gpu:
        torch.cuda.empty_cache()
    bounds = expert_bounds(config.num_experts, world)
    if rank == 0:
        print(f"\nExpert parallel: {world} ranks ({'NCCL' if on_gpu else 'gloo, interpreter'}), experts per rank "
              f"{[bounds[r + 1] - bounds[r] for r in range(world)]}")  # fmt: skip
        print(f"{'N/rank':>7} {'EP ms':>9} {'a2a ms':>8} {'a2a %':>6} {'1-dev ms':>9} {'speedup':>8}")
    batch_sizes = args.batch_sizes or ([128, 2048, 8192] if on_gpu else [4, 16])
    for n in batch_sizes:
        x = make_activations(n, config.hidden_dim, seed=args.seed + 1 + rank, dtype=config.dtype, device=device)
        with torch.no_grad():
            ep_ms = _slowest(_timed_ms(lambda x=x: layer(x), on_gpu), device)
            # The two exchanges of (N*K, H) rows that the EP forward makes, sized like a uniform routing.
            # Even splits need a multiple of W rows.
            rows = x.new_empty((-(-n * config.top_k // world) * world, config.hidden_dim))
            received = torch.empty_like(rows)

            def exchange(rows=rows, received=received):
                dist.all_to_all_single(received, rows)
                dist.all_to_all_single(rows, received)

            a2a_ms = _slowest(_timed_ms(exchange, on_gpu), device)
            single_ms = None
            if rank == 0:
                x_all = make_activations(
                    world * n, config.hidden_dim, seed=args.seed, dtype=config.dtype, device=device
                )
                try:
                    single_ms = _timed_ms(lambda x_all=x_all: single(x_all), on_gpu, barrier=False)
                except torch.OutOfMemoryError:
                    single_ms = None
        if rank == 0:
            single_txt = f"{single_ms:9.3f}" if single_ms else f"{'n/a':>9}"
            speedup = f"{single_ms / ep_ms:7.2f}x" if single_ms else f"{'n/a':>8}"
            print(f"{n:>7} {ep_ms:9.3f} {a2a_ms:8.3f} {100 * a2a_ms / ep_ms:5.0f}% {single_txt} {speedup}", flush=True)
        dist.barrier()
    dist.destroy_process_group()
    return 0
