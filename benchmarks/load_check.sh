#!/usr/bin/env bash
# stepmesh-1x1 against raw ucxx while another process keeps the GPU busy, in one device call:
#
#   benchmarks/device_run.sh --mps run bash benchmarks/load_check.sh [KIND...]
#
# For each KIND of benchmarks/gpu_load.py (default: matmul h2d d2d), the load is started (its pid kept, killed
# after), then stepmesh-1x1 runs with need_event on and off; a run with no load comes first and last. The
# question: do a shared GPU's slow spells cost stepmesh more than raw ucxx, and is the push's event why.
set -u
. "$(dirname "$0")/device_lib.sh"
kinds=("$@")
[ ${#kinds[@]} -eq 0 ] && kinds=(matmul h2d d2d)
bench idle-a -- "${one[@]}"
for k in "${kinds[@]}"; do
  python3 "$(dirname "$0")/gpu_load.py" "$k" --seconds 100 &
  pid=$!
  sleep 8
  bench "$k-event" -- "${one[@]}"
  bench "$k-noevent" -- "${one[@]}" --no-need-event
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
done
bench idle-b -- "${one[@]}"
