"""jax.export of functions that use jax_mxfp8.

XLA refuses to serialize custom calls that carry no compatibility guarantee unless each target
is named in `disabled_checks`. Ours carry theirs in their names: every target ends with the FFI
version of its calling convention (`_ffi.FFI_VERSION`), so an artifact lowered for one version
fails by name, not by misread buffers, against a build of another. MxWeight is registered for
serialization (weight.py), so exported functions can take prepared weights as arguments.

    exported = jax_mxfp8.exporting.export(fn, platforms=("cuda",))(x, weight)
    blob = exported.serialize()   # ... later, anywhere with the same jax_mxfp8 FFI version:
    y = jax.export.deserialize(blob).call(x, weight)
"""
from __future__ import annotations

import jax

from jax_mxfp8 import _ffi


def disabled_checks() -> list:
    """The jax.export.DisabledSafetyCheck entries for every jax_mxfp8 FFI target."""
    return [jax.export.DisabledSafetyCheck.custom_call(t) for t in _ffi.target_names()]


def export(fn, *, platforms=None, disabled_checks_extra=(), **kwargs):
    """jax.export.export(jax.jit(fn), ...) with jax_mxfp8's targets allowed; `platforms`
    e.g. ("cpu",), ("cuda",) or both (lowering for CUDA needs no GPU)."""
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    return jax.export.export(jitted, platforms=platforms,
                             disabled_checks=[*disabled_checks(), *disabled_checks_extra], **kwargs)
