"""The examples run as shipped (shortened where they loop)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_train_tiny_loss_curves_agree():
    """Fused layer (Triton backward) and the PyTorch reference train to the same losses."""
    result = _run("train_tiny.py", "--steps", "6")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backward: triton" in result.stdout and "AGREE" in result.stdout, result.stdout


def test_quickstart_runs():
    if not (ROOT / "examples" / "quickstart.py").exists():
        pytest.skip("examples/quickstart.py is not in this checkout")
    result = _run("quickstart.py")
    assert result.returncode == 0, result.stdout + result.stderr
