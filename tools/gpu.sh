#!/usr/bin/env bash
# Build, test, sanitize, benchmark and profile jax_mxfp8 on an offline GPU machine, from the
# repo root:  bash tools/gpu.sh MODE... [-- PYTEST_ARGS...]
# Every call starts with `build` (NO_BUILD=1 skips it), then runs the other modes in order.
# Each step has a time limit (TIMEOUT=<s> overrides all) and logs to $OUT/<step>.log
# (OUT default ./gpu_out); the call prints "== step rc=N in S s" and a short tail per step.
#   build     pip-install this checkout (no network; wheels in .whl/ are installed first).
#             CUDA_ARCHS (default 90a), JAX_MXFP8_CUTLASS (default OFF; ON builds the SM100
#             kernels, with the headers of a carried nvidia-cutlass wheel).
#   test      pytest (PYTEST_ARGS after --, default tests/) with JAX_MXFP8_REQUIRE_CUDA=1, so
#             GPU tests fail instead of skipping without the CUDA module; XDIST (default
#             "-n 4 --dist loadfile" where pytest-xdist is installed).
#   sanitize  compute-sanitizer memcheck and racecheck on the Marlin kernels, tiny shapes
#             (SANITIZE_ARGS, default "--ms 3 33"; add --wgmma for the sm_90a kernel).
#   bench     the op benchmark (OPS_BENCH_ARGS), the Marlin linear table over SHAPES (NxK
#             list; TABLE_ARGS), then the prepare/memory extras.
#   profile   ncu sections of wgmma launches (NCU_CASES: N,K,M,BM,C[,BLOCKS[,SPLITS]]), then
#             per-block timelines from tools/wgmma_trace.cu (TRACE_CASES:
#             N,K,M,BM,C,BLOCKS,SPLITS,SUM; TRACE_ABLATE: variants among none, dequant, mma,
#             dequant+mma), packed into $OUT/trace.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_MXFP8_REQUIRE_CUDA=1 NCCL_NVLS_ENABLE=0
py=(python3 -P)  # -P: import the installed package (with its .so), never the source tree

if [ "${1:-}" = __build ]; then  # the build step itself (run under `timeout` by step)
  set -e
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
  fi
  python3 -m pip install -q --no-build-isolation --no-deps --no-index -Cbuild-dir=build/gpu \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90a}" \
    -Ccmake.define.JAX_MXFP8_CUTLASS="${JAX_MXFP8_CUTLASS:-OFF}" -Ccmake.define.JAX_MXFP8_CUDA=ON .
  "${py[@]}" -m jax_mxfp8 info
  exit 0
fi

usage() { echo "usage: bash tools/gpu.sh {build,test,sanitize,bench,profile}... [-- PYTEST_ARGS...]" >&2; exit 2; }
modes=()
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; pytest_args=("$@"); break ;;
    build|test|sanitize|bench|profile) modes+=("$1") ;;
    *) usage ;;
  esac
  shift
