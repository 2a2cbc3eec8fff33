"""Backward of the routed experts: SwiGLU backward fused with the gate/up recompute, dX through
gate/up, and the per-expert weight gradients as grouped GEMMs over the expert-sorted rows. No
atomics: every output element has one owner program, so the gradients are deterministic."""

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
def _bwd_swiglu_kernel(
    x_ptr,  # (T, H) forward input
    dy_ptr,  # (T, H) gradient of the layer output
    w_gate_ptr,  # (E, I, H) view: gate rows of gate_up_proj
    w_up_ptr,  # (E, I, H) view: up rows
    w_down_ptr,  # (E, H, I)
    topk_weights_ptr,  # (T*K,) fp32: routing weight of each slot
    dgu_ptr,  # (T*K, 2I) out: d(gate pre-activation) in [0, I), d(up) in [I, 2I); sorted rows
    act_ptr,  # (T*K, I) out: silu(g) * u, recomputed; sorted rows (for d down_proj)
    d_weight_partial_ptr,  # (T*K, n_tiles_i) fp32 out: per I-tile partial d(routing weight), by slot
    sorted_slot_ptr,  # (T*K,) int32
    tile_expert_ptr,  # (max_tiles,) int32, < 0 past the last
    tile_row_start_ptr,  # (max_tiles,) int32
    expert_offsets_ptr,  # (E+1,) int32
    H,
    I,
    top_k,
    stride_xt,
    stride_dyt,
    stride_we,
    stride_wn,
    stride_de,
    stride_dh,
    stride_dgu,
    stride_act,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (max_tiles * cdiv(I, BLOCK_N),). One program owns one (routed tile, I column tile):
    it recomputes g = x W_g^T and u = x W_u^T, forms da = w * (dy W_d) for its rows, and writes
    dg, du, a = silu(g) u and its share of d(routing weight) = sum_i a * (dy W_d)."""
    pid = tl.program_id(0)
    n_tiles_i = tl.cdiv(I, BLOCK_N)
    tile = pid // n_tiles_i
    pid_n = pid % n_tiles_i
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= 0:
        tile_maps = (sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr)
        rows, row_mask, slots = _tile_rows(tile, *tile_maps, expert, BLOCK_M)
        tokens = (slots // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)
        e64 = expert.to(tl.int64)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < H
            xy_mask = row_mask[:, None] & k_mask[None, :]
            x = tl.load(x_ptr + tokens[:, None] * stride_xt + k[None, :], mask=xy_mask, other=0.0)
            dy = tl.load(dy_ptr + tokens[:, None] * stride_dyt + k[None, :], mask=xy_mask, other=0.0)
            w_mask = k_mask[:, None] & col_mask[None, :]
            w_offs = e64 * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + k[:, None]
            w_g = tl.load(w_gate_ptr + w_offs, mask=w_mask, other=0.0)
            w_u = tl.load(w_up_ptr + w_offs, mask=w_mask, other=0.0)
            # W_d[e] is (H, I): its (k, n) block is already the (BLOCK_K, BLOCK_N) operand.
            d_offs = e64 * stride_de + k.to(tl.int64)[:, None] * stride_dh + offs_n[None, :]
            w_d = tl.load(w_down_ptr + d_offs, mask=w_mask, other=0.0)
            if UPCAST:  # the interpreter cannot multiply bf16
                x, dy = x.to(tl.float32), dy.to(tl.float32)
                w_g, w_u, w_d = w_g.to(tl.float32), w_u.to(tl.float32), w_d.to(tl.float32)
            acc_g = tl.dot(x, w_g, acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(x, w_u, acc_u, input_precision=DOT_PRECISION)
            acc_d = tl.dot(dy, w_d, acc_d, input_precision=DOT_PRECISION)
        sig = tl.sigmoid(acc_g)
        silu = acc_g * sig
        act = silu * acc_u
        out_mask = row_mask[:, None] & col_mask[None, :]
        partial = tl.sum(tl.where(out_mask, act * acc_d, 0.0), axis=1)
        tl.store(d_weight_partial_ptr + slots.to(tl.int64) * n_tiles_i + pid_n, partial, mask=row_mask)
        scale = tl.load(topk_weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
        d_act = acc_d * scale[:, None]
        d_g = d_act * acc_u * sig * (1.0 + acc_g * (1.0 - sig))  # silu'(g) = sig * (1 + g (1 - sig))
        d_u = d_act * silu
        rows64 = rows.to(tl.int64)
        dgu_ptrs = dgu_ptr + rows64[:, None] * stride_dgu + offs_n[None, :]
        tl.store(dgu_ptrs, d_g.to(dgu_ptr.dtype.element_ty), mask=out_mask)
        tl.store(dgu_ptrs + I, d_u.to(dgu_ptr.dtype.element_ty), mask=out_mask)
        act_ptrs = act_ptr + rows64[:, None] * stride_act + offs_n[None, :]
        tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dx_kernel(
    dgu_ptr,  # (T*K, 2I) from _bwd_swiglu_kernel, sorted rows
    w_gate_ptr,  # (E, I, H) view
    w_up_ptr,  # (E, I, H) view
    dx_slot_ptr,  # (T*K, H) out: each slot's share of dX, slot order
    sorted_slot_ptr,  # (T*K,) int32
    tile_expert_ptr,  # (max_tiles,) int32
    tile_row_start_ptr,  # (max_tiles,) int32
    expert_offsets_ptr,  # (E+1,) int32
    H,
    I,
    stride_dgu,
    stride_we,
    stride_wn,
    stride_dx,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (max_tiles * cdiv(H, BLOCK_N),). One program owns one (routed tile, H column tile):
    dx_slot[slot, h] = sum_i dg[row, i] W_g[i, h] + du[row, i] W_u[i, h], written to the slot's own
    row, so the K slots of a token are summed afterwards in a fixed order."""
    pid = tl.program_id(0)
    n_tiles_h = tl.cdiv(H, BLOCK_N)
    tile = pid // n_tiles_h
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= 0:
        tile_maps = (sorted_slot_ptr, tile_row_start_ptr, expert_offsets_ptr)
        rows, row_mask, slots = _tile_rows(tile, *tile_maps, expert, BLOCK_M)
        offs_n = (pid % n_tiles_h) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        rows64 = rows.to(tl.int64)
        e64 = expert.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < I
            a_mask = row_mask[:, None] & k_mask[None, :]
            d_g = tl.load(dgu_ptr + rows64[:, None] * stride_dgu + k[None, :], mask=a_mask, other=0.0)
            d_u = tl.load(dgu_ptr + rows64[:, None] * stride_dgu + I + k[None, :], mask=a_mask, other=0.0)
            # W[e] is (I, H): its (k, n) block is the (BLOCK_K, BLOCK_N) operand.
            w_offs = e64 * stride_we + k.to(tl.int64)[:, None] * stride_wn + offs_n[None, :]
            w_mask = k_mask[:, None] & col_mask[None, :]
            w_g = tl.load(w_gate_ptr + w_offs, mask=w_mask, other=0.0)
            w_u = tl.load(w_up_ptr + w_offs, mask=w_mask, other=0.0)
            if UPCAST:
                d_g, d_u, w_g, w_u = d_g.to(tl.float32), d_u.to(tl.float32), w_g.to(tl.float32), w_u.to(tl.float32)
            acc = tl.dot(d_g, w_g, acc, input_precision=DOT_PRECISION)
            acc = tl.dot(d_u, w_u, acc, input_precision=DOT_PRECISION)
        out_ptrs = dx_slot_ptr + slots.to(tl.int64)[:, None] * stride_dx + offs_n[None, :]
        tl.store(out_ptrs, acc.to(dx_slot_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grouped_weight_grad_kernel(
    a_ptr,  # (rows_a, P) left operand rows (gathered by token when A_BY_TOKEN, else sorted rows)
    b_ptr,  # (rows_b, Q) right operand rows (gathered by token when B_BY_TOKEN, else sorted rows)
    out_ptr,  # (E, P, Q) out: per-expert sum over its rows of a_row^T b_row
    topk_weights_ptr,  # (T*K,) fp32: row scale of A when SCALE_A
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
    SCALE_A: tl.constexpr,
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
        slots = tl.load(sorted_slot_ptr + rows, mask=row_mask, other=0)
        tokens = (slots // top_k).to(tl.int64)
        a_rows = tokens if A_BY_TOKEN else rows.to(tl.int64)
        b_rows = tokens if B_BY_TOKEN else rows.to(tl.int64)
        # A loaded transposed, (BLOCK_P, BLOCK_R): the reduction runs over rows.
        a_mask = row_mask[None, :] & p_mask[:, None]
        a = tl.load(a_ptr + a_rows[None, :] * stride_a + offs_p[:, None], mask=a_mask, other=0.0)
        b_mask = row_mask[:, None] & q_mask[None, :]
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + offs_q[None, :], mask=b_mask, other=0.0)
        if SCALE_A:
            scale = tl.load(topk_weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * scale[None, :]).to(a_ptr.dtype.element_ty)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + offs_p.to(tl.int64)[:, None] * stride_op + offs_q[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & q_mask[None, :])
