#!/usr/bin/env bash
# Device buffers mapped for UCX (STEPMESH_MEMORY_HINTS=all) against host hints only, and the issue's GPU figures
# with the hints, in one device call:
#
#   benchmarks/device_run.sh --mps run bash benchmarks/memh_check.sh
#
#   1. stepmesh-1x1 against raw ucxx, STEPMESH_MEMORY_HINTS=host, all, host, all (at all the server maps each
#      registered chunk a layout receives into, and the worker its device pushes and pull tensors, so UCX takes
#      their type from the handle instead of looking it up);
#   2. the GPU suite with all (SUITES="all host": at the default too);
#   3. step3 (128x7168 fp8 push, bf16 pull), and stepmesh-1x1 with 3 stages in flight (against 1: step 1's host);
#   4. device_floor with the cache off and --hint (as stepmesh runs), then --memh: stepmesh's messages against
#      one-sided requests with the answers as today (put-req) and both ways one-sided (put-count-fence).
# About 300 s on one H100. JSON of every bench lands in $OUT (at most 8 files come back).
set -u
. "$(dirname "$0")/device_lib.sh"
ucx=$(python3 -c 'import libucx, os; print(os.path.dirname(libucx.__file__))')
if cc -O2 benchmarks/device_floor.c -I"$ucx/include" -L"$ucx/lib" -Wl,-rpath,"$ucx/lib" -lucp -lucs -ldl \
     -o /tmp/device_floor 2>/tmp/floor-build.log; then
  for flag in --hint --memh; do  # the first run prints what a buffer-id query costs
    echo "== device_floor, UCX_MEMTYPE_CACHE=n $flag"
    UCX_MEMTYPE_CACHE=n timeout 60 /tmp/device_floor --mem cuda --size 917504 --iters 2000 --rounds 3 \
      --modes tag,hdr-lane,put-req,put-count-fence $flag 2>&1 | tail -7
  done
else
  echo "device_floor did not build:"; tail -5 /tmp/floor-build.log
fi
for i in 1 2; do
  bench host-$i STEPMESH_MEMORY_HINTS=host -- "${one[@]}"
  bench all-$i STEPMESH_MEMORY_HINTS=all -- "${one[@]}"
done
for h in ${SUITES:-all}; do  # SUITES="all host" runs it at the default too
  echo "== GPU suite, STEPMESH_MEMORY_HINTS=$h"
  STEPMESH_MEMORY_HINTS=$h timeout 150 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -3
done
bench step3 STEPMESH_MEMORY_HINTS=host -- --preset step3 --contenders stepmesh,ucxx --iters 2000 --rounds 6
bench stages3 STEPMESH_MEMORY_HINTS=host -- --preset stepmesh-1x1 --stages 3 --contenders stepmesh --iters 2000 --rounds 6
