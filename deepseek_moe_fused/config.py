"""`MoEConfig`: the shape and routing rule of one DeepSeek MoE block, plus published presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

SCORING_FUNCS = ("softmax", "sigmoid")
# Which top-k methods each scoring function supports, as in DeepSeek's releases:
# V2 / deepseek-moe use softmax with plain or group-limited greedy selection, V3 uses
# sigmoid scores plus a correction bias with group-limited selection ("noaux_tc").
TOPK_METHODS = {
    "softmax": ("greedy", "group_limited_greedy"),
    "sigmoid": ("noaux_tc",),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing rule of one DeepSeek MoE block.

    The first four fields are the seed's; the rest make it a full DeepSeek layer
    (transformers' ``DeepseekV3MoE`` / ``DeepseekV2Moe``).
    """

    hidden_dim: int  # H: model width
    intermediate_dim: int  # I: width of one routed expert's MLP (moe_intermediate_size)
    num_experts: int  # E: routed experts
    top_k: int  # K: routed experts per token
    n_shared_experts: int = 1  # shared MLP width is intermediate_dim * n_shared_experts; 0 = none
    scoring_func: str = "softmax"  # "softmax" (V2) or "sigmoid" (V3)
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" (softmax), "noaux_tc" (sigmoid)
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups kept per token
    # Renormalise the top-k weights to sum to 1 (DeepSeek's code does for both scoring functions;
    # transformers' DeepseekV2 router ignores it, so a V2 model converted from there sets it False).
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0  # multiplies the routing weights
    dtype: torch.dtype = torch.bfloat16  # parameter dtype of a new layer

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "intermediate_dim", "num_experts", "top_k", "n_group", "topk_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"MoEConfig.{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"MoEConfig.{name} must be >= 1, got {value}")
        if isinstance(self.n_shared_experts, bool) or not isinstance(self.n_shared_experts, int):
            raise TypeError("MoEConfig.n_shared_experts must be an int")
        if self.n_shared_experts < 0:
            raise ValueError(f"MoEConfig.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"MoEConfig.scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        allowed = TOPK_METHODS[self.scoring_func]
        if self.topk_method not in allowed:
            raise ValueError(
                f"MoEConfig.topk_method {self.topk_method!r} does not go with scoring_func "
                f"{self.scoring_func!r}; expected one of {allowed}"
            )
        if self.num_experts % self.n_group != 0:
            raise ValueError(
                f"MoEConfig.num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.topk_method == "greedy" and self.n_group != 1:
            raise ValueError("MoEConfig.n_group must be 1 with topk_method='greedy' (groups are not used)")
        if self.grouped and self.top_k > self.topk_group * self.num_experts // self.n_group:
            raise ValueError(
                f"MoEConfig.top_k ({self.top_k}) exceeds the experts in the kept groups "
                f"({self.topk_group} x {self.num_experts // self.n_group})"
            )
        if not isinstance(self.routed_scaling_factor, (int, float)) or isinstance(self.routed_scaling_factor, bool):
            raise TypeError("MoEConfig.routed_scaling_factor must be a float")
        if self.dtype not in DTYPES:
            raise TypeError(f"MoEConfig.dtype must be one of {DTYPES}, got {self.dtype}")

    @property
    def grouped(self) -> bool:
        """Whether selection is limited to the best `topk_group` of `n_group` expert groups."""
        return self.topk_method != "greedy"

    @property
    def shared_intermediate_dim(self) -> int:
        """S: width of the shared MLP (all shared experts fused into one, as transformers does)."""
        return self.intermediate_dim * self.n_shared_experts

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf_config, dtype: torch.dtype | None = None) -> MoEConfig:
        """From a transformers DeepseekV3Config / DeepseekV2Config (see deepseek_moe_fused.hf)."""
        from .hf import config_from_hf

        return config_from_hf(hf_config, dtype)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MoEConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    def weight_bytes(self) -> tuple[int, int]:
        """(routed, shared) expert weight bytes in `dtype`: three H x I matrices per expert."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_expert = 3 * self.hidden_dim * self.intermediate_dim * itemsize
        return self.num_experts * per_expert, self.n_shared_experts * per_expert


# Values from the published config.json of each model (MoE block only).
PRESETS: dict[str, MoEConfig] = {
    # The seed project's default benchmark shape.
    "seed": MoEConfig(hidden_dim=2048, intermediate_dim=2048, num_experts=8, top_k=2),
    "deepseek-moe-16b": MoEConfig(hidden_dim=2048, intermediate_dim=1408, num_experts=64, top_k=6, n_shared_experts=2),
    "deepseek-v2-lite": MoEConfig(hidden_dim=2048, intermediate_dim=1408, num_experts=64, top_k=6, n_shared_experts=2),
    "deepseek-v2": MoEConfig(
        hidden_dim=5120,
        intermediate_dim=1536,
        num_experts=160,
        top_k=6,
        n_shared_experts=2,
        topk_method="group_limited_greedy",
        n_group=8,
        topk_group=3,
        routed_scaling_factor=16.0,
    ),
    "deepseek-v3": MoEConfig(
        hidden_dim=7168,
        intermediate_dim=2048,
        num_experts=256,
        top_k=8,
        n_shared_experts=1,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
}
