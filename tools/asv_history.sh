#!/usr/bin/env bash
# asv results for several past commits on this GPU machine, under one machine name so the graphs
# form one line per parameter set (docs/asv-results/ was made this way on an H100).
#   bash tools/asv_history.sh OUT_DIR SHA...
# Each commit is checked out in a clone of this repository (a git bundle, so no network is needed)
# and its own benchmarks run against its own code; results are copied to OUT_DIR after each commit.
set -uo pipefail
OUT=$(realpath "$1"); shift
MACHINE=${ASV_MACHINE:-$(python -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")}
export DEEPSEEK_MOE_BENCH_SIZES=${DEEPSEEK_MOE_BENCH_SIZES:-"seed=1,2048;deepseek-v2-lite=2048"}
BENCH=${BENCH:-"track_fused_ms|track_grouped_mm_ms|track_pct_of_floor|graph_ms"}
CLONE=$(mktemp -d)
git bundle create "$CLONE.bundle" --all 2> /dev/null && git clone -q "$CLONE.bundle" "$CLONE/repo" || exit 1
mkdir -p "$OUT" "$CLONE/repo/.asv"
[ -d "$OUT/results" ] && cp -r "$OUT/results" "$CLONE/repo/.asv/"  # earlier runs of this script
cd "$CLONE/repo" || exit 1
python -m asv machine --yes --machine "$MACHINE" > /dev/null
for commit in "$@"; do
	git checkout -q --detach "$commit" || { echo "$commit: not in this repository"; continue; }
	ASV_PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} DEEPSEEK_MOE_BENCH_RUN=$commit-$(date +%s%N) \
		python -m asv run -E existing:same --set-commit-hash "$(git rev-parse HEAD)" --machine "$MACHINE" \
		-b "$BENCH" > "$OUT/bench-$commit.log" 2>&1
	echo "$commit: asv exit $?"
	rm -rf "$OUT/results" && cp -r .asv/results "$OUT/results"
done
python -m asv publish > "$OUT/publish.log" 2>&1 && cp -r .asv/html "$OUT/html"
echo "results in $OUT/results, plots in $OUT/html"
