"""The router: logits = X W^T in fp32, then the DeepSeek top-k selection, on device.

One launch when one program can hold every expert's logits for its tokens and the token tiles
fill the card; otherwise two: a logits GEMM tiled over experts (and over H for few tokens), then
the selection over whole rows.
"""

import triton
import triton.language as tl


@triton.jit
def _select_top_k(
    logits,  # (BLOCK_T, BLOCK_E) fp32: every expert's logit of BLOCK_T tokens, columns >= E unused
    bias_ptr,  # (E,) fp32 score correction bias, read when HAS_BIAS
    topk_weights_ptr,  # (T, K) fp32 out
    topk_ids_ptr,  # (T, K) int64 out
    rows,  # (BLOCK_T,) int64: the tokens
    row_mask,  # (BLOCK_T,) bool: tokens that exist
    routed_scaling_factor,
    E,
    K,
    N_GROUP,
    TOPK_GROUP,
    SIGMOID: tl.constexpr,
    GROUPED: tl.constexpr,
    NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Writes each token's K expert ids (best first, ties to the lower id) and routing weights.

    sigmoid: choose by sigmoid + bias within the best groups (group score = its two best biased
    scores), weigh by the unbiased sigmoid. softmax: choose and weigh by softmax, dropped groups
    scored 0 (as transformers does). Then optional renormalisation and the scaling factor.
    """
    cols = tl.arange(0, BLOCK_E)
    valid = (cols < E)[None, :]
    if SIGMOID:
        scores = tl.sigmoid(logits)
        choice = scores
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + cols, mask=cols < E, other=0.0)[None, :]
    else:
        shifted = tl.where(valid, logits, float("-inf"))
        exps = tl.exp(shifted - tl.max(shifted, axis=1)[:, None])
        scores = exps / tl.sum(exps, axis=1)[:, None]
        choice = scores
    choice = tl.where(valid, choice, float("-inf"))
    if GROUPED:
        per_group = E // N_GROUP
        group_of = cols // per_group
        group_cols = tl.arange(0, BLOCK_G)
        group_score = tl.full((choice.shape[0], BLOCK_G), float("-inf"), tl.float32)
        for g in range(N_GROUP):
            member = tl.where((group_of == g)[None, :], choice, float("-inf"))
            best = tl.max(member, axis=1)
            if SIGMOID:  # the sum of the group's two best (a one-expert group: its one)
                first = tl.argmax(member, axis=1, tie_break_left=True)
                second = tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), member), axis=1)
                best += tl.where(per_group >= 2, second, 0.0)
            group_score = tl.where(group_cols[None, :] == g, best[:, None], group_score)
        kept = tl.zeros(choice.shape, tl.int1)
        for _ in range(TOPK_GROUP):
            top = tl.argmax(group_score, axis=1, tie_break_left=True)
            kept |= group_of[None, :] == top[:, None]
            group_score = tl.where(group_cols[None, :] == top[:, None], float("-inf"), group_score)
        if SIGMOID:
            choice = tl.where(kept, choice, float("-inf"))
        else:
            scores = tl.where(kept, scores, 0.0)
            choice = tl.where(valid, scores, float("-inf"))
    k_cols = tl.arange(0, BLOCK_K)
    weights = tl.zeros((choice.shape[0], BLOCK_K), tl.float32)
    ids = tl.zeros((choice.shape[0], BLOCK_K), tl.int32)
    for k in range(K):
        # A NaN logit makes the choice arbitrary; the clamp keeps even that id in range.
        best = tl.minimum(tl.argmax(choice, axis=1, tie_break_left=True), E - 1)
        hit = cols[None, :] == best[:, None]
        weight = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        choice = tl.where(hit, float("-inf"), choice)
        weights = tl.where(k_cols[None, :] == k, weight[:, None], weights)
        ids = tl.where(k_cols[None, :] == k, best[:, None], ids)
    if NORM:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    weights = weights * routed_scaling_factor
    out_offs = rows[:, None] * K + k_cols[None, :]
    out_mask = row_mask[:, None] & (k_cols < K)[None, :]
    tl.store(topk_weights_ptr + out_offs, weights, mask=out_mask)
    tl.store(topk_ids_ptr + out_offs, ids.to(tl.int64), mask=out_mask)


@triton.jit
def _router_logits_kernel(
    x_ptr,  # (T, H) activations
    w_ptr,  # (E, H) router weight
    bias_ptr,  # (E,) fp32 score correction bias, read when SELECT and HAS_BIAS
    logits_ptr,  # (splits, T, E) fp32 out: the logits, or with several splits one partial sum per split of H
    topk_weights_ptr,  # (T, K) fp32 out when SELECT
    topk_ids_ptr,  # (T, K) int64 out when SELECT
    T,
    H,
    h_per_split,  # columns of H each split sums, a multiple of BLOCK_H
    stride_xt,
    stride_we,
    routed_scaling_factor,
    E,
    K,
    N_GROUP,
    TOPK_GROUP,
    SIGMOID: tl.constexpr,
    GROUPED: tl.constexpr,
    NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SELECT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (cdiv(T, BLOCK_T), cdiv(E, BLOCK_E), splits of H).

    One program owns the logits of BLOCK_T tokens x BLOCK_E experts over one split of H (fp32
    accumulate: products of 16-bit inputs are exact in fp32, as in transformers' fp32 linear).
    Splitting H fills the SMs when T and E give few tiles (decode); the selection kernel adds the
    splits in a fixed order. With SELECT (one split, BLOCK_E covering every expert) the program
    also selects its tokens' top-k.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    col_mask = cols < E
    h_start = tl.program_id(2) * h_per_split
    h_end = tl.minimum(H, h_start + h_per_split)
    offs_h = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + rows[:, None] * stride_xt + (h_start + offs_h)[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_we + (h_start + offs_h)[:, None]
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for h0 in range(h_start, h_end, BLOCK_H):
        h_mask = offs_h < h_end - h0
        x = tl.load(x_ptrs, mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=h_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter cannot multiply bf16; mixed dtypes meet in fp32
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    out_ptrs = logits_ptr + tl.program_id(2).to(tl.int64) * T * E + rows[:, None] * E + cols[None, :]
    tl.store(out_ptrs, acc, mask=row_mask[:, None] & col_mask[None, :])
    if SELECT:
        _select_top_k(
            acc, bias_ptr, topk_weights_ptr, topk_ids_ptr, rows, row_mask, routed_scaling_factor,
            E, K, N_GROUP, TOPK_GROUP, SIGMOID, GROUPED, NORM, HAS_BIAS, BLOCK_E, BLOCK_K, BLOCK_G,
        )  # fmt: skip


@triton.jit
def _router_select_kernel(
    partial_ptr,  # (num_splits, T, E) fp32: partial logits over splits of H (one split: the logits)
    logits_ptr,  # (T, E) fp32 out when num_splits > 1: their sum
    bias_ptr,  # (E,) fp32 score correction bias, read when HAS_BIAS
    topk_weights_ptr,  # (T, K) fp32 out
    topk_ids_ptr,  # (T, K) int64 out
    T,
    num_splits,
    routed_scaling_factor,
    E,
    K,
    N_GROUP,
    TOPK_GROUP,
    SIGMOID: tl.constexpr,
    GROUPED: tl.constexpr,
    NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Grid: (cdiv(T, BLOCK_T),). One program selects the top-k of BLOCK_T tokens (whole rows)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask = row_mask[:, None] & (cols < E)[None, :]
    offs = rows[:, None] * E + cols[None, :]
    logits = tl.load(partial_ptr + offs, mask=mask, other=0.0)
    if num_splits > 1:
        for split in range(1, num_splits):  # in order: the same logits on every run
            logits += tl.load(partial_ptr + split * T * E + offs, mask=mask, other=0.0)
        tl.store(logits_ptr + offs, logits, mask=mask)
    _select_top_k(
        logits, bias_ptr, topk_weights_ptr, topk_ids_ptr, rows, row_mask, routed_scaling_factor,
        E, K, N_GROUP, TOPK_GROUP, SIGMOID, GROUPED, NORM, HAS_BIAS, BLOCK_E, BLOCK_K, BLOCK_G,
    )  # fmt: skip
