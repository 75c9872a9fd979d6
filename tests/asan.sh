#!/usr/bin/env bash
# The C extension's tests under AddressSanitizer (not part of CI: it takes a few minutes and a rebuild).
#   bash tests/asan.sh [pytest args]     default: tests/test_cores.py and the C half of tests/test_dataplane.py
# Builds stepmesh._ucpc in place with -fsanitize=address, runs the tests with libasan preloaded, then
# rebuilds it as pip would. UCX's CMA probe trips ASan's process_vm_readv interceptor, so CMA is left out.
set -euo pipefail
cd "$(dirname "$0")/.."
ext=stepmesh/_ucpc$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
inc=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
build() { cc "$@" -shared -fPIC -I"$inc" stepmesh/_ucpc.c stepmesh/_ucpc_worker.c stepmesh/_ucpc_server.c -o "$ext"; }
trap 'build -O2' EXIT
build -O1 -g -fsanitize=address -fno-omit-frame-pointer
[ $# -gt 0 ] || set -- tests/test_cores.py tests/test_dataplane.py -k "not python]"
UCX_TLS='^cma' LD_PRELOAD=$(cc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python -m pytest -q "$@"
