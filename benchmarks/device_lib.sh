# Sourced by the *_check.sh scripts run under device_run.sh: what they share.
#
#   bench NAME [VAR=VALUE...] -- BENCH ARGS...   stepmesh bench --device cuda with those variables, its JSON in
#                                                $out/NAME.json, the progress lines left out
#   one=(...)                                    stepmesh-1x1 against raw ucxx, 2,000 round trips in 6 rounds
out=${OUT:-/tmp/stepmesh-out}
mkdir -p "$out"
export UCX_WARN_UNUSED_ENV_VARS=n
bench() {
  local name=$1; shift
  local env=()
  while [ "$1" != "--" ]; do env+=("$1"); shift; done
  shift
  echo "== $name"
  env "${env[@]}" timeout 120 python3 -m stepmesh.cli bench --device cuda --json "$out/$name.json" "$@" 2>&1 \
    | grep -v "^measuring"
}
one=(--preset stepmesh-1x1 --contenders stepmesh,ucxx --iters 2000 --rounds 6)
