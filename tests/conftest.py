"""Test tiers: with no CUDA device the Triton kernels run in the interpreter (CPU tier); with one
they are compiled (GPU tier, bigger shapes and bf16). Hypothesis profiles: cpu, gpu, nightly."""

import os

import torch

# Triton reads this when a kernel is decorated, so it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
IN_CI = bool(os.environ.get("CI"))

_common = dict(
    deadline=None,  # interpreter and compile times vary far more than any deadline would allow
    derandomize=IN_CI,  # CI runs the same examples every time; local runs explore
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("cpu", max_examples=40, **_common)
GPU_EXAMPLES = 60
settings.register_profile("gpu", max_examples=GPU_EXAMPLES, **_common)
settings.register_profile("nightly", max_examples=2000, **_common)
# compute-sanitizer slows every launch ~100x: few examples, each still fuzzed.
settings.register_profile("sanitize", max_examples=6, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if ON_GPU else "cpu"))


def compile_bound(gpu_examples: int):
    """Settings for a test whose every GPU example compiles a fresh set of kernels: random shapes
    give new tile constants and argument specializations, and a whole layer's forward and
    backward are a dozen kernels. At the gpu profile's 60 examples one such test ran past 400 s
    on the H100 machine (14 workers), so on a GPU it runs `gpu_examples` at most; the cpu tier
    (the interpreter compiles nothing) and larger profiles (nightly) keep their counts. Read when
    the test module is imported, after pytest's --hypothesis-profile has been applied."""
    examples = settings.default.max_examples
    if ON_GPU and examples <= GPU_EXAMPLES:
        return settings(max_examples=min(examples, gpu_examples))
    return settings()


def layer_step_with(device: torch.device, env: str) -> dict[str, list[torch.Tensor]]:
    """The output and every gradient (x's, then the parameters') of one training step of a small
    bf16 layer with 1600 rows per expert, under `env` set to "auto" and to "off": a kernel switch's
    two sides, for the tests that check a warp-specialized kernel inside the layer."""
    from deepseek_moe_fused import MoEConfig
    from deepseek_moe_fused._env import env_set
    from deepseek_moe_fused.benchmark import make_layer
    from deepseek_moe_fused.testing import make_activations

    config = MoEConfig(256, 128, 2, 1, n_shared_experts=1, dtype=torch.bfloat16)
    layer = make_layer(config, device, seed=0)
    x = make_activations(3200, 256, seed=3, device=device).requires_grad_()
    results = {}
    for choice in ("auto", "off"):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with env_set(env, choice):
            out = layer(x)
            out.float().square().sum().backward()
        grads = [x.grad] + [p.grad for p in layer.parameters()]
        results[choice] = [out.detach().clone()] + [g.clone() for g in grads]
    return results


def assert_switch_sides_agree(results: dict) -> None:
    """Every tensor of a kernel switch's "auto" side within the bf16 tolerances of its "off" side."""
    from deepseek_moe_fused.testing import TOLERANCES, error_stats

    for got, want in zip(results["auto"], results["off"], strict=True):
        stats = error_stats(got, want.double())
        assert stats.within(TOLERANCES[torch.bfloat16]), stats


def check_switch_runs_only_where_built(enabled, env: str, device: torch.device) -> None:
    """A warp-specialized kernel's switch `enabled(device, dtype)`: never on the CPU or for fp32
    operands (wgmma takes 16-bit ones), off under `env`=off, and a value it does not know named
    with `env` in the error."""
    from deepseek_moe_fused._env import env_set

    assert not enabled(torch.device("cpu"), torch.bfloat16)
    assert not enabled(device, torch.float32)
    with env_set(env, "off"):
        assert not enabled(device, torch.bfloat16)
    with env_set(env, "always"), pytest.raises(ValueError, match=env):
        enabled(device, torch.bfloat16)


def _xdist_gpu() -> int:
    """pytest-xdist worker gwN runs on GPU N mod the device count: one worker per GPU."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw") or 0) % max(torch.cuda.device_count(), 1)


@pytest.fixture(scope="session")
def device() -> torch.device:
    if ON_GPU:
        torch.cuda.set_device(_xdist_gpu())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _workers_share_a_card() -> bool:
    """Whether more xdist workers run than there are GPUs (so some share one, _xdist_gpu)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return workers > torch.cuda.device_count()


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        if _workers_share_a_card():
            # Another worker's kernels on the same card add time to whatever these measure: one
            # read a warm 16 MB sum at 2x the cold one under the tier's 14 workers on one H100.
            skip = pytest.mark.skip(reason="times the card: needs it alone, run without xdist (make test-gpu does)")
            for item in items:
                if "card_alone" in item.keywords:
                    item.add_marker(skip)
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: the GPU tier runs it (make test-gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_report_header(config):
    tier = "GPU (compiled kernels)" if ON_GPU else "CPU (Triton interpreter, TRITON_INTERPRET=1)"
    return [f"deepseek_moe_fused test tier: {tier}; hypothesis profile: {settings().max_examples} examples"]
