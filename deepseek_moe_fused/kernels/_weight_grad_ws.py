"""The routed weight gradients on Hopper as a warp-specialized, persistent Gluon kernel.

Same product as `_backward._grouped_weight_grad_kernel` (out[e] = a_e^T b_e over each expert's
sorted rows), which stays the tested twin: Gluon does not run in Triton's interpreter, so the CPU
tier runs that kernel and the GPU tier runs both against the float64 oracle. One load warp walks
the program's (expert, P tile, Q tile) tiles and their row steps and keeps a ring of TMA boxes
full; one or two MMA warpgroups run the wgmma chain one step behind the loads and store each
finished tile through TMA. So the next tile's boxes are in flight while this tile's last products
and its store run, which one Triton program per tile, a pipeline fill and drain each, cannot
overlap (a program with few row steps per tile is mostly fill and store: docs/perf-notes.md,
session 13). With two warpgroups they take the tiles in turn ("ping-pong"): one's epilogue (the
accumulator's conversion and store) runs beside the other's products.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ._ws_ring import _invalidate_ring_barriers, _invalidate_turn_barriers, _new_ring_barriers, _new_turn_barriers


@gluon.jit
def _tile_coords(tile, n_p, n_q, BLOCK_P: gl.constexpr, BLOCK_Q: gl.constexpr):
    """(expert, first row of d W, first column of d W) of a tile; tiles of one expert are adjacent,
    so the programs working at one time share that expert's rows in L2."""
    per_expert = n_p * n_q
    expert = tile // per_expert
    rest = tile % per_expert
    return expert, (rest // n_q) * BLOCK_P, (rest % n_q) * BLOCK_Q


@gluon.jit
def _ws_load_partition(
    a_desc,  # (T*K, P) boxes (BLOCK_R, BLOCK_P)
    b_desc,  # (T*K, Q) boxes (BLOCK_R, BLOCK_Q)
    a_ring,  # smem (STAGES, BLOCK_R, BLOCK_P)
    b_ring,  # smem (STAGES, BLOCK_R, BLOCK_Q)
    ready,  # (STAGES,) mbarriers: a stage's two boxes have landed
    empty,  # (STAGES,) mbarriers: the MMA warpgroup is done with a stage
    expert_offsets_ptr,  # (E+1,) int32
    num_tiles,
    n_p,
    n_q,
    STAGES: gl.constexpr,
):
    """One warp: every row step of every tile this program owns, in order, one stage each. The
    step that crosses an expert's last row loads whole boxes (the next expert's first rows, or
    zeros past the matrix); the MMA side masks them."""
    BLOCK_R: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_P: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_Q: gl.constexpr = b_desc.block_type.shape[1]
    step = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        expert, p0, q0 = _tile_coords(tile, n_p, n_q, BLOCK_P, BLOCK_Q)
        lo = gl.load(expert_offsets_ptr + expert)
        hi = gl.load(expert_offsets_ptr + expert + 1)
        for r0 in range(lo, hi, BLOCK_R):
            stage = step % STAGES
            # A fresh barrier counts as having completed the phase before its first: the first
            # pass over the ring waits for nothing.
            mbarrier.wait(empty.index(stage), ((step // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(stage), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [r0, p0], ready.index(stage), a_ring.index(stage))
            tma.async_copy_global_to_shared(b_desc, [r0, q0], ready.index(stage), b_ring.index(stage))
            step += 1


@gluon.jit
def _ws_mma_partition(
    a_ring,
    b_ring,
    c_smem,  # smem (GROUPS, 1, BLOCK_P, BLOCK_Q): each warpgroup's tile on its way out
    ready,
    empty,
    turn,  # (2,) mbarriers: turn[g] completes a phase when group g may take the ring (GROUPS == 2)
    out_desc,  # (E, P, Q) boxes (1, BLOCK_P, BLOCK_Q)
    expert_offsets_ptr,
    num_tiles,
    n_p,
    n_q,
    BLOCK_R: gl.constexpr,
    STAGES: gl.constexpr,
    GROUP: gl.constexpr,  # this warpgroup: it takes the program's tiles GROUP, GROUP + GROUPS, ...
    GROUPS: gl.constexpr,  # MMA warpgroups taking the program's tiles in turn (1 or 2)
    num_warps: gl.constexpr,
):
    """One warpgroup: per tile it owns, acc (BLOCK_P, BLOCK_Q) fp32 = sum over the expert's row
    steps of a_step^T b_step, each wgmma left in flight while the next step's stage is awaited (a
    stage is released once the product after it is issued); then the tile goes out through TMA."""
    BLOCK_P: gl.constexpr = out_desc.block_type.shape[1]
    BLOCK_Q: gl.constexpr = out_desc.block_type.shape[2]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_Q, 16]
    )
    # The partial step's a^T goes through registers, where its rows past the expert are zeroed.
    a_reg_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    step_rows = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, a_reg_layout))
    c_out = c_smem.index(GROUP)
    c_tile = c_out.reshape([BLOCK_P, BLOCK_Q])
    step = 0  # the program's row steps so far, both groups' (the ring's position)
    local = 0  # the program's tiles so far
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        expert, p0, q0 = _tile_coords(tile, n_p, n_q, BLOCK_P, BLOCK_Q)
        lo = gl.load(expert_offsets_ptr + expert)
        hi = gl.load(expert_offsets_ptr + expert + 1)
        whole_steps = (hi - lo) // BLOCK_R
        left = hi - lo - whole_steps * BLOCK_R
        if local % GROUPS == GROUP:
            acc = gl.zeros((BLOCK_P, BLOCK_Q), gl.float32, mma_layout)  # an expert without rows: zeros
            if GROUPS > 1:
                # Take the ring once the other group has waited on all of its tile's stages: a
                # parity wait more than one pass of the ring ahead of the loader would pass early.
                # Group 0 goes first (a fresh barrier's phase "before the first" counts as done).
                mbarrier.wait(turn.index(GROUP), ((local // GROUPS) & 1) ^ (1 - GROUP))
            in_flight = 0  # the stage of the product still running
            for i in range(whole_steps):
                stage = step % STAGES
                mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
                acc = warpgroup_mma(a_ring.index(stage).permute((1, 0)), b_ring.index(stage), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                mbarrier.arrive(empty.index(in_flight), count=1, pred=i > 0)
                in_flight = stage
                step += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index(in_flight), count=1, pred=whole_steps > 0)
            if left > 0:
                stage = step % STAGES
                mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
                a = a_ring.index(stage).permute((1, 0)).load(a_reg_layout)
                a = gl.where((step_rows < left)[None, :], a, gl.zeros_like(a))
                acc = warpgroup_mma(a, b_ring.index(stage), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(empty.index(stage), count=1)
                step += 1
            if GROUPS > 1:
                mbarrier.arrive(turn.index(1 - GROUP), count=1)
            tma.store_wait(pendings=0)  # this group's previous tile has left c_out
            c_tile.store(acc.to(out_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [expert, p0, q0], c_out)
        else:  # the other group's tile: skip its stages
            step += (hi - lo + BLOCK_R - 1) // BLOCK_R
        local += 1  # noqa: SIM113 (Gluon's frontend has no enumerate)
    tma.store_wait(pendings=0)


@gluon.jit
def _grouped_weight_grad_ws_kernel(
    a_desc,  # (T*K, P) 16-bit, expert-sorted rows; boxes (BLOCK_R, BLOCK_P)
    b_desc,  # (T*K, Q) same dtype; boxes (BLOCK_R, BLOCK_Q)
    out_desc,  # (E, P, Q) out; boxes (1, BLOCK_P, BLOCK_Q), clipped at P and Q
    expert_offsets_ptr,  # (E+1,) int32
    num_tiles,  # E * n_p * n_q
    n_p,  # cdiv(P, BLOCK_P)
    n_q,  # cdiv(Q, BLOCK_Q)
    STAGES: gl.constexpr,
    GROUPS: gl.constexpr,  # MMA warpgroups: 1, or 2 taking tiles in turn
    num_warps: gl.constexpr,
):
    """Grid: (min(num_tiles, SMs),), persistent; program i owns tiles i, i + grid, ... Each
    output tile has one owner and sums its rows in order: deterministic, no atomics."""
    BLOCK_R: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_P: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_Q: gl.constexpr = b_desc.block_type.shape[1]
    a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_R, BLOCK_P], a_desc.layout)
    b_ring = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_R, BLOCK_Q], b_desc.layout)
    c_smem = gl.allocate_shared_memory(out_desc.dtype, [GROUPS, 1, BLOCK_P, BLOCK_Q], out_desc.layout)
    ready, empty = _new_ring_barriers(STAGES, 1)
    turn = _new_turn_barriers()
    # (Gluon's frontend cannot concatenate tuples holding constexprs: each partition's arguments in full.)
    if GROUPS == 1:
        gl.warp_specialize(
            [
                (_ws_mma_partition, (a_ring, b_ring, c_smem, ready, empty, turn, out_desc, expert_offsets_ptr,
                                     num_tiles, n_p, n_q, BLOCK_R, STAGES, 0, 1, num_warps)),
                (_ws_load_partition, (a_desc, b_desc, a_ring, b_ring, ready, empty, expert_offsets_ptr,
                                      num_tiles, n_p, n_q, STAGES)),
            ],
            [1],  # the load partition: one warp
            [40],  # its registers (it holds a few scalars); the MMA warpgroup gets the rest
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_ws_mma_partition, (a_ring, b_ring, c_smem, ready, empty, turn, out_desc, expert_offsets_ptr,
                                     num_tiles, n_p, n_q, BLOCK_R, STAGES, 0, 2, num_warps)),
                (_ws_mma_partition, (a_ring, b_ring, c_smem, ready, empty, turn, out_desc, expert_offsets_ptr,
                                     num_tiles, n_p, n_q, BLOCK_R, STAGES, 1, 2, 4)),
                (_ws_load_partition, (a_desc, b_desc, a_ring, b_ring, ready, empty, expert_offsets_ptr,
                                      num_tiles, n_p, n_q, STAGES)),
            ],
            [4, 1],  # the second MMA warpgroup, the load warp
            # Two 128 x 128 fp32 accumulators take 128 registers a thread each; the load warp's
            # warpgroup gives back all but 40, so each MMA warpgroup can hold 232.
            [232, 40],
        )  # fmt: skip
    _invalidate_ring_barriers(ready, empty, STAGES)
    _invalidate_turn_barriers(turn)
