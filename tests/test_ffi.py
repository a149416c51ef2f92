"""jax_mxfp8._ffi: the one kernel-lowering helper, and who chooses the jnp reference on CUDA."""
import jax
import jax.numpy as jnp
import pytest

import jax_mxfp8 as mx
from jax_mxfp8 import _ffi
from jax_mxfp8.backends import marlin


def cuda_text(fn, *args) -> str:
    """StableHLO of fn lowered for CUDA (works on a CPU-only host: lowering needs no GPU). A
    fresh function each time: the kernel choice is made when tracing, and jit caches traces."""
    return jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.fixture
def broken_cuda_module(monkeypatch):
    """The CUDA module installed but failing to load (e.g. built against another Python)."""
    real = _ffi._load

    def load(name):
        return (None, "ImportError: undefined symbol: demo") if name == _ffi.CUDA_MODULE else real(name)

    monkeypatch.setattr(_ffi, "_load", load)
    monkeypatch.delenv(_ffi.BACKEND_ENV, raising=False)


def test_a_broken_cuda_module_is_an_error_not_a_silent_fallback(broken_cuda_module):
    x = jnp.zeros((4, 64), jnp.bfloat16)
    assert _ffi.kernels_enabled()
    with pytest.raises(_ffi.KernelUnavailableError, match="cannot load.*undefined symbol"):
        cuda_text(mx.quantize, x)


def test_emulation_choice_lowers_the_elementwise_ops_to_jnp_on_cuda(broken_cuda_module, monkeypatch):
    monkeypatch.setenv(_ffi.BACKEND_ENV, "emulation")
    x = jnp.zeros((4, 64), jnp.bfloat16)
    assert not _ffi.kernels_enabled()
    text = cuda_text(lambda x: mx.dequantize(*mx.quantize(x)), x)
    assert "custom_call" not in text and "jax_mxfp8" not in text


@pytest.mark.skipif(_ffi.cuda_module_problem() is None, reason="needs a build without the CUDA module")
def test_without_a_cuda_module_the_ops_run_jnp_and_the_gemms_say_what_is_missing():
    assert not _ffi.kernels_enabled()  # the build's choice: nothing to fall back from
    x = jnp.zeros((4, 64), jnp.bfloat16)
    assert "custom_call" not in cuda_text(mx.quantize, x)
    arrays, _ = marlin.pack_weight(*mx.quantize(jnp.ones((64, 64), jnp.float32)))
    with pytest.raises(_ffi.KernelUnavailableError, match="no CUDA module.*nvcc"):
        cuda_text(lambda x, a: marlin.gemm(x, a["qweight"], a["scales"], a["flags"], m_blocks=1,
                                           warps_n=1, splits=1, out_dtype=jnp.bfloat16), x, arrays)


@pytest.mark.skipif(_ffi.cuda_module_problem() is not None, reason="needs the CUDA module")
def test_the_helper_hides_the_workspace_and_passes_int32_attributes():
    x = jnp.zeros((16, 4096), jnp.bfloat16)
    arrays, _ = marlin.pack_weight(*mx.quantize(jnp.ones((256, 4096), jnp.float32)))
    text = cuda_text(lambda x, a: marlin.gemm(x, a["qweight"], a["scales"], a["flags"], m_blocks=1,
                                              warps_n=1, splits=4, out_dtype=jnp.bfloat16), x, arrays)
    ws = marlin.workspace_bytes(16, 256, 4096, 1, 1, 4, False)
    call = next(line for line in text.splitlines() if "custom_call @jax_mxfp8_marlin_gemm_cuda_v1" in line)
    assert f"tensor<{ws}xui8>" in call and "splits = 4 : i32" in call and "cluster = 0 : i32" in call
    main = next(line for line in text.splitlines() if "func.func public @main" in line)
    assert "-> (tensor<16x256xbf16>" in main and "ui8> {" not in main.split("->")[1]  # hidden


def test_missing_target_names_the_build_option(monkeypatch):
    monkeypatch.setattr(_ffi, "cuda_module_problem", lambda: None)
    monkeypatch.setattr(_ffi, "has_cuda_target", lambda name: False)
    with pytest.raises(_ffi.KernelUnavailableError, match="90a in CMAKE_CUDA_ARCHITECTURES"):
        _ffi.require_cuda_target(marlin.WGMMA_TARGET)
    with pytest.raises(_ffi.KernelUnavailableError, match="JAX_MXFP8_CUTLASS"):
        _ffi.require_cuda_target("jax_mxfp8_cutlass_gemm_cuda_v1")
