"""The op benchmarks: quantize, dequantize and linear against their peers (XLA's jnp path,
bf16 jnp.dot, the emulation path, jax.nn.scaled_matmul)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

import jax_mxfp8 as mx
from jax_mxfp8 import reference
from jax_mxfp8.backends import registered_backends, why_unavailable
from jax_mxfp8.bench.harness import Case, Config, register_op
from jax_mxfp8.reference import padded_scale_shape


_DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}


def _quantize_bytes(rows: int, k: int, itemsize: int, swizzle: bool) -> int:
    mp, kbp = padded_scale_shape(rows, k // 32)
    scale_bytes = mp * kbp if swizzle else rows * k // 32
    return rows * k * (itemsize + 1) + scale_bytes


@register_op("quantize")
def quantize_cases(config: Config) -> list[Case]:

    shapes = [("bf16", 4096, 8192), ("bf16", 16384, 8192), ("bf16", 32768, 8192),
              ("bf16", 16384, 16384), ("f32", 16384, 8192), ("f16", 16384, 8192),
              ("bf16", 1, 4096), ("bf16", 16, 4096), ("bf16", 16, 16384)]
    if config.quick:
        shapes = [("bf16", 4096, 8192), ("bf16", 16384, 8192), ("bf16", 16, 16384)]
    cases = []
    for dtype_name, rows, k in shapes:
        dtype = _DTYPES[dtype_name]
        for swizzle in (False, True):
            def make(key, rows=rows, k=k, dtype=dtype):
                return (jax.random.normal(key, (rows, k), dtype),)

            def ours(x, swizzle=swizzle):
                return mx.quantize(x, swizzle=swizzle)

            def jnp_ref(x, swizzle=swizzle):
                values, scales = reference.quantize(x, "ceil")
                return values, (reference.swizzle_scales(scales) if swizzle else scales)

            nbytes = _quantize_bytes(rows, k, jnp.dtype(dtype).itemsize, swizzle)
            cases.append(Case(
                "quantize", f"{dtype_name} [{rows}, {k}] {'swizzled' if swizzle else 'row-major'}",
                make, {"jax_mxfp8": ours, "jnp": jnp_ref}, nbytes, baseline="jnp"))
    return cases


@register_op("dequantize")
def dequantize_cases(config: Config) -> list[Case]:

    shapes = [("bf16", 4096, 8192), ("bf16", 16384, 8192), ("bf16", 32768, 8192),
              ("f16", 16384, 8192), ("f32", 16384, 8192), ("bf16", 16, 16384)]
    if config.quick:
        shapes = [("bf16", 4096, 8192), ("bf16", 16384, 8192), ("bf16", 16, 16384)]
    cases = []
    for dtype_name, rows, k in shapes:
        dtype = _DTYPES[dtype_name]

        def make(key, rows=rows, k=k):
            kv, ks = jax.random.split(key)
            values = jax.random.normal(kv, (rows, k), jnp.float32).astype(jnp.float8_e4m3fn)
            scales = jax.random.randint(ks, (rows, k // 32), 100, 150).astype(jnp.uint8)
            return values, scales

        nbytes = rows * k * (1 + jnp.dtype(dtype).itemsize) + rows * k // 32
        cases.append(Case(
            "dequantize", f"->{dtype_name} [{rows}, {k}]", make,
            {"jax_mxfp8": lambda v, s, dtype=dtype: mx.dequantize(v, s, dtype=dtype),
             "jnp": lambda v, s, dtype=dtype: reference.dequantize(v, s, dtype)},
            nbytes, baseline="jnp"))
    return cases


@register_op("linear")
def linear_cases(config: Config) -> list[Case]:

    weights = [(4096, 4096), (14336, 4096), (8192, 8192), (28672, 8192)]
    ms = [1, 16, 64, 256, 1024, 4096]
    if config.quick:
        weights, ms = [(4096, 4096), (28672, 8192)], [1, 16, 256]
    device = jax.devices()[0]
    backends = [b for b in registered_backends() if why_unavailable(b, device) is None]
    cases = []
    for n, k in weights:
        for m in ms:
            def make(key, m=m, n=n, k=k):
                kx, kw = jax.random.split(key)
                x = jax.random.normal(kx, (m, k), jnp.bfloat16)
                w = jax.random.normal(kw, (n, k), jnp.bfloat16) * 0.05
                values, scales = reference.quantize(w, "ceil")
                xv, xs = reference.quantize(x, "ceil")
                prepared = {b.value: mx.prepare_weight(values, scales, backend=b) for b in backends}
                return x, w.astype(jnp.bfloat16), values, scales, xv, xs, prepared

            def scaled_matmul(x, w, values, scales, xv, xs, prepared):
                def e8m0(s):
                    return jax.lax.bitcast_convert_type(s, jnp.float8_e8m0fnu)[None]
                return jax.nn.scaled_matmul(
                    xv[None], values[None], e8m0(xs), e8m0(scales),
                    preferred_element_type=jnp.bfloat16)[0]

            impls = {f"jax_mxfp8[{b.value}]":
                     (lambda x, w, v, s, xv, xs, p, b=b.value: mx.linear(x, p[b])) for b in backends}
            impls.update({
                "bf16": lambda x, w, *rest: jnp.dot(x, w.T, preferred_element_type=jnp.bfloat16),
                "emulation": lambda x, w, v, s, *rest: reference.linear(x, v, s),
                "scaled_matmul": scaled_matmul,
            })
            nbytes = n * k + n * k // 32 + 2 * m * k + 2 * m * n
            cases.append(Case("linear", f"M={m} {n}x{k}", make, impls, nbytes, baseline="bf16",
                              size=float(m), flops=2 * m * n * k))
    return cases
