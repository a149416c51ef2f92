"""The compiled extension modules, and the one lowering helper every CUDA kernel goes through.

`_jax_mxfp8_cpu` is always built (build info, host-side facts of the kernels such as their
workspace sizes). `_jax_mxfp8_cuda` holds the XLA FFI CUDA kernels; it is absent when the
package was built without nvcc (or with JAX_MXFP8_CUDA=OFF). CUDA targets are registered with
XLA once, from the first CUDA lowering, and only when JAX has a CUDA backend.

`kernel_lowering` either emits the custom call or raises KernelUnavailableError naming the
missing build piece: it never falls back to jnp. Falling back is a choice made before binding:
`kernels_enabled()` says whether the elementwise ops bind their kernels (the jnp reference runs
on CUDA only when the package has no CUDA module or JAX_MXFP8_BACKEND=emulation), and backend
selection does the same for linear.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_mxfp8._compat import ShapedArray

# The version of the kernels' calling convention, the suffix of every target name (ffi_common.h:
# JAX_MXFP8_FFI_VERSION); a serialized export names the version it was lowered for.
FFI_VERSION = "v1"
CUDA_MODULE = "jax_mxfp8._jax_mxfp8_cuda"
CPU_MODULE = "jax_mxfp8._jax_mxfp8_cpu"
BACKEND_ENV = "JAX_MXFP8_BACKEND"
KERNEL_REFERENCES_ENV = "JAX_MXFP8_KERNEL_REFERENCES"
DISABLE_CUDA_ENV = "JAX_MXFP8_DISABLE_CUDA"

_lock = threading.Lock()
_cuda_registered = False


class KernelUnavailableError(RuntimeError):
    """A CUDA lowering needs a kernel this installation does not have."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


@functools.cache
def _load(name: str):
    """(module, None) or (None, why): "absent" when it was not built, else the import error."""
    if importlib.util.find_spec(name) is None:
        return None, "absent"
    try:
        return importlib.import_module(name), None
    except ImportError as err:  # built, but it cannot load (wrong Python, missing library, ...)
        return None, f"{type(err).__name__}: {err}"


def cpu_module():
    return _load(CPU_MODULE)[0]


def require_cpu_module():
    module, why = _load(CPU_MODULE)
    if module is None:
        raise KernelUnavailableError(
            f"jax_mxfp8's compiled host module {CPU_MODULE} is missing ({why}); the package "
            f"was not installed with pip (run `pip install .` from the source tree, BUILD.md)")
    return module


def cuda_module():
    """The CUDA module, or None when it was not built, cannot load, is of another FFI version,
    or JAX_MXFP8_DISABLE_CUDA=1."""
    return None if cuda_module_problem() else _load(CUDA_MODULE)[0]


@functools.cache
def _module_ffi_version(module) -> str:
    return str(module.build_info().get("ffi_version", "none"))


def cuda_module_problem() -> str | None:
    """Why there is no usable CUDA module (None when there is one), with the fix."""
    if _flag(DISABLE_CUDA_ENV):
        return f"the CUDA kernels are disabled by {DISABLE_CUDA_ENV}=1"
    module, why = _load(CUDA_MODULE)
    if module is not None:
        version = _module_ffi_version(module)
        if version != FFI_VERSION:
            return (f"the CUDA module's kernels are FFI version {version} but this Python package "
                    f"expects {FFI_VERSION} (a stale build); reinstall jax_mxfp8 (BUILD.md)")
        return None
    if why == "absent" and _load(CPU_MODULE)[1] == "absent":
        return ("jax_mxfp8 was imported from a source tree without its compiled modules "
                "(e.g. `python -m jax_mxfp8` run from the repository root, which puts the source "
                "first on sys.path): run from another directory, or `pip install -e .`")
    if why == "absent":
        return ("this installation of jax_mxfp8 has no CUDA module (it was built without nvcc, "
                "or with JAX_MXFP8_CUDA=OFF); reinstall with nvcc on PATH (BUILD.md)")
    return (f"the CUDA module {CUDA_MODULE} is installed but cannot load ({why}); rebuild it "
            f"against this Python and jaxlib (BUILD.md)")


@functools.cache
def _cuda_target_names() -> frozenset[str]:
    module = cuda_module()
    return frozenset(module.registrations()) if module is not None else frozenset()


def cuda_target_names() -> frozenset[str]:
    return _cuda_target_names() if cuda_module() is not None else frozenset()


_LOWERED_TARGETS: set[str] = set()  # every target a kernel_lowering was made for


def target_names() -> tuple[str, ...]:
    """Every FFI target the package's lowerings can emit (built here or not): the custom calls
    a jax.export of code using jax_mxfp8 may contain."""
    return tuple(sorted(_LOWERED_TARGETS))


