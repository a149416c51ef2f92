"""Every use of JAX internals lives here, so a JAX upgrade touches one file."""
from __future__ import annotations

import functools

from jax._src import core as _core
from jax._src import dispatch as _dispatch
from jax._src.interpreters import ad as _ad
from jax._src.interpreters import batching as _batching
from jax._src.interpreters import mlir as _mlir

Primitive = _core.Primitive
ShapedArray = _core.ShapedArray
ad = _ad
batching = _batching
mlir = _mlir


def is_symbolic_zero(tangent) -> bool:
    """A JVP tangent that JAX knows is zero (the input was not differentiated)."""
    return type(tangent) is _ad.Zero


def symbolic_zero(aval):
    """The symbolic zero tangent / cotangent of a value of type `aval`."""
    return _ad.Zero(aval.to_tangent_aval())


def primitive_impl(prim: Primitive):
    """Eager evaluation of a primitive: compile and run it through XLA."""
    return functools.partial(_dispatch.apply_primitive, prim)


def require_devices_during_lowering(prim: Primitive) -> None:
    """Needed for primitives whose lowering wraps custom_partitioning."""
    _dispatch.prim_requires_devices_during_lowering.add(prim)


def without_explicit_shardings(ctx):
    """`ctx` with operand/result avals typed replicated: custom_partitioning traces its body
    from these, and the body is per-device code that must not see explicit-mode shardings."""
    from jax.sharding import NamedSharding, PartitionSpec

    def strip(aval):
        sharding = getattr(aval, "sharding", None)
        if not isinstance(sharding, NamedSharding) or all(e is None for e in sharding.spec):
            return aval
        return aval.update(sharding=NamedSharding(sharding.mesh, PartitionSpec()))

    avals_out = ctx.avals_out if ctx.avals_out is None else [strip(a) for a in ctx.avals_out]
    return ctx.replace(avals_in=[strip(a) for a in ctx.avals_in], avals_out=avals_out)
