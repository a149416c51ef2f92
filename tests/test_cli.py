"""The command line entry points run on this machine, and the installed package carries the
compiled modules its build could make."""
import os
import shutil
import subprocess
import sys

import pytest

from jax_mxfp8 import _ffi

# Targets every CUDA build has; the CUTLASS GEMM and the wgmma kernel depend on build options.
CUDA_TARGETS = ("jax_mxfp8_quantize_cuda_v1", "jax_mxfp8_dequantize_cuda_v1", "jax_mxfp8_swizzle_scales_cuda_v1",
                "jax_mxfp8_unswizzle_scales_cuda_v1", "jax_mxfp8_marlin_gemm_cuda_v1",
                "jax_mxfp8_marlin_dequantize_cuda_v1")


def run(*args):
    return subprocess.run([sys.executable, "-m", "jax_mxfp8", *args], capture_output=True, text=True,
                          timeout=300, cwd="/")


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def test_info():
    out = run("info")
    assert out.returncode == 0, out.stderr
    assert "select_backend() ->" in out.stdout and "compiled modules" in out.stdout


def test_cpu_module_built():
    assert _ffi.cpu_module() is not None, (
        f"the installed package has no compiled CPU module: {_ffi.build_info()}")


def test_cuda_module_built_where_nvcc_is():
    """With nvcc on PATH a default (JAX_MXFP8_CUDA=AUTO) install builds the CUDA module, so it
    must be there and load; JAX_MXFP8_REQUIRE_CUDA=1 (`tools/gpu.sh test`) requires it anywhere.
    JAX_MXFP8_CUDA=OFF in the environment says this install is CPU-only on purpose."""
    if _flag(_ffi.DISABLE_CUDA_ENV):
        pytest.skip(f"{_ffi.DISABLE_CUDA_ENV}=1 turns the CUDA module off")
    if not _flag("JAX_MXFP8_REQUIRE_CUDA"):
        if shutil.which("nvcc") is None:
            pytest.skip("no nvcc on PATH: a CPU-only build (set JAX_MXFP8_REQUIRE_CUDA=1 to require CUDA)")
        if os.environ.get("JAX_MXFP8_CUDA", "").strip().upper() == "OFF":
            pytest.skip("JAX_MXFP8_CUDA=OFF: installed as a CPU-only build on purpose")
    problem = _ffi.cuda_module_problem()
    assert problem is None, f"nvcc is on PATH or JAX_MXFP8_REQUIRE_CUDA=1, but {problem}"
    missing = sorted(set(CUDA_TARGETS) - _ffi.cuda_target_names())
    assert not missing, f"the CUDA module lacks {missing}: {_ffi.build_info()}"
