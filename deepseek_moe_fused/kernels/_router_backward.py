"""Backward of the Triton router (router.py's TritonRouterFunction): the routing weights' gradient
back to the logits, then to x and the router weight, all in fp32 as autograd through
transformers' fp32 linear computes them (products accurate to fp32: `_fp32_dot`)."""

import triton
import triton.language as tl


@triton.jit
def _fp32_dot(a, b, acc, SPLIT_A: tl.constexpr):
    """acc + a @ b for fp32 `a`, with products as accurate as fp32's. SPLIT_A (b is bf16): `a`
    as the sum of three bf16 terms (8 + 8 + 8 significand bits, all 24 of fp32's), each product
    with b exact in fp32, on the tensor cores; else true fp32 products (`ieee`: FMAs on the CUDA
    cores, which bound both GEMMs at E=64 on the H100, docs/perf-notes.md)."""
    if SPLIT_A:
        hi = a.to(tl.bfloat16)
        rest = a - hi.to(tl.float32)  # exact: hi is a rounded to nearest
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(lo, b, acc)  # smallest terms first
        acc = tl.dot(mid, b, acc)
        acc = tl.dot(hi, b, acc)
    else:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _router_bwd_rows_kernel(
    logits_ptr,  # (T, E) fp32: the saved logits
    grad_logits_ptr,  # (T, E) fp32: gradient of the returned logits (zeros without an auxiliary loss)
    grad_weights_ptr,  # (T, K) fp32: gradient of the routing weights
    topk_ids_ptr,  # (T, K) int64: the chosen experts (distinct per token)
    weight_ptr,  # (E, H) router weight, any float dtype (read when DX); bf16 when SPLIT
    grad_ptr,  # (T, E) fp32 out: gradient of the logits, written by the programs of H chunk 0
    dx_ptr,  # (T, H) out in x's dtype: grad @ weight (when DX)
    T,
    E,
    K,
    H,
    h_per_program,
    stride_w,
    stride_dx,
    routed_scaling_factor,
    SIGMOID: tl.constexpr,
    NORM: tl.constexpr,
    DX: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid: (cdiv(T, BLOCK_T), cdiv(H, h_per_program)). One program owns BLOCK_T tokens: it
    recomputes their logits' gradient (a few ops per expert, cheaper than a second launch) and
    writes dx for its chunk of H columns.

    weights = scale * s[ids] (/ sum_k s[ids_k] when NORM), s = sigmoid(logits) or softmax(logits)
    (a grouped softmax's dropped scores are never chosen, so they get no gradient either way)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    mask = row_mask[:, None] & col_mask[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0.0)
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        shifted = tl.where(col_mask[None, :], logits, float("-inf"))
        exps = tl.exp(shifted - tl.max(shifted, axis=1)[:, None])
        scores = exps / tl.sum(exps, axis=1)[:, None]
    # The chosen scores' sum and the weights' gradient dotted with them: what renormalising needs.
    chosen_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    grad_dot_chosen = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in range(K):
        ids = tl.load(topk_ids_ptr + rows * K + k, mask=row_mask, other=0)
        g = tl.load(grad_weights_ptr + rows * K + k, mask=row_mask, other=0.0)
        chosen = tl.sum(tl.where(cols[None, :] == ids[:, None], scores, 0.0), axis=1)
        chosen_sum += chosen
        grad_dot_chosen += g * chosen
    denom = chosen_sum + 1e-20  # as _weights_at's renormalisation
    d_scores = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k in range(K):
        ids = tl.load(topk_ids_ptr + rows * K + k, mask=row_mask, other=0)
        g = tl.load(grad_weights_ptr + rows * K + k, mask=row_mask, other=0.0) * routed_scaling_factor
        if NORM:
            g = g / denom - routed_scaling_factor * grad_dot_chosen / (denom * denom)
        d_scores += tl.where(cols[None, :] == ids[:, None], g[:, None], 0.0)
    if SIGMOID:
        d_logits = d_scores * scores * (1.0 - scores)
    else:
        d_logits = scores * (d_scores - tl.sum(d_scores * scores, axis=1)[:, None])
    grad = tl.load(grad_logits_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0.0) + d_logits
    grad = tl.where(mask, grad, 0.0)
    h_begin = tl.program_id(1) * h_per_program
    if h_begin == 0:
        tl.store(grad_ptr + rows[:, None] * E + cols[None, :], grad, mask=mask)
    if DX:
        offs_h = tl.arange(0, BLOCK_H)
        for h0 in range(h_begin, tl.minimum(h_begin + h_per_program, H), BLOCK_H):
            h = h0 + offs_h
            h_mask = h < H
            w = tl.load(
                weight_ptr + cols[:, None] * stride_w + h[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0
            )
            dx = _fp32_dot(grad, w, tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32), SPLIT)
            tl.store(
                dx_ptr + rows[:, None] * stride_dx + h[None, :],
                dx.to(dx_ptr.dtype.element_ty),
                mask=row_mask[:, None] & h_mask[None, :],
            )


@triton.jit
def _router_bwd_weight_kernel(
    grad_ptr,  # (T, E) fp32: gradient of the logits
    x_ptr,  # (T, H) activations, any float dtype; bf16 when SPLIT
    partial_ptr,  # (splits, E, H) fp32 out: each split's share of grad^T @ x
    T,
    E,
    H,
    stride_x,
    rows_per_split,
    SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid: (cdiv(H, BLOCK_H), cdiv(E, BLOCK_E), splits). One program owns a (BLOCK_E, BLOCK_H)
    tile of one split's partial sum over its rows_per_split tokens, walked in order; the launcher
    adds the splits in order (no atomics: deterministic)."""
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(2)
    h_mask = offs_h < H
    e_mask = offs_e < E
    t_begin = split * rows_per_split
    t_end = tl.minimum(t_begin + rows_per_split, T)
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        rows = t0 + offs_t
        t_mask = rows < t_end
        rows = rows.to(tl.int64)
        # The gradient loaded transposed, (BLOCK_E, BLOCK_T): the sum runs over tokens.
        g = tl.load(grad_ptr + rows[None, :] * E + offs_e[:, None], mask=t_mask[None, :] & e_mask[:, None], other=0.0)
        xs = tl.load(
            x_ptr + rows[:, None] * stride_x + offs_h[None, :], mask=t_mask[:, None] & h_mask[None, :], other=0.0
        )
        acc = _fp32_dot(g, xs, acc, SPLIT)
    out = partial_ptr + split.to(tl.int64) * E * H + offs_e[:, None] * H + offs_h[None, :]
    tl.store(out, acc, mask=e_mask[:, None] & h_mask[None, :])
