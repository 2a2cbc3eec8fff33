"""Launcher of the router kernels: checks, tile choice, output allocation, grids."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from .._checks import FLOAT_DTYPES, check_tensor
from .._interpret import interpreter_active
from ..config import MoEConfig
from ._alloc import new_output
from ._router import _router_logits_kernel, _router_select_kernel
from ._router_backward import _router_bwd_rows_kernel, _router_bwd_weight_kernel
from ._tiles import num_sms

# Every expert's logits of a token tile fit one program's registers up to this many (padded to a
# power of two) experts: then the selection can run in the GEMM's epilogue, one launch.
MAX_EXPERTS_ONE_LAUNCH = 64
# The selection holds whole rows of logits (and as many score tiles) in one program.
MAX_EXPERTS = 1024
# Each split of H keeps at least this many columns (four GEMM steps). 256 (H=2048 in 8 splits) was
# the seed preset's best in the H100 sweep; fewer columns were not tried.
MIN_H_PER_SPLIT = 256


def _expert_block(num_experts: int) -> int:
    """Every expert's column in one tile: the next power of two, at least a dot's 16."""
    return max(16, triton.next_power_of_2(num_experts))


class RouterTiles(NamedTuple):
    block_t: int  # tokens per GEMM program
    block_e: int  # experts per GEMM program
    split_h: int  # splits of H (partial logits added by the selection kernel)
    one_launch: bool  # selection in the GEMM's epilogue (split_h 1, block_e covering every expert)
    block_h: int = 64  # columns of H per GEMM step


def router_tiles(num_tokens: int, num_experts: int, hidden_dim: int, num_sms: int) -> RouterTiles:
    """Tiles by shape: H split until the programs fill two waves; one launch when no split is
    needed and every expert fits one tile."""
    all_experts = _expert_block(num_experts)
    block_t = min(64, max(16, triton.next_power_of_2(num_tokens)))
    block_e = all_experts if all_experts <= MAX_EXPERTS_ONE_LAUNCH else (32 if num_tokens <= 256 else 128)
    programs = triton.cdiv(num_tokens, block_t) * triton.cdiv(num_experts, block_e)
    split_h = 1
    # Up to two waves: measured on an H100, splitting further (or less) was slower.
    while programs * split_h * 2 <= 2 * num_sms and hidden_dim // (split_h * 2) >= MIN_H_PER_SPLIT:
        split_h *= 2
    return RouterTiles(block_t, block_e, split_h, one_launch=split_h == 1 and block_e >= num_experts)


class RouterBackwardTiles(NamedTuple):
    block_t: int  # tokens per program of the logits-gradient (and dx) kernel
    block_h: int  # dx columns per step
    w_block_t: int  # tokens per step of the weight-gradient kernel
    w_block_h: int  # weight-gradient columns per program


def router_backward_tiles(num_experts: int, split: bool) -> RouterBackwardTiles:
    """A (block_e, block_h) weight tile per dx step, narrower as E grows. With split products
    (bf16 on the tensor cores) wider column tiles and longer token steps: on the H100 the two
    kernels' sweeps add up to v2-lite's N=16384 backward going from 138 to ~100 us, the seed's
    from 89 to ~70 (docs/perf-notes.md); the fp32-product tiles are the ones measured before."""
    block_e = _expert_block(num_experts)
    if split:
        return RouterBackwardTiles(16, max(16, min(128, 8192 // block_e)), 64, 128)
    return RouterBackwardTiles(16, max(16, min(64, 4096 // block_e)), 32, 64)


def split_products(operand: torch.Tensor) -> bool:
    """Whether the router's backward GEMMs with this 16-bit operand take `_fp32_dot`'s split
    (bf16, on a GPU: the interpreter cannot multiply bf16) rather than true fp32 products."""
    return operand.dtype == torch.bfloat16 and not interpreter_active()


def router_backward_tiles_for(x: torch.Tensor, weight: torch.Tensor, num_experts: int) -> RouterBackwardTiles:
    """`router_backward_tiles` for these operands: the split tiles where both GEMMs split."""
    return router_backward_tiles(num_experts, split_products(weight) and split_products(x))


def route_tokens(
    x: torch.Tensor,  # (T, H)
    weight: torch.Tensor,  # (E, H) router weight
    e_score_correction_bias: torch.Tensor | None,  # (E,) sigmoid scoring only
    config: MoEConfig,
    *,
    tiles: RouterTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """router_logits (T, E) fp32, topk_weights (T, K) fp32, topk_ids (T, K) int64, on device.

    The same rule as `select_experts` (transformers' routers) on fp32 logits; ties go to the lower
    expert id. `tiles` overrides the shape heuristic (tests run every path with it).
    """
    E, K, H = config.num_experts, config.top_k, config.hidden_dim
    check_tensor("x", x, shape=(None, H), dtypes=FLOAT_DTYPES, contiguous_last=True)
    check_tensor("weight", weight, shape=(E, H), dtypes=FLOAT_DTYPES, device=x.device, contiguous_last=True)
    if e_score_correction_bias is not None:
        check_tensor("e_score_correction_bias", e_score_correction_bias, shape=(E,), dtypes=FLOAT_DTYPES,
                     device=x.device)  # fmt: skip
        # A model cast to bf16 casts this buffer too; transformers adds it to fp32 scores.
        e_score_correction_bias = e_score_correction_bias.float().contiguous()
    if E > MAX_EXPERTS:
        raise ValueError(f"the Triton router takes at most {MAX_EXPERTS} experts, config has {E}")
    T = x.shape[0]
    logits = new_output(x, (T, E), torch.float32)
    topk_weights = new_output(x, (T, K), torch.float32)
    topk_ids = new_output(x, (T, K), torch.int64)
    if T == 0:
        return logits, topk_weights, topk_ids
    interpret = interpreter_active()
    same_16bit = x.dtype == weight.dtype != torch.float32
    rule = dict(
        E=E, K=K, N_GROUP=config.n_group, TOPK_GROUP=config.topk_group,
        SIGMOID=config.scoring_func == "sigmoid", GROUPED=config.grouped, NORM=config.norm_topk_prob,
        HAS_BIAS=e_score_correction_bias is not None,
        # Floors of 16: one compiled variant covers the usual K and group counts.
        BLOCK_K=max(16, triton.next_power_of_2(K)), BLOCK_G=max(16, triton.next_power_of_2(config.n_group)),
    )  # fmt: skip
    bias = e_score_correction_bias if e_score_correction_bias is not None else logits  # unread without HAS_BIAS
    tiles = tiles or router_tiles(T, E, H, num_sms(x.device))
    if tiles.one_launch and (tiles.split_h != 1 or tiles.block_e < E):
        raise ValueError(f"one launch needs split_h 1 and block_e >= {E} experts, got {tiles}")
    block_h = tiles.block_h
    h_per_split = triton.cdiv(triton.cdiv(H, tiles.split_h), block_h) * block_h
    splits = triton.cdiv(H, h_per_split)
    partial = new_output(x, (splits, T, E), torch.float32) if splits > 1 else logits
    gemm = dict(
        BLOCK_T=tiles.block_t, BLOCK_E=tiles.block_e, BLOCK_H=block_h,
        # Products of two 16-bit values are exact in fp32; fp32 (or mixed) inputs get true fp32
        # products, as transformers' fp32 linear computes them.
        UPCAST=not same_16bit or (interpret and x.dtype == torch.bfloat16),
        DOT_PRECISION="tf32" if same_16bit else "ieee",
    )  # fmt: skip
    grid = (triton.cdiv(T, tiles.block_t), triton.cdiv(E, tiles.block_e), splits)
    _router_logits_kernel[grid](
        x, weight, bias, partial, topk_weights, topk_ids,
        T, H, h_per_split, x.stride(0), weight.stride(0), float(config.routed_scaling_factor),
        SELECT=tiles.one_launch, **rule, **gemm, num_warps=4, num_stages=1 if interpret else 3,
    )  # fmt: skip
    if not tiles.one_launch:
        # Whole rows per program: few tokens per program as E grows, so the score tiles stay in registers.
        all_experts = _expert_block(E)
        block_rows = max(1, min(64, 2048 // all_experts))
        _router_select_kernel[(triton.cdiv(T, block_rows),)](
            partial, logits, bias, topk_weights, topk_ids, T, splits, float(config.routed_scaling_factor),
            **rule, BLOCK_T=block_rows, BLOCK_E=all_experts, num_warps=4,
        )  # fmt: skip
    return logits, topk_weights, topk_ids


def router_backward(
    x: torch.Tensor,  # (T, H): the forward's
    weight: torch.Tensor,  # (E, H)
    logits: torch.Tensor,  # (T, E) fp32: the forward's
    topk_ids: torch.Tensor,  # (T, K) int64: the forward's
    grad_logits: torch.Tensor,  # (T, E): gradient of the returned logits
    grad_weights: torch.Tensor,  # (T, K): gradient of the routing weights
    config: MoEConfig,
    need_dx: bool = True,
    need_dweight: bool = True,
    tiles: RouterBackwardTiles | None = None,  # None: router_backward_tiles' choice
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx in x's dtype, d weight in weight's dtype), None where not needed: the logits' gradient
    (its own plus the routing weights' through the scores) times the weight and x, in fp32."""
    T, H = x.shape
    E, K = config.num_experts, config.top_k
    grad = new_output(x, (T, E), torch.float32)
    dx = new_output(x, (T, H)) if need_dx else None
    if T == 0:
        return dx, torch.zeros_like(weight) if need_dweight else None
    sms = num_sms(x.device)
    block_e = _expert_block(E)
    split_dx, split_dweight = split_products(weight), split_products(x)  # each GEMM's bf16 operand
    tiles = tiles or router_backward_tiles(E, split_dx and split_dweight)  # as router_backward_tiles_for
    block_t, block_h = tiles.block_t, tiles.block_h
    t_tiles = triton.cdiv(T, block_t)
    # H chunks per token tile until the programs fill two waves (each recomputes its tiles' grad).
    chunks = min(triton.cdiv(H, block_h), max(1, triton.cdiv(2 * sms, t_tiles))) if need_dx else 1
    h_per_program = triton.cdiv(triton.cdiv(H, chunks), block_h) * block_h
    dx_arg = dx if need_dx else grad  # unread without DX
    _router_bwd_rows_kernel[(t_tiles, triton.cdiv(H, h_per_program))](
        logits, grad_logits.float().contiguous(), grad_weights.float().contiguous(), topk_ids, weight, grad, dx_arg,
        T, E, K, H, h_per_program, weight.stride(0), dx_arg.stride(0), float(config.routed_scaling_factor),
        SIGMOID=config.scoring_func == "sigmoid", NORM=config.norm_topk_prob, DX=need_dx,
        SPLIT=split_dx, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=block_h,
        num_warps=4 if block_e <= 256 else 8,
    )  # fmt: skip
    if not need_dweight:
        return dx, None
    w_block_e, w_block_h, w_block_t = min(64, block_e), tiles.w_block_h, tiles.w_block_t
    out_tiles = triton.cdiv(H, w_block_h) * triton.cdiv(E, w_block_e)
    # Splits of the token sum until the programs fill two waves; added in order below.
    splits = min(triton.cdiv(T, w_block_t), max(1, triton.cdiv(2 * sms, out_tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(T, splits), w_block_t) * w_block_t
    splits = triton.cdiv(T, rows_per_split)
    partial = new_output(x, (splits, E, H), torch.float32)
    _router_bwd_weight_kernel[(triton.cdiv(H, w_block_h), triton.cdiv(E, w_block_e), splits)](
        grad, x, partial, T, E, H, x.stride(0), rows_per_split, SPLIT=split_dweight,
        BLOCK_T=w_block_t, BLOCK_E=w_block_e, BLOCK_H=w_block_h, num_warps=4,
    )  # fmt: skip
    return dx, partial.sum(dim=0).to(weight.dtype)
