#!/usr/bin/env bash
# On a GPU machine, from the repo root: record asv results for BASE and HEAD, show the gate passing
# (HEAD run twice) and failing (HEAD with deliberately bad tiles), and build the HTML.
#   bash tools/asv_demo.sh BASE HEAD OUT_DIR
set -uo pipefail
BASE=$1 HEAD=$2 OUT=${3:-/tmp/asv-demo}
mkdir -p "$OUT"
# A quick subset by default: asv starts one process per benchmark and parameter set.
export DEEPSEEK_MOE_BENCH_SIZES=${DEEPSEEK_MOE_BENCH_SIZES:-"seed=1,2048"}
export PYTHONPATH=$PWD:${PYTHONPATH:-}
step() { echo "=== $*"; }
step "bench $BASE"; git checkout -q "$BASE" && make bench > "$OUT/bench-base.log" 2>&1; tail -2 "$OUT/bench-base.log"
step "bench $HEAD (run 1)"; git checkout -q "$HEAD" && make bench > "$OUT/bench-head1.log" 2>&1; tail -2 "$OUT/bench-head1.log"
rm -rf /tmp/asv-run1 && cp -r .asv/results /tmp/asv-run1
step "bench $HEAD (run 2)"; make bench > "$OUT/bench-head2.log" 2>&1; tail -2 "$OUT/bench-head2.log"
rm -rf /tmp/asv-run2 && cp -r .asv/results /tmp/asv-run2
step "gate: $BASE -> $HEAD"; make -s bench-compare BASE="$BASE" HEAD="$HEAD"; echo "exit $?"
step "gate: $HEAD run 1 -> run 2 (expect pass)"
python3 tools/asv_gate.py --base "$HEAD" --head "$HEAD" --base-results /tmp/asv-run1; echo "exit $?"
step "bench $HEAD with forced bad tiles"
DEEPSEEK_MOE_FORCE_TILES=block_m=16,block_n=16,block_k=16,num_warps=1,num_stages=1 \
	make bench BENCH_ARGS="-b track_fused_ms" > "$OUT/bench-bad.log" 2>&1
tail -2 "$OUT/bench-bad.log"
step "gate: $HEAD run 2 -> bad tiles (expect fail)"
python3 tools/asv_gate.py --base "$HEAD" --head "$HEAD" --base-results /tmp/asv-run2; echo "exit $?"
rm -rf .asv/results && cp -r /tmp/asv-run2 .asv/results  # publish the good runs
step "publish"; make -s bench-publish > "$OUT/publish.log" 2>&1; echo "exit $?"
find .asv/html -name "*.json" -path "*graphs*" | sed 's|.*/graphs/||' | sort | head -80
tar czf "$OUT/asv.tgz" .asv/results .asv/html
