"""Hypothesis strategies that generate only valid cases: configs, batches, routings, values.

Sizes are bounded per tier: the CPU tier runs the kernels in the interpreter on 2 cores.
"""

from __future__ import annotations

import math

import torch
from conftest import ON_GPU
from hypothesis import assume
from hypothesis import strategies as st

from deepseek_moe_fused import MoEConfig
from deepseek_moe_fused.reference import oracle_magnitude
from deepseek_moe_fused.testing import ROUTING_KINDS

# Expert counts: primes and non-powers of two next to the usual powers.
EXPERT_COUNTS = [1, 2, 3, 5, 7, 8, 12, 13, 16, 31, 64]
# Hidden / intermediate sizes: tiny, prime, and just past the block sizes (16, 32, 64).
DIMS = [1, 3, 16, 17, 33, 48, 65, 96] + ([129, 257, 1000] if ON_GPU else [])
# Tokens: empty, one, prime, just over a block, larger.
TOKENS = [0, 1, 2, 7, 17, 33, 64] + ([129, 255, 1031] if ON_GPU else [])
# Bound on routed rows (T*K) so each interpreted example stays around a second.
MAX_ROWS = 4096 if ON_GPU else 320

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
X_SCALES = [1e-3, 1e-1, 1.0, 10.0, 100.0]
# fp16's range is [6e-5 (smallest normal), 65504]. The SwiGLU activations scale like x^2: x ~ 100
# overflows the weighted slot sums and x ~ 1e-3 drops them into subnormals, in any fp16
# implementation. So fp16 draws x scales from 0.1 to 10; fp32 and bf16 (fp32's range) from all.
X_SCALE_RANGE = {torch.float16: (0.1, 10.0)}


# The warp-specialized kernels' oracle tests: (rows of each expert, K, H, I, S, block_m).
WS_SHAPES = [
    ([0, 1, 127, 128, 129, 300, 53], 3, 200, 72, 136, 128),  # empty expert, tile edges; H, I, S off the tiles
    ([64, 0, 192, 63, 65], 2, 256, 128, 64, 64),  # 64-row tiles: one warpgroup's rows (4 MMA warps)
    ([1, 255, 256, 100], 2, 2048, 1408, 2816, 128),  # v2-lite's widths; tails of 1 to 127 rows
    ([40, 0, 33, 130, 64, 1] * 30, 2, 128, 64, 64, 128),  # 180 experts: programs take several tiles
]
# Their fuzzed problems: rows of each expert (an even total: K=2 slots per token), and widths in
# multiples of 8 elements, since TMA needs 16-byte rows.
ws_expert_rows = st.lists(st.integers(0, 400), min_size=1, max_size=9).filter(lambda c: sum(c) % 2 == 0)


def ws_widths(max_eighths: int) -> st.SearchStrategy[int]:
    return st.integers(1, max_eighths).map(lambda n: 8 * n)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def moe_configs(draw, dtypes=DTYPES) -> MoEConfig:
    E = draw(st.sampled_from(EXPERT_COUNTS) | st.integers(1, 64))
    K = draw(st.sampled_from(sorted({1, min(2, E), E})) | st.integers(1, min(E, 8)))
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    method = "noaux_tc" if scoring == "sigmoid" else draw(st.sampled_from(["greedy", "group_limited_greedy"]))
    n_group = topk_group = 1
    if method != "greedy":
        n_group = draw(st.sampled_from(_divisors(E)))
        # top_k experts must fit in the kept groups: topk_group * (E / n_group) >= K.
        topk_group = draw(st.integers(math.ceil(K * n_group / E), n_group))
    return MoEConfig(
        hidden_dim=draw(st.sampled_from(DIMS)),
        intermediate_dim=draw(st.sampled_from(DIMS)),
        num_experts=E,
        top_k=K,
        n_shared_experts=draw(st.integers(0, 2)),
        scoring_func=scoring,
        topk_method=method,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 16.0, 0.37])),
        dtype=draw(st.sampled_from(dtypes)),
    )


def num_tokens(config: MoEConfig):
    return st.sampled_from([t for t in TOKENS if t * config.top_k <= MAX_ROWS] or [1])


routing_kinds = st.sampled_from(ROUTING_KINDS)


def x_scales(dtype: torch.dtype):
    low, high = X_SCALE_RANGE.get(dtype, (0.0, float("inf")))
    return st.sampled_from([s for s in X_SCALES if low <= s <= high])


seeds = st.integers(0, 2**16)


def assume_little_cancellation(magnitude: torch.Tensor, ref: torch.Tensor, typical: float) -> None:
    """Discard problems whose outputs are mostly cancellation: their error measures the data, not
    the kernel. `magnitude` bounds the size of the terms each output element sums; on random data
    norm(magnitude) / norm(ref) stays near `typical` (the square root of the terms per element);
    30x that is far past it, and H=3 with one dot cancelling 2000x is not."""
    assume(magnitude.norm() <= 30 * typical * ref.norm())


def assume_well_conditioned(kernel_args: tuple, ref: torch.Tensor) -> None:
    """`assume_little_cancellation` for the whole experts' output: two random-sign sums (over H,
    then over I), so typically sqrt(H * I). `kernel_args`: (x, topk_weights, topk_ids,
    gate_up_proj, down_proj, *shared), as the oracle takes them."""
    x, _, _, gate_up_proj, _, *shared = kernel_args
    if x.dtype == torch.float16 and ref.numel():
        # Below fp16's smallest normal (6.1e-5) outputs round to a fixed step of 6e-8: an error
        # relative to them measures the format, not the kernels.
        assume(ref.abs().max() >= torch.finfo(torch.float16).tiny)
    inner = max(gate_up_proj.shape[1] // 2, shared[0].shape[0] if shared and shared[0] is not None else 0, 1)
    assume_little_cancellation(oracle_magnitude(*kernel_args), ref, (x.shape[1] * inner) ** 0.5)


# Rows per expert (7 experts) against 32-row tiles with 16-row tails: 32 + a 16-row tail, 32 + 17
# (one row too many for the tail), a lone tail, one row, 32 + 1, none, 32 + 32 + 1.
TAIL_EDGE_COUNTS = [48, 49, 16, 1, 33, 0, 65]
# The forced tiles (kernels/_tiles.py FORCE_TILES_ENV) those counts are placed against.
TAIL_EDGE_TILES = "block_m=32,block_n=16,block_k=16,num_stages=1"
