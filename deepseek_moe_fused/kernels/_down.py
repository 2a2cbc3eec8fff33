"""Stage 2: routed and shared down projections, routing weight applied in the epilogue."""

import triton
import triton.language as tl


@triton.jit
def _down_tile(
    h_ptr,  # (rows, n_inner) activations from stage 1
    h_rows,  # (BLOCK_M,) int64: row of h each tile row reads
    row_mask,  # (BLOCK_M,) bool
    w_ptr,  # (H, n_inner) this program's down weight
    scale,  # (BLOCK_M,) fp32: routing weight of each row (1 for the shared MLP)
    y_ptr,  # (rows', H) output
    y_rows,  # (BLOCK_M,) int64: row of y each tile row writes
    n_inner,
    H,
    stride_hm,
    stride_wh,
    stride_ym,
    pid_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y[y_rows, n-tile] = scale * (h[h_rows] @ w^T), fp32 accumulate, one rounding at the end."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + h_rows[:, None] * stride_hm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wh + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_inner, BLOCK_K):
        k_mask = offs_k < n_inner - k0
        h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter cannot multiply bf16
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = acc * scale[:, None]
    y_ptrs = y_ptr + y_rows[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_kernel(
    h_routed_ptr,  # (T*K, I) routed activations, expert-sorted rows
    h_shared_ptr,  # (T, S) shared activations
    w_down_ptr,  # (E, H, I) routed down weights
    w_shared_down_ptr,  # (H, S) shared down weight
    topk_weights_ptr,  # (T*K,) fp32: routing weight of each slot
    y_routed_ptr,  # (T*K, H) out: weighted expert output of each slot, slot order
    y_shared_ptr,  # (T, H) out: shared MLP output
    sorted_slot_ptr,  # (T*K,) int32: slot of each sorted row
    tile_expert_ptr,  # (max_tiles,) int32: expert of each routed tile, < 0 past the last
    tile_row_start_ptr,  # (max_tiles,) int32
    expert_offsets_ptr,  # (E+1,) int32
    T,
    H,
    I,
    S,
    max_tiles,
    stride_hr,
    stride_hs,
    stride_we,
    stride_wh,
    stride_sh,
    stride_yr,
    stride_ys,
    ROUTED: tl.constexpr,
    SHARED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (max_tiles * cdiv(H, BLOCK_N) [if ROUTED] + cdiv(T, BLOCK_M) * cdiv(H, BLOCK_N) [if SHARED],).

    A routed program owns one (routed tile, H column tile): it multiplies each row by its slot's
    routing weight and writes it to the slot's own row of y_routed, so no two programs write the
    same element and the combine that follows can sum the K slots in a fixed order.
    """
    pid = tl.program_id(0)
    n_tiles_h = tl.cdiv(H, BLOCK_N)
    num_routed = max_tiles * n_tiles_h if ROUTED else 0
    offs_m = tl.arange(0, BLOCK_M)
    if pid < num_routed:
        tile = pid // n_tiles_h
        expert = tl.load(tile_expert_ptr + tile)
        if expert >= 0:
            row_start = tl.load(tile_row_start_ptr + tile)
            row_end = tl.load(expert_offsets_ptr + expert + 1)
            rows = row_start + offs_m
            row_mask = rows < row_end
            slots = tl.load(sorted_slot_ptr + rows, mask=row_mask, other=0)
            scale = tl.load(topk_weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
            _down_tile(
                h_routed_ptr, rows.to(tl.int64), row_mask,
                w_down_ptr + expert.to(tl.int64) * stride_we, scale,
                y_routed_ptr, slots.to(tl.int64),
                I, H, stride_hr, stride_wh, stride_yr, pid % n_tiles_h,
                BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
            )  # fmt: skip
    elif SHARED:
        local = pid - num_routed
        tokens = (local // n_tiles_h) * BLOCK_M + offs_m
        token_mask = tokens < T
        tokens = tokens.to(tl.int64)
        _down_tile(
            h_shared_ptr, tokens, token_mask,
            w_shared_down_ptr, tl.full((BLOCK_M,), 1.0, tl.float32),
            y_shared_ptr, tokens,
            S, H, stride_hs, stride_sh, stride_ys, local % n_tiles_h,
            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
        )  # fmt: skip
