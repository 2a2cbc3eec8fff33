"""One row-tiled grouped GEMM behind three launches: the forward's down projection (routing weight
in the epilogue), and the backward's dY W_down and dX. Routed tiles of the routing metadata and
token tiles of the shared MLP run in the same launch, as stage 1 reads X once for both."""

import triton
import triton.language as tl

from ._tile_map import _tile_rows, _tile_rows_left


@triton.jit
def _rows_matmul_tile(
    a_ptr,  # (rows, n_red) left operand; (rows, 2 * n_red) when TWO
    a_rows,  # (BLOCK_M,) int64: row of a each tile row reads
    row_mask,  # (BLOCK_M,) bool: tile rows that exist
    b_ptr,  # (n_red, n_cols) strided: right operand of a's first n_red columns; with B_TMA a
    #   descriptor over b^T's rows, (.., n_red), whose rows b_row0 + [0, n_cols) are this b^T
    b_row0,
    b2_ptr,  # (n_red, n_cols) same strides: right operand of a's columns [n_red, 2 n_red) (TWO only)
    scale,  # (BLOCK_M,) fp32: factor of each output row
    out_ptr,  # (rows', n_cols) output
    out_rows,  # (BLOCK_M,) int64: row of out each tile row writes
    n_red,
    n_cols,
    stride_a,
    stride_bk,
    stride_bn,
    stride_out,
    pid_n,
    TWO: tl.constexpr,
    TWO_WHOLE_STEPS: tl.constexpr,  # n_red is a whole number of k steps: no step straddles b and b2
    B_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[out_rows, n-tile] = scale * (a[a_rows] @ b [+ a[a_rows, n_red:] @ b2]), fp32
    accumulate, one rounding at the end. With TWO the two products are one reduction over a's
    2 n_red columns, whose rows of the right operand come from b, then b2: one dot per step
    (two dots per step, each half as wide, took 15-21% longer for dX's routed part at seed
    N = 2048-8192 on the H100; docs/perf-notes.md, "dX in one reduction"). Strides of 1 are
    specialised by Triton, so a transposed right operand costs nothing over a contiguous one."""
    n_total = 2 * n_red if TWO else n_red
    n_start = pid_n * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    col_mask = offs_n < n_cols
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + offs_k[None, :]
    b_cols = offs_n.to(tl.int64)[None, :] * stride_bn
    b_offs = offs_k.to(tl.int64)[:, None] * stride_bk + b_cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_total, BLOCK_K):
        k_mask = offs_k < n_total - k0
        a_mask = row_mask[:, None] & k_mask[None, :]
        b_mask = k_mask[:, None] & col_mask[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if B_TMA:  # columns past n_cols read other rows of b^T; the store masks them
            b = b_ptr.load([b_row0 + n_start, k0]).T
        elif TWO and TWO_WHOLE_STEPS:  # each step in b or in b2: one base pointer per step
            b_base = tl.where(k0 < n_red, b_ptr, b2_ptr - tl.cast(n_red, tl.int64) * stride_bk)
            b = tl.load(b_base + b_offs, mask=b_mask, other=0.0)
        elif TWO:  # a step may straddle b's last row and b2's first: per row
            k = (k0 + offs_k).to(tl.int64)
            b_rows = tl.where(k < n_red, b_ptr + k * stride_bk, b2_ptr + (k - n_red) * stride_bk)
            b = tl.load(b_rows[:, None] + b_cols, mask=b_mask, other=0.0)
        else:
            b = tl.load(b_ptr + b_offs, mask=b_mask, other=0.0)
        if UPCAST:  # the interpreter cannot multiply bf16
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_offs += BLOCK_K * stride_bk
    y = acc * scale[:, None]
    out_ptrs = out_ptr + out_rows[:, None] * stride_out + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _rows_matmul_kernel(
    a_routed_ptr,  # (T*K, [2] n_red) expert-sorted rows, or (T, n_red) read by token when A_BY_TOKEN
    a_shared_ptr,  # (T, [2] n_red_shared)
    b_ptr,  # (E, n_red, n_cols) strided: routed right operands; with B_TMA a descriptor over
    #   the transposed operands as (E * n_cols, n_red)
    b2_ptr,  # (E, n_red, n_cols) same strides (TWO only)
    shared_b_ptr,  # (n_red_shared, n_cols_shared) strided; with B_TMA a descriptor over its transpose
    shared_b2_ptr,  # (n_red_shared, n_cols_shared) same strides (TWO only)
    topk_weights_ptr,  # (T*K,) fp32: routing weight of each slot (SCALE only)
    out_routed_ptr,  # (T*K, n_cols) out: by slot when OUT_BY_SLOT, else by sorted row
    out_shared_ptr,  # (T, n_cols_shared) out
    sorted_slot_ptr,  # (T*K,) int32: slot of each sorted row
    tile_expert_ptr,  # (max_tiles,) int32: expert of each routed tile, < 0 past the last
    tile_row_start_ptr,  # (max_tiles,) int32
    expert_offsets_ptr,  # (E+1,) int32
    T,
    top_k,
    max_tiles,
    n_red,
    n_cols,
    n_red_shared,
    n_cols_shared,
    stride_ar,
    stride_as,
    stride_be,
    stride_bk,
    stride_bn,
    stride_sbk,
    stride_sbn,
    stride_or,
    stride_os,
    ROUTED: tl.constexpr,
    SHARED: tl.constexpr,
    TWO: tl.constexpr,
    TWO_WHOLE_STEPS: tl.constexpr,  # with TWO: n_red and n_red_shared are whole numbers of k steps
    B_TMA: tl.constexpr,  # right operands through TMA descriptors (never with TWO)
    A_BY_TOKEN: tl.constexpr,
    OUT_BY_SLOT: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TAIL_M: tl.constexpr,  # height of an expert's last tile when its rows fit; BLOCK_M: no tail tiles
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (max_tiles * cdiv(n_cols, BLOCK_N) [ROUTED] + cdiv(T, BLOCK_M) * cdiv(n_cols_shared, BLOCK_N) [SHARED],).

    A routed program owns one (routed tile, column tile) of one expert (TAIL_M rows high where that
    is all the expert has left); a program past the routed ones owns one (token tile, column tile)
    of the shared MLP (scale 1). Every output element has one owner: writing each slot to its own
    row (OUT_BY_SLOT) lets the K slots be summed after in a fixed order, so results are
    deterministic.
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_cols, BLOCK_N)
    num_routed = max_tiles * n_tiles if ROUTED else 0
    offs_m = tl.arange(0, BLOCK_M)
    if pid < num_routed:
        tile = pid // n_tiles
        expert = tl.load(tile_expert_ptr + tile)
        if expert >= 0:
            pid_n = pid % n_tiles
            # An expert's last tile with at most TAIL_M rows runs TAIL_M high: same b tiles, fewer MMA rows.
            if TAIL_M < BLOCK_M and _tile_rows_left(tile, expert, tile_row_start_ptr, expert_offsets_ptr) <= TAIL_M:
                _routed_rows_matmul(
                    a_routed_ptr, b_ptr, b2_ptr, topk_weights_ptr, out_routed_ptr,
                    sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr, tile, expert, pid_n,
                    top_k, n_red, n_cols, stride_ar, stride_be, stride_bk, stride_bn, stride_or,
                    TWO, TWO_WHOLE_STEPS, B_TMA, A_BY_TOKEN, OUT_BY_SLOT, SCALE, TAIL_M, BLOCK_N, BLOCK_K,
                    UPCAST, DOT_PRECISION,
                )  # fmt: skip
            else:
                _routed_rows_matmul(
                    a_routed_ptr, b_ptr, b2_ptr, topk_weights_ptr, out_routed_ptr,
                    sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr, tile, expert, pid_n,
                    top_k, n_red, n_cols, stride_ar, stride_be, stride_bk, stride_bn, stride_or,
                    TWO, TWO_WHOLE_STEPS, B_TMA, A_BY_TOKEN, OUT_BY_SLOT, SCALE, BLOCK_M, BLOCK_N, BLOCK_K,
                    UPCAST, DOT_PRECISION,
                )  # fmt: skip
    elif SHARED:
        local = pid - num_routed
        n_tiles_s = tl.cdiv(n_cols_shared, BLOCK_N)
        tokens = (local // n_tiles_s) * BLOCK_M + offs_m
        token_mask = tokens < T
        tokens = tokens.to(tl.int64)
        _rows_matmul_tile(
            a_shared_ptr, tokens, token_mask, shared_b_ptr, 0, shared_b2_ptr, tl.full((BLOCK_M,), 1.0, tl.float32),
            out_shared_ptr, tokens,
            n_red_shared, n_cols_shared, stride_as, stride_sbk, stride_sbn, stride_os, local % n_tiles_s,
            TWO, TWO_WHOLE_STEPS, B_TMA, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
        )  # fmt: skip


@triton.jit
def _routed_rows_matmul(
    a_routed_ptr, b_ptr, b2_ptr, topk_weights_ptr, out_routed_ptr,
    sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr, tile, expert, pid_n,
    top_k, n_red, n_cols, stride_ar, stride_be, stride_bk, stride_bn, stride_or,
    TWO: tl.constexpr, TWO_WHOLE_STEPS: tl.constexpr, B_TMA: tl.constexpr, A_BY_TOKEN: tl.constexpr,
    OUT_BY_SLOT: tl.constexpr, SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (routed tile, column tile) of `_rows_matmul_kernel`, BLOCK_M rows high."""
    rows, row_mask, slots = _tile_rows(tile, sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr, expert, BLOCK_M)
    if SCALE:
        scale = tl.load(topk_weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
    else:
        scale = tl.full((BLOCK_M,), 1.0, tl.float32)
    a_rows = (slots // top_k).to(tl.int64) if A_BY_TOKEN else rows.to(tl.int64)
    out_rows = slots.to(tl.int64) if OUT_BY_SLOT else rows.to(tl.int64)
    if B_TMA:
        b, b2, b_row0 = b_ptr, b2_ptr, expert * n_cols
    else:
        e_offset = expert.to(tl.int64) * stride_be
        b, b2, b_row0 = b_ptr + e_offset, b2_ptr + e_offset, 0
    _rows_matmul_tile(
        a_routed_ptr, a_rows, row_mask, b, b_row0, b2, scale,
        out_routed_ptr, out_rows,
        n_red, n_cols, stride_ar, stride_bk, stride_bn, stride_or, pid_n,
        TWO, TWO_WHOLE_STEPS, B_TMA, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
    )  # fmt: skip
