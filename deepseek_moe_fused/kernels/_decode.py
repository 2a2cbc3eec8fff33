"""The decode forward: two launches, slot-major, no routing metadata.

At a few tokens every touched expert serves about one row, so the expert-sorted tiles of the
three-stage forward buy nothing: each program here owns one slot's (or one token's shared) row
and reads its expert straight from topk_ids. The products are matrix-vector ones on the CUDA
cores; what bounds them is streaming the weights, which both layouts read once per slot. The
down launch sums a token's slots and its shared MLP in registers, so there is no combine.
"""

import triton
import triton.language as tl


@triton.jit
def _row_times_weight_tiles(
    v_ptr,  # (n_red,) one activation row
    w_ptr,  # (n_cols, n_red) weight rows, contiguous along n_red
    w2_ptr,  # (n_cols, n_red) a second weight with w's strides (read when TWO)
    n_red,
    stride_wn,
    offs_n,  # (BLOCK_N,) int64: weight rows this program owns
    n_mask,  # (BLOCK_N,) bool: which of them exist
    TWO: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(w @ v, w2 @ v) over the rows offs_n, fp32; the second is zeros without TWO. The partial
    products stay a (BLOCK_N, BLOCK_K) tile until the loop ends: one reduction, not one a step."""
    offs_k = tl.arange(0, BLOCK_K)
    w_offs = offs_n[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, n_red, BLOCK_K):
        k_mask = offs_k < n_red - k0
        w_mask = n_mask[:, None] & k_mask[None, :]
        v = tl.load(v_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32) * v[None, :]
        if TWO:
            acc2 += tl.load(w2_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32) * v[None, :]
        w_offs += BLOCK_K
    return tl.sum(acc, axis=1), tl.sum(acc2, axis=1)


@triton.jit
def _decode_gate_up_kernel(
    x_ptr,  # (T, H) activations
    topk_ids_ptr,  # (T*K,) int32/int64: expert of each slot (token * K + k)
    w_gate_up_ptr,  # (E, 2I, H): gate rows [0, I) then up rows [I, 2I) of each routed expert
    w_shared_gate_ptr,  # (S, H) shared MLP gate (unread when SHARED is off)
    w_shared_up_ptr,  # (S, H) shared MLP up, strides as the gate's
    h_routed_ptr,  # (T*K, I) out: SwiGLU activations in slot order
    h_shared_ptr,  # (T, S) out: the shared MLP's
    T,
    top_k,
    H,
    I,
    S,
    stride_xt,
    stride_we,
    stride_wn,
    stride_sn,
    stride_hr,
    stride_hs,
    ROUTED: tl.constexpr,  # off: the shared MLP alone (the unfused ablation's second launch)
    SHARED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid: ([ROUTED] T*K * cdiv(I, BLOCK_N) + [SHARED] T * cdiv(S, BLOCK_N),).

    The routed programs (the first T*K * cdiv(I, BLOCK_N), none without ROUTED) own BLOCK_N
    columns of one slot's h, the rest BLOCK_N columns of one token's shared h. Consecutive
    programs take the same columns of different slots, so slots that picked the same expert read
    its weight tile at about the same time and the second read comes from L2.
    """
    pid = tl.program_id(0)
    num_slots = T * top_k
    num_routed = num_slots * tl.cdiv(I, BLOCK_N) if ROUTED else 0
    if pid < num_routed:
        slot = pid % num_slots
        expert = tl.load(topk_ids_ptr + slot).to(tl.int64)
        x_row = x_ptr + (slot // top_k).to(tl.int64) * stride_xt
        gate = w_gate_up_ptr + expert * stride_we
        up = gate + I * stride_wn
        h_row = h_routed_ptr + slot.to(tl.int64) * stride_hr
        n_cols, stride_n, pid_n = I, stride_wn, pid // num_slots
    else:
        local = pid - num_routed
        token = (local % T).to(tl.int64)
        x_row = x_ptr + token * stride_xt
        gate, up = w_shared_gate_ptr, w_shared_up_ptr
        h_row = h_shared_ptr + token * stride_hs
        n_cols, stride_n, pid_n = S, stride_sn, local // T
    if pid < num_routed or SHARED:
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_cols
        g, u = _row_times_weight_tiles(x_row, gate, up, H, stride_n, offs_n, n_mask, True, BLOCK_N, BLOCK_K)
        h = g * tl.sigmoid(g) * u
        tl.store(h_row + offs_n, h.to(h_row.dtype.element_ty), mask=n_mask)


@triton.jit
def _decode_down_kernel(
    h_routed_ptr,  # (T*K, I) SwiGLU activations in slot order
    h_shared_ptr,  # (T, S) the shared MLP's (unread when SHARED is off)
    topk_ids_ptr,  # (T*K,) int32/int64: expert of each slot
    topk_weights_ptr,  # (T*K,) routing weight of each slot
    w_down_ptr,  # (E, H, I) routed down weights
    w_shared_down_ptr,  # (H, S) shared MLP down weight
    out_ptr,  # (T, H) out: the layer's experts output
    T,
    H,
    I,
    S,
    stride_hr,
    stride_hs,
    stride_we,
    stride_wh,
    stride_sh,
    stride_ot,
    TOP_K: tl.constexpr,  # unrolled: every slot's weight loads can be in flight at once
    ROUTED: tl.constexpr,  # off: the shared MLP alone (the unfused ablation)
    SHARED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid: (T * cdiv(H, BLOCK_N),); one program owns BLOCK_N output columns of one token.

    out[t] = sum_k w[t, k] * (h[t, k] @ W_down[e[t, k]]^T) [ROUTED] + h_shared[t] @ W_shared_down^T
    [SHARED], in fp32, slot 0 first and the shared MLP last (the combine's order), rounded once at
    the store.
    """
    pid = tl.program_id(0)
    token = pid % T
    offs_n = (pid // T).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in tl.static_range(TOP_K if ROUTED else 0):
        slot = token * TOP_K + k
        expert = tl.load(topk_ids_ptr + slot).to(tl.int64)
        weight = tl.load(topk_weights_ptr + slot).to(tl.float32)
        h_row = h_routed_ptr + slot.to(tl.int64) * stride_hr
        y, _ = _row_times_weight_tiles(
            h_row, w_down_ptr + expert * stride_we, w_down_ptr, I, stride_wh, offs_n, n_mask, False, BLOCK_N, BLOCK_K
        )
        acc += weight * y
    if SHARED:
        h_row = h_shared_ptr + token.to(tl.int64) * stride_hs
        y, _ = _row_times_weight_tiles(
            h_row, w_shared_down_ptr, w_shared_down_ptr, S, stride_sh, offs_n, n_mask, False, BLOCK_N, BLOCK_K
        )
        acc += y
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
