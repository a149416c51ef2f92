"""Every use of JAX internals lives here, so a JAX upgrade touches one file."""
from __future__ import annotations

import functools

from jax._src import core as _core
from jax._src import dispatch as _dispatch
from jax._src.interpreters import batching as _batching
from jax._src.interpreters import mlir as _mlir

Primitive = _core.Primitive
ShapedArray = _core.ShapedArray
batching = _batching
mlir = _mlir


def primitive_impl(prim: Primitive):
    """Eager evaluation of a primitive: compile and run it through XLA."""
    return functools.partial(_dispatch.apply_primitive, prim)


def require_devices_during_lowering(prim: Primitive) -> None:
    """Needed for primitives whose lowering wraps custom_partitioning."""
    _dispatch.prim_requires_devices_during_lowering.add(prim)
