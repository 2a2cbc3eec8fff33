"""Device-time medians of a GPU callable, each run starting from a cold and clean L2.

Why not `triton.testing.do_bench`: it empties the L2 before every run by writing a 256 MB buffer,
which leaves the cache full of dirty lines of that buffer. The timed kernels then also pay for
writing them back to HBM as their own reads evict them. On an H100 that added 8-10 us to every
small forward (seed N=1: 46.1 us after the write, 38.1 us after a read of the same buffer, 36.8 us
with no flush at all; docs/perf-notes.md, "The L2 flush of the timing loop"), a fifth of a decode
step, and nothing measurable from a millisecond up. A served step follows kernels that mostly
read weights, so here the L2 is emptied by reading a buffer larger than it: the timed code finds
its inputs in HBM and no one else's writes in flight.
"""

from __future__ import annotations

import functools
import statistics

import torch

# Five times the H100's 50 MB L2: a read of it leaves none of the timed code's data cached.
L2_FLUSH_BYTES = 256 * 2**20
# Run counts are derived from time budgets (as do_bench does), within these bounds.
MAX_RUNS = 1000
MIN_RUNS = 5


@functools.cache
def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.ones(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device)


def _flush_l2(buffer: torch.Tensor) -> None:
    buffer.sum()  # reads every line: the L2 ends up holding clean lines of `buffer` only


# GPU clock cycles of the spin that stands in for the flush when the L2 stays warm: about the
# flush read's ~90 us on an H100. Either keeps the GPU busy while the host enqueues the next run,
# so a run whose device time is shorter than its launch is timed as device work, not as the host's
# enqueue rate (a warm 16 MB sum read 17.9 us back to back, 14.8 us cold behind the flush).
SPIN_CYCLES = 150_000


def median_ms(
    fn, *, warmup_ms: float = 25.0, rep_ms: float = 100.0, flush_l2: bool = True, device: torch.device | None = None
) -> float:
    """Median device time of `fn()` in ms: CUDA events around each run, the L2 emptied by a read
    before each (untimed; `flush_l2=False` leaves it warm from the run before). Runs enough times
    to fill about `warmup_ms` and then `rep_ms` of `fn`'s own time. Either way the GPU is busy
    (reading or spinning) while each run is enqueued, so a run starts on the device as soon as
    the one before and its preparation end."""
    if not torch.cuda.is_available():
        raise RuntimeError("median_ms times CUDA work and there is no CUDA device here")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    buffer = _flush_buffer(device)
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(MIN_RUNS):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate_ms = max(start.elapsed_time(end) / MIN_RUNS, 1e-3)
    warmup = min(MAX_RUNS, max(1, int(warmup_ms / estimate_ms)))
    runs = min(MAX_RUNS, max(MIN_RUNS, int(rep_ms / estimate_ms)))
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for begin, finish in zip(starts, ends):
        if flush_l2:
            _flush_l2(buffer)
        else:
            torch.cuda._sleep(SPIN_CYCLES)  # touches no memory: the L2 keeps the run before's lines
        begin.record()
        fn()
        finish.record()
    torch.cuda.synchronize(device)
    return statistics.median(begin.elapsed_time(finish) for begin, finish in zip(starts, ends))
