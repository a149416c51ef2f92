"""quantize: x [..., K] -> (values e4m3 [..., K], scales uint8 [..., K/32] or swizzled [..., Mp*Kbp]).

Sharding: any leading axis shards freely (uneven shards too: rows are independent); K shards
only in whole blocks (K/32 divisible by the number of K shards). With swizzle=True the rows axis
shards only in whole 128-row tiles and K not at all (the 128x4 layout interleaves K blocks of 4
within each tile).
"""
from __future__ import annotations

import jax.numpy as jnp

from jax_mxfp8 import _checks, _ffi, reference
from jax_mxfp8._compat import ShapedArray
from jax_mxfp8.ops.base import Op, register
from jax_mxfp8.partitioning import (
    BLOCK, blocked_dim, check_row_tiles, check_whole_blocks, dim_axes, named, sdy_rule,
    swizzled_rows)

ROUNDING_CODES = {"ceil": 0, "floor": 1, "naive": 2}  # the kernel's `rounding` attribute


def check_rounding(rounding) -> str:
    if rounding not in ROUNDING_CODES:
        raise ValueError(f"unknown rounding {rounding!r}; use one of {tuple(ROUNDING_CODES)} "
                         f"(docs/numerics.md: 'ceil' is the default and the most accurate)")
    return rounding


def scale_shape(x_shape, swizzle: bool) -> tuple[int, ...]:
    *lead, k = x_shape
    if not swizzle:
        return (*lead, k // BLOCK)
    *batch, rows = lead
    mp, kbp = reference.padded_scale_shape(rows, k // BLOCK)
    return (*batch, mp * kbp)


@register
class Quantize(Op):
    name = "mxfp8_quantize"
    multiple_results = True
    cuda_target = "jax_mxfp8_quantize_cuda_v1"
    selectable_kernel = True
    not_differentiable = (
        "quantize has no useful derivative (its e4m3 values are a step function of x, its "
        "e8m0 scales integers). For quantization-aware training use jax_mxfp8.fake_quantize "
        "(dequantize(quantize(x)) with a straight-through gradient)")

    @staticmethod
    def abstract(x, *, rounding, swizzle):
        _checks.check_dtype("quantize input x", x.dtype, _checks.FLOAT_INPUT_DTYPES,
                            "Cast x to bfloat16, float16 or float32 first.")
        _checks.check_last_axis_blocks("quantize input x", x.shape)
        check_rounding(rounding)
        if swizzle and len(x.shape) < 2:
            raise ValueError(f"quantize(swizzle=True) needs x with at least 2 dims [..., rows, K] "
                             f"(the 128x4 layout tiles rows and blocks); got shape {x.shape}. Add a "
                             f"rows axis, e.g. x[None], or use swizzle=False")
        return (ShapedArray(x.shape, jnp.float8_e4m3fn),
                ShapedArray(scale_shape(x.shape, swizzle), jnp.uint8))

    @staticmethod
    def reference(x, *, rounding, swizzle):
        values, scales = reference.quantize(x, rounding)
        return values, (reference.swizzle_scales(scales) if swizzle else scales)

    @staticmethod
    def cuda_attrs(*, rounding, swizzle):
        return {"rounding": ROUNDING_CODES[rounding], "swizzle": bool(swizzle)}

    @staticmethod
    def sharding_rule(static):
        (shape,) = static.in_shapes
        k = shape[-1]
        if not static.kwargs["swizzle"]:
            data = [blocked_dim(k)]
            return sdy_rule([(True, data)], [(True, data), (True, [[("kb", k // BLOCK)]])],
                            replicate=("b",))
        rows_dim, flat = swizzled_rows(shape[-2], k // BLOCK)
        return sdy_rule([(True, [rows_dim, [("k", k)]])],
                        [(True, [rows_dim, [("k", k)]]), (True, [flat])], replicate=("sw", "k"))

    @staticmethod
    def partition(static, mesh, arg_shapes, result_shape, body):
        (x,) = arg_shapes
        axes = dim_axes(x.sharding, len(x.shape), "quantize input x")
        check_whole_blocks("quantize", "x", x.shape[-1], axes[-1], mesh)
        scale_axes = axes
        if static.kwargs["swizzle"]:
            if axes[-1]:
                raise ValueError(
                    f"quantize(swizzle=True): x's K axis is sharded over {axes[-1]}, but the "
                    f"swizzled scale layout interleaves K blocks of 4 within each 128-row tile, so "
                    f"a K shard is not a contiguous piece of it. Quantize with swizzle=False "
                    f"(row-major scales shard along K) and swizzle per shard, or leave K unsharded")
            check_row_tiles("quantize(swizzle=True)", x.shape[-2], axes[-2], mesh)
            scale_axes = axes[:-2] + [axes[-2]]
        x_sharding = named(mesh, axes)
        return (x_sharding, named(mesh, scale_axes)), (x_sharding,), body


def quantize(x, *, rounding: str = "ceil", swizzle: bool = False):
    """Quantizes x [..., K] (bf16/fp16/fp32, K % 32 == 0) to MXFP8.

    Returns (values float8_e4m3fn [..., K], scales uint8). Scales are row-major
    [..., K/32], or with swizzle=True the F8_128x4 layout of the last two axes,
    [..., Mp*Kbp]. rounding: "ceil" (default), "floor" (OCP MX v1.0) or "naive".
    """
    return Quantize.bind(jnp.asarray(x), rounding=check_rounding(rounding), swizzle=bool(swizzle))


def quantize_local(x, *, rounding: str = "ceil", swizzle: bool = False):
    """quantize without partitioning: for code that already runs per device (a backend's linear)."""
    out = Quantize.inner.bind(jnp.asarray(x), rounding=check_rounding(rounding),
                              swizzle=bool(swizzle), kernel=_ffi.kernels_enabled())
    return tuple(out)

