"""Triton kernels of the expert forward. Private: use `deepseek_moe_fused.fused_moe`."""
