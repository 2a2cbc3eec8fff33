"""Launchers for the expert kernels: checks, tile choice, output allocation, grids."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton

from .._checks import FLOAT_DTYPES, check_tensor
from .._interpret import interpreter_active
from ..routing_metadata import RoutingMetadata, build_routing_metadata
from . import _tiles, _tma
from ._alloc import new_output
from ._combine import _combine_kernel
from ._gate_up import _gate_up_swiglu_kernel
from ._rows_matmul import _rows_matmul_kernel
from ._sorted_rows import _sorted_rows_kernel
from .launch_decode import decode_forward
from .launch_gate_up_ws import GateUpSide, gate_up_ws, gate_up_ws_enabled
from .launch_rows_matmul_ws import rows_matmul_ws, rows_ws_enabled


@dataclass(frozen=True)
class ExpertWeights:
    """The weights of one MoE block's experts, in transformers' layouts."""

    gate_up_proj: torch.Tensor  # (E, 2I, H): gate rows then up rows of each routed expert
    down_proj: torch.Tensor | None  # (E, H, I); None when only stage 1 runs
    shared_gate: torch.Tensor | None = None  # (S, H) shared MLP gate_proj.weight; None = no shared
    shared_up: torch.Tensor | None = None  # (S, H)
    shared_down: torch.Tensor | None = None  # (H, S)

    @property
    def has_shared(self) -> bool:
        return self.shared_gate is not None

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    @property
    def hidden_dim(self) -> int:
        return self.gate_up_proj.shape[2]

    @property
    def intermediate_dim(self) -> int:
        return self.gate_up_proj.shape[1] // 2

    @property
    def shared_dim(self) -> int:
        return self.shared_gate.shape[0] if self.has_shared else 0

    def shared_gate_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(shared_gate, shared_up) with one set of strides: the forward's gate/up kernel and the
        backward's dX GEMM read both through shared_gate's. Copies only when they differ."""
        gate, up = self.shared_gate, self.shared_up
        if gate.stride() != up.stride():
            return gate.contiguous(), up.contiguous()
        return gate, up

    def check(self, x: torch.Tensor) -> None:
        """Shapes, dtypes (all equal to x's) and device of every weight."""
        E, H, device = self.num_experts, x.shape[-1], x.device
        common = dict(dtypes=(x.dtype,), device=device, contiguous_last=True)
        check_tensor("gate_up_proj", self.gate_up_proj, ndim=3, **common)
        if self.gate_up_proj.shape[1] % 2 or self.gate_up_proj.shape[2] != H:
            raise ValueError(f"gate_up_proj must have shape (E, 2I, {H}), got {tuple(self.gate_up_proj.shape)}")
        I = self.intermediate_dim
        with_down = self.down_proj is not None
        if with_down:
            check_tensor("down_proj", self.down_proj, shape=(E, H, I), **common)
        shared = {"shared_gate": self.shared_gate, "shared_up": self.shared_up}
        if with_down:
            shared["shared_down"] = self.shared_down
        given = [name for name, w in shared.items() if w is not None]
        if given and len(given) != len(shared):
            raise ValueError(f"{', '.join(shared)} must be given together or not at all (got only {given})")
        if self.has_shared:
            check_tensor("shared_gate", self.shared_gate, shape=(None, H), **common)
            S = self.shared_gate.shape[0]
            check_tensor("shared_up", self.shared_up, shape=(S, H), **common)
            if with_down:
                check_tensor("shared_down", self.shared_down, shape=(H, S), **common)


@dataclass(frozen=True)
class PreActivations:
    """What the forward writes for the Triton backward: stage 1's gate and up pre-activations
    (which the backward overwrites with their gradients), its SwiGLU outputs (the down
    projection's input, which the down weights' gradients read), and X in sorted rows where stage 1
    gathered it (the routed weight gradients reduce over those rows)."""

    routed: torch.Tensor  # (T*K, 2I): [x W_gate^T | x W_up^T] of each expert-sorted row
    shared: torch.Tensor | None  # (T, 2S) the same for the shared MLP; None without one
    x_sorted: torch.Tensor | None = None  # (T*K, H) X's row of each sorted row; None: the backward gathers
    h_routed: torch.Tensor | None = None  # (T*K, I) silu(g) * u of each sorted row; None only for a lone stage (tests)
    h_shared: torch.Tensor | None = None  # (T, S) the same for the shared MLP


