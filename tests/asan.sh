#!/usr/bin/env bash
# The compiled core's tests under AddressSanitizer (not part of CI: it takes a few minutes and a rebuild).
#   bash tests/asan.sh [pytest args]     default: the CPU data-plane tests and the protocol fuzzers
# Builds stepmesh._core.core in place with -fsanitize=address (from the C that Cython generated),
# runs the tests with libasan preloaded, then rebuilds it as pip would. UCX's CMA probe trips ASan's
# process_vm_readv interceptor, so CMA is left out.
set -euo pipefail
cd "$(dirname "$0")/.."
python setup.py build_ext --inplace -q >/dev/null  # generates wire.pxi and core.c
ext=src/stepmesh/_core/core$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
inc=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
build() { cc "$@" -shared -fPIC -I"$inc" src/stepmesh/_core/core.c -o "$ext"; }
trap 'build -O2' EXIT
build -O1 -g -fsanitize=address -fno-omit-frame-pointer
[ $# -gt 0 ] || set -- tests/test_dataplane.py tests/test_protocol_fuzz.py -k "not cuda"
UCX_TLS='^cma' LD_PRELOAD=$(cc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python -m pytest -q -p no:cacheprovider "$@"
