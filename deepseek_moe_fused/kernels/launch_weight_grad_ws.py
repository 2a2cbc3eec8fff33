"""Launcher of the warp-specialized weight-gradient kernel (kernels/_weight_grad_ws.py), and where
it runs: a Hopper card (sm_90: wgmma), 16-bit operands, a Triton whose Gluon API this kernel was
written and measured against, and operands whose layout TMA accepts. Everywhere else, and with
`DEEPSEEK_MOE_WGRAD_WS=off`, the weight gradients run on the Triton kernel of _backward.py."""

from __future__ import annotations

import functools

import torch
import triton

from .._env import env_choice
from .._interpret import interpreter_active
from . import _tma
from ._tiles import WS_ONE_GROUP, WeightGradWsTiles, num_sms

WS_ENV = "DEEPSEEK_MOE_WGRAD_WS"  # "auto" (default) or "off"
# Gluon is experimental and its API has changed between releases (warp_specialize's signature,
# for one): the kernel is enabled on the releases it was measured on.
VERIFIED_TRITON = ("3.6.",)
# Output tile (BLOCK_P, BLOCK_Q): the size measured best on the H100 (docs/perf-notes.md, session
# 13); the ring is a `WeightGradWsTiles` (_tiles.py).
BLOCK_P, BLOCK_Q = 128, 128


@functools.cache
def _gluon_kernel():
    """The Gluon kernel, or None where this Triton is not a verified release or has no Gluon."""
    if not triton.__version__.startswith(VERIFIED_TRITON):
        return None
    try:
        from ._weight_grad_ws import _grouped_weight_grad_ws_kernel
    except ImportError:
        return None
    return _grouped_weight_grad_ws_kernel


@functools.cache
def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def ws_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `grouped_weight_grad_ws` can run for operands of `dtype` on `device`."""
    if env_choice(WS_ENV, ("auto", "off"), "auto") == "off":
        return False
    if interpreter_active() or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    return _is_hopper(device) and _gluon_kernel() is not None


def switched_ws_enabled(env: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether another warp-specialized kernel, switched by `env` ("auto" or "off"), may run: the
    switch is not off and `ws_enabled` holds."""
    return env_choice(env, ("auto", "off"), "auto") != "off" and ws_enabled(device, dtype)


def grouped_weight_grad_ws(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    expert_offsets: torch.Tensor,
    tiles: WeightGradWsTiles = WS_ONE_GROUP,
) -> bool:
    """out[e] = a_e^T b_e over each expert's sorted rows (expert_offsets[e] to expert_offsets[e + 1])
    on the warp-specialized kernel. a: (T*K, P), b: (T*K, Q), out: (E, P, Q), one 16-bit dtype.
    Returns False, launching nothing, where a layout breaks TMA's rules (the caller then runs the
    Triton kernel); call only where `ws_enabled`."""
    if not (a.dtype == b.dtype == out.dtype and a.dim() == b.dim() == 2 and out.dim() == 3):
        raise ValueError(f"a, b, out: 2-D, 2-D, 3-D of one dtype, got {a.shape} {b.shape} {out.shape}")
    if any(_tma.rows_of(t) is None for t in (a, b, out)):  # TMA's alignment rules
        return False
    E, P, Q = out.shape
    n_p, n_q = triton.cdiv(P, BLOCK_P), triton.cdiv(Q, BLOCK_Q)
    num_tiles = E * n_p * n_q
    if num_tiles == 0:
        return True
    if a.shape[0] == 0:  # no rows to reduce over (a descriptor needs a positive extent)
        out.zero_()
        return True
    descriptor = _tma.gluon_descriptor
    _gluon_kernel()[(min(num_tiles, num_sms(a.device)),)](
        descriptor(a, [tiles.block_r, BLOCK_P]), descriptor(b, [tiles.block_r, BLOCK_Q]),
        descriptor(out, [1, BLOCK_P, BLOCK_Q]), expert_offsets, num_tiles, n_p, n_q,
        STAGES=tiles.stages, GROUPS=tiles.mma_groups, num_warps=4,
    )  # fmt: skip
    return True
