"""Where small-batch time goes: eager forward vs CUDA-graph replay of the same forward.

Eager time minus replay time is host-side launch overhead (Python, Triton's launcher, torch ops for
the routing metadata). Run on a GPU: python tools/decode_overhead.py [preset] [N ...]
"""

import sys

import torch

from deepseek_moe_fused import MoEConfig
from deepseek_moe_fused.benchmark import graph_median_ms
from deepseek_moe_fused.kernels.launch import moe_experts_forward
from deepseek_moe_fused.testing import make_moe_inputs
from deepseek_moe_fused.timing import median_ms


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "deepseek-v2-lite"
    sizes = [int(n) for n in sys.argv[2:]] or [1, 16, 128]
    config = MoEConfig.from_preset(preset)
    print(f"{torch.cuda.get_device_name()} | {preset}")
    print(f"{'N':>6} {'eager us':>10} {'graph us':>10} {'host us':>9}")
    for n in sizes:
        inputs = make_moe_inputs(config, n, device="cuda")

        def forward(inputs=inputs):
            return moe_experts_forward(inputs.x, inputs.topk_weights, inputs.topk_ids, inputs.weights)

        eager = median_ms(forward, rep_ms=200)
        replay = graph_median_ms(forward)
        print(f"{n:>6} {eager * 1e3:>10.1f} {replay * 1e3:>10.1f} {(eager - replay) * 1e3:>9.1f}")


if __name__ == "__main__":
    main()
