#!/usr/bin/env bash
# Device calls for issue 4's evidence. `bash tools/gpu_next.sh check`: build, the whole test
# suite on the GPU, Marlin racecheck + memcheck, prepare time and memory analysis.
# `bash tools/gpu_next.sh tune`: build, Marlin tests, sweep and large-M slice timings.
# `bash tools/gpu_next.sh bench`: build, the issue's table (both timing methods) + plot.
# `bash tools/gpu_next.sh wgmma`: build, the sm_90a kernel's tests, sanitizers and sweep.
# `tune90`: Marlin tests, wgmma sanitizers, both sweeps; `table90`: the issue's table + memory
# extras; `ncu`: ncu sections of one wgmma launch at M = 64 and M = 1024. `split90`: the wgmma
# tests, memcheck, and the sweep of configs x K splits at small M. `final90`: the whole suite
# (4 workers), both sanitizers on every Marlin kernel, prepare/memory extras. `trace`: per-block
# timelines of wgmma launches (TRACE_CASES).
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
  tune)  # after a kernel change: its tests and sanitizers, the tile x split sweep, large-M slices
    TAIL=4 step tests 200 python3 -P -m pytest -q -p no:cacheprovider tests/test_marlin.py tests/test_linear.py
    TAIL=4 step racecheck 120 compute-sanitizer --tool racecheck --kernel-name kns=Marlin \
      python3 -P tools/marlin_dev.py sanitize --ms 3 33 --bf16-only
    TAIL=4 step memcheck 90 compute-sanitizer --tool memcheck --kernel-name kns=Marlin \
      python3 -P tools/marlin_dev.py sanitize --ms 3 33 --bf16-only
    TAIL=24 step sweep 200 python3 -P tools/marlin_dev.py sweep --ms ${SWEEP_MS:-1 16 32 64 128 256} --out "$out"
    [ -n "${SLICES:-}" ] && TAIL=6 step slices 100 python3 -P tools/marlin_dev.py slices --shapes $SLICES \
      --ms 1024 4096 ;;
  race)  # racecheck of every tile, then tile by tile if the whole run fails
    TAIL=4 step racecheck 120 compute-sanitizer --tool racecheck --kernel-name kns=Marlin \
      python3 -P tools/marlin_dev.py sanitize --ms 3 33 --bf16-only
    if ! grep -q "0 hazards" "$out/racecheck.log"; then
      for t in 11 12 14 21 22 24 41 42 44; do
        TAIL=2 step "racecheck_$t" 60 compute-sanitizer --tool racecheck --kernel-name kns=Marlin \
          python3 -P tools/marlin_dev.py sanitize --ms 3 33 --bf16-only --tiles $t
      done
    fi
    TAIL=40 step bench 420 python3 -P tools/marlin_dev.py bench --out "$out" --shapes $BENCH_SHAPES ;;
  final)  # the whole suite, memcheck, prepare/memory extras, then the table for $BENCH_SHAPES
    TAIL=6 step tests 300 python3 -P -m pytest -q -p no:cacheprovider ${TEST_FILES:-tests}
    TAIL=4 step memcheck 60 compute-sanitizer --tool memcheck --kernel-name kns=Marlin \
      python3 -P tools/marlin_dev.py sanitize --ms 3 33
    TAIL=12 step extras 90 python3 -P tools/marlin_dev.py extras
    TAIL=20 step bench 150 python3 -P tools/marlin_dev.py bench --out "$out" --shapes $BENCH_SHAPES ;;
  last)  # the test files a timed-out full run left, racecheck of both dtypes, the whole table
    TAIL=6 step tests 200 python3 -P -m pytest -q -p no:cacheprovider ${TEST_FILES:-tests}
    [ -n "${EXTRAS:-}" ] && TAIL=12 step extras 90 python3 -P tools/marlin_dev.py extras
    TAIL=4 step racecheck 120 compute-sanitizer --tool racecheck --kernel-name kns=Marlin \
      python3 -P tools/marlin_dev.py sanitize --ms 3 33
    [ -n "${MEMCHECK:-}" ] && TAIL=4 step memcheck 60 compute-sanitizer --tool memcheck \
      --kernel-name kns=Marlin python3 -P tools/marlin_dev.py sanitize --ms 3 33
    TAIL=70 step bench 330 python3 -P tools/marlin_dev.py bench --out "$out" ${BENCH_ARGS:-} ;;
  tests)  # just the named test files ($XDIST: e.g. "-n 4 --dist loadfile"), then an optional sweep
    TAIL=6 step tests 400 python3 -P -m pytest -q ${XDIST:-} -p no:cacheprovider ${TEST_FILES:-tests}
    [ -n "${SWEEP_ARGS:-}" ] && TAIL=6 step sweep 120 python3 -P tools/marlin_dev.py sweep $SWEEP_ARGS ;;
  wgmma)  # the sm_90a kernel: its tests (stop at the first failure), sanitizers, the sweep
    TAIL=12 step tests_wgmma 200 python3 -P -m pytest -q -x -p no:cacheprovider tests/test_marlin.py -k wgmma
    TAIL=4 step memcheck 100 compute-sanitizer --tool memcheck --kernel-name kns=Wgmma \
      python3 -P tools/marlin_dev.py sanitize --ms 3 200 --wgmma --wgmma-only
    TAIL=4 step racecheck 100 compute-sanitizer --tool racecheck --kernel-name kns=Wgmma \
      python3 -P tools/marlin_dev.py sanitize --ms 3 200 --wgmma --wgmma-only
    TAIL=40 step sweep90 ${SWEEP_S:-240} python3 -P tools/marlin_dev.py sweep90 --out "$out" \
      --shapes ${SHAPES:-8192x8192 28672x8192} --ms ${MS:-128 256 1024 4096}
    [ -n "${TEST_FILES:-}" ] && TAIL=6 step tests 200 python3 -P -m pytest -q -p no:cacheprovider $TEST_FILES ;;
  tune90)  # after a wgmma change: Marlin tests, wgmma sanitizers, both sweeps on this GPU
    TAIL=6 step tests 150 python3 -P -m pytest -q -x -p no:cacheprovider tests/test_marlin.py
    TAIL=4 step memcheck 40 compute-sanitizer --tool memcheck --kernel-name kns=Wgmma \
      python3 -P tools/marlin_dev.py sanitize --ms 3 200 --wgmma --wgmma-only
    TAIL=4 step racecheck 40 compute-sanitizer --tool racecheck --kernel-name kns=Wgmma \
      python3 -P tools/marlin_dev.py sanitize --ms 3 200 --wgmma --wgmma-only
    TAIL=30 step sweep90 130 python3 -P tools/marlin_dev.py sweep90 --out "$out" \
      --ms ${MS90:-64 128 256 512 1024 2048 4096}
    TAIL=20 step sweep 160 python3 -P tools/marlin_dev.py sweep --out "$out" --ms ${MS:-1 16 32 64} ;;
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
    # logs and per-block CSVs in $out/trace.tar.gz
    mkdir -p "$out/trace"
    TAIL=3 step trace_build 240 nvcc -std=c++17 -O3 --expt-relaxed-constexpr \
      -gencode=arch=compute_90a,code=sm_90a -I ffi/include \
      -isystem "$(python3 -c 'from jax import ffi; print(ffi.include_dir())')" \
      -DJAX_MXFP8_CUDA_ARCHS='"90a"' -o "$out/wgmma_trace" tools/wgmma_trace.cu
    for case in ${TRACE_CASES:-8192,8192,64,64,4,1,4,2}; do  # N,K,M,BM,C,BLOCKS,SPLITS,SUM
      name="trace/${case//,/_}"
      TAIL=12 step "$name" 30 "$out/wgmma_trace" ${case//,/ } "$out/$name.csv"
    done
    tar czf "$out/trace.tar.gz" -C "$out" trace && rm -rf "$out/trace" "$out/wgmma_trace" ;;
  bench)
    TAIL=80 step bench 540 python3 -P tools/marlin_dev.py bench --out "$out" ;;
esac
exit 0  # each step printed its own rc
