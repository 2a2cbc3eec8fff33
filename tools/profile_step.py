"""Device time per kernel of one training step (torch.profiler): the layer with the Triton backward,
then the grouped_mm pipeline under autograd, on the same layer and inputs.

Shows where a step's time goes (docs/perf-notes.md, "Where a training step's device time goes").
The step runs eagerly under the profiler; its CUDA-graph replay is printed beside the kernels' sum.
Run on a GPU: python tools/profile_step.py [preset] [N ...]
"""

import sys

import torch
from profile_forward import kernel_times_us  # tools/ is the script's directory, so on sys.path

from deepseek_moe_fused import MoEConfig
from deepseek_moe_fused.benchmark import graph_median_ms, make_layer
from deepseek_moe_fused.benchmark_backward import grouped_mm_fwd_bwd_step, layer_fwd_bwd_step
from deepseek_moe_fused.testing import make_activations

REPEATS = 5
WARMUP = 3
SHOWN = 22  # kernel names printed per step, the longest first


def step_kernel_times_us(step) -> dict[str, float]:
    """Device time per kernel name of one call of `step`, after WARMUP unprofiled calls."""
    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    return kernel_times_us(step, repeats=REPEATS, name_chars=90)


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "deepseek-v2-lite"
    sizes = [int(n) for n in sys.argv[2:]] or [512, 2048, 16384]
    config = MoEConfig.from_preset(preset)
    layer = make_layer(config, torch.device("cuda"), 0)
    for n in sizes:
        x = make_activations(n, config.hidden_dim, seed=1, device="cuda").requires_grad_()
        grad = make_activations(n, config.hidden_dim, seed=2, device="cuda")
        steps = {
            "triton": layer_fwd_bwd_step(layer, x, grad, "triton"),
            "grouped_mm": grouped_mm_fwd_bwd_step(layer, x, grad),
        }
        for name, step in steps.items():
            per_kernel = step_kernel_times_us(step)
            replay_us = graph_median_ms(step) * 1e3
            print(f"\n{torch.cuda.get_device_name()} | {preset} N={n} {name}: graph replay {replay_us:.0f} us, "
                  f"sum of kernels {sum(per_kernel.values()):.0f} us")  # fmt: skip
            for kernel, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:SHOWN]:
                print(f"  {us:8.1f} us  {kernel}")


if __name__ == "__main__":
    main()
