"""The row-tiled grouped GEMM (`_rows_matmul._rows_matmul_kernel`) on Hopper as a warp-specialized,
persistent Gluon kernel, for launches whose left operand rows are contiguous: dX ([dG | dU] in
sorted-row order) and the forward's down projection (the SwiGLU outputs).

`_rows_matmul_kernel` stays the tested twin (Gluon does not run in Triton's interpreter). One load
warp walks the program's work items (a routed tile of the routing metadata, or a token tile of
the shared MLP, times a column tile) and their reduction steps, and keeps a ring of TMA boxes
full: a (BLOCK_M, BLOCK_K) box of the left operand's rows and a box of the expert's weight. The
MMA warps run the wgmma chain one step behind and write each finished tile from registers,
masked to the rows that exist and scattered to their output rows (slots). So the next item's
boxes are in flight while this item's last products and its epilogue run (Nsight Compute found
the Triton kernel waiting on load latency with no unit busy: docs/perf-notes.md, session 10).
With two MMA partitions of one warpgroup each, they either take the items in turn, as the
weight-gradient kernel's do, or each own half of every item's rows (`SPLIT_M`), so that an
expert's short last tile runs the products of one half only. The layer runs the one-partition
form (kernels/_tiles.py `ROWS_WS`); the other two measured no faster where it runs.

Weights are read through 3-D descriptors over (E, rows, cols) views, so a box never reaches into
the next expert's weight (TMA fills what lies past a dimension with zeros). With TWO the
reduction runs over a's 2 n_red columns against b's rows, then b2's: the step that crosses a's
column n_red reads b rows past n_red, which come back as zeros, so a's other half adds nothing.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from ._ws_ring import _invalidate_ring_barriers, _invalidate_turn_barriers, _new_ring_barriers, _new_turn_barriers


@gluon.jit
def _work_item(item, num_shared, n_n, n_n_s, tile_expert_ptr, tile_row_start_ptr, BLOCK_M: gl.constexpr):
    """(expert, first row, column tile) of a work item: below `num_shared` a token tile of the
    shared MLP (expert 0 of its one-expert weight views), then a routed tile of the routing
    metadata (expert < 0: a padding tile past the last, skipped). The shared items come first so
    the padding tiles, whose number the host cannot know without a sync, are the last items: the
    static assignment of items to programs then spreads the real ones evenly."""
    if item < num_shared:
        expert = item * 0  # an int32 like the routed branch's
        row0 = (item // n_n_s) * BLOCK_M
        pid_n = item % n_n_s
    else:
        routed = item - num_shared
        tile = routed // n_n
        expert = gl.load(tile_expert_ptr + tile)
        row0 = gl.load(tile_row_start_ptr + tile)
        pid_n = routed % n_n
    return expert, row0, pid_n


@gluon.jit
def _num_steps(n_red, BLOCK_K: gl.constexpr, TWO: gl.constexpr):
    half = (n_red + BLOCK_K - 1) // BLOCK_K
    if TWO:
        return 2 * half
    return half


@gluon.jit
def _load_item(
    a_desc,  # (rows, [2] n_red) boxes (BLOCK_M, BLOCK_K)
    b_desc,  # (E, n_red, n_cols) boxes (1, BLOCK_K, BLOCK_N); B_NK: (E, n_cols, n_red) boxes (1, BLOCK_N, BLOCK_K)
    b2_desc,  # as b_desc: the right operand of a's columns [n_red, 2 n_red) (TWO only)
    a_ring,
    b_ring,
    ready,
    empty,
    row0,
    expert,
    n0,
    n_red,
    step,
    STAGES: gl.constexpr,
    TWO: gl.constexpr,
    B_NK: gl.constexpr,
):
    """Every reduction step of one work item, a ring stage each; returns the ring position after."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    half_steps = (n_red + BLOCK_K - 1) // BLOCK_K
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    for j in range(_num_steps(n_red, BLOCK_K, TWO)):
        stage = step % STAGES
        # A fresh barrier counts as having completed the phase before its first: the first pass
        # over the ring waits for nothing.
        mbarrier.wait(empty.index(stage), ((step // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(stage), nbytes)
        if TWO:
            half = j // half_steps
        else:
            half = 0
        k0 = (j - half * half_steps) * BLOCK_K
        tma.async_copy_global_to_shared(a_desc, [row0, half * n_red + k0], ready.index(stage), a_ring.index(stage))
        if B_NK:
            b_coords = [expert, n0, k0]
        else:
            b_coords = [expert, k0, n0]
        if half == 0:
            tma.async_copy_global_to_shared(b_desc, b_coords, ready.index(stage), b_ring.index(stage))
        else:
            tma.async_copy_global_to_shared(b2_desc, b_coords, ready.index(stage), b_ring.index(stage))
        step += 1
    return step


@gluon.jit
def _rows_ws_load_partition(
    a_desc,
    b_desc,
    b2_desc,
    a_s_desc,  # the shared MLP's operands, as a_desc / b_desc / b2_desc with E = 1
    sb_desc,
    sb2_desc,
    a_ring,  # smem (STAGES, BLOCK_M, BLOCK_K)
    b_ring,  # smem (STAGES, 1, BLOCK_K, BLOCK_N); B_NK: (STAGES, 1, BLOCK_N, BLOCK_K)
    ready,  # (STAGES,) mbarriers: a stage's two boxes have landed
    empty,  # (STAGES,) mbarriers: the MMA warps are done with a stage
    tile_expert_ptr,
    tile_row_start_ptr,
    num_items,
    num_shared,
    n_n,
    n_n_s,
    n_red,
    n_red_s,
    STAGES: gl.constexpr,
    TWO: gl.constexpr,
    B_NK: gl.constexpr,
):
    """One warp: the program's work items in order, every reduction step one ring stage."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    if B_NK:
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[1]
    else:
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[2]
    step = 0
    for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
        expert, row0, pid_n = _work_item(item, num_shared, n_n, n_n_s, tile_expert_ptr, tile_row_start_ptr, BLOCK_M)
        if item < num_shared:
            step = _load_item(
                a_s_desc, sb_desc, sb2_desc, a_ring, b_ring, ready, empty, row0, expert, pid_n * BLOCK_N,
                n_red_s, step, STAGES, TWO, B_NK,
            )  # fmt: skip
        elif expert >= 0:
            step = _load_item(
                a_desc, b_desc, b2_desc, a_ring, b_ring, ready, empty, row0, expert, pid_n * BLOCK_N,
                n_red, step, STAGES, TWO, B_NK,
            )  # fmt: skip


@gluon.jit
def _rows_ws_mma_partition(
    a_ring,
    b_ring,
    ready,
    empty,
    turn,  # (2,) mbarriers: turn[g] completes a phase when group g may take the ring (ping-pong)
    out_ptr,  # (rows', n_cols) routed output: by slot when OUT_BY_SLOT, else by sorted row
    out_s_ptr,  # (T, n_cols_s) the shared MLP's output
    topk_weights_ptr,  # (T*K,) fp32: routing weight of each slot (SCALE only)
    sorted_slot_ptr,  # (T*K,) int32
    tile_expert_ptr,
    tile_row_start_ptr,
    expert_offsets_ptr,  # (E+1,) int32
    T,
    num_items,
    num_shared,
    n_n,
    n_n_s,
    n_red,
    n_red_s,
    n_cols,
    n_cols_s,
    stride_out,
    stride_out_s,
    alpha,  # runtime 1.0: a product before the bf16 conversion (ptxas otherwise serializes the wgmma chain)
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr,
    TWO: gl.constexpr,
    B_NK: gl.constexpr,
    SCALE: gl.constexpr,
    OUT_BY_SLOT: gl.constexpr,
    GROUP: gl.constexpr,  # this partition's index
    GROUPS: gl.constexpr,  # MMA partitions (1 or 2)
    SPLIT_M: gl.constexpr,  # two partitions: each owns half the rows of every item; else they take items in turn
    num_warps: gl.constexpr,
):
    """Per work item it works on: acc (rows, BLOCK_N) fp32 = sum over the reduction steps of
    a_step @ b_step, each wgmma left in flight while the next stage is awaited; then the rows that
    exist, times their routing weight (SCALE), go to their output rows. With SPLIT_M a partition
    whose half of the item has no rows (an expert's last, short tile) skips the products but still
    waits on and releases every stage, so neither partition can run a pass of the ring ahead."""
    if SPLIT_M:
        ROWS: gl.constexpr = BLOCK_M // 2
    else:
        ROWS: gl.constexpr = BLOCK_M
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    # Stores: each warp writes whole 16-byte pieces of a row's columns.
    threads_n: gl.constexpr = BLOCK_N // 8 if BLOCK_N < 256 else 32
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // threads_n, threads_n], [num_warps, 1], [1, 0])
    step = 0  # the ring's position: every step of the program's items, both partitions'
    local = 0  # the program's items with work so far
    for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
        expert, row0, pid_n = _work_item(item, num_shared, n_n, n_n_s, tile_expert_ptr, tile_row_start_ptr, BLOCK_M)
        shared = item < num_shared
        if expert >= 0:
            steps = _num_steps(gl.where(shared, n_red_s, n_red), BLOCK_K, TWO)
            row_end = gl.where(shared, T, gl.load(expert_offsets_ptr + expert + 1))
            if SPLIT_M:
                mine = True
                first = row0 + GROUP * ROWS
                active = first < row_end
            else:
                mine = local % GROUPS == GROUP
                first = row0
                active = True
            if mine:
                if GROUPS > 1 and not SPLIT_M:
                    # Take the ring once the other partition has waited on all of its item's
                    # stages: a parity wait more than one pass ahead of the loader would pass
                    # early (docs/perf-notes.md, session 14). Group 0 goes first.
                    mbarrier.wait(turn.index(GROUP), ((local // GROUPS) & 1) ^ (1 - GROUP))
                if active:
                    acc = gl.zeros((ROWS, BLOCK_N), gl.float32, mma_layout)
                    in_flight = 0  # the stage of the product still running
                    for i in range(steps):
                        stage = step % STAGES
                        mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
                        if B_NK:
                            b = b_ring.index(stage).reshape([BLOCK_N, BLOCK_K]).permute((1, 0))
                        else:
                            b = b_ring.index(stage).reshape([BLOCK_K, BLOCK_N])
                        a = a_ring.index(stage)
                        if SPLIT_M:
                            a = a.slice(GROUP * ROWS, ROWS, dim=0)
                        acc = warpgroup_mma(a, b, acc, is_async=True)
                        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                        mbarrier.arrive(empty.index(in_flight), count=1, pred=i > 0)
                        in_flight = stage
                        step += 1
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                    mbarrier.arrive(empty.index(in_flight), count=1, pred=steps > 0)
                    if GROUPS > 1 and not SPLIT_M:
                        mbarrier.arrive(turn.index(1 - GROUP), count=1)
                    _epilogue(
                        acc, shared, first, row_end, pid_n, out_ptr, out_s_ptr, topk_weights_ptr, sorted_slot_ptr,
                        n_cols, n_cols_s, stride_out, stride_out_s, alpha,
                        mma_layout, store_layout, ROWS, BLOCK_N, SCALE, OUT_BY_SLOT,
                    )  # fmt: skip
                else:  # SPLIT_M, no rows in this half: keep step with the ring
                    for _ in range(steps):
                        stage = step % STAGES
                        mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
                        mbarrier.arrive(empty.index(stage), count=1)
                        step += 1
            else:  # the other partition's item: skip its stages
                step += steps
            local += 1


@gluon.jit
def _epilogue(
    acc,
    shared,
    row0,
    row_end,  # the tile's expert's last row + 1 (T for the shared MLP)
    pid_n,
    out_ptr,
    out_s_ptr,
    topk_weights_ptr,
    sorted_slot_ptr,
    n_cols,
    n_cols_s,
    stride_out,
    stride_out_s,
    alpha,
    mma_layout: gl.constexpr,
    store_layout: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    SCALE: gl.constexpr,
    OUT_BY_SLOT: gl.constexpr,
):
    """One rounding after the scale, as the Triton twin rounds; rows past the tile's expert (the
    next expert's, read by the box) and columns past n_cols are not written."""
    if SCALE:
        acc_rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
        acc_mask = (acc_rows < row_end) & (shared == 0)
        slots = gl.load(sorted_slot_ptr + acc_rows, mask=acc_mask, other=0)
        scale = gl.load(topk_weights_ptr + slots, mask=acc_mask, other=1.0).to(gl.float32)
        acc = acc * (scale * alpha)[:, None]
    else:
        acc = acc * alpha
    y = gl.convert_layout(acc.to(out_ptr.dtype.element_ty), store_layout)
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store_layout))
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store_layout))
    row_mask = rows < row_end
    if shared:
        ptrs = out_s_ptr + rows.to(gl.int64)[:, None] * stride_out_s + cols[None, :]
        gl.store(ptrs, y, mask=row_mask[:, None] & (cols < n_cols_s)[None, :])
    else:
        if OUT_BY_SLOT:
            out_rows = gl.load(sorted_slot_ptr + rows, mask=row_mask, other=0)
        else:
            out_rows = rows
        ptrs = out_ptr + out_rows.to(gl.int64)[:, None] * stride_out + cols[None, :]
        gl.store(ptrs, y, mask=row_mask[:, None] & (cols < n_cols)[None, :])


