"""dequantize: (values e4m3 [..., K], scales uint8 [..., K/32]) -> [..., K] in bf16/fp16/fp32."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jax_mxfp8 import reference, sharding
from jax_mxfp8._compat import ShapedArray
from jax_mxfp8.primitives import base

SCALE_DTYPES = (jnp.dtype(jnp.uint8), jnp.dtype(jnp.float8_e8m0fnu))


def check_scales_match(values_shape, scales_shape, what="scales") -> None:
    expected = (*values_shape[:-1], values_shape[-1] // 32)
    if tuple(scales_shape) != expected:
        raise ValueError(f"{what} shape {tuple(scales_shape)} does not match values shape "
                         f"{tuple(values_shape)}: expected {expected} (one scale per 32 values of the "
                         f"last axis, row-major; unswizzle_scales() first if they are swizzled)")


def _abstract(values, scales, *, dtype):
    base.check_dtype("dequantize values", values.dtype, (jnp.float8_e4m3fn,),
                     "Pass the e4m3 values returned by quantize().")
    base.check_dtype("dequantize scales", scales.dtype, (jnp.uint8,),
                     "Pass uint8 (or float8_e8m0fnu) e8m0 scale bytes.")
    base.check_last_axis_blocks("dequantize values", values.shape)
    check_scales_match(values.shape, scales.shape)
    base.check_dtype("dequantize output dtype", dtype, base.FLOAT_INPUT_DTYPES, "")
    return ShapedArray(values.shape, dtype)


def _reference(values, scales, *, dtype):
    return reference.dequantize(values, scales, dtype)


def _batch(args, dims, *, dtype):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    values, scales = (base.move_to_front(a, d, size) for a, d in zip(args, dims))
    return dequantize_p.bind(values, scales, dtype=dtype), 0


LOWERINGS = {
    "cuda": base.cuda_ffi_lowering("jax_mxfp8_dequantize_cuda", _reference, False,
                                   lambda **params: {}),
}

dequantize_p = base.define_primitive(
    "mxfp8_dequantize", abstract_eval=_abstract, reference=_reference, batcher=_batch,
    multiple_results=False, lowerings=LOWERINGS)
# What the public function binds: partitions under jit (sharding.py), lowers to dequantize_p per shard.
dequantize_partitioned_p = sharding.define_partitioned(
    dequantize_p, abstract_eval=_abstract, rule=sharding.dequantize_rule,
    partition=sharding.dequantize_partition)


def scales_to_uint8(scales):
    scales = jnp.asarray(scales)
    base.check_dtype("scales", scales.dtype, SCALE_DTYPES,
                     "Scales are e8m0 bytes: uint8 or jnp.float8_e8m0fnu.")
    return scales if scales.dtype == jnp.uint8 else lax.bitcast_convert_type(scales, jnp.uint8)


def dequantize(values, scales, *, dtype=jnp.bfloat16):
    """values [..., K] float8_e4m3fn and row-major scales [..., K/32] (uint8 or
    float8_e8m0fnu) -> values * 2^(scale - 127) in dtype (bf16, fp16 or fp32)."""
    dtype = jnp.dtype(dtype)
    base.check_dtype("dequantize output dtype", dtype, base.FLOAT_INPUT_DTYPES, "")
    return dequantize_partitioned_p.bind(jnp.asarray(values), scales_to_uint8(scales), dtype=dtype)
