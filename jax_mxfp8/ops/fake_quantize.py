"""fake_quantize: x -> dequantize(quantize(x)) with a straight-through gradient.

For quantization-aware fine-tuning: the forward sees the MXFP8 rounding of x exactly as
quantize + dequantize give it (docs/numerics.md); the backward passes the cotangent through
unchanged (the straight-through estimator), since the true derivative of the rounding is zero
almost everywhere. Blocks holding NaN or Inf come out NaN, as dequantize(quantize(x)) does; their
gradient still passes through.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_mxfp8.ops.dequantize import dequantize
from jax_mxfp8.ops.quantize import check_rounding, quantize


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fake_quantize(x, rounding):
    values, scales = quantize(x, rounding=rounding)
    return dequantize(values, scales, dtype=x.dtype)


def _forward(x, rounding):
    return _fake_quantize(x, rounding), None


def _backward(rounding, _, ct):
    return (ct,)


_fake_quantize.defvjp(_forward, _backward)


def fake_quantize(x, *, rounding: str = "ceil"):
    """dequantize(quantize(x, rounding=rounding), dtype=x.dtype), differentiable with the
    straight-through gradient (d/dx = identity). x: bf16/fp16/fp32 [..., K], K % 32 == 0."""
    return _fake_quantize(jnp.asarray(x), check_rounding(rounding))
