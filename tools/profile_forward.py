"""Device time per kernel of the experts forward (torch.profiler), next to its CUDA-graph replay.

Shows where a batch size's time goes: routing-metadata ops vs the three expert stages.
Run on a GPU: python tools/profile_forward.py [preset] [N ...]
"""

import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from deepseek_moe_fused import MoEConfig
from deepseek_moe_fused.benchmark import graph_median_ms
from deepseek_moe_fused.kernels.launch import moe_experts_forward
from deepseek_moe_fused.testing import make_moe_inputs

REPEATS = 20


def kernel_times_us(fn, repeats: int = REPEATS, name_chars: int = 60) -> dict[str, float]:
    """Device time per kernel name (its first `name_chars` characters) of one call of `fn`,
    averaged over `repeats` profiled calls; warm `fn` up first."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name[:name_chars]] += event.device_time / repeats
    return per_kernel


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "deepseek-v2-lite"
    sizes = [int(n) for n in sys.argv[2:]] or [1, 128, 2048]
    config = MoEConfig.from_preset(preset)
    for n in sizes:
        inputs = make_moe_inputs(config, n, device="cuda")

        def forward(inputs=inputs):
            return moe_experts_forward(inputs.x, inputs.topk_weights, inputs.topk_ids, inputs.weights)

        replay_us = graph_median_ms(forward) * 1e3
        per_kernel = kernel_times_us(forward)
        total = sum(per_kernel.values())
        print(f"\n{torch.cuda.get_device_name()} | {preset} N={n}: graph replay {replay_us:.1f} us, "
              f"sum of kernels {total:.1f} us over {len(per_kernel)} kernel names")  # fmt: skip
        for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
            print(f"  {us:8.1f} us  {name}")


if __name__ == "__main__":
    main()
