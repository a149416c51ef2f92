#!/usr/bin/env bash
# Build and install jax_mxfp8 on the (offline) GPU machine from this checkout.
# Usage (from the repo root on the device): bash tools/gpu_build.sh
# Env: JAX_MXFP8_ARCHS (default 90a), JAX_MXFP8_CUTLASS (default OFF there: SM100 cannot run on Hopper).
set -euo pipefail
export PYTHONUNBUFFERED=1
archs="${JAX_MXFP8_ARCHS:-90a}"
cutlass="${JAX_MXFP8_CUTLASS:-OFF}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # Carried wheels (e.g. nvidia-cutlass for the headers): install without network.
  python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
fi
start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps --no-index \
  -Cbuild-dir=build/gpu \
  -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$archs" \
  -Ccmake.define.JAX_MXFP8_CUTLASS="$cutlass" \
  -Ccmake.define.JAX_MXFP8_CUDA=ON .
echo "gpu_build: installed jax_mxfp8 (archs=$archs, cutlass=$cutlass) in $(( $(date +%s) - start )) s"
python3 -P -c "import jax, jax_mxfp8._ffi as f; print('jax', jax.__version__, jax.devices()); print('cuda module:', f.cuda_module() is not None)"
