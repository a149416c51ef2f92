#!/usr/bin/env bash
# Build, test, sanitize and benchmark jax_mxfp8 on the (offline) GPU machine in one call.
# Usage (repo root on the device):  bash tools/gpu_check.sh [build] [test] [sanitize] [bench]
#   no steps = all four. Logs and results go to $OUT (default ./gpu_out):
#   build.log test.log sanitize.log bench.log bench.md bench.json bench.png
# Env: BENCH_ARGS (default "--op quantize --op dequantize"), PYTEST_ARGS (extra pytest args for
#      the test step), STEP_TIMEOUT (seconds per step, default 540).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_MXFP8_REQUIRE_CUDA=1
# -P: keep the repo root off sys.path, so the installed package (with its .so) is imported.
py=(python3 -P)

if [ "${1:-}" = "__sanitize" ]; then  # internal: the sanitize step (run under `timeout`)
  sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  [ -n "$sanitizer" ] || { echo "compute-sanitizer not found"; exit 2; }
  # Instrument only our kernels (XLA's own are not ours to check); ignore API return codes
  # that XLA handles itself. Small shapes only (JAX_MXFP8_SMALL_ONLY).
  opts=(--error-exitcode 99 --print-limit 20 --report-api-errors no)
  "$sanitizer" --help 2>&1 | grep -q -- "--kernel-name" && opts+=(--kernel-name kns=jax_mxfp8)
  tests=("${py[@]}" -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py)
  rc=0
  echo "--- memcheck"
  JAX_MXFP8_SMALL_ONLY=1 "$sanitizer" --tool memcheck "${opts[@]}" "${tests[@]}" \
    -k "quantize_random or quantize_edge or dequantize or swizzle" || rc=$?
  echo "--- racecheck"
  JAX_MXFP8_SMALL_ONLY=1 "$sanitizer" --tool racecheck "${opts[@]}" "${tests[@]}" \
    -k "(quantize_random and bfloat16) or dequantize_random or swizzle" || rc=$?
  exit $rc
fi

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize bench)
limit="${STEP_TIMEOUT:-540}"
declare -A status

run_step() {  # name, command...: runs with a time limit, logs to $out/<name>.log
  local name="$1"; shift
  local start=$(date +%s)
  echo "=== $name: $*" | tee -a "$out/$name.log"
  timeout "$limit" "$@" >>"$out/$name.log" 2>&1
  local rc=$?
  status[$name]="rc=$rc in $(( $(date +%s) - start )) s"
  echo "=== $name: ${status[$name]}" | tee -a "$out/$name.log"
  tail -n 6 "$out/$name.log"
  return $rc
}

xdist=()
"${py[@]}" -c "import xdist" 2>/dev/null && xdist=(-n 4)
failed=0
for step in "${steps[@]}"; do
  case "$step" in
    build) run_step build bash tools/gpu_build.sh || { failed=1; break; } ;;
    test) run_step test "${py[@]}" -m pytest -q -p no:cacheprovider "${xdist[@]}" tests ${PYTEST_ARGS:-} || failed=1 ;;
    sanitize) run_step sanitize bash "$PWD/tools/gpu_check.sh" __sanitize || failed=1 ;;
    bench) run_step bench "${py[@]}" -m jax_mxfp8 bench ${BENCH_ARGS:---op quantize --op dequantize} \
             --out "$out" || failed=1 ;;
    *) echo "unknown step $step (use: build test sanitize bench)"; exit 2 ;;
  esac
done
echo "=== summary ($(date -Is), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
for step in "${steps[@]}"; do echo "  $step: ${status[$step]:-not run}"; done
exit $failed
