"""The mbarriers of the warp-specialized Gluon kernels' TMA rings (_gate_up_ws.py, _rows_matmul_ws.py,
_weight_grad_ws.py): one `ready` barrier a stage (its boxes have landed, counted by bytes) and one
`empty` barrier a stage (its consumers are done with it)."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier


@gluon.jit
def _new_ring_barriers(STAGES: gl.constexpr, EMPTY_ARRIVALS: gl.constexpr):
    """(ready, empty), each (STAGES, 1); a stage is empty once EMPTY_ARRIVALS consumers released it."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=EMPTY_ARRIVALS)
    return ready, empty


@gluon.jit
def _new_turn_barriers():
    """(2, 1): turn[g] completes a phase when MMA group g may take the ring (two groups in turn)."""
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    return turn


@gluon.jit
def _invalidate_ring_barriers(ready, empty, STAGES: gl.constexpr):
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


@gluon.jit
def _invalidate_turn_barriers(turn):
    for i in gl.static_range(2):
        mbarrier.invalidate(turn.index(i))
