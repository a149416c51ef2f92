"""quantize: x [..., K] -> (values e4m3 [..., K], scales uint8 [..., K/32] or swizzled [..., Mp*Kbp])."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_mxfp8 import reference, sharding
from jax_mxfp8._compat import ShapedArray
from jax_mxfp8.primitives import base

ROUNDING_CODES = {"ceil": 0, "floor": 1, "naive": 2}


def check_rounding(rounding) -> str:
    if rounding not in ROUNDING_CODES:
        raise ValueError(f"unknown rounding {rounding!r}; use one of {tuple(ROUNDING_CODES)} "
                         f"(see numerics.md: 'ceil' is the default and the most accurate)")
    return rounding


def scale_shape(x_shape, swizzle: bool) -> tuple[int, ...]:
    *lead, k = x_shape
    if not swizzle:
        return (*lead, k // 32)
    *batch, rows = lead
    mp, kbp = reference.padded_scale_shape(rows, k // 32)
    return (*batch, mp * kbp)


def _abstract(x, *, rounding, swizzle):
    base.check_dtype("quantize input x", x.dtype, base.FLOAT_INPUT_DTYPES,
                     "Cast x to bfloat16, float16 or float32 first.")
    base.check_last_axis_blocks("quantize input x", x.shape)
    check_rounding(rounding)
    if swizzle and len(x.shape) < 2:
        raise ValueError(f"quantize(swizzle=True) needs x with at least 2 dims [..., rows, K] (the "
                         f"128x4 layout tiles rows and blocks); got shape {x.shape}. Add a rows axis, "
                         f"e.g. x[None], or use swizzle=False")
    return (ShapedArray(x.shape, jnp.float8_e4m3fn),
            ShapedArray(scale_shape(x.shape, swizzle), jnp.uint8))


def _reference(x, *, rounding, swizzle):
    values, scales = reference.quantize(x, rounding)
    return values, (reference.swizzle_scales(scales) if swizzle else scales)


def _batch(args, dims, *, rounding, swizzle):
    (x,), (d,) = args, dims
    x = base.move_to_front(x, d, None)
    return quantize_p.bind(x, rounding=rounding, swizzle=swizzle), (0, 0)


def _cuda_attrs(*, rounding, swizzle):
    return {"rounding": np.int32(ROUNDING_CODES[rounding]), "swizzle": bool(swizzle)}


LOWERINGS = {
    "cuda": base.cuda_ffi_lowering("jax_mxfp8_quantize_cuda", _reference, True, _cuda_attrs),
}

quantize_p = base.define_primitive(
    "mxfp8_quantize", abstract_eval=_abstract, reference=_reference, batcher=_batch,
    multiple_results=True, lowerings=LOWERINGS)
# What the public function binds: partitions under jit (sharding.py), lowers to quantize_p per shard.
quantize_partitioned_p = sharding.define_partitioned(
    quantize_p, abstract_eval=_abstract, rule=sharding.quantize_rule,
    partition=sharding.quantize_partition)


def quantize(x, *, rounding: str = "ceil", swizzle: bool = False):
    """Quantizes x [..., K] (bf16/fp16/fp32, K % 32 == 0) to MXFP8.

    Returns (values float8_e4m3fn [..., K], scales uint8). Scales are row-major
    [..., K/32], or with swizzle=True the F8_128x4 layout of the last two axes,
    [..., Mp*Kbp]. rounding: "ceil" (default), "floor" (OCP MX v1.0) or "naive".
    """
    x = jnp.asarray(x)
    return tuple(quantize_partitioned_p.bind(x, rounding=check_rounding(rounding),
                                             swizzle=bool(swizzle)))
