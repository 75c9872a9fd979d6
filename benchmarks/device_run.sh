#!/usr/bin/env bash
# GPU-machine run: install the carried ucxx-cu13 wheels (no network there), then
# the GPU tests and the CUDA benchmark. Usage: benchmarks/device_run.sh [tests|bench|all] [bench args...]
set -uo pipefail
what=${1:-all}; shift || true
out=${OUT:-/tmp/out}; mkdir -p "$out"
site=/tmp/stepmesh-site
if [ ! -d "$site/ucxx" ]; then
  pip install -q --no-index --no-deps --target "$site" .gpu-wheels/*.whl >"$out/pip.log" 2>&1 || { tail -20 "$out/pip.log"; exit 1; }
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -e stepmesh/cli ] || ln -s ../cli stepmesh/cli   # what the package-dir mapping does when installed
# The C extension, built in place as pip install builds it (stepmesh falls back to Python over ctypes without).
ext=stepmesh/_ucpc$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
stale=$(find stepmesh -maxdepth 1 -name '_ucpc*.[ch]' -newer "$ext" 2>/dev/null | head -1)
{ [ -e "$ext" ] && [ -z "$stale" ]; } || cc -O2 -shared -fPIC $(python3 -c 'import sysconfig; print("-I" + sysconfig.get_paths()["include"])') \
  stepmesh/_ucpc.c stepmesh/_ucpc_worker.c stepmesh/_ucpc_server.c -o "$ext" || echo "stepmesh._ucpc not built: the data path runs on ctypes"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python -c "import torch, ucxx; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ucxx', ucxx.__version__)"
python -m stepmesh.cli info | tee "$out/info.txt" | head -40
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  python -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.txt" | tail -15
  rc=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python -m stepmesh.cli bench --device cuda --contenders stepmesh,protocol,ucxx,gloo --json "$out/bench-cuda.json" "$@" 2>&1 \
    | grep -v "^measuring" | tee "$out/bench-cuda.txt" | tail -12
fi
exit $rc
