"""Expert parallelism against the single-process layer holding all experts: outputs and every
gradient. gloo with 2 and 3 CPU processes (kernels in the interpreter) in the CPU tier; NCCL with
one process per GPU (2 or more GPUs) in the GPU tier."""

import faulthandler
import itertools
import os
import queue
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from strategies import moe_configs, routing_kinds, seeds

from deepseek_moe_fused import DeepSeekMoELayer, fused_moe_experts
from deepseek_moe_fused.expert_parallel import ep_moe_experts, expert_bounds
from deepseek_moe_fused.kernels.launch import ExpertWeights
from deepseek_moe_fused.testing import TOLERANCES, error_stats, make_activations, make_moe_inputs

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
# Every rank must finish one example within this: a collective that never completes fails the test.
SPAWN_TIMEOUT_S = int(os.environ.get("EP_SPAWN_TIMEOUT_S", "120"))
# Bound on E * H * I in the gloo (interpreter) cases, so each example finishes well inside it.
MAX_EXPERT_WEIGHTS_CPU = 200_000


class _Ranks:
    """`world` ranks in one process group, kept for many examples: starting them (torch import,
    device and process-group init, kernel compiles) takes tens of seconds, one check a second or
    two. A failing or stuck case stops them all (a failed rank's peers may wait in a collective
    forever); the next case starts fresh ones."""

    def __init__(self, world: int, backend: str):
        context = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._tmp.name, "init")
        self.world, self.alive = world, True
        self.results = context.Queue()
        self.tasks = [context.Queue() for _ in range(world)]
        self.processes = [
            # daemon: ranks never outlive the test session, even one killed mid-example
            context.Process(
                target=_serve, args=(rank, world, init_file, backend, self.tasks[rank], self.results), daemon=True
            )
            for rank in range(world)
        ]
        for process in self.processes:
            process.start()

    def check(self, case) -> str | None:
        """Runs one case on every rank: None if all passed, else what went wrong."""
        for tasks in self.tasks:
            tasks.put(case)
        deadline, passed = time.monotonic() + SPAWN_TIMEOUT_S, 0
        while passed < self.world:
            try:
                rank, error = self.results.get(timeout=1)
            except queue.Empty:
                dead = [rank for rank, p in enumerate(self.processes) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.stop()
                    return (
                        f"ranks {dead} died"
                        if dead
                        else f"ranks did not finish in {SPAWN_TIMEOUT_S} s (hung collective?)"
                    )
                continue
            if error is not None:
                self.stop()
                return f"rank {rank} failed:\n{error}"
            passed += 1
        return None

    def stop(self, graceful: bool = False) -> None:
        if graceful:
            for tasks in self.tasks:
                tasks.put(None)
            for process in self.processes:
                process.join(timeout=30)
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join()
        self._tmp.cleanup()
        self.alive = False


_RANKS: dict[tuple[int, str], _Ranks] = {}


@pytest.fixture(scope="module", autouse=True)
def _stop_ranks():
    yield
    for ranks in _RANKS.values():
        if ranks.alive:
            ranks.stop(graceful=True)
    _RANKS.clear()


def _run_on_ranks(world: int, backend: str, *case) -> None:
    ranks = _RANKS.get((world, backend))
    if ranks is None or not ranks.alive:
        ranks = _RANKS[(world, backend)] = _Ranks(world, backend)
    failure = ranks.check(case)
    if failure is not None:
        pytest.fail(f"{backend} expert parallelism over {world} ranks: {failure}")


def _close(got, want, what):
    stats = error_stats(got, want)
    # Both sides are within the table's bound of the float64 oracle (other tests hold them to it),
    # so they are within twice it of each other. On a GPU they round differently: the EP side runs
    # one-slot rows, which get other tile sizes and so another accumulation order.
    tol = TOLERANCES[want.dtype]
    tol = type(tol)(rel_norm=2 * tol.rel_norm, rel_max=2 * tol.rel_max)
    assert stats.within(tol), f"rank {dist.get_rank()}: {what}: {stats}"


def _grad_close(got, want, what):
    # fp32 gradients summed over ranks in another order than the single process: 1e-5 relative.
    diff = (got.double() - want.double()).norm()
    assert diff <= 1e-5 * want.double().norm() + 1e-7, f"rank {dist.get_rank()}: {what}: |diff| {diff:.3e}"


def _serve(rank, world, init_file, backend, tasks, results):
    """One rank: joins the group once, then checks each case put on its queue (None: stop)."""
    device = torch.device("cpu")
    extra = {}
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        extra["device_id"] = device  # bind the communicator to this rank's GPU up front
    verbose = bool(os.environ.get("EP_VERBOSE"))  # per-case timings on stderr, for a slow or stuck rank
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world, **extra)
    while (case := tasks.get()) is not None:
        config, tokens, kind, seed = case
        start = time.monotonic()
        # A rank stuck in a collective prints every thread's stack before the parent gives up on it.
        faulthandler.dump_traceback_later(SPAWN_TIMEOUT_S - 10, exit=True)
        try:
            _check_layer(rank, world, config, tokens, seed, device)
            _check_given_routing(rank, world, config, tokens, kind, seed, device)
        except BaseException:
            # Report and leave without the group's teardown: peers may be inside a collective.
            results.put((rank, traceback.format_exc()))
            return
        faulthandler.cancel_dump_traceback_later()
        if verbose:
            print(f"rank {rank}: {tokens} tokens checked in {time.monotonic() - start:.1f} s", file=sys.stderr)
        results.put((rank, None))
    dist.destroy_process_group()


