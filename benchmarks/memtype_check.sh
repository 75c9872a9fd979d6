#!/usr/bin/env bash
# Does UCX's memory-type lookup cost stepmesh's GPU round trip, and do the core's hints spare it? One device call.
#
#   benchmarks/device_run.sh --mps run bash benchmarks/memtype_check.sh [PAIRS]
#
# `import ucxx` sets UCX_MEMTYPE_CACHE=n when it is unset, so stepmesh's processes (and raw ucxx's) look up
# the memory type of every buffer UCX is not told about through the CUDA driver. This runs, in one call:
#   1. device_floor (C, no Python) with the cache off (plain, --hint, --memh) and on (UCX_MEMTYPE_CACHE=n / try),
#      with hdr-iov (the count carried with the payload in one iov message) beside stepmesh's messages;
#   2. PAIRS (default 2) rounds of `stepmesh bench --preset stepmesh-1x1 --contenders stepmesh,ucxx`, alternating
#      STEPMESH_MEMORY_HINTS=off (every type looked up, as before the hints), host (the default), and off with
#      UCX's cache on (UCX_MEMTYPE_CACHE=try: what sparing every lookup could give);
#   3. the GPU suite under each STEPMESH_MEMORY_HINTS level in $SUITES (default: host, the default level).
# If the cache-on runs close the gap to raw ucxx, the lookups are the cost, and a registered memory handle per
# buffer (which carries its type) is the way to spare them without the cache.
set -u
pairs=${1:-2}
out=${OUT:-/tmp/stepmesh-out}
mkdir -p "$out"
export UCX_WARN_UNUSED_ENV_VARS=n
ucx=$(python3 -c 'import libucx, os; print(os.path.dirname(libucx.__file__))')
if cc -O2 benchmarks/device_floor.c -I"$ucx/include" -L"$ucx/lib" -Wl,-rpath,"$ucx/lib" -lucp -lucs -ldl \
     -o /tmp/device_floor 2>"$out/floor-build.log"; then
  for v in "n" "n --hint" "n --memh" "try"; do
    echo "== device_floor, UCX_MEMTYPE_CACHE=$v"
    # shellcheck disable=SC2086  # the flags after the cache setting are words of their own
    UCX_MEMTYPE_CACHE=${v%% *} timeout 60 /tmp/device_floor --mem cuda --size 917504 --iters 2000 --rounds 3 \
      --modes tag,hdr,hdr-lane,put-count,hdr-iov $([ "$v" != "${v#* }" ] && echo "${v#* }") 2>&1 | tail -6
  done
else
  echo "device_floor did not build:"; tail -5 "$out/floor-build.log"
fi
args=(--device cuda --preset stepmesh-1x1 --contenders stepmesh,ucxx --iters 2000 --rounds 6)
for i in $(seq 1 "$pairs"); do
  for v in off host cache; do
    echo "== stepmesh-1x1, round $i, $v"
    case $v in
      cache) env=(UCX_MEMTYPE_CACHE=try STEPMESH_MEMORY_HINTS=off) ;;
      *) env=(STEPMESH_MEMORY_HINTS=$v) ;;
    esac
    env "${env[@]}" timeout 120 python3 -m stepmesh.cli bench "${args[@]}" --json "$out/$v-$i.json" 2>&1 \
      | grep -v "^measuring"
  done
done
for h in ${SUITES:-host}; do
  echo "== GPU suite, STEPMESH_MEMORY_HINTS=$h"
  STEPMESH_MEMORY_HINTS=$h timeout 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -3
done
