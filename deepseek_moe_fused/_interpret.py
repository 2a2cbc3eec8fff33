"""Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1) rather than compiled."""

import os
import sys


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_to_interpreter_without_gpu() -> None:
    """On a machine with no CUDA device, Triton can only run kernels in its interpreter, and it
    decides that when a kernel is decorated: so turn it on before our kernels are imported.
    An explicit TRITON_INTERPRET (0 or 1) is left alone; so is a process that imported triton first."""
    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
