"""Token rows into expert-sorted row order: the copy behind the weight gradients' and the
warp-specialized stage 1's sorted operands (TMA boxes need contiguous rows)."""

import triton
import triton.language as tl


@triton.jit
def _sorted_rows_kernel(
    src_ptr,  # (T, H) rows by token
    out_ptr,  # (T*K, H) out: row r = src's row of the token sorted row r belongs to
    slot_to_row_ptr,  # (T*K,) int32: sorted row of each slot t*K + k
    scale_ptr,  # (T*K,) fp32: factor of each slot's row (SCALE only)
    H,
    stride_src,
    stride_out,
    TOP_K: tl.constexpr,
    SCALE: tl.constexpr,  # each written row times its slot's factor, in fp32, rounded once
    BLOCK_H: tl.constexpr,
):
    """Grid: (T, cdiv(H, BLOCK_H)); one program owns BLOCK_H columns of one token and writes them
    to its K sorted rows.

    Token-major: each source row is read once. Row-major (torch.index_select: each sorted row
    reads its token's row) read the source K times, from HBM once it outgrows L2; on the H100 it
    took 260 against 170 us at v2-lite N=16384 (docs/perf-notes.md, session 22).
    """
    token = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs_h < H
    row = tl.load(src_ptr + token.to(tl.int64) * stride_src + offs_h, mask=mask)
    for k in tl.static_range(TOP_K):
        dst = tl.load(slot_to_row_ptr + token * TOP_K + k).to(tl.int64)
        value = row
        if SCALE:
            value = (row.to(tl.float32) * tl.load(scale_ptr + token * TOP_K + k)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + dst * stride_out + offs_h, value, mask=mask)