@gluon.jit
def _rows_matmul_ws_kernel(
    a_desc,  # (T*K, [2] n_red) 16-bit, expert-sorted rows; boxes (BLOCK_M, BLOCK_K)
    b_desc,  # (E, n_red, n_cols) view of the routed right operand; B_NK: (E, n_cols, n_red)
    b2_desc,  # as b_desc (TWO only; else b_desc again)
    a_s_desc,  # (T, [2] n_red_s) the shared MLP's left operand
    sb_desc,  # (1, n_red_s, n_cols_s); B_NK: (1, n_cols_s, n_red_s)
    sb2_desc,
    out_ptr,  # (T*K, n_cols) routed output rows (slots when OUT_BY_SLOT)
    out_s_ptr,  # (T, n_cols_s)
    topk_weights_ptr,  # (T*K,) fp32 (SCALE only)
    sorted_slot_ptr,  # (T*K,) int32
    tile_expert_ptr,  # (max_tiles,) int32, < 0 past the last
    tile_row_start_ptr,  # (max_tiles,) int32
    expert_offsets_ptr,  # (E+1,) int32
    T,
    num_items,  # shared items (token tiles x n_n_s, 0 without the shared MLP) + routed (max_tiles x n_n)
    num_shared,
    n_n,  # cdiv(n_cols, BLOCK_N)
    n_n_s,  # cdiv(n_cols_s, BLOCK_N)
    n_red,
    n_red_s,
    n_cols,
    n_cols_s,
    stride_out,
    stride_out_s,
    alpha,
    STAGES: gl.constexpr,
    TWO: gl.constexpr,
    B_NK: gl.constexpr,
    SCALE: gl.constexpr,
    OUT_BY_SLOT: gl.constexpr,
    GROUPS: gl.constexpr,  # 1: one MMA partition of num_warps warps; 2: two of 4 warps
    SPLIT_M: gl.constexpr,  # with GROUPS == 2: each owns half the rows of every item, else items in turn
    num_warps: gl.constexpr,
):
    """Grid: (min(num_items, SMs),), persistent; program i owns items i, i + grid, ... Each output
    element has one owner and one reduction order: deterministic, no atomics."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    if B_NK:
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[1]
    else:
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[2]
    a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    if B_NK:
        b_ring = gl.allocate_shared_memory(b_desc.dtype, [STAGES, 1, BLOCK_N, BLOCK_K], b_desc.layout)
    else:
        b_ring = gl.allocate_shared_memory(b_desc.dtype, [STAGES, 1, BLOCK_K, BLOCK_N], b_desc.layout)
    # With SPLIT_M both partitions release every stage.
    ready, empty = _new_ring_barriers(STAGES, 2 if SPLIT_M else 1)
    turn = _new_turn_barriers()
    # (Gluon's frontend cannot concatenate tuples holding constexprs: each partition's arguments in full.)
    if GROUPS == 1:
        gl.warp_specialize(
            [
                (_rows_ws_mma_partition, (a_ring, b_ring, ready, empty, turn, out_ptr, out_s_ptr, topk_weights_ptr,
                    sorted_slot_ptr, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, T, num_items,
                    num_shared, n_n, n_n_s, n_red, n_red_s, n_cols, n_cols_s, stride_out, stride_out_s, alpha,
                    BLOCK_M, BLOCK_N, BLOCK_K, STAGES, TWO, B_NK, SCALE, OUT_BY_SLOT, 0, 1, False, num_warps)),
                (_rows_ws_load_partition, (a_desc, b_desc, b2_desc, a_s_desc, sb_desc, sb2_desc, a_ring, b_ring, ready,
                    empty, tile_expert_ptr, tile_row_start_ptr, num_items, num_shared, n_n, n_n_s, n_red, n_red_s,
                    STAGES, TWO, B_NK)),
            ],
            [1],  # the load partition: one warp
            [40],  # its registers (a few scalars); the MMA warps get the rest
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_rows_ws_mma_partition, (a_ring, b_ring, ready, empty, turn, out_ptr, out_s_ptr, topk_weights_ptr,
                    sorted_slot_ptr, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, T, num_items,
                    num_shared, n_n, n_n_s, n_red, n_red_s, n_cols, n_cols_s, stride_out, stride_out_s, alpha,
                    BLOCK_M, BLOCK_N, BLOCK_K, STAGES, TWO, B_NK, SCALE, OUT_BY_SLOT, 0, 2, SPLIT_M, num_warps)),
                (_rows_ws_mma_partition, (a_ring, b_ring, ready, empty, turn, out_ptr, out_s_ptr, topk_weights_ptr,
                    sorted_slot_ptr, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, T, num_items,
                    num_shared, n_n, n_n_s, n_red, n_red_s, n_cols, n_cols_s, stride_out, stride_out_s, alpha,
                    BLOCK_M, BLOCK_N, BLOCK_K, STAGES, TWO, B_NK, SCALE, OUT_BY_SLOT, 1, 2, SPLIT_M, 4)),
                (_rows_ws_load_partition, (a_desc, b_desc, b2_desc, a_s_desc, sb_desc, sb2_desc, a_ring, b_ring, ready,
                    empty, tile_expert_ptr, tile_row_start_ptr, num_items, num_shared, n_n, n_n_s, n_red, n_red_s,
                    STAGES, TWO, B_NK)),
            ],
            [4, 1],  # the second MMA partition, the load warp
            [232, 40],  # two accumulators of 128 registers a thread; the load warp keeps 40
        )  # fmt: skip
    _invalidate_ring_barriers(ready, empty, STAGES)
    _invalidate_turn_barriers(turn)
