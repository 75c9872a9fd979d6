#!/usr/bin/env bash
# The GPU rule in one device call: the GPU suite, then stepmesh-1x1 with the device lane on and off, alternating.
#
#   benchmarks/device_run.sh --mps run bash benchmarks/gpu_check.sh [SUITE_RUNS] [BENCH_PAIRS]
#
# SUITE_RUNS (default 1) runs of `pytest -m gpu tests`, then BENCH_PAIRS (default 2) pairs of
# `stepmesh bench --preset stepmesh-1x1 --contenders stepmesh,protocol,ucxx`, STEPMESH_DEVICE_LANE=1 then 0,
# each printing its table and stage breakdown. About 110 s per suite run and 35 s per bench on one H100.
# Each bench writes its JSON under $OUT, and the first pair its plots too: with device_run.sh's pip.log and
# build.log that is at most 8 files for 2 pairs, as many as the device tool brings back.
set -u
suite_runs=${1:-1}
pairs=${2:-2}
out=${OUT:-/tmp/stepmesh-out}
mkdir -p "$out"
export UCX_WARN_UNUSED_ENV_VARS=n
for i in $(seq 1 "$suite_runs"); do
  echo "== GPU suite, run $i of $suite_runs"
  timeout 300 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -3
done
args=(--device cuda --preset stepmesh-1x1 --contenders stepmesh,protocol,ucxx --iters 2000 --rounds 10)
for i in $(seq 1 "$pairs"); do
  for lane in 1 0; do
    name="lane$lane-1x1-$i"
    plot=()
    [ "$i" = 1 ] && plot=(--plot "$out/$name.png")
    echo "== stepmesh-1x1, pair $i, STEPMESH_DEVICE_LANE=$lane"
    STEPMESH_DEVICE_LANE=$lane timeout 120 python3 -m stepmesh.cli bench "${args[@]}" --json "$out/$name.json" \
      "${plot[@]}" 2>&1 | grep -v "^measuring"
  done
done
