"""Output allocation for the kernels, with an opt-in NaN poison so tests catch unwritten elements."""

from __future__ import annotations

import contextlib

import torch

_poison = False


def new_output(like: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised buffer on `like`'s device, of `like`'s dtype unless `dtype` is given.
    Inside `poisoned_outputs()` it is filled with NaN (integer buffers: -1, never a valid index)."""
    out = like.new_empty(shape, dtype=dtype)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


@contextlib.contextmanager
def poisoned_outputs():
    """Fill every buffer the kernels allocate with NaN, so any element a kernel forgets to write
    shows up as NaN in the result (and any padding row a kernel wrongly reads, too)."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous
