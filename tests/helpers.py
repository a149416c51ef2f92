"""Helpers the test files share: error norms, bit comparisons, compiled HLO text, the small
decoder model, what this machine has (a GPU, the CUDA module's targets) and the markers built
on that, and the meshes and inputs of the sharding tests.

conftest.py puts tests/ on sys.path, so a test file does `import helpers` (and takes the numpy
oracles from tests/oracles/). Importing this module does not initialise JAX's backends: the
two-process worker of test_partitioning.py imports it before jax.distributed.initialize, so
every device query here is a function, called when a test or a marker needs it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from jax_mxfp8 import _ffi

# ---- numerics --------------------------------------------------------------------------------


def rel_fro(got, want) -> float:
    """Relative error in the Frobenius norm, ||got - want|| / ||want||, in float64."""
    got = np.asarray(got).astype(np.float64)
    want = np.asarray(want).astype(np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def bits(a) -> np.ndarray:
    """The raw bits of an array as unsigned integers of its item size."""
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(f"u{a.dtype.itemsize}")


def assert_same_bits(a, b) -> None:
    """Two pytrees of arrays: same shapes, dtypes and bits, leaf by leaf."""
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert u.shape == v.shape and u.dtype == v.dtype
        np.testing.assert_array_equal(bits(u), bits(v))


def assert_same_bits_any_nan(got, want) -> None:
    """Bit-exact, except that any NaN matches any NaN (payloads are not part of the contract)."""
    got, want = np.asarray(got), np.asarray(want)
    both_nan = np.isnan(got.astype(np.float32)) & np.isnan(want.astype(np.float32))
    width = {2: np.uint16, 4: np.uint32}[got.dtype.itemsize]
    mismatch = (got.view(width) != want.view(width)) & ~both_nan
    assert not mismatch.any(), (f"{mismatch.sum()} mismatches, first at "
                                f"{np.argwhere(mismatch)[:5].tolist()}: "
                                f"got {got[mismatch][:5]} want {want[mismatch][:5]}")


def hlo(fn, *args) -> str:
    """The compiled (optimised) HLO text of jax.jit(fn) for these arguments."""
    return jax.jit(fn).lower(*args).compile().as_text()


# ---- the small decoder of the demo and decoder tests (they need the flax extra) ---------------

# DecoderConfig(**SMALL_DECODER) is the model of the demo's arguments in test_cli_demo.py.
SMALL_DECODER = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


def jitted_logits(model, tokens) -> np.ndarray:
    """An NNX model's forward pass under nnx.jit, as float64."""
    from flax import nnx
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens), np.float64)


# ---- what this machine has ---------------------------------------------------------------------

@functools.cache
def has_gpu() -> bool:
    """Whether JAX's default devices are (NVIDIA) GPUs."""
    return any(d.platform == "gpu" for d in jax.devices())


@functools.cache
def has_sm100_gpu() -> bool:
    """Whether a GPU of compute capability >= 10.0 (Blackwell) is present."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return False
    return any(tuple(int(v) for v in str(d.compute_capability).split(".")[:2]) >= (10, 0)
               for d in devices)


def has_cuda_targets(*targets: str) -> bool:
    """Whether the installed CUDA module registers every one of these FFI targets."""
    return all(_ffi.has_cuda_target(t) for t in targets)


# ---- markers -------------------------------------------------------------------------------------

def gpu_marks(available: bool = True, reason: str = "needs an NVIDIA GPU") -> list:
    """The marks of a GPU-only test or parameter: `gpu` (pyproject.toml registers the marker)
    and a skip unless a GPU is present and `available` holds (e.g. its kernels were built)."""
    return [pytest.mark.gpu, pytest.mark.skipif(not (available and has_gpu()), reason=reason)]


def gpu_test(available: bool = True, reason: str = "needs an NVIDIA GPU"):
    """Decorator of a GPU-only test (gpu_marks)."""
    def mark(fn):
        for m in reversed(gpu_marks(available, reason)):
            fn = m(fn)
        return fn
    return mark


def needs_cuda_targets(*targets: str, reason: str | None = None):
    """Skip unless the CUDA module has these targets. No GPU needed: lowering for the "cuda"
    platform only needs the module's registrations."""
    missing = [t for t in targets if not _ffi.has_cuda_target(t)]
    return pytest.mark.skipif(
        bool(missing), reason=reason or f"the CUDA module lacks {missing} (a build without nvcc)")


def cpu_only(reason: str = "a CPU-only expectation"):
    """Skip where a GPU is the default device (the test expects what a CPU-only machine does)."""
    return pytest.mark.skipif(has_gpu(), reason=reason)


# ---- sharding on the 8 fake CPU devices (conftest.py asks for them) -----------------------------

def cpu_devices() -> list:
    return jax.devices("cpu")


def mesh_2x4() -> Mesh:
    return Mesh(np.array(cpu_devices()[:8]).reshape(2, 4), ("data", "model"))


def mesh_8() -> Mesh:
    return Mesh(np.array(cpu_devices()[:8]), ("model",))


def put(x, mesh, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def local(x):
    """x on one CPU device: the single-device result a sharded one is compared with."""
    return jax.device_put(x, cpu_devices()[0])


def random_x(rng, shape, dtype=jnp.float32):
    """Gaussian 32-blocks along the last axis, each scaled by 2^[-20, 20)."""
    blocks = rng.standard_normal((*shape[:-1], shape[-1] // 32, 32))
    spread = np.exp2(rng.integers(-20, 20, (*shape[:-1], shape[-1] // 32, 1)))
    return jnp.asarray((blocks * spread).reshape(shape), dtype)
