"""Swap the fused MoE into a transformers DeepSeek model and check the logits do not move.

A tiny DeepseekV3ForCausalLM built from config (random weights, no download); on a GPU it runs in
bf16, on a CPU in fp32 through the Triton interpreter.
"""

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from deepseek_moe_fused.hf import patch_model

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
config = DeepseekV3Config(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4,
    n_group=4, topk_group=2, max_position_embeddings=128,
)  # fmt: skip
torch.manual_seed(0)
model = DeepseekV3ForCausalLM(config).to(device=device, dtype=dtype).eval()
with torch.no_grad():
    for name, p in model.named_parameters():  # routers start at zero in transformers: give them signal
        if "mlp.gate.weight" in name:
            p.normal_(std=0.5)

ids = torch.randint(0, config.vocab_size, (1, 16), device=device)
with torch.no_grad():
    before = model(ids).logits.float()
    print(f"replaced {patch_model(model)} MoE blocks")
    after = model(ids).logits.float()
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
rel = ((after - before).norm() / before.norm()).item()
print(f"logits relative difference after patching: {rel:.2e} ({dtype})")
print(f"greedy continuation: {tokens[0, 16:].tolist()}")
