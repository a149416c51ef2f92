"""EMULATION: the jnp math of docs/numerics.md on any device; weights stay [N, K] + [N, K/32]."""
from __future__ import annotations

from jax_mxfp8 import reference
from jax_mxfp8.backends.base import Backend, BackendImpl, register_backend
from jax_mxfp8.ops.dequantize import dequantize
from jax_mxfp8.ops.quantize import quantize


def _prepare(values, scales):
    return {"values": values, "scales": scales}, None


def _unprepare(arrays, meta, shape):
    return arrays["values"], arrays["scales"]


def _linear(x, weight, bias, out_dtype, quantize_activations):
    op_dtype = reference.dot_dtype(x.dtype)
    if quantize_activations:
        xv, xs = quantize(x, rounding="ceil")
        x = dequantize(xv, xs, dtype=op_dtype)
    w = dequantize(weight.arrays["values"], weight.arrays["scales"], dtype=op_dtype)
    return reference.dot_with_bias(x.astype(op_dtype), w, bias, out_dtype)


register_backend(BackendImpl(
    backend=Backend.EMULATION, min_compute_capability=None, required_targets=(),
    default_quantize_activations=False, supports_w8a16=True, supports_w8a8=True,
    prepare=_prepare, unprepare=_unprepare, linear=_linear,
    array_axes=lambda meta, shape: {"values": ("n", "k"), "scales": ("n", "k")}))
