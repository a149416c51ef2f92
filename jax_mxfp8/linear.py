"""prepare_weight and linear: the public GEMM API, dispatched through the backend table."""
from __future__ import annotations

import jax.numpy as jnp

from jax_mxfp8 import sharding
from jax_mxfp8.backends import Backend, ensure_available, get_backend_impl, select_backend
from jax_mxfp8.primitives import base
from jax_mxfp8.primitives.dequantize import check_scales_match, scales_to_uint8
from jax_mxfp8.primitives.quantize import quantize
from jax_mxfp8.weight import MxWeight


def prepare_weight(values, scales, *, backend: Backend | str | None = None) -> MxWeight:
    """Repacks an MXFP8 weight ([N, K] float8_e4m3fn values, [N, K/32] uint8 or e8m0
    scales: the checkpoint layout) once, for `backend` (default: select_backend())."""
    values = jnp.asarray(values)
    base.check_dtype("weight values", values.dtype, (jnp.float8_e4m3fn,),
                     "Quantize the weight first (quantize() or quantize_weight()).")
    if values.ndim != 2:
        raise ValueError(f"weight values must be 2-D [N, K] (out_features, in_features); got shape "
                         f"{values.shape}. For stacked weights, vmap prepare_weight.")
    base.check_last_axis_blocks("weight values", values.shape)
    scales = scales_to_uint8(scales)
    check_scales_match(values.shape, scales.shape, "weight scales")
    backend = select_backend() if backend is None else ensure_available(Backend.parse(backend))
    arrays, meta = get_backend_impl(backend).prepare(values, scales)
    return MxWeight(arrays, values.shape, backend, meta)


def quantize_weight(w, *, rounding: str = "ceil", backend: Backend | str | None = None) -> MxWeight:
    """Quantizes a high-precision [N, K] weight and prepares it for `backend`."""
    values, scales = quantize(jnp.asarray(w), rounding=rounding)
    return prepare_weight(values, scales, backend=backend)


def linear(x, weight: MxWeight, bias=None, *, out_dtype=None, quantize_activations=None):
    """y = x @ dequantize(weight).T + bias, float32 accumulation.

    x: [..., K] bf16/fp16/fp32; weight: MxWeight of shape (N, K); bias: [N] or None.
    out_dtype defaults to x's dtype. quantize_activations=None uses the backend's own math
    (W8A16 for EMULATION and MARLIN, W8A8 for CUTLASS); EMULATION supports both.
    """
    if not isinstance(weight, MxWeight):
        raise TypeError(f"weight must be an MxWeight from prepare_weight()/quantize_weight(); got "
                        f"{type(weight).__name__}")
    x = jnp.asarray(x)
    base.check_dtype("linear input x", x.dtype, base.FLOAT_INPUT_DTYPES,
                     "Cast activations to bfloat16 (recommended), float16 or float32.")
    n, k = sharding.local_weight_shape(weight)  # a shard's (N, K) inside shard_map
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"linear: x has shape {x.shape} but the weight expects in_features K={k} "
                         f"on the last axis (weight shape [N, K] = {weight.shape})")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    base.check_dtype("linear out_dtype", out_dtype, base.FLOAT_INPUT_DTYPES, "")
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (n,):
            raise ValueError(f"linear: bias has shape {bias.shape}; expected ({n},) = (out_features,)")
        base.check_dtype("linear bias", bias.dtype, base.FLOAT_INPUT_DTYPES, "")
    impl = get_backend_impl(weight.backend)
    qa = impl.default_quantize_activations if quantize_activations is None else bool(quantize_activations)
    if qa and not impl.supports_w8a8:
        raise ValueError(f"backend {weight.backend.value} computes W8A16 only; pass "
                         f"quantize_activations=False/None or prepare the weight for 'emulation'")
    if not qa and not impl.supports_w8a16:
        raise ValueError(f"backend {weight.backend.value} computes W8A8 only (activations are "
                         f"quantized); pass quantize_activations=True/None or use 'emulation'")
    return sharding.linear(x, weight, bias, out_dtype, qa)  # impl.linear per shard, partitioned
