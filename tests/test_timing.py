"""The benchmarks' timer: what it times and what it leaves out (properties, not speeds)."""

import pytest
import torch

from deepseek_moe_fused import timing


def test_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device; the refusal is for machines without one")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        timing.median_ms(lambda: None)


def _least_of(rounds: int, *timings) -> list[float]:
    """Each timing's smallest median over `rounds` rounds taken in turn. Other work on the card
    (another process; the tier keeps its own workers off, `card_alone`) only ever adds time, and a
    measurement it landed on can invert a comparison: the least of a few is the card's own time."""
    rounds_of_medians = [[timing() for timing in timings] for _ in range(rounds)]
    return [min(medians) for medians in zip(*rounds_of_medians)]


@pytest.mark.gpu
@pytest.mark.card_alone
def test_flush_is_outside_the_timed_region(device):
    # Each flush reads 256 MB (~100 us on an H100); a 4 KB add takes a few us. Were the flush
    # timed, the median would be at least the read's time.
    flush = torch.ones(timing.L2_FLUSH_BYTES // 4, device=device)
    tiny = torch.ones(1024, device=device)
    flush_ms, tiny_ms = _least_of(
        5, lambda: timing.median_ms(flush.sum, flush_l2=False), lambda: timing.median_ms(lambda: tiny.add_(1.0))
    )
    assert 0 < tiny_ms < flush_ms / 4, (tiny_ms, flush_ms)


@pytest.mark.gpu
@pytest.mark.card_alone
def test_each_run_starts_with_a_cold_l2(device):
    # 16 MB fits any L2 the project targets: read warm it comes from the cache, after the flush from
    # HBM, at a fraction of the cache's bandwidth (H100: ~10 TB/s against ~3).
    data = torch.ones(4 * 2**20, device=device)
    warm_ms, cold_ms = _least_of(
        5, lambda: timing.median_ms(data.sum, flush_l2=False), lambda: timing.median_ms(data.sum)
    )
    assert cold_ms > 1.2 * warm_ms, (cold_ms, warm_ms)
