# Test tiers, lint and benchmarks. `make test` picks the tier by the machine.
PYTHON ?= python3
PYTEST = $(PYTHON) -m pytest
HAS_GPU := $(shell $(PYTHON) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
NUM_GPUS := $(shell $(PYTHON) -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
# CPU tier: the interpreter is single-threaded Python, so one xdist worker per core.
CPU_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)

ASV ?= $(PYTHON) -m asv
FACTOR ?= 1.10

.PHONY: help install install-cpu install-gpu versions lint lint-workflows format test test-cpu test-gpu \
	test-nightly sanitize benchmark tune bench bench-publish bench-compare bench-check bench-save-results bench-pr

help:
	@echo "install test test-cpu test-gpu test-nightly sanitize lint format benchmark tune"
	@echo "bench bench-publish bench-compare BASE=<sha> HEAD=<sha> [FACTOR=1.10] bench-check"

install:
	$(PYTHON) -m pip install -e ".[test,hf,plot,lint]"

# CPU machines (.ci/run, hosted Actions runners): torch pinned first, the CPU build. TORCH_INDEX_URL
# points pip at the CPU wheel index where PyPI's default would be the CUDA build.
install-cpu:
	$(PYTHON) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PYTHON) -m pip install --quiet -e ".[test,hf,lint,bench]"

# GPU runners keep their CUDA torch and Triton; this adds the project and its test/bench extras.
install-gpu:
	$(PYTHON) -m pip install --quiet -e ".[test,hf,plot,bench]"

# key=value lines for $$GITHUB_OUTPUT (the Triton cache key).
versions:
	@$(PYTHON) -c "import torch, triton; print(f'torch={torch.__version__}'); print(f'triton={triton.__version__}')"

lint: lint-workflows
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Offline: GitHub's workflow schema (vendored in check-jsonschema) and zizmor's security audits.
lint-workflows:
	$(PYTHON) -m check_jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	zizmor --offline .github/workflows

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

ifeq ($(HAS_GPU),1)
test: test-gpu
else
test: test-cpu
endif

test-cpu:
	TRITON_INTERPRET=1 $(PYTEST) -n $(CPU_WORKERS) --hypothesis-profile=cpu -m "not slow"

# Kernel compiles dominate the GPU tier (each Hypothesis example compiles new specialisations):
# GPU_WORKERS_PER_GPU xdist workers per GPU overlap them. On 2 H100s (8 workers) the whole tier
# took 424 s, its longest test 263 s. conftest pins worker N to GPU N mod the GPU count.
GPU_WORKERS_PER_GPU ?= 4
# Tests marked card_alone time the GPU, so other workers must not share it: they run afterwards,
# in one process.
test-gpu:
	$(PYTEST) -n $$(( $(NUM_GPUS) * $(GPU_WORKERS_PER_GPU) )) --hypothesis-profile=gpu --junitxml=junit-gpu.xml
	$(PYTEST) -m card_alone --hypothesis-profile=gpu --junitxml=junit-gpu-card-alone.xml

test-nightly:
	$(PYTEST) -n $(if $(filter 1,$(HAS_GPU)),$(NUM_GPUS),$(CPU_WORKERS)) --hypothesis-profile=nightly

# The GPU tier's kernel tests under compute-sanitizer's memcheck (out-of-bounds / misaligned accesses).
sanitize:
	PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
		$(PYTEST) -p no:xdist --hypothesis-profile=sanitize tests/test_fused_moe.py tests/test_moe_layer.py::test_layer_matches_oracle

benchmark:
	$(PYTHON) -m deepseek_moe_fused.benchmark

# Re-measure the tile table for this GPU (deepseek_moe_fused/kernels/tuned_tiles.json; other cards'
# entries are kept). About 2 minutes per preset on an H100. TUNE_ARGS="--presets seed" for one.
tune:
	$(PYTHON) tools/tune.py $(TUNE_ARGS)

# asv history, offline, in the current environment. Results are saved only with a commit hash.
# DEEPSEEK_MOE_BENCH_RUN lets all tracks of one (preset, N) share one measurement (benchmarks/_measure.py).
# asv drops PYTHONPATH in its benchmark processes but honours ASV_PYTHONPATH: the checkout comes first,
# so the commit being recorded is the code being measured. BENCH_ARGS passes more asv options (-b REGEX).
bench:
	$(ASV) machine --yes
	ASV_PYTHONPATH=$(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH)) \
	DEEPSEEK_MOE_BENCH_RUN=$$(git rev-parse --short HEAD)-$$(date +%s%N) \
		$(ASV) run -E existing:same --set-commit-hash $$(git rev-parse HEAD) --show-stderr $(BENCH_ARGS)

bench-publish:
	$(ASV) publish

# The table, then the gate: exits non-zero when HEAD is slower than BASE by more than FACTOR.
bench-compare:
	@test -n "$(BASE)" -a -n "$(HEAD)" || { echo "usage: make bench-compare BASE=<sha> HEAD=<sha>"; exit 2; }
	$(ASV) compare --factor $(FACTOR) $(BASE) $(HEAD)
	$(PYTHON) tools/asv_gate.py --base $(BASE) --head $(HEAD) --factor $(FACTOR) $(GATE_ARGS)

# Imports the suite and checks its structure (CI runs it; no GPU needed).
bench-check:
	$(ASV) check -E existing:same

# After `make bench` in the benchmarks workflow: commit the new result file to the asv-results
# branch, which the workflow checks out in .asv/results (a repository of its own; created here on
# the first run, with the project's origin as its remote).
bench-save-results:
	cd .asv/results && { test -e .git || { git init -q -b asv-results && \
		git remote add origin "$$(git -C $(CURDIR) remote get-url origin)"; }; } && \
		git add -A && { git diff --cached --quiet || git -c user.name=asv-bot \
		-c user.email=asv-bot@users.noreply.github.com commit -qm "asv results for $$(git -C $(CURDIR) rev-parse --short HEAD)"; } && \
		git push -q origin HEAD:asv-results

# Pull requests: benchmark BASE and HEAD on this runner, then gate; SUMMARY gets a markdown table.
bench-pr:
	@test -n "$(BASE)" -a -n "$(HEAD)" || { echo "usage: make bench-pr BASE=<sha> HEAD=<sha> [SUMMARY=file]"; exit 2; }
	git checkout --quiet --detach $(BASE) && $(MAKE) bench
	git checkout --quiet --detach $(HEAD) && $(MAKE) bench
	$(PYTHON) tools/asv_gate.py --base $(BASE) --head $(HEAD) --factor $(FACTOR) --markdown \
		| tee $(if $(SUMMARY),-a $(SUMMARY),/dev/null)