done
[ ${#modes[@]} -gt 0 ] || usage
[ ${#pytest_args[@]} -gt 0 ] || pytest_args=(tests)

failed=0
summary=()
step() {  # name, seconds, command...
  local name=$1 limit=${TIMEOUT:-$2}; shift 2
  local log="$out/$name.log" t=$(date +%s)
  mkdir -p "$(dirname "$log")"
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $(( $(date +%s) - t )) s"
  tail -n "${TAIL:-4}" "$log" | sed 's/^/   /'
  summary+=("$name rc=$rc")
  [ $rc -eq 0 ] || failed=1
  return $rc
}

sanitizer() { command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1; }

run_test() {
  local xdist=()
  if [ -n "${XDIST+x}" ]; then
    read -ra xdist <<<"$XDIST"
  elif "${py[@]}" -c "import xdist" 2>/dev/null; then
    xdist=(-n 4 --dist loadfile)
  fi
  TAIL=8 step test 420 "${py[@]}" -m pytest -q -p no:cacheprovider "${xdist[@]}" "${pytest_args[@]}"
}

run_sanitize() {
  local cs args
  cs=$(sanitizer)
  [ -n "$cs" ] || cs=compute-sanitizer  # the step then reports rc=127
  read -ra args <<<"${SANITIZE_ARGS:---ms 3 33}"
  for tool in memcheck racecheck; do
    step "$tool" 240 "$cs" --tool "$tool" --error-exitcode 99 --kernel-name kns=Marlin \
      "${py[@]}" -m jax_mxfp8.bench.marlin sanitize "${args[@]}"
  done
}

run_bench() {
  local shapes ops table
  read -ra shapes <<<"${SHAPES:-28672x8192 8192x8192 14336x4096 4096x4096}"
  read -ra ops <<<"${OPS_BENCH_ARGS:-}"
  read -ra table <<<"${TABLE_ARGS:-}"
  TAIL=25 step bench_ops 240 "${py[@]}" -m jax_mxfp8 bench --out "$out" "${ops[@]}"
  TAIL=70 step bench_table 540 "${py[@]}" -m jax_mxfp8.bench.marlin table --out "$out" \
    --shapes "${shapes[@]}" "${table[@]}"
  TAIL=12 step bench_extras 120 "${py[@]}" -m jax_mxfp8.bench.marlin extras
}

run_profile() {
  local case variant dir defines name xla_include
  for case in ${NCU_CASES:-28672,8192,64,64,2 28672,8192,1024,256,2}; do
    set -- ${case//,/ }
    TAIL=60 step "ncu_${case//,/_}" 180 ncu --clock-control none --kernel-name regex:MarlinWgmma \
      --launch-skip 2 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis --section Occupancy \
      "${py[@]}" tools/ncu_wgmma.py "$@"
  done
  xla_include=$("${py[@]}" -c 'from jax import ffi; print(ffi.include_dir())')
  for variant in ${TRACE_ABLATE:-none}; do
    defines=()
    case "+$variant+" in *+dequant+*) defines+=(-DWGMMA_NO_DEQUANT) ;; esac
    case "+$variant+" in *+mma+*) defines+=(-DWGMMA_NO_MMA) ;; esac
    dir="trace/${variant//+/_}"
    TAIL=3 step "$dir/build" 300 nvcc -std=c++17 -O3 --expt-relaxed-constexpr \
      -gencode=arch=compute_90a,code=sm_90a -I ffi/include -isystem "$xla_include" \
      -DJAX_MXFP8_CUDA_ARCHS='"90a"' "${defines[@]}" -o "$out/$dir/wgmma_trace" \
      tools/wgmma_trace.cu || continue
    for case in ${TRACE_CASES:-8192,8192,64,64,4,1,4,2}; do
      name="$dir/${case//,/_}"
      TAIL=12 step "$name" 60 "$out/$dir/wgmma_trace" ${case//,/ } "$out/$name.csv"
    done
    rm -f "$out/$dir/wgmma_trace"
  done
  tar czf "$out/trace.tar.gz" -C "$out" trace && rm -rf "$out/trace"
}

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader 2>/dev/null
if [ -z "${NO_BUILD:-}" ] || [[ " ${modes[*]} " == *" build "* ]]; then
  build_limit=300
  [ "${JAX_MXFP8_CUTLASS:-OFF}" = OFF ] || build_limit=580
  TAIL=6 step build "$build_limit" bash "$PWD/tools/gpu.sh" __build || { echo "build failed"; exit 1; }
fi
for mode in "${modes[@]}"; do
  case "$mode" in
    build) ;;
    test) run_test ;;
    sanitize) run_sanitize ;;
    bench) run_bench ;;
    profile) run_profile ;;
  esac
done
echo "== summary: ${summary[*]}"
exit $failed
