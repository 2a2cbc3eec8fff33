"""Stage 1: routed and shared gate/up projections with SwiGLU, one launch over the same X."""

import triton
import triton.language as tl

from ._tile_map import _tile_rows, _tile_rows_left


@triton.jit
def _swiglu_tile(
    x_ptr,  # (T, H) activations
    x_rows,  # (BLOCK_M,) int64: row of X each tile row reads
    row_mask,  # (BLOCK_M,) bool: tile rows that exist
    gate_w,  # (rows, H) gate weight rows: pointer, or TMA descriptor when WEIGHTS_TMA
    gate_row0,  # row of gate_w where this program's n_cols gate rows start
    up_w,  # (rows, H) up weight rows, as gate_w
    up_row0,
    h_ptr,  # (rows, n_cols) output activations
    h_rows,  # (BLOCK_M,) int64: row of h each tile row writes
    pre_ptr,  # (rows, 2 * n_cols) out when SAVE_PREACT: [gate | up] pre-activations, rows as h
    n_cols,
    H,
    stride_xt,
    stride_wn,
    stride_hm,
    stride_pm,
    pid_n,
    SAVE_PREACT: tl.constexpr,
    WEIGHTS_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """h[h_rows, n-tile] = silu(X[x_rows] @ gate^T) * (X[x_rows] @ up^T), fp32 accumulate."""
    n_start = pid_n * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    col_mask = offs_n < n_cols
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + x_rows[:, None] * stride_xt + offs_k[None, :]
    w_offs = offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = offs_k < H - k0
        # One X tile feeds both the gate and the up dot.
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if WEIGHTS_TMA:  # columns past n_cols read other rows; the store masks them
            w_gate = gate_w.load([gate_row0 + n_start, k0]).T
            w_up = up_w.load([up_row0 + n_start, k0]).T
        else:
            w_mask = k_mask[:, None] & col_mask[None, :]
            w_gate = tl.load(gate_w + gate_row0 * stride_wn + w_offs, mask=w_mask, other=0.0)
            w_up = tl.load(up_w + up_row0 * stride_wn + w_offs, mask=w_mask, other=0.0)
        if UPCAST:  # the interpreter cannot multiply bf16
            x = x.to(tl.float32)
            w_gate = w_gate.to(tl.float32)
            w_up = w_up.to(tl.float32)
        acc_gate = tl.dot(x, w_gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, w_up, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_offs += BLOCK_K
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SAVE_PREACT:  # for the Triton backward: saves recomputing both GEMMs there
        pre_ptrs = pre_ptr + h_rows[:, None] * stride_pm + offs_n[None, :]
        tl.store(pre_ptrs, acc_gate.to(pre_ptr.dtype.element_ty), mask=out_mask)
        tl.store(pre_ptrs + n_cols, acc_up.to(pre_ptr.dtype.element_ty), mask=out_mask)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    h_ptrs = h_ptr + h_rows[:, None] * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr,  # (T, H) activations, any float dtype
    w_gate_ptr,  # (E, I, H) view: gate rows [0, I) of the routed gate_up weight (E, 2I, H);
    #   with WEIGHTS_TMA a descriptor over that whole weight as (E * 2I, H)
    w_up_ptr,  # (E, I, H) view: up rows [I, 2I) of the same weight; with WEIGHTS_TMA the same descriptor
    w_shared_gate_ptr,  # (S, H) shared experts' gate, pointer or descriptor (unread when SHARED is off)
    w_shared_up_ptr,  # (S, H) shared experts' up, as the gate
    h_routed_ptr,  # (T*K, I) out: routed activations, expert-sorted rows
    h_shared_ptr,  # (T, S) out: shared activations
    pre_routed_ptr,  # (T*K, 2I) out when SAVE_PREACT: routed [gate | up] pre-activations, sorted rows
    pre_shared_ptr,  # (T, 2S) out when SAVE_PREACT and SHARED: shared pre-activations
    sorted_slot_ptr,  # (T*K,) int32: slot (token*K + k) of each sorted row
    tile_expert_ptr,  # (max_tiles,) int32: expert of each routed tile, < 0 past the last
    tile_row_start_ptr,  # (max_tiles,) int32: first sorted row of each tile
    expert_offsets_ptr,  # (E+1,) int32: first sorted row of each expert
    T,
    H,
    I,
    S,
    top_k,
    max_tiles,
    stride_xt,
    stride_we,
    stride_wn,
    stride_sn,
    stride_hr,
    stride_hs,
    stride_pr,
    stride_ps,
    ROUTED: tl.constexpr,
    SHARED: tl.constexpr,
    SAVE_PREACT: tl.constexpr,
    WEIGHTS_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TAIL_M: tl.constexpr,  # height of an expert's last tile when its rows fit; BLOCK_M: no tail tiles
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (max_tiles * cdiv(I, BLOCK_N) [if ROUTED] + cdiv(T, BLOCK_M) * cdiv(S, BLOCK_N) [if SHARED],).

    Programs [0, routed) own one (routed tile, I column tile) each: up to BLOCK_M rows of one
    expert (TAIL_M of them where that is all the expert has left: the same weight tiles, fewer
    MMA rows). The rest own one (token tile, S column tile) of the shared MLP. Both kinds read the
    same X in the same launch, so X tiles loaded by the routed programs are still in L2 for the
    shared ones.
    """
    pid = tl.program_id(0)
    n_tiles_i = tl.cdiv(I, BLOCK_N)
    num_routed = max_tiles * n_tiles_i if ROUTED else 0
    offs_m = tl.arange(0, BLOCK_M)
    if pid < num_routed:
        tile = pid // n_tiles_i
        expert = tl.load(tile_expert_ptr + tile)
        if expert >= 0:
            pid_n = pid % n_tiles_i
            # An expert's last tile with at most TAIL_M rows runs TAIL_M high: same weights, fewer MMA rows.
            if TAIL_M < BLOCK_M and _tile_rows_left(tile, expert, tile_row_start_ptr, expert_offsets_ptr) <= TAIL_M:
                _routed_swiglu(
                    x_ptr, w_gate_ptr, w_up_ptr, h_routed_ptr, pre_routed_ptr,
                    sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr, tile, expert, pid_n,
                    H, I, top_k, stride_xt, stride_we, stride_wn, stride_hr, stride_pr,
                    SAVE_PREACT, WEIGHTS_TMA, TAIL_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
                )  # fmt: skip
            else:
                _routed_swiglu(
                    x_ptr, w_gate_ptr, w_up_ptr, h_routed_ptr, pre_routed_ptr,
                    sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr, tile, expert, pid_n,
                    H, I, top_k, stride_xt, stride_we, stride_wn, stride_hr, stride_pr,
                    SAVE_PREACT, WEIGHTS_TMA, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
                )  # fmt: skip
    elif SHARED:
        local = pid - num_routed
        n_tiles_s = tl.cdiv(S, BLOCK_N)
        tokens = (local // n_tiles_s) * BLOCK_M + offs_m
        token_mask = tokens < T
        tokens = tokens.to(tl.int64)
        _swiglu_tile(
            x_ptr, tokens, token_mask,
            w_shared_gate_ptr, 0, w_shared_up_ptr, 0,
            h_shared_ptr, tokens, pre_shared_ptr,
            S, H, stride_xt, stride_sn, stride_hs, stride_ps, local % n_tiles_s, SAVE_PREACT, WEIGHTS_TMA,
            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
        )  # fmt: skip


@triton.jit
def _routed_swiglu(
    x_ptr, w_gate_ptr, w_up_ptr, h_routed_ptr, pre_routed_ptr,
    sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr, tile, expert, pid_n,
    H, I, top_k, stride_xt, stride_we, stride_wn, stride_hr, stride_pr,
    SAVE_PREACT: tl.constexpr, WEIGHTS_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (routed tile, I column tile) of `_gate_up_swiglu_kernel`, BLOCK_M rows high."""
    rows, row_mask, slots = _tile_rows(tile, sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr, expert, BLOCK_M)
    if WEIGHTS_TMA:  # descriptor rows: expert e's gate rows start at e * 2I, its up rows at + I
        gate_w, up_w = w_gate_ptr, w_up_ptr
        gate_row0 = expert * 2 * I
        up_row0 = gate_row0 + I
    else:
        expert_offset = expert.to(tl.int64) * stride_we
        gate_w, up_w = w_gate_ptr + expert_offset, w_up_ptr + expert_offset
        gate_row0, up_row0 = 0, 0
    _swiglu_tile(
        x_ptr, (slots // top_k).to(tl.int64), row_mask,
        gate_w, gate_row0, up_w, up_row0,
        h_routed_ptr, rows.to(tl.int64), pre_routed_ptr,
        I, H, stride_xt, stride_wn, stride_hr, stride_pr, pid_n, SAVE_PREACT, WEIGHTS_TMA,
        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
    )  # fmt: skip