def new_preactivations(
    x: torch.Tensor, weights: ExpertWeights, metadata: RoutingMetadata, tiles: _tiles.ExpertTiles | None = None
) -> PreActivations:
    """Buffers for stage 1 to fill; `tiles` (default: `tiles_for`'s) decide whether X in sorted rows is one."""
    T, H = x.shape
    I, S = weights.intermediate_dim, weights.shared_dim
    shared = new_output(x, (T, 2 * S)) if weights.has_shared else None
    routed = new_output(x, (metadata.num_rows, 2 * I))
    tiles = tiles or tiles_for(T, weights, metadata.top_k)
    x_sorted = new_output(x, (metadata.num_rows, H)) if tiles.gate_up_ws is not None else None
    h_routed = new_output(x, (metadata.num_rows, I))
    h_shared = new_output(x, (T, S)) if weights.has_shared else None
    return PreActivations(routed, shared, x_sorted, h_routed, h_shared)


def gather_sorted_rows(
    src: torch.Tensor,
    metadata: RoutingMetadata,
    out: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,  # (T*K,) fp32 by slot: each sorted row times its slot's factor
) -> torch.Tensor:
    """(T*K, H): row r is src's row of the token sorted row r belongs to [times that slot's
    `scale`, rounded once] (one token-major launch, `_sorted_rows.py`)."""
    T, H = src.shape
    out = new_output(src, (metadata.num_rows, H)) if out is None else out
    if T == 0:
        return out
    block_h = _tiles.sorted_rows_block_h(H)
    _sorted_rows_kernel[(T, triton.cdiv(H, block_h))](
        src, out, metadata.slot_to_row, scale if scale is not None else metadata.slot_to_row,
        H, src.stride(0), out.stride(0), TOP_K=metadata.top_k, SCALE=scale is not None, BLOCK_H=block_h,
    )  # fmt: skip
    return out


def check_routing(
    x: torch.Tensor, topk_weights: torch.Tensor | None, topk_ids: torch.Tensor, num_experts: int, validate_ids: bool
) -> None:
    """Shapes, dtypes and device of a routing; `topk_weights` None when only stage 1 runs."""
    T = x.shape[0]
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64), device=x.device)
    K = topk_ids.shape[1]
    if topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must have shape ({T}, K), got {tuple(topk_ids.shape)}")
    if num_experts < K:
        raise ValueError(f"topk_ids has top_k={K} columns but there are only {num_experts} experts")
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, shape=(T, K), dtypes=FLOAT_DTYPES, device=x.device)
    # Reading the ids back is a host sync: the fused layer, whose router cannot produce bad ids,
    # skips it; direct callers of the low-level ops get the check by default.
    if validate_ids and topk_ids.numel():
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if low < 0 or high >= num_experts:
            raise ValueError(f"topk_ids must lie in [0, {num_experts}), got values in [{low}, {high}]")


