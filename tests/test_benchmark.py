"""The benchmark CLI end to end at interpreter-sized shapes (its timings are not checked)."""

import json

import pytest
import torch

from deepseek_moe_fused import benchmark


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch_sizes", "3", "--detailed"],  # seed preset shrunk for the CPU
        ["--preset", "deepseek-v3", "--hidden_dim", "32", "--intermediate_dim", "16", "--num_experts", "16",
         "--top_k", "4", "--batch_sizes", "5", "--dtype", "fp32"],  # grouped sigmoid routing
        ["--n_shared_experts", "0", "--batch_sizes", "1", "--dtype", "fp16"],
        ["--batch_sizes", "2", "--dtype", "fp32", "--backward"],  # forward+backward, both backwards
    ],
)  # fmt: skip
def test_cli_passes_and_writes_json(tmp_path, capsys, argv):
    if torch.cuda.is_available():
        pytest.skip("the CPU-sized CLI run is for machines without a GPU; the GPU tier runs the real one")
    path = tmp_path / "report.json"
    assert benchmark.main([*argv, "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "interpreter" in printed and "PASS" in printed and "FAIL" not in printed
    report = json.loads(path.read_text())
    assert report["rows"] and all(row["pass"] for row in report["rows"])
    assert {"naive_ms", "unfused_ms", "fused_ms", "layer_ms"} <= set(report["rows"][0])
    if "--backward" in argv:
        row = report["rows"][0]
        assert row["grad_pass"] and {"fwd_bwd_triton_bwd_ms", "fwd_bwd_torch_bwd_ms"} <= set(row)


def test_roofline_floor():
    from deepseek_moe_fused import PRESETS

    config = PRESETS["seed"]
    ids = torch.tensor([[0, 1]])  # N=1: two experts touched
    floor = benchmark.roofline_floor_us(config, ids, benchmark.Ceilings(matmul_tflops=800.0, copy_gbps=3000.0))
    # bytes: (2 routed + 1 shared) experts x 3 x 2048 x 2048 x 2 bytes = 75.5 MB at 3 TB/s
    assert floor == pytest.approx(3 * 3 * 2048 * 2048 * 2 / 3000e9 * 1e6)


def test_ep_cli_under_torchrun(tmp_path):
    """`--ep 2` under torchrun (gloo, interpreter): both ranks finish and rank 0 prints the table."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("the CPU-sized EP run is for machines without a GPU; on GPUs run it by hand with NCCL")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "deepseek_moe_fused.benchmark", "--ep", "2", "--dtype", "fp32", "--batch_sizes", "0", "3"]  # fmt: skip
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Expert parallel: 2 ranks" in result.stdout
    assert [line.split()[0] for line in result.stdout.splitlines()[-2:]] == ["0", "3"]


@pytest.mark.gpu
def test_replay_keeps_its_captured_tensors():
    """A replay outlives the caller's references to what it was captured from: its input stays
    allocated (not freed and reused by the next allocation) and each replay recomputes the output."""
    import functools
    import gc
    import weakref

    x = torch.randn(1 << 20, device="cuda")
    out = torch.empty_like(x)
    # A partial holds its arguments (a lambda would read the names below, which `del` unbinds).
    replay = benchmark.replayable(functools.partial(torch.mul, x, 2.0, out=out))
    x_alive, out_alive = weakref.ref(x), weakref.ref(out)
    expected = x * 2.0
    del x, out
    gc.collect()
    torch.cuda.empty_cache()
    torch.randn(1 << 20, device="cuda")  # would take the input's block had it been freed
    assert x_alive() is not None and out_alive() is not None
    out_alive().fill_(float("nan"))  # poison: only the replay writes it back
    replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out_alive(), expected, rtol=0, atol=0)
