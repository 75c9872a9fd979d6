#!/usr/bin/env bash
# Written answers (STEPMESH_ONE_SIDED=device, the default) against answers as messages (off), and the GPU suite
# with and without MPS, in one device call:
#
#   JOBS=3 [STAGES=0] [PROTOCOL=1] [PAIRS=1] benchmarks/device_run.sh --mps run bash benchmarks/written_check.sh [SUITE_RUNS] [NO_MPS_RUNS]
#
#   1. the GPU suite SUITE_RUNS times in a row (default 1), under MPS;
#   2. stepmesh-1x1 against raw ucxx, STEPMESH_ONE_SIDED=off, device, off, device (device: the server puts each
#      answer into the worker's pull tensor, flushes, then sends the response header);
#   2b. with PROTOCOL=1, stepmesh-1x1 against the protocol contender (written answers too) and raw ucxx;
#   3. step3 against raw ucxx, and stepmesh-1x1 with 3 stages in flight and with 1, at device;
#   4. the MPS daemon stopped, the GPU suite NO_MPS_RUNS times in a row (default 0);
#   5. with ROUNDS=1, every bench of the call round by round (benchmarks/rounds.py): where a slow spell went.
# JOBS > 1 runs each suite on that many pytest-xdist processes (carried in .gpu-wheels): about 60 s a run instead
# of 165 s on one H100. The benches take about 200 s. JSON of every bench lands in $OUT (8 files at most come back).
set -u
. "$(dirname "$0")/device_lib.sh"
jobs=${JOBS:-1}
par=()
[ "$jobs" -gt 1 ] && par=(-n "$jobs")
suite() {  # LABEL
  echo "== GPU suite, $1"
  timeout 200 python3 -m pytest -q -m gpu tests -p no:cacheprovider "${par[@]}" 2>&1 | grep -E "passed|failed|FAILED|ERROR|error" | tail -8
}
for i in $(seq 1 "${1:-1}"); do suite "MPS, run $i"; done
for i in $(seq 1 "${PAIRS:-2}"); do  # PAIRS: off/device pairs (default 2)
  bench off-$i STEPMESH_ONE_SIDED=off -- "${one[@]}"
  bench device-$i STEPMESH_ONE_SIDED=device -- "${one[@]}"
done
[ "${PROTOCOL:-0}" = 1 ] && bench protocol STEPMESH_ONE_SIDED=device -- --preset stepmesh-1x1 \
  --contenders stepmesh,protocol,ucxx --iters 2000 --rounds 6
if [ "${STAGES:-1}" = 1 ]; then  # STAGES=0 skips step 3
  bench step3 STEPMESH_ONE_SIDED=device -- --preset step3 --contenders stepmesh,ucxx --iters 2000 --rounds 6
  bench stages3 STEPMESH_ONE_SIDED=device -- --preset stepmesh-1x1 --stages 3 --contenders stepmesh --iters 2000 --rounds 6
  bench stages1 STEPMESH_ONE_SIDED=device -- --preset stepmesh-1x1 --stages 1 --contenders stepmesh --iters 2000 --rounds 6
fi
if [ "${2:-0}" -gt 0 ]; then
  echo quit | nvidia-cuda-mps-control >/dev/null 2>&1 && echo "written_check: MPS daemon stopped"
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  sleep 2
  for i in $(seq 1 "$2"); do suite "no MPS, run $i"; done
fi
if [ "${ROUNDS:-0}" = 1 ] && ls "$out"/*.json >/dev/null 2>&1; then
  python3 "$(dirname "$0")/rounds.py" "$out"/*.json | cut -c1-200
fi
