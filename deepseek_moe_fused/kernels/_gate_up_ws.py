"""Stage 1 (`_gate_up._gate_up_swiglu_kernel`) on Hopper as a warp-specialized, persistent Gluon
kernel, for a forward whose routed X rows were first gathered into expert-sorted order, so TMA can
box them (Hopper's TMA has no row gather).

`_gate_up_swiglu_kernel` stays the tested twin (Gluon does not run in Triton's interpreter). The
work items, their order and the load warp follow `_rows_matmul_ws`: the shared MLP's token tiles,
then the routing metadata's tiles, each times a column tile of I (or S). Each ring stage holds one
(BLOCK_M, BLOCK_K) box of rows and two (BLOCK_N, BLOCK_K) weight boxes, the gate's and the up's
rows of the same columns, read through (E, I, H) views so a box past row I comes back as zeros
instead of the up rows. The MMA warps keep both accumulators, then write the pre-activations the
backward needs (SAVE_PREACT) and h = silu(gate) * up, masked to the tile's expert's rows.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from ._rows_matmul_ws import _work_item
from ._ws_ring import _invalidate_ring_barriers, _new_ring_barriers


@gluon.jit
def _gate_up_ws_load_partition(
    x_desc,  # (T*K, H) expert-sorted X rows; boxes (BLOCK_M, BLOCK_K)
    gate_desc,  # (E, I, H) routed gate rows; boxes (1, BLOCK_N, BLOCK_K)
    up_desc,  # (E, I, H) routed up rows
    x_s_desc,  # (T, H) X by token, for the shared MLP
    gate_s_desc,  # (1, S, H)
    up_s_desc,  # (1, S, H)
    x_ring,  # smem (STAGES, BLOCK_M, BLOCK_K)
    gate_ring,  # smem (STAGES, 1, BLOCK_N, BLOCK_K)
    up_ring,  # smem (STAGES, 1, BLOCK_N, BLOCK_K)
    ready,  # (STAGES,) mbarriers: a stage's three boxes have landed
    empty,  # (STAGES,) mbarriers: the MMA warps are done with a stage
    tile_expert_ptr,
    tile_row_start_ptr,
    num_items,
    num_shared,
    n_n,
    n_n_s,
    H,
    STAGES: gl.constexpr,
):
    """One warp: the program's work items in order, every reduction step one ring stage."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = gate_desc.block_type.shape[1]
    nbytes: gl.constexpr = x_desc.block_type.nbytes + 2 * gate_desc.block_type.nbytes
    steps = (H + BLOCK_K - 1) // BLOCK_K
    step = 0
    for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
        expert, row0, pid_n = _work_item(item, num_shared, n_n, n_n_s, tile_expert_ptr, tile_row_start_ptr, BLOCK_M)
        n0 = pid_n * BLOCK_N
        if expert >= 0:
            for j in range(steps):
                stage = step % STAGES
                # A fresh barrier counts as having completed the phase before its first: the
                # first pass over the ring waits for nothing.
                mbarrier.wait(empty.index(stage), ((step // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(stage), nbytes)
                k0 = j * BLOCK_K
                bar = ready.index(stage)
                if item < num_shared:
                    tma.async_copy_global_to_shared(x_s_desc, [row0, k0], bar, x_ring.index(stage))
                    tma.async_copy_global_to_shared(gate_s_desc, [expert, n0, k0], bar, gate_ring.index(stage))
                    tma.async_copy_global_to_shared(up_s_desc, [expert, n0, k0], bar, up_ring.index(stage))
                else:
                    tma.async_copy_global_to_shared(x_desc, [row0, k0], bar, x_ring.index(stage))
                    tma.async_copy_global_to_shared(gate_desc, [expert, n0, k0], bar, gate_ring.index(stage))
                    tma.async_copy_global_to_shared(up_desc, [expert, n0, k0], bar, up_ring.index(stage))
                step += 1


@gluon.jit
def _gate_up_ws_mma_partition(
    x_ring,
    gate_ring,
    up_ring,
    ready,
    empty,
    h_ptr,  # (T*K, I) out: routed activations, sorted rows
    h_s_ptr,  # (T, S) out: shared activations
    pre_ptr,  # (T*K, 2I) out when SAVE_PREACT: routed [gate | up] pre-activations, sorted rows
    pre_s_ptr,  # (T, 2S) out when SAVE_PREACT: the shared MLP's
    tile_expert_ptr,
    tile_row_start_ptr,
    expert_offsets_ptr,  # (E+1,) int32
    T,
    num_items,
    num_shared,
    n_n,
    n_n_s,
    H,
    I,
    S,
    stride_h,
    stride_h_s,
    stride_pre,
    stride_pre_s,
    alpha,  # runtime 1.0: a product before the bf16 conversion (ptxas otherwise serializes the wgmma chain)
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr,
    SAVE_PREACT: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Per work item: gate and up accumulators (BLOCK_M, BLOCK_N) fp32 over the H reduction, each
    step's two wgmmas left in flight while the next stage is awaited; then the epilogue."""
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    # Stores: each warp writes whole 16-byte pieces of a row's columns.
    threads_n: gl.constexpr = BLOCK_N // 8 if BLOCK_N < 256 else 32
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // threads_n, threads_n], [num_warps, 1], [1, 0])
    steps = (H + BLOCK_K - 1) // BLOCK_K
    step = 0
    for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
        expert, row0, pid_n = _work_item(item, num_shared, n_n, n_n_s, tile_expert_ptr, tile_row_start_ptr, BLOCK_M)
        if expert >= 0:
            shared = item < num_shared
            acc_gate = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, mma_layout)
            acc_up = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, mma_layout)
            in_flight = 0  # the stage of the products still running
            for i in range(steps):
                stage = step % STAGES
                mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
                x = x_ring.index(stage)
                gate = gate_ring.index(stage).reshape([BLOCK_N, BLOCK_K]).permute((1, 0))
                up = up_ring.index(stage).reshape([BLOCK_N, BLOCK_K]).permute((1, 0))
                acc_gate = warpgroup_mma(x, gate, acc_gate, is_async=True)
                acc_up = warpgroup_mma(x, up, acc_up, is_async=True)
                # The previous step's pair is done: its stage goes back to the loader.
                acc_gate, acc_up = warpgroup_mma_wait(num_outstanding=2, deps=(acc_gate, acc_up))
                mbarrier.arrive(empty.index(in_flight), count=1, pred=i > 0)
                in_flight = stage
                step += 1
            acc_gate, acc_up = warpgroup_mma_wait(num_outstanding=0, deps=(acc_gate, acc_up))
            mbarrier.arrive(empty.index(in_flight), count=1, pred=steps > 0)
            if shared:
                row_end = T
                n_cols = S
                out_h, out_pre, s_h, s_pre = h_s_ptr, pre_s_ptr, stride_h_s, stride_pre_s
            else:
                row_end = gl.load(expert_offsets_ptr + expert + 1)
                n_cols = I
                out_h, out_pre, s_h, s_pre = h_ptr, pre_ptr, stride_h, stride_pre
            _swiglu_epilogue(
                acc_gate * alpha, acc_up * alpha, row0, row_end, pid_n * BLOCK_N, n_cols, out_h, out_pre, s_h, s_pre,
                store_layout, BLOCK_M, BLOCK_N, SAVE_PREACT,
            )  # fmt: skip


@gluon.jit
def _swiglu_epilogue(
    gate,  # (BLOCK_M, BLOCK_N) fp32 pre-activations
    up,
    row0,
    row_end,  # the tile's expert's last row + 1 (T for the shared MLP)
    n0,
    n_cols,
    h_ptr,
    pre_ptr,
    stride_h,
    stride_pre,
    store_layout: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    SAVE_PREACT: gl.constexpr,
):
    """h = silu(gate) * up from the fp32 accumulators, one rounding each, as the Triton twin does;
    rows past the tile's expert (the next expert's, read by the box) and columns past n_cols are
    not written."""
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store_layout))
    cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store_layout))
    mask = (rows < row_end)[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(gl.int64)[:, None]
    h = gate / (1.0 + gl.exp(-gate)) * up
    if SAVE_PREACT:
        pre = pre_ptr + rows * stride_pre + cols[None, :]
        gl.store(pre, gl.convert_layout(gate.to(pre_ptr.dtype.element_ty), store_layout), mask=mask)
        gl.store(pre + n_cols, gl.convert_layout(up.to(pre_ptr.dtype.element_ty), store_layout), mask=mask)
    h_out = h_ptr + rows * stride_h + cols[None, :]
    gl.store(h_out, gl.convert_layout(h.to(h_ptr.dtype.element_ty), store_layout), mask=mask)


@gluon.jit
def _gate_up_ws_kernel(
    x_desc,  # (T*K, H) 16-bit, expert-sorted X rows; boxes (BLOCK_M, BLOCK_K)
    gate_desc,  # (E, I, H) view of the routed gate rows; boxes (1, BLOCK_N, BLOCK_K)
    up_desc,  # (E, I, H) view of the routed up rows
    x_s_desc,  # (T, H) X by token (the shared MLP's rows)
    gate_s_desc,  # (1, S, H)
    up_s_desc,  # (1, S, H)
    h_ptr,  # (T*K, I) out, sorted rows
    h_s_ptr,  # (T, S) out
    pre_ptr,  # (T*K, 2I) out when SAVE_PREACT
    pre_s_ptr,  # (T, 2S) out when SAVE_PREACT
    tile_expert_ptr,  # (max_tiles,) int32, < 0 past the last
    tile_row_start_ptr,  # (max_tiles,) int32
    expert_offsets_ptr,  # (E+1,) int32
    T,
    num_items,  # shared items (token tiles x n_n_s, 0 without the shared MLP) + routed (max_tiles x n_n)
    num_shared,
    n_n,  # cdiv(I, BLOCK_N)
    n_n_s,  # cdiv(S, BLOCK_N)
    H,
    I,
    S,
    stride_h,
    stride_h_s,
    stride_pre,
    stride_pre_s,
    alpha,
    STAGES: gl.constexpr,
    SAVE_PREACT: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Grid: (min(num_items, SMs),), persistent; program i owns items i, i + grid, ... One load
    warp and one MMA partition of BLOCK_M // 16 warps. Each output element has one owner and one
    reduction order: deterministic, no atomics."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = gate_desc.block_type.shape[1]
    x_ring = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    gate_ring = gl.allocate_shared_memory(gate_desc.dtype, [STAGES, 1, BLOCK_N, BLOCK_K], gate_desc.layout)
    up_ring = gl.allocate_shared_memory(up_desc.dtype, [STAGES, 1, BLOCK_N, BLOCK_K], up_desc.layout)
    ready, empty = _new_ring_barriers(STAGES, 1)
    gl.warp_specialize(
        [
            (_gate_up_ws_mma_partition, (x_ring, gate_ring, up_ring, ready, empty, h_ptr, h_s_ptr, pre_ptr, pre_s_ptr,
                tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, T, num_items, num_shared, n_n, n_n_s, H, I,
                S, stride_h, stride_h_s, stride_pre, stride_pre_s, alpha, BLOCK_M, BLOCK_N, BLOCK_K, STAGES,
                SAVE_PREACT, num_warps)),
            (_gate_up_ws_load_partition, (x_desc, gate_desc, up_desc, x_s_desc, gate_s_desc, up_s_desc, x_ring,
                gate_ring, up_ring, ready, empty, tile_expert_ptr, tile_row_start_ptr, num_items, num_shared, n_n,
                n_n_s, H, STAGES)),
        ],
        [1],  # the load partition: one warp
        [40],  # its registers (a few scalars); the MMA warps get the rest
    )  # fmt: skip
    _invalidate_ring_barriers(ready, empty, STAGES)
