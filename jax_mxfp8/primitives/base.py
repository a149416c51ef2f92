"""Shared plumbing for jax_mxfp8 primitives.

Every op is one `core.Primitive` with: abstract evaluation (validation lives
there, so errors appear at trace time with the fix in the message), a jnp
reference lowering registered for every platform, optional per-platform
lowerings from a table (the CUDA FFI custom calls), and a vmap batching rule.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from jax_mxfp8 import _ffi
from jax_mxfp8._compat import Primitive, batching, mlir, primitive_impl

FLOAT_INPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def define_primitive(
    name: str,
    *,
    abstract_eval: Callable,
    reference: Callable,
    batcher: Callable,
    multiple_results: bool,
    lowerings: Mapping[str, Callable] | None = None,
) -> Primitive:
    prim = Primitive(name)
    prim.multiple_results = multiple_results
    prim.def_impl(primitive_impl(prim))
    prim.def_abstract_eval(abstract_eval)
    mlir.register_lowering(prim, mlir.lower_fun(reference, multiple_results=multiple_results))
    for platform, rule in (lowerings or {}).items():
        mlir.register_lowering(prim, rule, platform=platform)
    batching.primitive_batchers[prim] = batcher
    return prim


def cuda_ffi_lowering(target: str, reference: Callable, multiple_results: bool,
                      attrs: Callable[..., dict] = lambda **params: {}) -> Callable:
    """A CUDA lowering that emits the FFI custom call `target`, or the jnp reference
    when the CUDA module (or this target) was not built."""
    fallback = mlir.lower_fun(reference, multiple_results=multiple_results)

    def rule(ctx, *args, **params):
        if not _ffi.has_cuda_target(target):
            return fallback(ctx, *args, **params)
        _ffi.register_cuda_targets()
        return jax.ffi.ffi_lowering(target)(ctx, *args, **attrs(**params))

    return rule


def move_to_front(x, bdim, size):
    """Batched operand with its batch axis first (broadcast if it is unbatched)."""
    if bdim is None or bdim is getattr(batching, "not_mapped", None):
        return jnp.broadcast_to(x, (size, *x.shape))
    return jnp.moveaxis(x, bdim, 0)


def check_dtype(what: str, dtype, allowed, fix: str) -> None:
    if jnp.dtype(dtype) not in tuple(jnp.dtype(a) for a in allowed):
        names = ", ".join(jnp.dtype(a).name for a in allowed)
        raise TypeError(f"{what} has dtype {jnp.dtype(dtype).name}; expected one of {names}. {fix}")


def check_last_axis_blocks(what: str, shape) -> int:
    if len(shape) < 1:
        raise ValueError(f"{what} must have at least 1 dimension (the blocked axis last); got a scalar")
    k = shape[-1]
    if k == 0 or k % 32:
        raise ValueError(
            f"{what} has last-axis size {k}, which is not a positive multiple of the MXFP8 block "
            f"size 32; pad the last axis to a multiple of 32 (e.g. with zeros) before quantizing")
    return k
