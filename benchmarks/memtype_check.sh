#!/usr/bin/env bash
# Does UCX's memory-type lookup cost stepmesh's GPU round trip? One device call, main's code unchanged.
#
#   benchmarks/device_run.sh --mps run bash benchmarks/memtype_check.sh [PAIRS]
#
# `import ucxx` sets UCX_MEMTYPE_CACHE=n when it is unset, so stepmesh's processes (and raw ucxx's) look up
# the memory type of every buffer UCX is not told about through the CUDA driver. This runs, in one call:
#   1. the GPU suite once;
#   2. device_floor (C, no Python) with the cache off and on (UCX_MEMTYPE_CACHE=n / try);
#   3. PAIRS (default 2) pairs of `stepmesh bench --preset stepmesh-1x1 --contenders stepmesh,ucxx`, the cache
#      left as ucxx sets it (off), then on (UCX_MEMTYPE_CACHE=try), alternating.
# If the cache-on runs close the gap to raw ucxx, the lookups are the cost, and a registered memory handle per
# buffer (which carries its type) is the way to spare them without the cache.
set -u
pairs=${1:-2}
out=${OUT:-/tmp/stepmesh-out}
mkdir -p "$out"
export UCX_WARN_UNUSED_ENV_VARS=n
echo "== GPU suite"
timeout 300 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -3
ucx=$(python3 -c 'import libucx, os; print(os.path.dirname(libucx.__file__))')
if cc -O2 benchmarks/device_floor.c -I"$ucx/include" -L"$ucx/lib" -Wl,-rpath,"$ucx/lib" -lucp -lucs -ldl \
     -o /tmp/device_floor 2>"$out/floor-build.log"; then
  for cache in n try; do
    echo "== device_floor, UCX_MEMTYPE_CACHE=$cache"
    UCX_MEMTYPE_CACHE=$cache timeout 90 /tmp/device_floor --mem cuda --size 917504 --iters 2000 --rounds 3 \
      --modes tag,hdr-lane,put-count 2>&1 | tail -6
  done
else
  echo "device_floor did not build:"; tail -5 "$out/floor-build.log"
fi
args=(--device cuda --preset stepmesh-1x1 --contenders stepmesh,ucxx --iters 2000 --rounds 6)
for i in $(seq 1 "$pairs"); do
  for cache in off try; do
    echo "== stepmesh-1x1, pair $i, memory-type cache $cache"
    if [ "$cache" = try ]; then
      UCX_MEMTYPE_CACHE=try timeout 120 python3 -m stepmesh.cli bench "${args[@]}" --json "$out/cache-$cache-$i.json" 2>&1 | grep -v "^measuring"
    else
      timeout 120 python3 -m stepmesh.cli bench "${args[@]}" --json "$out/cache-$cache-$i.json" 2>&1 | grep -v "^measuring"
    fi
  done
done
