"""Forward time of a transformers DeepSeek model before and after `patch_model`, on a GPU.

The model is built from config (random weights, no download) with DeepSeek-V2-Lite's MoE shape
(hidden 2048, 64 experts of width 1408, top-6, 2 shared) but few layers and a small vocabulary, so
the MoE blocks dominate. Unpatched runs transformers' own experts backend (grouped_mm where the
installed transformers has it). Usage: python tools/bench_hf.py [--layers 4] [--seq 1 128 2048 8192]
"""

import argparse
from functools import partial

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from deepseek_moe_fused.hf import patch_model
from deepseek_moe_fused.timing import median_ms


def build_model(num_layers: int, backend: str) -> DeepseekV2ForCausalLM:
    config = DeepseekV2Config(
        vocab_size=1024, hidden_size=2048, intermediate_size=4096, moe_intermediate_size=1408,
        num_hidden_layers=num_layers, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, max_position_embeddings=16384,
    )  # fmt: skip
    config._experts_implementation = backend
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    with torch.no_grad():  # transformers starts routers at zero: give them signal
        for name, p in model.named_parameters():
            if "mlp.gate.weight" in name or "experts" in name:
                p.normal_(std=0.02)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, nargs="+", default=[1, 128, 2048, 8192])
    parser.add_argument("--backend", default="grouped_mm", help="transformers experts backend when unpatched")
    parser.add_argument("--profile", type=int, default=0, help="also print the top kernels at this sequence length")
    args = parser.parse_args()
    model = build_model(args.layers, args.backend)
    backend = getattr(model.config, "_experts_implementation", None) or "default"
    print(f"{torch.cuda.get_device_name()} | DeepseekV2ForCausalLM, {args.layers} layers, V2-Lite MoE shape, bf16")
    print(f"{'seq':>6} {'unpatched (' + backend + ') ms':>26} {'patched ms':>11} {'speedup':>8} {'logits rel':>12}")
    inputs = {
        seq: torch.randint(0, 1024, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(seq))
        for seq in args.seq
    }
    unpatched = {}
    with torch.no_grad():
        for seq, ids in inputs.items():
            logits = model(ids).logits.float()
            unpatched[seq] = (median_ms(partial(model, ids), rep_ms=200), logits)
        patch_model(model)
        for seq, ids in inputs.items():
            logits = model(ids).logits.float()
            ms = median_ms(partial(model, ids), rep_ms=200)
            ms_before, logits_before = unpatched[seq]
            rel = ((logits - logits_before).norm() / logits_before.norm()).item()
            print(f"{seq:>6} {ms_before:>26.3f} {ms:>11.3f} {ms_before / ms:>7.2f}x {rel:>12.2e}")
        if args.profile:
            profile_forward(model, inputs[args.profile])


def profile_forward(model, ids, repeats: int = 5) -> None:
    """Top device kernels and host time of the patched forward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            model(ids)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
