"""Input validation shared by the ops: each check raises with the fix in its message."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jax_mxfp8.reference import BLOCK_SIZE

FLOAT_INPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
SCALE_DTYPES = (jnp.dtype(jnp.uint8), jnp.dtype(jnp.float8_e8m0fnu))


def check_dtype(what: str, dtype, allowed, fix: str) -> None:
    if jnp.dtype(dtype) not in tuple(jnp.dtype(a) for a in allowed):
        names = ", ".join(jnp.dtype(a).name for a in allowed)
        raise TypeError(f"{what} has dtype {jnp.dtype(dtype).name}; expected one of {names}. {fix}")


def check_last_axis_blocks(what: str, shape) -> int:
    if len(shape) < 1:
        raise ValueError(f"{what} must have at least 1 dimension (the blocked axis last); got a scalar")
    k = shape[-1]
    if k == 0 or k % BLOCK_SIZE:
        raise ValueError(
            f"{what} has last-axis size {k}, which is not a positive multiple of the MXFP8 block "
            f"size 32; pad the last axis to a multiple of 32 (e.g. with zeros) before quantizing")
    return k


def check_scales_match(values_shape, scales_shape, what="scales") -> None:
    expected = (*values_shape[:-1], values_shape[-1] // BLOCK_SIZE)
    if tuple(scales_shape) != expected:
        raise ValueError(f"{what} shape {tuple(scales_shape)} does not match values shape "
                         f"{tuple(values_shape)}: expected {expected} (one scale per 32 values of the "
                         f"last axis, row-major; unswizzle_scales() first if they are swizzled)")


def scales_to_uint8(scales):
    """uint8 or float8_e8m0fnu scale bytes as uint8 (a bitcast: e8m0 bytes are the same bits)."""
    scales = jnp.asarray(scales)
    check_dtype("scales", scales.dtype, SCALE_DTYPES,
                "Scales are e8m0 bytes: uint8 or jnp.float8_e8m0fnu.")
    return scales if scales.dtype == jnp.uint8 else lax.bitcast_convert_type(scales, jnp.uint8)
