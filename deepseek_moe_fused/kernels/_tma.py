"""Weight tiles through Hopper's tensor-memory accelerator (TMA): when the expert kernels may read
them that way, and the host-side descriptors they read them through.

Only the weights go through TMA: their tiles are plain boxes of a 2-D matrix, while the kernels'
activation rows are gathered by the routing (one row per token), which TMA cannot do on Hopper.
A descriptor covers every expert's rows at once, (E * rows, cols); a tile near the end of one
expert's rows reads the next expert's first rows into output columns that the kernels mask at the
store, and reads past the matrix's end come back as zeros. The reduction runs along the inner
(contiguous) dimension, whose bound is the descriptor's own, so no neighbour enters a sum.
"""

from __future__ import annotations

import functools

import torch

from .._env import env_choice
from .._interpret import interpreter_active

# "auto" (default): TMA weight tiles on Hopper and newer, and in the interpreter (so the CPU tier
# runs that path); "off": pointer loads everywhere, the path of pre-Hopper cards.
TMA_ENV = "DEEPSEEK_MOE_TMA"
# TMA's rules (CUDA driver API, cuTensorMapEncodeTiled): a 16-byte-aligned base, row strides that
# are multiples of 16 bytes, at most 256 elements per box side.
_ALIGN_BYTES = 16
_MAX_BOX = 256


@functools.cache
def _device_has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


@functools.cache
def _descriptor_class():
    """Triton's host-side descriptor, or None in a Triton too old to have one (pointer loads then)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def tma_enabled(device: torch.device) -> bool:
    """Whether the expert kernels read weight tiles through TMA descriptors on `device`."""
    if env_choice(TMA_ENV, ("auto", "off"), "auto") == "off" or _descriptor_class() is None:
        return False
    if interpreter_active():
        return True
    return device.type == "cuda" and _device_has_tma(device.index if device.index is not None else 0)


def rows_of(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` (…, rows, cols) as one 2-D (all rows, cols) matrix a descriptor can cover, or None
    where its layout breaks TMA's rules (the kernels then load it through pointers)."""
    cols = weight.shape[-1]
    if weight.stride(-1) != 1 or weight.data_ptr() % _ALIGN_BYTES:
        return None
    try:
        matrix = weight.view(-1, cols)
    except RuntimeError:  # leading dims not evenly strided: not one matrix
        return None
    if (matrix.stride(0) * matrix.element_size()) % _ALIGN_BYTES:
        return None
    return matrix


def descriptor(matrix: torch.Tensor, block_rows: int, block_cols: int):
    """A TMA descriptor over the 2-D `matrix` (from `rows_of`) for (block_rows, block_cols) tiles."""
    return _descriptor_class().from_tensor(matrix, [block_rows, block_cols])


def weight_descriptors(device: torch.device, weights: list[torch.Tensor], block_rows: int, block_cols: int):
    """Descriptors for (block_rows, block_cols) tiles of each of `weights`, each taken as one matrix
    of all its rows; None where TMA is off for `device` or any weight or the box breaks its rules
    (the kernels then load every weight through pointers)."""
    if not tma_enabled(device) or max(block_rows, block_cols) > _MAX_BOX:
        return None
    matrices = [rows_of(w) for w in weights]
    if any(m is None for m in matrices):
        return None
    return [descriptor(m, block_rows, block_cols) for m in matrices]
