#!/usr/bin/env bash
# Run stepmesh on a GPU machine from a checkout, with nothing fetched there.
#
#   benchmarks/device_run.sh [--mps|--no-mps] tests [pytest args...]  the GPU suite (pytest -m gpu)
#   benchmarks/device_run.sh [--mps|--no-mps] bench [bench args...]   stepmesh bench --device cuda
#   benchmarks/device_run.sh [--mps|--no-mps] run CMD [ARGS...]        any command in that environment
#
# It installs the UCX wheels carried in .gpu-wheels/ (ucxx-cu13 and what it needs,
# see docs/gpu.md) into a private folder, builds the compiled core in place for
# this Python when no build for it is there (from a carried core.c newer than
# core.pyx and wire.py when there is one: the GPU machine may lack Cython), and puts src/ and cli/ on the path.
#
# --mps starts the CUDA MPS daemon for the command and stops it after (it needs
# root; the output says when it cannot). On one GPU without MPS, worker and
# server are two time-sliced CUDA contexts and every hand-over between them
# costs ~140 us: one-GPU figures mean little without it (docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
mps=0
case "${1:-}" in --mps) mps=1; shift ;; --no-mps) mps=0; shift ;; esac
what=${1:-tests}; shift || true
out=${OUT:-/tmp/stepmesh-out}; mkdir -p "$out"
site=/tmp/stepmesh-site
if [ ! -d "$site/ucxx" ]; then
  python3 -m pip install -q --no-index --no-deps --target "$site" .gpu-wheels/*.whl >"$out/pip.log" 2>&1 \
    || { echo "device_run: installing the carried wheels failed:"; tail -20 "$out/pip.log"; exit 1; }
fi
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}"
[ -e src/stepmesh/cli ] || ln -s ../../cli src/stepmesh/cli   # what package-dir maps when installed
suffix=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
if [ ! -e "src/stepmesh/_core/core$suffix" ]; then  # a carried build for this Python is used as it is
  python3 src/stepmesh/data/wire.py src/stepmesh/_core/wire.pxi || exit 1
  { { [ src/stepmesh/_core/core.c -nt src/stepmesh/_core/core.pyx ] && [ src/stepmesh/_core/core.c -nt src/stepmesh/data/wire.py ]; } \
      || python3 -m cython -3 src/stepmesh/_core/core.pyx -o src/stepmesh/_core/core.c >"$out/build.log" 2>&1; } \
    && cc -O2 -shared -fPIC $(python3 -c 'import sysconfig; print("-I" + sysconfig.get_paths()["include"])') \
         src/stepmesh/_core/core.c -o "src/stepmesh/_core/core$suffix" >>"$out/build.log" 2>&1 \
    || { echo "device_run: building the core failed:"; tail -20 "$out/build.log"; exit 1; }
fi

mps_stop() { echo quit | nvidia-cuda-mps-control >/dev/null 2>&1; }
if [ "$mps" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/stepmesh-mps CUDA_MPS_LOG_DIRECTORY=/tmp/stepmesh-mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d >/dev/null 2>&1; then
    trap mps_stop EXIT
    echo "device_run: CUDA MPS daemon started (pipe $CUDA_MPS_PIPE_DIRECTORY)"
  else
    echo "device_run: could not start the CUDA MPS daemon (nvidia-cuda-mps-control -d needs root and a free GPU):"\
         "running without it; one-GPU figures are then time-sliced"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
else
  echo "device_run: MPS off"
fi
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, ucxx; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ucxx', ucxx.__version__)"

case "$what" in
  tests) python3 -m pytest -q -rs -m gpu tests -p no:cacheprovider "$@" ;;
  bench) python3 -m stepmesh.cli bench --device cuda "$@" ;;
  run) "$@" ;;
  *) echo "device_run: unknown command $what (tests, bench or run)"; exit 2 ;;
esac
