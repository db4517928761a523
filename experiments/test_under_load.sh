#!/usr/bin/env bash
# The suite under CPU contention: RUNS consecutive `make test` runs with two CPU-bound processes beside them
# (on the 2-core CI-sized machine), one summary line per run (exit code, seconds, pytest's closing line).
#   bash experiments/test_under_load.sh 10 runs/test_under_load
set -u
runs=${1:-10}
out=${2:-runs/test_under_load}
mkdir -p "$out"
python3 -c 'while True: pass' & load1=$!
python3 -c 'while True: pass' & load2=$!
trap 'kill $load1 $load2' EXIT
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  make test > "$out/run$i.log" 2>&1
  rc=$?
  echo "run $i rc=$rc seconds=$(( $(date +%s) - start )) $(grep -E 'passed|failed|Segmentation|Fatal' "$out/run$i.log" | tail -1)" \
    | tee -a "$out/summary.txt"
done
