"""Backends as data: one BackendImpl per backend in a table, plus device-based selection."""
from __future__ import annotations

import os

import jax

from jax_mxfp8 import _ffi
from jax_mxfp8._devices import compute_capability
from jax_mxfp8.backends.base import (  # noqa: F401
    Backend, BackendImpl, get_backend_impl, register_backend, registered_backends)
from jax_mxfp8.backends import emulation  # noqa: F401  (registers EMULATION)
from jax_mxfp8.backends import marlin  # noqa: F401  (registers MARLIN)
from jax_mxfp8.backends import cutlass  # noqa: F401  (registers CUTLASS)

ENV_VAR = _ffi.BACKEND_ENV
# Preference order for automatic selection: the fastest path a device can run first.
PREFERENCE = (Backend.CUTLASS, Backend.MARLIN, Backend.EMULATION)


def why_unavailable(backend: Backend, device) -> str | None:
    """None if `backend` can run on `device`, else the reason (with the fix)."""
    if backend not in registered_backends():
        return f"{backend.value} is not part of this build of jax_mxfp8"
    impl = get_backend_impl(backend)
    if impl.min_compute_capability is None:
        return None
    need = "%d.%d" % impl.min_compute_capability
    cc = compute_capability(device)
    if cc is None:
        return (f"{backend.value} needs an NVIDIA GPU with compute capability >= {need}, but the "
                f"device is {device.platform} ({device.device_kind}); use backend='emulation'")
    if cc < impl.min_compute_capability:
        return (f"{backend.value} needs compute capability >= {need}; {device.device_kind} has "
                f"{cc[0]}.{cc[1]}; use backend='emulation'" +
                ("" if backend is not Backend.CUTLASS else " or 'marlin'"))
    problem = _ffi.cuda_module_problem()
    if problem is not None and impl.required_targets:
        return f"{problem}; or use backend='emulation'"
    missing = [t for t in impl.required_targets if not _ffi.has_cuda_target(t)]
    if missing:
        return (f"{backend.value} kernels were not built into this installation (missing "
                f"{', '.join(missing)}); rebuild with CUDA enabled (see BUILD.md) or use "
                f"backend='emulation'")
    return None


def ensure_available(backend: Backend, device=None) -> Backend:
    device = device or jax.devices()[0]
    reason = why_unavailable(backend, device)
    if reason is not None:
        raise ValueError(f"backend {backend.value!r} cannot run here: {reason}")
    return backend


def select_backend(device=None) -> Backend:
    """The backend for `device` (default: jax.devices()[0]).

    SM100+ -> CUTLASS, SM80+ -> MARLIN, anything else (CPU, TPU, older GPUs, kernels
    not built) -> EMULATION. JAX_MXFP8_BACKEND=emulation|marlin|cutlass overrides the
    choice; forcing a backend the device cannot run raises ValueError.
    """
    device = device or jax.devices()[0]
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced:
        return ensure_available(Backend.parse(forced), device)
    for backend in PREFERENCE:
        if why_unavailable(backend, device) is None:
            return backend
    return Backend.EMULATION
