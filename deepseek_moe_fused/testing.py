"""One input factory for tests and benchmarks: random weights, activations and routings.

Everything is random normal (never zeros, which hide unwritten outputs) from an explicit seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MoEConfig
from .kernels.launch import ExpertWeights

ROUTING_KINDS = ("uniform", "one_expert", "empty_experts", "zipf", "repeated_expert")


def _randn(shape, generator, scale, dtype, device):
    if generator.device.type == "cuda":
        # Straight in the target dtype on the GPU: a DeepSeek-V3 layer's weights are 21 GB in bf16,
        # and an fp32 staging copy (on the host or the card) would be twice that.
        return torch.randn(shape, generator=generator, dtype=dtype, device=device).mul_(scale)
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * scale).to(dtype=dtype, device=device)


def _generator(seed: int, device) -> torch.Generator:
    """CPU generator unless the data lives on a GPU (then it is generated there)."""
    on_gpu = torch.device(device).type == "cuda"
    return torch.Generator(device=device if on_gpu else "cpu").manual_seed(seed)


def make_expert_weights(
    config: MoEConfig, *, seed: int = 0, device="cpu", dtype: torch.dtype | None = None
) -> ExpertWeights:
    """Weights scaled by 1/sqrt(fan_in), so activations keep their magnitude through each GEMM."""
    g = _generator(seed, device)
    dtype = dtype or config.dtype
    E, H, I, S = config.num_experts, config.hidden_dim, config.intermediate_dim, config.shared_intermediate_dim
    args = {"generator": g, "dtype": dtype, "device": device}
    gate_up = _randn((E, 2 * I, H), scale=H**-0.5, **args)
    down = _randn((E, H, I), scale=I**-0.5, **args)
    shared = (None, None, None)
    if S:
        shared = (_randn((S, H), scale=H**-0.5, **args), _randn((S, H), scale=H**-0.5, **args))
        shared += (_randn((H, S), scale=S**-0.5, **args),)
    return ExpertWeights(gate_up, down, *shared)


def make_activations(
    num_tokens: int, hidden_dim: int, *, seed: int = 1, scale: float = 1.0, dtype=torch.bfloat16, device="cpu"
) -> torch.Tensor:
    return _randn((num_tokens, hidden_dim), _generator(seed, device), scale, dtype, device)


def _routing_weights(T: int, K: int, generator: torch.Generator) -> torch.Tensor:
    """(T, K) fp32 routing weights of mixed sign and magnitude (log-normal, one in five negative)."""
    magnitude = torch.exp(torch.randn(T, K, generator=generator))
    sign = torch.where(torch.rand(T, K, generator=generator) < 0.2, -1.0, 1.0)
    return magnitude * sign


def make_routing(
    kind: str, num_tokens: int, num_experts: int, top_k: int, *, seed: int = 2, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights (T, K) fp32, topk_ids (T, K) int64) fed straight to the expert kernels.

    kinds: "uniform" (distinct random experts per token), "one_expert" (every slot of every
    token on one expert, repeats allowed as kernels must accept them), "empty_experts" (only the
    first ceil(E/4) experts used), "zipf" (a few experts get most tokens), "repeated_expert"
    (each token's K slots all name the same expert). Weights mix sign and magnitude.
    """
    if kind not in ROUTING_KINDS:
        raise ValueError(f"kind must be one of {ROUTING_KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    T, E, K = num_tokens, num_experts, top_k
    if kind == "uniform":
        ids = torch.rand(T, E, generator=g).argsort(dim=-1)[:, :K]
    elif kind == "one_expert":
        ids = torch.full((T, K), int(torch.randint(E, (1,), generator=g)))
    elif kind == "empty_experts":
        ids = torch.randint(max(1, -(-E // 4)), (T, K), generator=g)
    elif kind == "zipf":
        rank_weight = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.5
        popular = torch.randperm(E, generator=g)  # which expert gets which rank
        ids = popular[torch.multinomial(rank_weight.expand(max(T, 1), E), K, replacement=False, generator=g)][:T]
    else:  # repeated_expert
        ids = torch.randint(E, (T, 1), generator=g).expand(T, K).contiguous()
    return _routing_weights(T, K, g).to(device), ids.to(device)


def routing_with_counts(
    rows_per_expert: list[int], top_k: int, *, seed: int = 2, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights, topk_ids) in which expert e gets exactly rows_per_expert[e] of the slots, in
    a random order (a token may name one expert twice): routings that put chosen row counts at
    the edges of the kernels' tiles. The counts must add up to a multiple of top_k."""
    total = sum(rows_per_expert)
    if total % top_k or min(rows_per_expert, default=0) < 0:
        raise ValueError(
            f"rows_per_expert must be >= 0 and add up to a multiple of top_k={top_k}, got {rows_per_expert}"
        )
    g = torch.Generator().manual_seed(seed)
    expert_of_row = torch.repeat_interleave(torch.arange(len(rows_per_expert)), torch.tensor(rows_per_expert))
    ids = expert_of_row[torch.randperm(total, generator=g)].view(-1, top_k)
    return _routing_weights(ids.shape[0], top_k, g).to(device), ids.to(device)


@dataclass
class MoEInputs:
    """A whole problem for the expert kernels."""

    x: torch.Tensor  # (T, H)
    topk_weights: torch.Tensor  # (T, K) fp32
    topk_ids: torch.Tensor  # (T, K) int64
    weights: ExpertWeights

    def kernel_args(self) -> tuple:
        w = self.weights
        return (self.x, self.topk_weights, self.topk_ids, w.gate_up_proj, w.down_proj,
                w.shared_gate, w.shared_up, w.shared_down)  # fmt: skip


def make_moe_inputs(
    config: MoEConfig,
    num_tokens: int,
    *,
    routing: str = "uniform",
    seed: int = 0,
    x_scale: float = 1.0,
    dtype: torch.dtype | None = None,
    device="cpu",
) -> MoEInputs:
    dtype = dtype or config.dtype
    weights = make_expert_weights(config, seed=seed, device=device, dtype=dtype)
    x = make_activations(num_tokens, config.hidden_dim, seed=seed + 1, scale=x_scale, dtype=dtype, device=device)
    topk_weights, topk_ids = make_routing(
        routing, num_tokens, config.num_experts, config.top_k, seed=seed + 2, device=device
    )
    return MoEInputs(x, topk_weights, topk_ids, weights)


@dataclass(frozen=True)
class Tolerance:
    rel_norm: float  # bound on ||out - ref||_2 / ||ref||_2
    rel_max: float  # bound on max|out - ref| / max|ref|


# The suite's one tolerance table, against the float64 oracle. u = unit roundoff (fp32 2^-24,
# fp16 2^-11, bf16 2^-8). The kernels round three times in the input dtype (SwiGLU activations, each
# slot's weighted output, the combined output), each adding about u relative; routing weights of
# mixed sign let the K slots partly cancel, which can amplify that relative error a few times.
# So rel_norm ~ 8u for 16-bit types, and rel_max ~ 4x that for the worst single element. fp32 uses
# IEEE dots (no tf32), and its bound allows for the accumulation order over up to H, I ~ 1e3.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(rel_norm=2e-6, rel_max=1e-5),
    torch.float16: Tolerance(rel_norm=4e-3, rel_max=1.6e-2),
    torch.bfloat16: Tolerance(rel_norm=3.2e-2, rel_max=1.2e-1),
}


@dataclass(frozen=True)
class ErrorStats:
    rel_norm: float
    max_abs: float
    rel_max: float
    nan_mismatch: bool  # NaN/inf where the reference is finite, or the other way round

    def within(self, tol: Tolerance) -> bool:
        return not self.nan_mismatch and self.rel_norm <= tol.rel_norm and self.rel_max <= tol.rel_max


def error_stats(out: torch.Tensor, ref: torch.Tensor) -> ErrorStats:
    """Errors of `out` against `ref` (both compared in float64), over the elements `ref` has finite."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    nan_mismatch = bool((torch.isfinite(out) != finite).any())
    diff = torch.where(finite, out - ref, 0.0).nan_to_num(nan=float("inf"))
    ref = torch.where(finite, ref, 0.0)
    tiny = torch.finfo(torch.float64).tiny
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    ref_max = float(ref.abs().max()) if ref.numel() else 0.0
    return ErrorStats(
        rel_norm=float(diff.norm() / (ref.norm() + tiny)),
        max_abs=max_abs,
        rel_max=max_abs / (ref_max + tiny),
        nan_mismatch=nan_mismatch,
    )
