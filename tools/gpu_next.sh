#!/usr/bin/env bash
# The device call the open work needs (issue 4 tuning evidence, issue 8's mesh-of-one run), in one
# time-boxed script: Marlin tile/split sweep, prepare time + memory analysis, racecheck, and the
# tensor-parallel program on one GPU. Logs and JSON land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_out}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_MXFP8_REQUIRE_CUDA=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2; local t=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name rc=$? in $(( $(date +%s) - t )) s"; tail -n "${TAIL:-3}" "$out/$name.log"
}
step build 150 bash tools/gpu_build.sh
TAIL=40 step sweep 200 python3 -P tools/marlin_dev.py sweep --general --ms 1 16 64 256 --out "$out"
TAIL=10 step extras 60 python3 -P tools/marlin_dev.py extras
TAIL=5 step racecheck 90 compute-sanitizer --tool racecheck --kernel-name kns=Marlin \
  python3 -P tools/marlin_dev.py sanitize --ms 33 --bf16-only
TAIL=12 step tp1 90 python3 -P tools/tp_gpu.py --tp 1 --tokens 16 --out "$out/tp_gpu.json"
