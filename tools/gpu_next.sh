#!/usr/bin/env bash
# Device calls for issue 4's evidence (one mode per call; raw logs go to $OUT):
#   check    build, the whole test suite on the GPU, Marlin racecheck + memcheck, extras
#   tests    build, $TEST_FILES (with $XDIST), then the mma.sync sweep $SWEEP_ARGS if set
#   split90  build, wgmma tests + memcheck (or $TEST_FILES), wgmma configs x K splits at small M
#            ($SPLIT_CASES, $SPLITS) with bf16 + mma.sync peers, the mma.sync sweep $MMA_SWEEP
#   table90  build, the issue's table on this GPU ($TABLE_SHAPES) + prepare/memory extras
#   final90  build, the whole suite (4 workers), both sanitizers on every Marlin kernel, extras
#   ncu      build, ncu sections of wgmma launches ($NCU_CASES)
#   trace    per-block timelines of wgmma launches (tools/wgmma_trace.cu, $TRACE_CASES)
# Earlier sessions' modes (tune, race, final, last, wgmma, tune90, bench) are in git history.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_out}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_MXFP8_REQUIRE_CUDA=1
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2; local t=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name rc=$? in $(( $(date +%s) - t )) s"; tail -n "${TAIL:-3}" "$out/$name.log"
}
[ "${1:-check}" != trace ] && step build 200 bash tools/gpu_build.sh
case "${1:-check}" in
  check)
    TAIL=6 step tests 300 python3 -P -m pytest -q -p no:cacheprovider tests
    TAIL=4 step racecheck 90 compute-sanitizer --tool racecheck --kernel-name kns=Marlin \
      python3 -P tools/marlin_dev.py sanitize --ms 3 33
    TAIL=4 step memcheck 60 compute-sanitizer --tool memcheck --kernel-name kns=Marlin \
      python3 -P tools/marlin_dev.py sanitize --ms 3 33
    TAIL=10 step extras 90 python3 -P tools/marlin_dev.py extras ;;
  tests)  # just the named test files ($XDIST: e.g. "-n 4 --dist loadfile"), then an optional sweep
    TAIL=6 step tests 400 python3 -P -m pytest -q ${XDIST:-} -p no:cacheprovider ${TEST_FILES:-tests}
    [ -n "${SWEEP_ARGS:-}" ] && TAIL=6 step sweep 120 python3 -P tools/marlin_dev.py sweep $SWEEP_ARGS ;;
  table90)  # the issue's table on this GPU (rows saved as they finish), then prepare/memory extras
    TAIL=70 step bench ${BENCH_S:-470} python3 -P tools/marlin_dev.py bench --out "$out" \
      --shapes ${TABLE_SHAPES:-28672x8192 8192x8192 14336x4096 4096x4096} ${BENCH_ARGS:-}
    [ -z "${NO_EXTRAS:-}" ] && TAIL=12 step extras 70 python3 -P tools/marlin_dev.py extras
    [ -n "${MEMCHECK:-}" ] && TAIL=4 step memcheck 60 compute-sanitizer --tool memcheck \
      --kernel-name kns=Marlin python3 -P tools/marlin_dev.py sanitize --ms 3 33 --bf16-only ;;
  ncu)  # where the wgmma kernel's time goes: one launch per case, ncu's stall and throughput sections
    for case in ${NCU_CASES:-28672,8192,64,64,2 28672,8192,1024,256,2}; do  # N,K,M,BM,C[,BLOCKS[,SPLITS]]
      set -- ${case//,/ }
      TAIL=60 step "ncu_$1_$3_$4x$5${7:+s$7}" 120 ncu --clock-control none --kernel-name regex:MarlinWgmma \
        --launch-skip 2 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis --section Occupancy \
        python3 -P tools/ncu_wgmma.py "$@"
    done ;;
  split90)  # wgmma tests + memcheck (or $TEST_FILES, with $XDIST), then configs x K splits (both
    # sums) at small M with bf16 + mma.sync peers, then the mma.sync sweep $MMA_SWEEP if set
    if [ -n "${TEST_FILES:-}" ]; then
      TAIL=6 step tests 300 python3 -P -m pytest -q ${XDIST:-} -p no:cacheprovider $TEST_FILES
    else
      TAIL=8 step tests_wgmma 150 python3 -P -m pytest -q -x -p no:cacheprovider tests/test_marlin.py -k wgmma
      TAIL=4 step memcheck 60 compute-sanitizer --tool memcheck --kernel-name kns=Wgmma \
        python3 -P tools/marlin_dev.py sanitize --ms 3 200 --wgmma --wgmma-only
    fi
    [ -n "${MMA_SWEEP:-}" ] && TAIL=6 step sweep 150 python3 -P tools/marlin_dev.py sweep --out "$out" $MMA_SWEEP
    for case in ${SPLIT_CASES:-28672x8192:16,64,128 8192x8192:16,64,128 14336x4096:64,128 4096x4096:64,128}; do
      shape=${case%%:*} ms=${case#*:}
      TAIL=10 step "sweep90_$shape" ${SPLIT_S:-100} python3 -P tools/marlin_dev.py sweep90 \
        --out "$out/$shape" --shapes "$shape" --ms ${ms//,/ } --few-peers \
        --wgmma-splits ${SPLITS:-1 2 3 4 6 8}
    done ;;
  final90)
    TAIL=6 step tests_all 280 python3 -P -m pytest -q -n 4 --dist loadfile -p no:cacheprovider tests
    TAIL=4 step memcheck 90 compute-sanitizer --tool memcheck --kernel-name kns=Marlin \
      python3 -P tools/marlin_dev.py sanitize --ms 3 200 --wgmma --bf16-only
    TAIL=4 step racecheck 90 compute-sanitizer --tool racecheck --kernel-name kns=Marlin \
      python3 -P tools/marlin_dev.py sanitize --ms 3 200 --wgmma --bf16-only
    TAIL=12 step extras 90 python3 -P tools/marlin_dev.py extras ;;
  trace)  # per-block timelines of wgmma launches (tools/wgmma_trace.cu; no package build);
    # logs and per-block CSVs in $out/trace.tar.gz; TRACE_DEFINES: e.g. -DWGMMA_NO_DEQUANT
    mkdir -p "$out/trace"
    TAIL=3 step trace_build 240 nvcc -std=c++17 -O3 --expt-relaxed-constexpr \
      -gencode=arch=compute_90a,code=sm_90a -I ffi/include \
      -isystem "$(python3 -c 'from jax import ffi; print(ffi.include_dir())')" \
      -DJAX_MXFP8_CUDA_ARCHS='"90a"' ${TRACE_DEFINES:-} -o "$out/wgmma_trace" tools/wgmma_trace.cu
    for case in ${TRACE_CASES:-8192,8192,64,64,4,1,4,2}; do  # N,K,M,BM,C,BLOCKS,SPLITS,SUM
      name="trace/${case//,/_}"
      TAIL=12 step "$name" 30 "$out/wgmma_trace" ${case//,/ } "$out/$name.csv"
    done
    tar czf "$out/trace.tar.gz" -C "$out" trace && rm -rf "$out/trace" "$out/wgmma_trace" ;;
esac
exit 0  # each step printed its own rc
