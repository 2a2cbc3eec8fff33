"""Fused DeepSeek Mixture-of-Experts in Triton: routed and shared experts from one read of X."""

from ._interpret import default_to_interpreter_without_gpu

default_to_interpreter_without_gpu()  # must run before the kernels below are decorated

# ruff: noqa: E402

from .config import PRESETS, MoEConfig
from .fused_moe import GateUpOutput, fused_gate_up_swiglu, fused_moe_experts
from .moe_layer import DeepSeekMoELayer, FusedMoEExpertsFunction
from .router import DeepSeekRouter, select_experts
from .routing_metadata import RoutingMetadata, build_routing_metadata

__all__ = [
    "PRESETS",
    "DeepSeekMoELayer",
    "DeepSeekRouter",
    "FusedMoEExpertsFunction",
    "GateUpOutput",
    "MoEConfig",
    "RoutingMetadata",
    "build_routing_metadata",
    "fused_gate_up_swiglu",
    "fused_moe_experts",
    "select_experts",
]

__version__ = "0.1.0"
