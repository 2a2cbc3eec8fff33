"""The GitHub workflows stay thin: every `make` target they call exists, and they keep the
security settings the suite relies on (schema and zizmor run in `make lint-workflows`)."""

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the workflows (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*):(?!=)", text, re.MULTILINE)}


def _steps(workflow: dict):
    for job_name, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            yield job_name, step


def test_there_are_four_workflows():
    assert {p.name for p in WORKFLOWS} == {"ci.yml", "gpu-tests.yml", "benchmarks.yml", "nightly.yml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_make_target_exists(path):
    targets = _makefile_targets()
    called = set()
    for _, step in _steps(yaml.safe_load(path.read_text())):
        for line in str(step.get("run", "")).splitlines():
            called |= set(re.findall(r"\bmake(?:\s+-\w+)*\s+([A-Za-z][\w-]*)", line))
    assert called, f"{path.name} calls no make target"
    assert called <= targets, f"{path.name} calls missing targets {sorted(called - targets)}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_run_steps_are_make_targets_and_checkouts_keep_no_credentials(path):
    workflow = yaml.safe_load(path.read_text())
    assert workflow.get("permissions") == {"contents": "read"}, "least privilege at the top level"
    for job_name, step in _steps(workflow):
        if "run" in step:
            assert step["run"].strip().startswith("make "), f"{job_name}: run steps call make targets"
        uses = step.get("uses", "")
        if uses:
            assert re.search(r"@[0-9a-f]{40}$", uses.split(" #")[0]), f"{job_name}: {uses} is not pinned to a SHA"
        if uses.startswith("actions/checkout@") and step.get("with", {}).get("path") != ".asv/results":
            assert step["with"]["persist-credentials"] is False, f"{job_name}: checkout keeps credentials"


def test_gpu_jobs_run_on_self_hosted_gpu_runners():
    for path in WORKFLOWS:
        for name, job in yaml.safe_load(path.read_text())["jobs"].items():
            if path.name != "ci.yml" and name != "deploy-pages":
                assert job["runs-on"] == ["self-hosted", "linux", "x64", "gpu"], f"{path.name}:{name}"
            assert "timeout-minutes" in job, f"{path.name}:{name} has no timeout"