def has_cuda_target(name: str) -> bool:
    return name in cuda_target_names()


def kernels_enabled() -> bool:
    """Whether the elementwise ops bind their CUDA kernels. False only by choice: a build
    without the CUDA module, JAX_MXFP8_DISABLE_CUDA=1 or JAX_MXFP8_BACKEND=emulation. A CUDA
    module that is installed but broken leaves this True, so its lowering raises. Read when a
    function is traced (jit caches traces): set JAX_MXFP8_BACKEND before the first call."""
    if os.environ.get(BACKEND_ENV, "").strip().lower() == "emulation" or _flag(DISABLE_CUDA_ENV):
        return False
    return _load(CUDA_MODULE)[1] != "absent"


def kernel_references_enabled() -> bool:
    """JAX_MXFP8_KERNEL_REFERENCES=1: a GPU backend's weights may run off the GPU, their kernels
    lowered to the jnp references of what they compute (slow; for testing layouts and sharding
    on a CPU host). Off by default: linear refuses such a weight there."""
    return _flag(KERNEL_REFERENCES_ENV)


# What to rebuild when the CUDA module lacks a target; every other target is always built.
_BUILD_HINTS = {
    "jax_mxfp8_cutlass_gemm_cuda_v1": "the CUTLASS SM100 kernels need a CUDA >= 12.8 toolkit, the "
                                   "nvidia-cutlass headers and JAX_MXFP8_CUTLASS=AUTO|ON",
    "jax_mxfp8_marlin_wgmma_cuda_v1": "the wgmma kernel needs 90a in CMAKE_CUDA_ARCHITECTURES",
}


def require_cuda_target(target: str) -> None:
    problem = cuda_module_problem()
    if problem is not None:
        raise KernelUnavailableError(
            f"jax_mxfp8: lowering for CUDA needs the kernel {target}, but {problem}. To run "
            f"the jnp reference instead, select it: JAX_MXFP8_BACKEND=emulation")
    if not has_cuda_target(target):
        hint = _BUILD_HINTS.get(target, "this build is incomplete; reinstall (BUILD.md)")
        raise KernelUnavailableError(
            f"jax_mxfp8: the CUDA module was built without {target}: {hint}")


@functools.cache
def jax_has_cuda_backend() -> bool:
    try:
        return len(jax.devices("cuda")) > 0
    except RuntimeError:
        return False


def register_cuda_targets() -> bool:
    """Registers every CUDA target of the module with XLA (once). Returns whether registered."""
    global _cuda_registered
    if _cuda_registered:
        return True
    module = cuda_module()
    if module is None or not jax_has_cuda_backend():
        return False
    with _lock:
        if not _cuda_registered:
            for name, capsule in module.registrations().items():
                jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
            _cuda_registered = True
    return True


def kernel_lowering(target: str, *, attrs: Callable[..., dict] = lambda **params: {},
                    workspace: Callable[..., int] | None = None,
                    operands: Callable[..., tuple[int, ...]] | None = None) -> Callable:
    """The CUDA lowering rule of a primitive whose kernel is the FFI target `target`.

    attrs(**params) -> the handler's attributes (python ints become int32, bools stay bools;
    pass numpy scalars for other widths). workspace(avals_in, avals_out, **params) -> bytes of a scratch buffer the
    handler takes as its last result: it is hidden, the primitive never sees it.
    operands(**params) -> the indices of the operands the handler takes (default: all), for
    optional operands bound as empty placeholders.
    """
    if not target.endswith("_" + FFI_VERSION):
        raise ValueError(f"FFI target {target!r} must end with the FFI version _{FFI_VERSION}")
    _LOWERED_TARGETS.add(target)

    def rule(ctx, *args, **params):
        require_cuda_target(target)
        register_cuda_targets()
        if operands is not None:
            keep = operands(**params)
            ctx = ctx.replace(avals_in=[ctx.avals_in[i] for i in keep])
            args = [args[i] for i in keep]
        visible = len(ctx.avals_out)
        if workspace is not None:
            size = int(workspace(ctx.avals_in, ctx.avals_out, **params))
            ctx = ctx.replace(avals_out=[*ctx.avals_out, ShapedArray((size,), jnp.uint8)])
        values = {k: np.int32(v) if type(v) is int else v for k, v in attrs(**params).items()}
        results = jax.ffi.ffi_lowering(target)(ctx, *args, **values)
        return list(results)[:visible]

    return rule


def build_info() -> dict:
    info = {"cpu_module": cpu_module() is not None, "cuda_module": cuda_module() is not None}
    if cpu_module() is not None:
        info.update(cpu_module().build_info())
    if cuda_module() is not None:
        info.update(cuda_module().build_info())
        info["cuda_targets"] = sorted(cuda_target_names())
    else:
        info["cuda_problem"] = cuda_module_problem()
    return info
