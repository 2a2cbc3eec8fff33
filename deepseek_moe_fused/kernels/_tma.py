"""Tiles through Hopper's tensor-memory accelerator (TMA): when the expert kernels may read them
that way, and the host-side descriptors they read them through.

What goes through TMA are plain boxes of a 2-D matrix: the weights, and the backward's
expert-sorted rows that the weight-gradient GEMMs reduce over. The forward's activation rows are
gathered by the routing (one row per token), which TMA cannot do on Hopper. A weight descriptor
covers every expert's rows at once, (E * rows, cols); a tile near the end of one expert's rows
reads the next expert's first rows into output columns that the kernels mask at the store, and
reads past the matrix's end come back as zeros. The weights' reduction runs along the inner
(contiguous) dimension, whose bound is the descriptor's own, so no neighbour enters a sum; the
weight gradients reduce along rows, and mask the one box per expert that crosses its last row.
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


def fits_descriptor(t: torch.Tensor) -> bool:
    """Whether a descriptor can cover `t` as it is, any rank (a strided view included): positive
    extents, an aligned base, a contiguous last dimension, every other stride a multiple of 16 bytes."""
    if any(n == 0 for n in t.shape) or t.stride(-1) != 1 or t.data_ptr() % _ALIGN_BYTES:
        return False
    return all((stride * t.element_size()) % _ALIGN_BYTES == 0 for stride in t.stride()[:-1])


def gluon_descriptor(t: torch.Tensor, box: list[int]):
    """A Gluon (Hopper) descriptor over 16-bit `t` for `box`, in the default swizzled layout the
    warp-specialized kernels' shared-memory rings take."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    element = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[t.dtype]
    return TensorDescriptor.from_tensor(t, box, gl.NVMMASharedLayout.get_default_for(box, element))


def descriptor(matrix: torch.Tensor, block_rows: int, block_cols: int):
    """A TMA descriptor over the 2-D `matrix` (from `rows_of`) for (block_rows, block_cols) tiles."""
    return _descriptor_class().from_tensor(matrix, [block_rows, block_cols])


def descriptors_for(device: torch.device, boxes: list[tuple[torch.Tensor, int, int]]):
    """A descriptor for each (tensor, block_rows, block_cols), the tensor taken as one matrix of all
    its rows; None where TMA is off for `device` or any tensor or box breaks its rules (the
    kernels then load every operand of the launch through pointers)."""
    if not tma_enabled(device) or any(max(rows, cols) > _MAX_BOX for _, rows, cols in boxes):
        return None
    matrices = [rows_of(t) for t, _, _ in boxes]
    if any(m is None for m in matrices):
        return None
    return [descriptor(m, rows, cols) for m, (_, rows, cols) in zip(matrices, boxes, strict=True)]


def weight_descriptors(device: torch.device, weights: list[torch.Tensor], block_rows: int, block_cols: int):
    """`descriptors_for` with one box shape for all `weights`."""
    return descriptors_for(device, [(w, block_rows, block_cols) for w in weights])