def _kernel_flags(dtype: torch.dtype) -> dict:
    interpret = interpreter_active()
    return dict(
        UPCAST=interpret and dtype == torch.bfloat16,
        # fp32 inputs get true fp32 products; 16-bit inputs are exact in any tensor-core mode.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


def tiles_for(num_tokens: int, weights: ExpertWeights, top_k: int) -> _tiles.ExpertTiles:
    """Both stages' tiles for this batch: tuned table for this card, else heuristic; either stage
    on its warp-specialized kernel where experts are long enough (`_tiles.gate_up_ws_tiles`,
    `_tiles.rows_ws_tiles`)."""
    tiles = _tiles.expert_tiles(
        num_tokens, weights.num_experts, weights.hidden_dim, weights.intermediate_dim, weights.shared_dim, top_k,
        interpreter_active(),
    )  # fmt: skip
    rows_per_expert = num_tokens * top_k / max(weights.num_experts, 1)
    free = not _tiles.tiles_forced()
    gate_up_ws_tiles = _tiles.gate_up_ws_tiles(rows_per_expert, free)
    down_ws = _tiles.rows_ws_tiles(rows_per_expert, free)
    # The card checks only where a rule picks a kernel: decode is host-bound.
    w = weights.gate_up_proj
    if gate_up_ws_tiles is not None and gate_up_ws_enabled(w.device, w.dtype):
        tiles = replace(tiles, gate_up_ws=gate_up_ws_tiles)
    if down_ws is not None and rows_ws_enabled(w.device, w.dtype):
        tiles = replace(tiles, down_ws=down_ws)
    decode = _tiles.decode_tiles(num_tokens, interpreter_active())
    if decode is not None:
        tiles = replace(tiles, decode=decode)
    return tiles


def runs_decode(tiles: _tiles.ExpertTiles, preacts: PreActivations | None = None) -> bool:
    """Whether `moe_experts_forward` takes the decode path, which needs no routing metadata: the
    rule picked it and no backward reads pre-activations."""
    return tiles.decode is not None and preacts is None


def routing_metadata_for(
    topk_ids: torch.Tensor, weights: ExpertWeights, tiles: _tiles.ExpertTiles | None = None
) -> RoutingMetadata:
    """Metadata cut for the tile height the kernels will pick for this batch (or for `tiles`)."""
    T, K = topk_ids.shape
    block_m = (tiles or tiles_for(T, weights, K)).block_m
    return build_routing_metadata(topk_ids, weights.num_experts, block_m)


def _checked_tiles(
    num_tokens: int, weights: ExpertWeights, metadata: RoutingMetadata, tiles: _tiles.ExpertTiles | None
) -> _tiles.ExpertTiles:
    tiles = tiles or tiles_for(num_tokens, weights, metadata.top_k)
    if tiles.block_m != metadata.block_m:  # metadata a caller cut for another tile height
        H, inner = weights.hidden_dim, max(weights.intermediate_dim, weights.shared_dim)
        tiles = _tiles.tiles_for_block_m(metadata.block_m, H, inner, interpreter_active())
    return tiles


def gate_up_swiglu(
    x: torch.Tensor,  # (T, H)
    weights: ExpertWeights,
    metadata: RoutingMetadata,
    *,
    routed: bool = True,
    shared: bool = True,
    tiles: _tiles.ExpertTiles | None = None,
    preacts: PreActivations | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Stage 1: ``h_routed`` (T*K, I) in expert-sorted row order and ``h_shared`` (T, S).

    h = silu(x @ gate^T) * (x @ up^T). With both `routed` and `shared` (the default) it is one
    launch; the flags let a benchmark time the unfused ablation with the same kernel. A part that
    is not computed (flag off, or no shared expert) is returned as None, never as a stale buffer.
    With `preacts`, the computed parts' pre-activations are written there too, and h goes to its
    buffers there (kept for the backward).
    """
    T, H = x.shape
    I, S = weights.intermediate_dim, weights.shared_dim
    shared = shared and weights.has_shared
    save = preacts is not None
    h_routed = (preacts.h_routed if save else new_output(x, (metadata.num_rows, I))) if routed else None
    h_shared = (preacts.h_shared if save else new_output(x, (T, S))) if shared else None
    expert_tiles = _checked_tiles(T, weights, metadata, tiles)
    gate, up = weights.gate_up_proj[:, :I], weights.gate_up_proj[:, I:]
    # A buffer for X in sorted rows is filled whichever kernel runs: the backward reads it.
    x_sorted = preacts.x_sorted if save else None
    if routed and (x_sorted is not None or expert_tiles.gate_up_ws is not None):
        x_sorted = gather_sorted_rows(x, metadata, out=x_sorted)
    if expert_tiles.gate_up_ws is not None and (routed or shared):
        routed_side = GateUpSide(x_sorted, gate, up, h_routed, preacts.routed if save else None) if routed else None
        shared_side = None
        if shared:
            shared_gate, shared_up = weights.shared_gate_up()
            shared_pre = preacts.shared if save else None
            shared_side = GateUpSide(x, shared_gate.unsqueeze(0), shared_up.unsqueeze(0), h_shared, shared_pre)
        if gate_up_ws(routed_side, shared_side, metadata, T, expert_tiles.gate_up_ws):
            return h_routed, h_shared
    tiles = expert_tiles.gate_up
    bm, bn = tiles.block_m, tiles.block_n
    num_programs = (metadata.max_tiles * triton.cdiv(I, bn) if routed else 0) + (
        triton.cdiv(T, bm) * triton.cdiv(S, bn) if shared else 0
    )
    if num_programs == 0:
        return h_routed, h_shared
    # Pointer arguments of a disabled part get a tensor that exists; ROUTED/SHARED keep them unread.
    shared_gate, shared_up = weights.shared_gate_up() if shared else (gate, up)
    weight_args = (gate, up, shared_gate, shared_up)
    described = ([weights.gate_up_proj] if routed else []) + ([shared_gate, shared_up] if shared else [])
    descriptors = _tma.weight_descriptors(x.device, described, bn, tiles.block_k)
    if descriptors is not None:  # the routed descriptor serves gate and up; an absent part gets a present one's
        routed_desc = descriptors[0] if routed else descriptors[-1]
        shared_descs = descriptors[-2:] if shared else [routed_desc, routed_desc]
        weight_args = (routed_desc, routed_desc, *shared_descs)
    h_routed_arg = h_routed if routed else h_shared
    h_shared_arg = h_shared if shared else h_routed
    pre_routed = preacts.routed if save and routed else h_routed_arg
    pre_shared = preacts.shared if save and shared else h_shared_arg
    _gate_up_swiglu_kernel[(num_programs,)](
        x, *weight_args,
        h_routed_arg, h_shared_arg, pre_routed, pre_shared,
        metadata.sorted_slot, metadata.tile_expert, metadata.tile_row_start, metadata.expert_offsets,
        T, H, I, S, metadata.top_k, metadata.max_tiles,
        x.stride(0), gate.stride(0), gate.stride(1), shared_gate.stride(0),
        h_routed_arg.stride(0), h_shared_arg.stride(0), pre_routed.stride(0), pre_shared.stride(0),
        ROUTED=routed, SHARED=shared, SAVE_PREACT=save, WEIGHTS_TMA=descriptors is not None,
        BLOCK_M=bm, TAIL_M=_tiles.tail_block_m(bm, H), BLOCK_N=bn, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **_kernel_flags(x.dtype),
    )  # fmt: skip
    return h_routed, h_shared


def down_proj(
    h_routed: torch.Tensor | None,  # (T*K, I) expert-sorted rows; None when `routed` is off
    h_shared: torch.Tensor | None,  # (T, S); None without a shared expert or when `shared` is off
    topk_weights: torch.Tensor,  # (T, K)
    weights: ExpertWeights,
    metadata: RoutingMetadata,
    *,
    routed: bool = True,
    shared: bool = True,
    tiles: _tiles.ExpertTiles | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Stage 2: ``y_routed`` (T, K, H), each slot's expert output times its routing weight, and
    ``y_shared`` (T, H); a part that is not computed is returned as None."""
    T, K = topk_weights.shape
    H = weights.hidden_dim
    shared = shared and weights.has_shared
    like = h_routed if routed else h_shared
    y_routed = new_output(like, (T, K, H)) if routed else None
    y_shared = new_output(like, (T, H)) if shared else None
    tiles = _checked_tiles(T, weights, metadata, tiles)
    # y = h @ W_down^T: the down weights read transposed, through their strides.
    launch_rows_matmul(
        RowsMatmul(h_routed, weights.down_proj, y_routed, b_transposed=True) if routed else None,
        RowsMatmul(h_shared, weights.shared_down, y_shared, b_transposed=True) if shared else None,
        metadata, T, tiles.down, topk_weights=topk_weights.contiguous(), out_by_slot=True, ws=tiles.down_ws,
    )  # fmt: skip
    return y_routed, y_shared


class RowsMatmul(NamedTuple):
    """One side (routed or shared) of a `_rows_matmul_kernel` launch: out = a @ b [+ a[:, n:] @ b2].
    A NamedTuple and no views: this runs on every layer call (decode is host-bound)."""

    a: torch.Tensor  # left operand rows: (rows, n) or (rows, 2n) with b2
    b: torch.Tensor  # (E, n, n_cols) routed or (n, n_cols) shared; (.., n_cols, n) when b_transposed
    out: torch.Tensor  # contiguous rows of n_cols: (rows, n_cols) or (T, K, n_cols) for slot rows
    b2: torch.Tensor | None = None  # multiplies a's columns [n, 2n); shape and strides as b's
    b_transposed: bool = False  # the operand is b's last two dims swapped

    def right_operand(self) -> tuple[int, int, int, int, int]:
        """(n_red, n_cols, expert stride, reduction stride, column stride) of b as the kernels read it."""
        *lead, rows, cols = self.b.shape
        *lead_stride, stride_rows, stride_cols = self.b.stride()
        stride_e = lead_stride[0] if lead else 0
        if self.b_transposed:
            return cols, rows, stride_e, stride_cols, stride_rows
        return rows, cols, stride_e, stride_rows, stride_cols


def launch_rows_matmul(
    routed: RowsMatmul | None,
    shared: RowsMatmul | None,
    metadata: RoutingMetadata,
    num_tokens: int,
    tiles: _tiles.TileConfig,  # block_m must be the metadata's tile height
    *,
    topk_weights: torch.Tensor | None = None,  # (T, K) contiguous: routed output rows times their slot's weight
    a_by_token: bool = False,  # routed rows of `a` are tokens (slot // K), not sorted rows
    out_by_slot: bool = True,  # routed output rows are slots, else sorted rows
    ws: _tiles.RowsWsTiles | None = None,  # the warp-specialized kernel's tiles, where the rule picked it
) -> None:
    """Routed experts' tiles and the shared MLP's in one launch (either side may be None); on the
    warp-specialized kernel (launch_rows_matmul_ws.py) where `ws` is given and the layouts allow
    (its rows must be sorted rows, not tokens)."""
    scaled = {"topk_weights": topk_weights, "out_by_slot": out_by_slot}
    if ws is not None and not a_by_token and rows_matmul_ws(routed, shared, metadata, num_tokens, ws, **scaled):
        return
    bm, bn = tiles.block_m, tiles.block_n
    # An absent side's pointers and sizes come from the present one; ROUTED/SHARED keep them unread.
    r, s = routed or shared, shared or routed
    n_red, n_cols, stride_be, stride_bk, stride_bn = r.right_operand()
    n_red_s, n_cols_s, _, stride_sbk, stride_sbn = s.right_operand()
    grid = (metadata.max_tiles * triton.cdiv(n_cols, bn) if routed else 0) + (
        triton.cdiv(num_tokens, bm) * triton.cdiv(n_cols_s, bn) if shared else 0
    )
    if grid == 0:
        return
    two = r.b2 is not None
    # False without TWO, where it is unread: a flag that varied there would only add compiled variants.
    two_whole_steps = two and n_red % tiles.block_k == 0 and n_red_s % tiles.block_k == 0
    scale = topk_weights is not None
    b_args = (r.b, r.b2 if two else r.b, s.b, s.b2 if two else s.b)
    descriptors = None
    # TMA boxes run along the reduction, which must be b's inner dimension: a transposed b.
    if not two and r.b_transposed and s.b_transposed:
        descriptors = _tma.weight_descriptors(r.a.device, [r.b, s.b], bn, tiles.block_k)
    if descriptors is not None:
        b_args = (descriptors[0], descriptors[0], descriptors[1], descriptors[1])
    _rows_matmul_kernel[(grid,)](
        r.a, s.a, *b_args, topk_weights if scale else r.out,
        r.out, s.out,
        metadata.sorted_slot, metadata.tile_expert, metadata.tile_row_start, metadata.expert_offsets,
        num_tokens, metadata.top_k, metadata.max_tiles, n_red, n_cols, n_red_s, n_cols_s,
        r.a.stride(0), s.a.stride(0), stride_be, stride_bk, stride_bn, stride_sbk, stride_sbn,
        r.out.stride(-2), s.out.stride(-2),
        ROUTED=routed is not None, SHARED=shared is not None, TWO=two, TWO_WHOLE_STEPS=two_whole_steps,
        B_TMA=descriptors is not None,
        A_BY_TOKEN=a_by_token, OUT_BY_SLOT=out_by_slot, SCALE=scale,
        BLOCK_M=bm, TAIL_M=_tiles.tail_block_m(bm, 2 * n_red if two else n_red), BLOCK_N=bn, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **_kernel_flags(r.a.dtype),
    )  # fmt: skip


def combine(y_routed: torch.Tensor, y_shared: torch.Tensor | None) -> torch.Tensor:
    """Stage 3: out (T, H) = sum over k of y_routed[:, k] + y_shared, summed in a fixed order."""
    T, K, H = y_routed.shape
    out = new_output(y_routed, (T, H))
    if T == 0:
        return out
    block_h = _tiles.combine_block_h(H)
    has_shared = y_shared is not None
    y_shared_arg = y_shared if has_shared else out
    _combine_kernel[(T, triton.cdiv(H, block_h))](
        y_routed, y_shared_arg, out,
        H, y_routed.stride(0), y_routed.stride(1), y_shared_arg.stride(0), out.stride(0),
        TOP_K=K, SHARED=has_shared, BLOCK_H=block_h,
    )  # fmt: skip
    return out


def moe_experts_forward(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: ExpertWeights,
    metadata: RoutingMetadata | None = None,
    *,
    fuse_shared: bool = True,
    preacts: PreActivations | None = None,
    tiles: _tiles.ExpertTiles | None = None,
) -> torch.Tensor:
    """Unchecked expert forward (callers validate): three stages, or two launches without routing
    metadata for a few tokens (`runs_decode`; `metadata` is then unused). `fuse_shared=False`
    launches the shared MLP separately from the routed experts, on either path: the ablation that
    shows what fusing buys.
    `preacts` (from `new_preactivations`) receives stage 1's pre-activations for the backward.
    `tiles`: `tiles_for`'s choice where the caller has it already."""
    tiles = tiles or tiles_for(x.shape[0], weights, topk_ids.shape[1])  # once for both stages
    if runs_decode(tiles, preacts):
        if fuse_shared or not weights.has_shared:
            return decode_forward(x, topk_weights, topk_ids, weights, tiles.decode)
        y_routed = decode_forward(x, topk_weights, topk_ids, weights, tiles.decode, shared=False)
        y_shared = decode_forward(x, topk_weights, topk_ids, weights, tiles.decode, routed=False)
        return combine(y_routed.unsqueeze(1), y_shared)
    if metadata is None:
        metadata = routing_metadata_for(topk_ids, weights, tiles)
    stage = {"tiles": tiles}
    if fuse_shared or not weights.has_shared:
        h_routed, h_shared = gate_up_swiglu(x, weights, metadata, preacts=preacts, **stage)
        y_routed, y_shared = down_proj(h_routed, h_shared, topk_weights, weights, metadata, **stage)
    else:
        h_routed, _ = gate_up_swiglu(x, weights, metadata, shared=False, preacts=preacts, **stage)
        _, h_shared = gate_up_swiglu(x, weights, metadata, routed=False, preacts=preacts, **stage)
        y_routed, _ = down_proj(h_routed, h_shared, topk_weights, weights, metadata, shared=False, **stage)
        _, y_shared = down_proj(h_routed, h_shared, topk_weights, weights, metadata, routed=False, **stage)
    return combine(y_routed, y_shared)
