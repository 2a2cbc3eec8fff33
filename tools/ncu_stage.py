"""Run one expert-kernel stage a few times after the forward that feeds it, for Nsight Compute (GPU).

    ncu --clock-control none -k regex:_gate_up_swiglu_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section LaunchStats \\
        python tools/ncu_stage.py gate_up --preset deepseek-v2-lite --tokens 2048
    ncu ... -k regex:_rows_matmul_kernel ... python tools/ncu_stage.py dx --preset seed --tokens 2048

The forward (and, for gate_up, down and down_grad, the stage inputs) launch each kernel once or
twice first, so --launch-skip 2 lands on a warm launch of the stage. The numbers in
docs/perf-notes.md ("Where the N=2048 GEMMs wait") came from these two commands.
"""

from __future__ import annotations

import argparse

import torch

from deepseek_moe_fused.config import PRESETS, MoEConfig
from deepseek_moe_fused.kernels import _tiles, _tma
from deepseek_moe_fused.kernels import launch_backward as launchers
from deepseek_moe_fused.kernels.launch import (
    down_proj,
    gate_up_swiglu,
    moe_experts_forward,
    new_preactivations,
    routing_metadata_for,
)
from deepseek_moe_fused.testing import make_activations, make_moe_inputs

STAGES = ("gate_up", "down", "down_grad", "dx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="seed")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    config = MoEConfig.from_preset(args.preset)
    inputs = make_moe_inputs(config, args.tokens, routing="uniform", seed=0, device="cuda")
    w = inputs.weights
    metadata = routing_metadata_for(inputs.topk_ids, w)
    preacts = new_preactivations(inputs.x, w, metadata)
    moe_experts_forward(inputs.x, inputs.topk_weights, inputs.topk_ids, w, metadata, preacts=preacts)
    H, I, S = config.hidden_dim, config.intermediate_dim, config.shared_intermediate_dim
    rows_per_expert = args.tokens * config.top_k / config.num_experts
    tiles = _tiles.backward_tiles(
        metadata.block_m, H, max(I, S), False, rows_per_expert=rows_per_expert, tma=_tma.tma_enabled(inputs.x.device)
    )
    h_routed, h_shared = gate_up_swiglu(inputs.x, w, metadata)
    dy = make_activations(args.tokens, H, seed=2, device="cuda")
    run = {
        "gate_up": lambda: gate_up_swiglu(inputs.x, w, metadata),
        "down": lambda: down_proj(h_routed, h_shared, inputs.topk_weights, w, metadata),
        "down_grad": lambda: launchers._down_grad_stage(dy, w, metadata, tiles.down_grad),
        # dX reads dG/dU from the pre-activations; their values do not change its work.
        "dx": lambda: launchers._dx_stage(args.tokens, preacts, w, metadata, tiles.dx),
    }[args.stage]
    for _ in range(args.runs):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