def _check_layer(rank, world, config, tokens, seed, device):
    torch.manual_seed(seed)
    full = DeepSeekMoELayer(config, device=device)
    if full.gate.e_score_correction_bias is not None:
        full.gate.e_score_correction_bias.normal_(std=0.1, generator=torch.Generator(device).manual_seed(seed))
    ep = DeepSeekMoELayer(config, device=device, ep_group=dist.group.WORLD)
    ep.load_state_dict(full.state_dict())  # the full (transformers-layout) state_dict; keeps the shard
    start, end = sum(tokens[:rank]), sum(tokens[: rank + 1])
    x_all = make_activations(sum(tokens), config.hidden_dim, seed=seed, dtype=torch.float32, device=device)
    x_all.requires_grad_()
    grad_all = make_activations(sum(tokens), config.hidden_dim, seed=seed + 1, dtype=torch.float32, device=device)
    # The reference runs each rank's tokens as a batch of its own: its router GEMM then has the
    # EP rank's shape, so near-ties in the top-k break the same way (a GEMM's rounding depends on
    # its row count through the BLAS algorithm choice, and one flipped expert is not a tolerance).
    for lo, hi in zip(itertools.accumulate([0, *tokens[:-1]]), itertools.accumulate(tokens)):
        if hi > lo:
            full(x_all[lo:hi]).backward(grad_all[lo:hi])
    for tensor in (x_all, *full.parameters()):  # no tokens anywhere: no gradient was made
        if tensor.grad is None:
            tensor.grad = torch.zeros_like(tensor)
    x = x_all.detach()[start:end].clone().requires_grad_()
    out = ep(x)
    out.backward(grad_all[start:end])
    _close(out, full(x_all.detach()[start:end]), "output")
    _grad_close(x.grad, x_all.grad[start:end], "dx")
    first = expert_bounds(config.num_experts, world)[rank]
    count = ep.experts.gate_up_proj.shape[0]
    for name in ("gate_up_proj", "down_proj"):
        got = getattr(ep.experts, name).grad
        want = getattr(full.experts, name).grad[first : first + count]
        _grad_close(got if got is not None else torch.zeros_like(want), want, f"experts.{name}")
    # Replicated parameters see only local tokens: their gradients add up over the ranks.
    full_params = dict(full.named_parameters())
    for name, p in ep.named_parameters():
        if name.startswith("experts."):
            continue
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        _grad_close(grad, full_params[name].grad, name)


