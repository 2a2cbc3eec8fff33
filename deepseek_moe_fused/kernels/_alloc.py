"""Output allocation for the kernels, with an opt-in NaN poison so tests catch unwritten elements."""

from __future__ import annotations

import contextlib

import torch

_poison = False


def new_output(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised buffer of `like`'s dtype and device; NaN-filled inside `poisoned_outputs()`."""
    out = like.new_empty(shape)
    if _poison:
        out.fill_(float("nan"))
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
