"""Backward of the fused experts beyond the row-tiled GEMMs of _rows_matmul.py (dY W_down and dX):
the SwiGLU backward, elementwise over whole rows, and the routed experts' weight gradients as
grouped GEMMs over the expert-sorted rows. No atomics: every output element has one owner
program, so the gradients are deterministic."""

import triton
import triton.language as tl


@triton.jit
def _swiglu_bwd_rows(
    pre_ptr,  # (rows, 2 * n_inner) saved [g | u]; overwritten with [dg | du]
    d_act_ptr,  # (rows, n_inner) dA = dY W_down
    rows,  # (BLOCK_M,) int64
    row_mask,  # (BLOCK_M,) bool
    scale,  # (BLOCK_M,) fp32: routing weight of each row (1 for the shared MLP)
    n_inner,
    stride_pre,
    stride_d_act,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dg = scale dA u silu'(g), du = scale dA silu(g), in place; returns d scale = sum_n silu(g) u dA."""
    offs_n = tl.arange(0, BLOCK_N)
    pre_ptrs = pre_ptr + rows[:, None] * stride_pre + offs_n[None, :]
    d_act_ptrs = d_act_ptr + rows[:, None] * stride_d_act + offs_n[None, :]
    d_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, n_inner, BLOCK_N):
        mask = row_mask[:, None] & (offs_n < n_inner - n0)[None, :]
        d_a = tl.load(d_act_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(pre_ptrs + n_inner, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        d_scale += tl.sum(silu * u * d_a, axis=1)
        d_act = d_a * scale[:, None]
        # In place, and a load and the store to its address need not run on one thread: the
        # compiler lays each access out by its pointers' alignment (u's sit n_inner past g's), or a
        # tile smaller than the program holds an element twice. On the H100 at I = 24, du stored
        # by one thread overwrote u before another read it, in every run. So all threads load first.
        tl.debug_barrier()
        tl.store(pre_ptrs + n_inner, (d_act * silu).to(pre_ptr.dtype.element_ty), mask=mask)
        tl.store(pre_ptrs, (d_act * u * sig * (1.0 + g * (1.0 - sig))).to(pre_ptr.dtype.element_ty), mask=mask)
        pre_ptrs += BLOCK_N
        d_act_ptrs += BLOCK_N
    return d_scale


@triton.jit
def _swiglu_bwd_kernel(
    pre_routed_ptr,  # (T*K, 2I) saved routed [g | u] by sorted row; overwritten with [dg | du]
    pre_shared_ptr,  # (T, 2S) the same for the shared MLP
    d_act_routed_ptr,  # (T*K, I) dA by sorted row
    d_act_shared_ptr,  # (T, S) dA of the shared MLP
    topk_weights_ptr,  # (T*K,) fp32: routing weight of each slot
    d_topk_ptr,  # (T*K,) fp32 out: gradient of each slot's routing weight
    sorted_slot_ptr,  # (T*K,) int32: slot of each sorted row
    T,
    num_rows,
    I,
    S,
    stride_pr,
    stride_ps,
    stride_dar,
    stride_das,
    SHARED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(T*K, BLOCK_M) + [SHARED] cdiv(T, BLOCK_M),).

    The SwiGLU backward after the dY W_down GEMM, elementwise: a program owns BLOCK_M whole rows
    (sorted routed rows, then the shared MLP's tokens), so each routing weight's gradient is one
    row sum written once, in a fixed order. The SwiGLU output the down weights' gradients need is
    the forward's, kept (PreActivations.h_routed / h_shared), not recomputed here: one write of
    (T*K, I) fewer, a sixth of this pass's bytes."""
    pid = tl.program_id(0)
    num_routed = tl.cdiv(num_rows, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    if pid < num_routed:
        rows = pid * BLOCK_M + offs_m
        row_mask = rows < num_rows
        slots = tl.load(sorted_slot_ptr + rows, mask=row_mask, other=0)
        scale = tl.load(topk_weights_ptr + slots, mask=row_mask, other=0.0)
        d_scale = _swiglu_bwd_rows(
            pre_routed_ptr, d_act_routed_ptr, rows.to(tl.int64), row_mask, scale, I, stride_pr, stride_dar,
            BLOCK_M, BLOCK_N,
        )  # fmt: skip
        tl.store(d_topk_ptr + slots, d_scale, mask=row_mask)
    elif SHARED:
        tokens = (pid - num_routed) * BLOCK_M + offs_m
        token_mask = tokens < T
        _swiglu_bwd_rows(
            pre_shared_ptr, d_act_shared_ptr, tokens.to(tl.int64), token_mask, tl.full((BLOCK_M,), 1.0, tl.float32),
            S, stride_ps, stride_das, BLOCK_M, BLOCK_N,
        )  # fmt: skip


@triton.jit
def _grouped_weight_grad_kernel(
    a_ptr,  # (T*K, P) left operand, expert-sorted rows; with TMA a descriptor, (BLOCK_R, BLOCK_P) boxes
    b_ptr,  # (T*K, Q) right operand, expert-sorted rows; with TMA a descriptor, (BLOCK_R, BLOCK_Q) boxes
    out_ptr,  # (E, P, Q) out: per-expert sum over its rows of a_row^T b_row
    expert_offsets_ptr,  # (E+1,) int32
    P,
    Q,
    stride_a,
    stride_b,
    stride_oe,
    stride_op,
    TMA: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (E * cdiv(P, BLOCK_P) * cdiv(Q, BLOCK_Q),). One program owns one (expert, P tile,
    Q tile) of the weight gradient and walks that expert's rows in order: no atomics, so the
    result is deterministic; an expert without rows gets zeros.

    Both operands are read as contiguous sorted rows. Gathering rows by token inside the loop
    (a load whose address comes from a load in the same step) ran at 35-50% of the matmul
    ceiling on the H100 against 50-70% for the same rows pre-sorted (docs/perf-notes.md). With
    TMA, the whole steps of an expert's rows are unmasked boxes; the last, partial step reads the
    next expert's first rows too, and zeroes them before its dot."""
    pid = tl.program_id(0)
    n_p = tl.cdiv(P, BLOCK_P)
    n_q = tl.cdiv(Q, BLOCK_Q)
    expert = pid // (n_p * n_q)
    p0 = ((pid // n_q) % n_p) * BLOCK_P
    q0 = (pid % n_q) * BLOCK_Q
    offs_p = p0 + tl.arange(0, BLOCK_P)
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    p_mask = offs_p < P
    q_mask = offs_q < Q
    lo = tl.load(expert_offsets_ptr + expert)
    hi = tl.load(expert_offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    if TMA:  # columns past P or Q and rows past T*K come back as zeros
        whole_end = lo + (hi - lo) // BLOCK_R * BLOCK_R
        for r0 in range(lo, whole_end, BLOCK_R):
            a = a_ptr.load([r0, p0])
            b = b_ptr.load([r0, q0])
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a.T, b, acc, input_precision=DOT_PRECISION)
        if whole_end < hi:
            own = (whole_end + offs_r < hi)[:, None]
            a = tl.where(own, a_ptr.load([whole_end, p0]), 0.0)
            b = tl.where(own, b_ptr.load([whole_end, q0]), 0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a.T, b, acc, input_precision=DOT_PRECISION)
    else:
        for r0 in range(lo, hi, BLOCK_R):
            rows = r0 + offs_r
            row_mask = rows < hi
            rows = rows.to(tl.int64)
            # A loaded transposed, (BLOCK_P, BLOCK_R): the reduction runs over rows.
            a_mask = row_mask[None, :] & p_mask[:, None]
            a = tl.load(a_ptr + rows[None, :] * stride_a + offs_p[:, None], mask=a_mask, other=0.0)
            b_mask = row_mask[:, None] & q_mask[None, :]
            b = tl.load(b_ptr + rows[:, None] * stride_b + offs_q[None, :], mask=b_mask, other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + offs_p.to(tl.int64)[:, None] * stride_op + offs_q[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & q_mask[None, :])
