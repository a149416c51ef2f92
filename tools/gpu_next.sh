#!/usr/bin/env bash
# One time-boxed device call for the Marlin tuning loop: build, correctness smoke of every
# kernel configuration, the tile/split sweep, where the time of one unrolled jit goes
# (profiler timeline, with and without command buffers), then the Marlin GPU tests.
# Logs and JSON land in $OUT. Usage: bash tools/gpu_next.sh [sweep shapes...]
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
TAIL=60 step sweep "${SWEEP_S:-240}" python3 -P tools/marlin_dev.py sweep --general --ms ${SWEEP_MS:-1 16 64} --out "$out" ${SWEEP_SHAPES:+--shapes $SWEEP_SHAPES}
TAIL=60 step timeline 60 python3 -P tools/marlin_dev.py timeline --n 8192 --k 8192 --ms 1
MXFP8_KEEP_CMDBUF=1 TAIL=30 step timeline_cmdbuf 45 python3 -P tools/marlin_dev.py timeline --n 8192 --k 8192 --ms 1
TAIL=8 step test_marlin 120 python3 -P -m pytest -q -x tests/test_marlin.py
