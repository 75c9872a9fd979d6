#!/usr/bin/env bash
# Written answers (STEPMESH_ONE_SIDED=device, the default) against answers as messages (off), and the GPU suite,
# in one device call:
#
#   benchmarks/device_run.sh --mps run bash benchmarks/written_check.sh [SUITE_RUNS]
#
#   1. the GPU suite, SUITE_RUNS times (default 1);
#   2. stepmesh-1x1 against raw ucxx, STEPMESH_ONE_SIDED=off, device, off, device (device: the server puts each
#      answer into the worker's pull tensor, flushes, then sends the response header);
#   3. step3 and stepmesh-1x1 with 3 stages in flight against 1 stage, at device.
# About 150 s per suite run and 200 s for the rest on one H100. JSON of every bench lands in $OUT (8 files at most
# come back: 7 benches here).
set -u
out=${OUT:-/tmp/stepmesh-out}
mkdir -p "$out"
export UCX_WARN_UNUSED_ENV_VARS=n
for i in $(seq 1 "${1:-1}"); do
  echo "== GPU suite, run $i"
  timeout 200 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -4
done
bench() {  # NAME ENV... -- BENCH ARGS...
  local name=$1; shift
  local env=()
  while [ "$1" != "--" ]; do env+=("$1"); shift; done
  shift
  echo "== $name"
  env "${env[@]}" timeout 120 python3 -m stepmesh.cli bench --device cuda --json "$out/$name.json" "$@" 2>&1 \
    | grep -v "^measuring"
}
one=(--preset stepmesh-1x1 --contenders stepmesh,ucxx --iters 2000 --rounds 6)
for i in 1 2; do
  bench off-$i STEPMESH_ONE_SIDED=off -- "${one[@]}"
  bench device-$i STEPMESH_ONE_SIDED=device -- "${one[@]}"
done
bench step3 STEPMESH_ONE_SIDED=device -- --preset step3 --contenders stepmesh,ucxx --iters 2000 --rounds 6
bench stages3 STEPMESH_ONE_SIDED=device -- --preset stepmesh-1x1 --stages 3 --contenders stepmesh --iters 2000 --rounds 6
bench stages1 STEPMESH_ONE_SIDED=device -- --preset stepmesh-1x1 --stages 1 --contenders stepmesh --iters 2000 --rounds 6
