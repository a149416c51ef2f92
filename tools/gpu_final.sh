#!/usr/bin/env bash
# One device call that checks the integrated tree when device time is short: build, the GPU
# tests of every kernel family, the Marlin linear table (issue 4), the quantize/dequantize
# bench (issue 3) and the demo, each under its own time limit so one slow step cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_out}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_MXFP8_REQUIRE_CUDA=1 NCCL_NVLS_ENABLE=0
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2; local t=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name rc=$? in $(( $(date +%s) - t )) s"; tail -n "${TAIL:-3}" "$out/$name.log"
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
step build 150 bash tools/gpu_build.sh
xdist=(); python3 -P -c "import xdist" 2>/dev/null && xdist=(-n 8)
step test 170 python3 -P -m pytest -q -p no:cacheprovider "${xdist[@]}" tests/test_cuda_ops.py \
  tests/test_marlin.py tests/test_linear.py tests/test_api.py tests/test_transforms.py tests/test_cli.py
TAIL=40 step marlin_bench 190 python3 -P tools/marlin_dev.py bench --ms 1 16 64 256 1024 4096 --out "$out"
TAIL=25 step qbench 70 python3 -P -m jax_mxfp8 bench --op quantize --op dequantize --quick --out "$out"
TAIL=12 step demo 40 python3 -P -m jax_mxfp8 demo
