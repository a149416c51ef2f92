"""Loads the compiled extension modules and registers their XLA FFI targets.

CUDA targets are registered once, lazily (from the first CUDA lowering), and
only when JAX has a CUDA backend. Without a CUDA module everything still runs
through the jnp reference lowerings.
"""
from __future__ import annotations

import functools
import importlib
import os
import threading

_lock = threading.Lock()
_cuda_registered = False


@functools.cache
def cpu_module():
    try:
        return importlib.import_module("jax_mxfp8._jax_mxfp8_cpu")
    except ImportError:
        return None


@functools.cache
def cuda_module():
    if os.environ.get("JAX_MXFP8_DISABLE_CUDA", "") not in ("", "0"):
        return None
    try:
        return importlib.import_module("jax_mxfp8._jax_mxfp8_cuda")
    except ImportError:
        return None


@functools.cache
def cuda_target_names() -> frozenset[str]:
    module = cuda_module()
    return frozenset(module.registrations()) if module is not None else frozenset()


def has_cuda_target(name: str) -> bool:
    return name in cuda_target_names()


@functools.cache
def jax_has_cuda_backend() -> bool:
    import jax
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
    import jax
    with _lock:
        if not _cuda_registered:
            for name, capsule in module.registrations().items():
                jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
            _cuda_registered = True
    return True


def build_info() -> dict:
    info = {"cpu_module": cpu_module() is not None, "cuda_module": cuda_module() is not None}
    if cpu_module() is not None:
        info.update(cpu_module().build_info())
    if cuda_module() is not None:
        info.update(cuda_module().build_info())
        info["cuda_targets"] = sorted(cuda_target_names())
    return info
