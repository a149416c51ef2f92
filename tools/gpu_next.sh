#!/usr/bin/env bash
# One time-boxed device call for the Marlin tuning loop: build, smoke, and the tile/split sweep
# by profiler busy time over the issue's shapes and M values. Logs and JSON land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_out}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_MXFP8_REQUIRE_CUDA=1
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2; local t=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name rc=$? in $(( $(date +%s) - t )) s"; tail -n "${TAIL:-3}" "$out/$name.log"
}
step build 200 bash tools/gpu_build.sh
TAIL=6 step smoke 60 python3 -P tools/marlin_dev.py smoke
TAIL=40 step sweep 300 python3 -P tools/marlin_dev.py sweep --ms 1 16 32 64 128 256 1024 --out "$out"
