"""Stage 3: out[t] = sum_k y_routed[t, k] + y_shared[t], in a fixed order (no atomics)."""

import triton
import triton.language as tl


@triton.jit
def _combine_kernel(
    y_routed_ptr,  # (T, K, H) weighted expert outputs, slot order
    y_shared_ptr,  # (T, H) shared MLP output (unread when SHARED is off)
    out_ptr,  # (T, H) out
    H,
    stride_yt,
    stride_yk,
    stride_st,
    stride_ot,
    TOP_K: tl.constexpr,
    SHARED: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid: (T, cdiv(H, BLOCK_H)); one program owns BLOCK_H columns of one token.

    Sums in fp32, slot 0 first and the shared MLP last, so the result is the same bit for bit on
    every run.
    """
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    y_ptrs = y_routed_ptr + token * stride_yt + offs_h
    for k in tl.static_range(TOP_K):
        acc += tl.load(y_ptrs + k * stride_yk, mask=mask, other=0.0).to(tl.float32)
    if SHARED:
        acc += tl.load(y_shared_ptr + token * stride_st + offs_h, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_ot + offs_h, acc.to(out_ptr.dtype.element_ty), mask=mask)
