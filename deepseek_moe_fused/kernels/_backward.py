"""Backward of the fused experts, routed and shared in the same launches as in the forward: the
SwiGLU backward fused into the dY W_down GEMM, dX through gate/up, and the routed experts' weight
gradients as grouped GEMMs over the expert-sorted rows. No atomics: every output element has one
owner program, so the gradients are deterministic."""

import triton
import triton.language as tl


@triton.jit
def _tile_rows(tile, sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr, expert, BLOCK_M: tl.constexpr):
    """The sorted rows of a routed tile of `expert`, which of them exist, and their slots."""
    rows = tl.load(tile_row_start_ptr + tile) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(expert_offsets_ptr + expert + 1)
    slots = tl.load(sorted_slot_ptr + rows, mask=row_mask, other=0)
    return rows, row_mask, slots


@triton.jit
def _swiglu_bwd_tile(
    dy_ptr,  # (T, H) gradient of the layer output
    dy_rows,  # (BLOCK_M,) int64: row of dY each tile row reads (its token)
    row_mask,  # (BLOCK_M,) bool
    w_ptr,  # (H, n_inner) this program's down weight
    pre_ptr,  # (rows, 2 * n_inner) saved [g | u]; overwritten with [dg | du]
    pre_rows,  # (BLOCK_M,) int64: row of pre (and of act) each tile row owns
    act_ptr,  # (rows, n_inner) out: scale * silu(g) * u, the down weight's gradient operand
    scale,  # (BLOCK_M,) fp32: routing weight of each row (1 for the shared MLP)
    partial_ptr,  # (T*K, n_tiles) fp32 out when WITH_PARTIAL: d(routing weight) per column tile
    partial_rows,  # (BLOCK_M,) int64: slot of each row
    n_partial,  # columns of partial: cdiv(I, BLOCK_N)
    n_inner,
    H,
    stride_dyt,
    stride_wh,
    stride_pre,
    stride_act,
    pid_n,
    WITH_PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """da = dY[dy_rows] @ W (one GEMM), then the SwiGLU backward in the epilogue:
    dg = scale da u silu'(g), du = scale da silu(g), d scale = sum_n silu(g) u da."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < n_inner
    offs_k = tl.arange(0, BLOCK_K)
    dy_ptrs = dy_ptr + dy_rows[:, None] * stride_dyt + offs_k[None, :]
    # W is (H, n_inner): its (k, n) block is already the (BLOCK_K, BLOCK_N) operand.
    w_ptrs = w_ptr + offs_k.to(tl.int64)[:, None] * stride_wh + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = offs_k < H - k0
        dy = tl.load(dy_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter cannot multiply bf16
            dy, w = dy.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        dy_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wh
    mask = row_mask[:, None] & col_mask[None, :]
    pre_ptrs = pre_ptr + pre_rows[:, None] * stride_pre + offs_n[None, :]
    g = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(pre_ptrs + n_inner, mask=mask, other=0.0).to(tl.float32)
    # Ordered so that each fp32 tile dies as early as possible (registers are the limit here).
    sig = tl.sigmoid(g)
    silu = g * sig
    act = silu * u
    if WITH_PARTIAL:
        partial = tl.sum(tl.where(mask, act * acc, 0.0), axis=1)
        tl.store(partial_ptr + partial_rows * n_partial + pid_n, partial, mask=row_mask)
    act_ptrs = act_ptr + pre_rows[:, None] * stride_act + offs_n[None, :]
    tl.store(act_ptrs, (act * scale[:, None]).to(act_ptr.dtype.element_ty), mask=mask)
    d_act = acc * scale[:, None]
    # In place: this program is the only reader and writer of these elements.
    tl.store(pre_ptrs + n_inner, (d_act * silu).to(pre_ptr.dtype.element_ty), mask=mask)
    tl.store(pre_ptrs, (d_act * u * sig * (1.0 + g * (1.0 - sig))).to(pre_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_swiglu_kernel(
    dy_ptr,  # (T, H) gradient of the layer output
    w_down_ptr,  # (E, H, I)
    w_shared_down_ptr,  # (H, S) (unread when SHARED is off)
    topk_weights_ptr,  # (T*K,) fp32: routing weight of each slot
    pre_routed_ptr,  # (T*K, 2I) saved routed [g | u] by sorted row; overwritten with [dg | du]
    pre_shared_ptr,  # (T, 2S) the same for the shared MLP
    act_routed_ptr,  # (T*K, I) out: w * silu(g) * u by sorted row
    act_shared_ptr,  # (T, S) out: silu(g) * u
    partial_ptr,  # (T*K, cdiv(I, BLOCK_N)) fp32 out: per I-tile partial d(routing weight), by slot
    sorted_slot_ptr,  # (T*K,) int32
    tile_expert_ptr,  # (max_tiles,) int32, < 0 past the last
    tile_row_start_ptr,  # (max_tiles,) int32
    expert_offsets_ptr,  # (E+1,) int32
    T,
    H,
    I,
    S,
    top_k,
    max_tiles,
    stride_dyt,
    stride_de,
    stride_dh,
    stride_sh,
    stride_pr,
    stride_ps,
    stride_ar,
    stride_as,
    SHARED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (max_tiles * cdiv(I, BLOCK_N) + [SHARED] cdiv(T, BLOCK_M) * cdiv(S, BLOCK_N),).

    Programs [0, routed) own one (routed tile, I column tile); the rest one (token tile, S column
    tile) of the shared MLP. Both read the same dY in one launch, as the forward reads X."""
    pid = tl.program_id(0)
    n_tiles_i = tl.cdiv(I, BLOCK_N)
    num_routed = max_tiles * n_tiles_i
    offs_m = tl.arange(0, BLOCK_M)
    if pid < num_routed:
        tile = pid // n_tiles_i
        expert = tl.load(tile_expert_ptr + tile)
        if expert >= 0:
            rows, row_mask, slots = _tile_rows(
                tile, sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr, expert, BLOCK_M
            )
            scale = tl.load(topk_weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
            _swiglu_bwd_tile(
                dy_ptr, (slots // top_k).to(tl.int64), row_mask,
                w_down_ptr + expert.to(tl.int64) * stride_de,
                pre_routed_ptr, rows.to(tl.int64), act_routed_ptr, scale,
                partial_ptr, slots.to(tl.int64), n_tiles_i,
                I, H, stride_dyt, stride_dh, stride_pr, stride_ar, pid % n_tiles_i, True,
                BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
            )  # fmt: skip
    elif SHARED:
        local = pid - num_routed
        n_tiles_s = tl.cdiv(S, BLOCK_N)
        tokens = (local // n_tiles_s) * BLOCK_M + offs_m
        token_mask = tokens < T
        tokens = tokens.to(tl.int64)
        _swiglu_bwd_tile(
            dy_ptr, tokens, token_mask, w_shared_down_ptr,
            pre_shared_ptr, tokens, act_shared_ptr, tl.full((BLOCK_M,), 1.0, tl.float32),
            partial_ptr, tokens, n_tiles_i,
            S, H, stride_dyt, stride_sh, stride_ps, stride_as, local % n_tiles_s, False,
            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
        )  # fmt: skip


@triton.jit
def _dx_tile(
    dgu_ptr,  # (rows, 2 * n_inner) [dg | du]
    dgu_rows,  # (BLOCK_M,) int64
    row_mask,  # (BLOCK_M,) bool
    gate_ptr,  # (n_inner, H) this program's gate weight
    up_ptr,  # (n_inner, H) this program's up weight
    out_ptr,  # (rows', H) out
    out_rows,  # (BLOCK_M,) int64
    n_inner,
    H,
    stride_dgu,
    stride_wk,
    stride_out,
    pid_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[out_rows, n-tile] = dg @ W_gate + du @ W_up, fp32 accumulate."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    dg_ptrs = dgu_ptr + dgu_rows[:, None] * stride_dgu + offs_k[None, :]
    # W is (n_inner, H): its (k, n) block is the (BLOCK_K, BLOCK_N) operand.
    w_offs = offs_k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_inner, BLOCK_K):
        k_mask = offs_k < n_inner - k0
        a_mask = row_mask[:, None] & k_mask[None, :]
        d_g = tl.load(dg_ptrs, mask=a_mask, other=0.0)
        d_u = tl.load(dg_ptrs + n_inner, mask=a_mask, other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w_g = tl.load(gate_ptr + w_offs, mask=w_mask, other=0.0)
        w_u = tl.load(up_ptr + w_offs, mask=w_mask, other=0.0)
        if UPCAST:
            d_g, d_u, w_g, w_u = d_g.to(tl.float32), d_u.to(tl.float32), w_g.to(tl.float32), w_u.to(tl.float32)
        acc = tl.dot(d_g, w_g, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(d_u, w_u, acc, input_precision=DOT_PRECISION)
        dg_ptrs += BLOCK_K
        w_offs += BLOCK_K * stride_wk
    out_ptrs = out_ptr + out_rows[:, None] * stride_out + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _bwd_dx_kernel(
    dgu_routed_ptr,  # (T*K, 2I) from _bwd_swiglu_kernel, sorted rows
    dgu_shared_ptr,  # (T, 2S)
    w_gate_ptr,  # (E, I, H) view
    w_up_ptr,  # (E, I, H) view
    w_shared_gate_ptr,  # (S, H)
    w_shared_up_ptr,  # (S, H)
    dx_routed_ptr,  # (T*K, H) out: each slot's share of dX, slot order
    dx_shared_ptr,  # (T, H) out: the shared MLP's share
    sorted_slot_ptr,  # (T*K,) int32
    tile_expert_ptr,  # (max_tiles,) int32
    tile_row_start_ptr,  # (max_tiles,) int32
    expert_offsets_ptr,  # (E+1,) int32
    T,
    H,
    I,
    S,
    max_tiles,
    stride_gr,
    stride_gs,
    stride_we,
    stride_wk,
    stride_sk,
    stride_dxr,
    stride_dxs,
    SHARED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (max_tiles * cdiv(H, BLOCK_N) + [SHARED] cdiv(T, BLOCK_M) * cdiv(H, BLOCK_N),).

    A routed program owns one (routed tile, H column tile) and writes each row to its slot's own
    row, so the K slots of a token (and the shared MLP's share) are summed afterwards in a fixed
    order; a shared program owns one (token tile, H column tile)."""
    pid = tl.program_id(0)
    n_tiles_h = tl.cdiv(H, BLOCK_N)
    num_routed = max_tiles * n_tiles_h
    offs_m = tl.arange(0, BLOCK_M)
    if pid < num_routed:
        tile = pid // n_tiles_h
        expert = tl.load(tile_expert_ptr + tile)
        if expert >= 0:
            rows, row_mask, slots = _tile_rows(
                tile, sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr, expert, BLOCK_M
            )
            e_offset = expert.to(tl.int64) * stride_we
            _dx_tile(
                dgu_routed_ptr, rows.to(tl.int64), row_mask, w_gate_ptr + e_offset, w_up_ptr + e_offset,
                dx_routed_ptr, slots.to(tl.int64),
                I, H, stride_gr, stride_wk, stride_dxr, pid % n_tiles_h,
                BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
            )  # fmt: skip
    elif SHARED:
        local = pid - num_routed
        tokens = (local // n_tiles_h) * BLOCK_M + offs_m
        token_mask = tokens < T
        tokens = tokens.to(tl.int64)
        _dx_tile(
            dgu_shared_ptr, tokens, token_mask, w_shared_gate_ptr, w_shared_up_ptr,
            dx_shared_ptr, tokens,
            S, H, stride_gs, stride_sk, stride_dxs, local % n_tiles_h,
            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
        )  # fmt: skip


@triton.jit
def _grouped_weight_grad_kernel(
    a_ptr,  # (rows_a, P) left operand rows (gathered by token when A_BY_TOKEN, else sorted rows)
    b_ptr,  # (rows_b, Q) right operand rows (gathered by token when B_BY_TOKEN, else sorted rows)
    out_ptr,  # (E, P, Q) out: per-expert sum over its rows of a_row^T b_row
    sorted_slot_ptr,  # (T*K,) int32
    expert_offsets_ptr,  # (E+1,) int32
    P,
    Q,
    top_k,
    stride_a,
    stride_b,
    stride_oe,
    stride_op,
    A_BY_TOKEN: tl.constexpr,
    B_BY_TOKEN: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (E * cdiv(P, BLOCK_P) * cdiv(Q, BLOCK_Q),). One program owns one (expert, P tile,
    Q tile) of the weight gradient and walks that expert's rows in order: no atomics, so the
    result is deterministic; an expert without rows gets zeros."""
    pid = tl.program_id(0)
    n_p = tl.cdiv(P, BLOCK_P)
    n_q = tl.cdiv(Q, BLOCK_Q)
    expert = pid // (n_p * n_q)
    offs_p = ((pid // n_q) % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (pid % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = offs_p < P
    q_mask = offs_q < Q
    lo = tl.load(expert_offsets_ptr + expert)
    hi = tl.load(expert_offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(lo, hi, BLOCK_R):
        rows = r0 + offs_r
        row_mask = rows < hi
        tokens = (tl.load(sorted_slot_ptr + rows, mask=row_mask, other=0) // top_k).to(tl.int64)
        a_rows = tokens if A_BY_TOKEN else rows.to(tl.int64)
        b_rows = tokens if B_BY_TOKEN else rows.to(tl.int64)
        # A loaded transposed, (BLOCK_P, BLOCK_R): the reduction runs over rows.
        a_mask = row_mask[None, :] & p_mask[:, None]
        a = tl.load(a_ptr + a_rows[None, :] * stride_a + offs_p[:, None], mask=a_mask, other=0.0)
        b_mask = row_mask[:, None] & q_mask[None, :]
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + offs_q[None, :], mask=b_mask, other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + offs_p.to(tl.int64)[:, None] * stride_op + offs_q[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & q_mask[None, :])
