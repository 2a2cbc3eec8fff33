"""The seed's "Use in Your Code" snippet. On a machine without a GPU it runs at a small size in the
Triton interpreter (importing deepseek_moe_fused turns TRITON_INTERPRET=1 on there)."""

import torch

from deepseek_moe_fused import DeepSeekMoELayer
from deepseek_moe_fused.config import MoEConfig

if torch.cuda.is_available():
    config = MoEConfig(hidden_dim=2048, intermediate_dim=2048, num_experts=8, top_k=2)
    moe = DeepSeekMoELayer(config).cuda()
    x = torch.randn(1024, 2048, dtype=torch.bfloat16, device="cuda")
else:
    config = MoEConfig(hidden_dim=64, intermediate_dim=64, num_experts=8, top_k=2)
    moe = DeepSeekMoELayer(config)
    x = torch.randn(32, 64, dtype=torch.bfloat16)

output, router_logits = moe(x, return_router_logits=True)
print(f"Input: {x.shape}")
print(f"Output: {output.shape}")
print(f"Router logits: {router_logits.shape} {router_logits.dtype}")