def _check_given_routing(rank, world, config, tokens, kind, seed, device):
    """Routings straight to the EP path (all on one expert, empty experts, Zipf, repeats)."""
    inputs = make_moe_inputs(config, sum(tokens), routing=kind, seed=seed, device=device)
    start, end = sum(tokens[:rank]), sum(tokens[: rank + 1])
    want = fused_moe_experts(*inputs.kernel_args())[start:end]
    w = inputs.weights
    bounds = expert_bounds(config.num_experts, world)
    local = ExpertWeights(
        w.gate_up_proj[bounds[rank] : bounds[rank + 1]], w.down_proj[bounds[rank] : bounds[rank + 1]],
        w.shared_gate, w.shared_up, w.shared_down,
    )  # fmt: skip
    got = ep_moe_experts(
        inputs.x[start:end], inputs.topk_weights[start:end], inputs.topk_ids[start:end], local,
        config.num_experts, dist.group.WORLD,
    )  # fmt: skip
    _close(got, want, f"routing {kind}")


@st.composite
def ep_cases(draw):
    world = draw(st.sampled_from([2, 3]))
    # Every rank also runs the whole layer as its reference, all experts interpreted on 2 shared
    # cores: E=61 with H=I=96 took over the rank timeout (found by a local, non-derandomized run).
    config = draw(
        moe_configs(dtypes=[torch.float32]).filter(
            lambda c: c.num_experts * c.hidden_dim * c.intermediate_dim <= MAX_EXPERT_WEIGHTS_CPU
        )
    )
    # Uneven splits, ranks with no tokens, and fewer experts than ranks all occur.
    tokens = draw(st.lists(st.sampled_from([0, 1, 3, 8]), min_size=world, max_size=world))
    return world, config, tokens, draw(routing_kinds), draw(seeds)


@settings(max_examples=int(os.environ.get("EP_EXAMPLES", "6")))
@given(case=ep_cases())
def test_expert_parallel_equals_single_process(case):
    if torch.cuda.is_available():
        pytest.skip("the gloo CPU test runs the kernels in the interpreter: the CPU tier's job")
    world, config, tokens, kind, seed = case
    _run_on_ranks(world, "gloo", config, tokens, kind, seed)


@st.composite
def nccl_cases(draw):
    world = torch.cuda.device_count()
    # Dims of 16 and up: with H or I of 1-3 a single dot can cancel to a thousandth of its terms,
    # and two fp32 accumulation orders then differ by more than any fixed tolerance (the kernels'
    # own tests discard such problems; here the reference is another GPU run, not the oracle).
    config = draw(moe_configs(dtypes=[torch.float32]).filter(lambda c: min(c.hidden_dim, c.intermediate_dim) >= 16))
    # Uneven splits, ranks with no tokens, and fewer experts than ranks all occur; up to 300 rows.
    tokens = draw(st.lists(st.sampled_from([0, 1, 7, 64, 300]), min_size=world, max_size=world))
    return world, config, tokens, draw(routing_kinds), draw(seeds)


@pytest.mark.gpu
# No shrinking: each step would start the ranks again (tens of seconds with their compiles); the
# failing example is reported as found.
@settings(
    max_examples=int(os.environ.get("EP_EXAMPLES", "6")),
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)
@given(case=nccl_cases())
def test_expert_parallel_on_nccl_equals_single_gpu(case):
    """One process per GPU over NCCL, against one GPU holding all experts (compiled kernels)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 or more GPUs for NCCL expert parallelism, found {torch.cuda.device_count()}")
    world, config, tokens, kind, seed = case
    _run_on_ranks(world, "nccl", config, tokens, kind, seed)
