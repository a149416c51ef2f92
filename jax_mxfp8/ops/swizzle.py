"""swizzle_scales / unswizzle_scales: row-major [..., M, Kb] <-> F8_128x4 [..., Mp*Kbp].

Sharding: leading batch axes freely; the rows axis only in whole 128-row tiles (rows a multiple
of 128 * shards); the scale-column axis never (a swizzled shard needs whole rows of scales).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from jax_mxfp8 import _checks, reference
from jax_mxfp8._compat import ShapedArray
from jax_mxfp8.ops.base import Op, register
from jax_mxfp8.partitioning import (
    axes_size, check_row_tiles, dim_axes, named, sdy_rule, swizzled_rows)


@register
class Swizzle(Op):
    name = "mxfp8_swizzle_scales"
    cuda_target = "jax_mxfp8_swizzle_scales_cuda_v1"
    selectable_kernel = True

    @staticmethod
    def abstract(scales):
        _checks.check_dtype("swizzle_scales input", scales.dtype, (jnp.uint8,), "")
        if len(scales.shape) < 2:
            raise ValueError(f"swizzle_scales needs scales with at least 2 dims [..., rows, K/32]; "
                             f"got shape {scales.shape}. Add a rows axis, e.g. scales[None]")
        *batch, rows, cols = scales.shape
        mp, kbp = reference.padded_scale_shape(rows, cols)
        return ShapedArray((*batch, mp * kbp), jnp.uint8)

    reference = staticmethod(reference.swizzle_scales)

    @staticmethod
    def sharding_rule(static):
        (shape,) = static.in_shapes
        rows_dim, flat = swizzled_rows(shape[-2], shape[-1])
        return sdy_rule([(True, [rows_dim, [("c", shape[-1])]])], [(True, [flat])],
                        replicate=("sw", "c"))

    @staticmethod
    def partition(static, mesh, arg_shapes, result_shape, body):
        (s,) = arg_shapes
        axes = dim_axes(s.sharding, len(s.shape), "swizzle_scales input")
        if axes[-1]:
            raise ValueError(f"swizzle_scales: the scale-column axis is sharded over {axes[-1]}; "
                             f"the swizzled layout needs whole rows of scales per shard. Leave it "
                             f"unsharded")
        check_row_tiles("swizzle_scales", s.shape[-2], axes[-2], mesh)
        return named(mesh, axes[:-2] + [axes[-2]]), (named(mesh, axes),), body


@register
class Unswizzle(Op):
    name = "mxfp8_unswizzle_scales"
    cuda_target = "jax_mxfp8_unswizzle_scales_cuda_v1"
    selectable_kernel = True

    @staticmethod
    def abstract(swizzled, *, rows, cols):
        _checks.check_dtype("unswizzle_scales input", swizzled.dtype, (jnp.uint8,), "")
        if rows < 1 or cols < 1:
            raise ValueError(f"unswizzle_scales needs rows >= 1 and cols >= 1; got rows={rows}, "
                             f"cols={cols}")
        mp, kbp = reference.padded_scale_shape(rows, cols)
        if len(swizzled.shape) < 1 or swizzled.shape[-1] != mp * kbp:
            raise ValueError(f"unswizzle_scales: last axis of {swizzled.shape} should be Mp*Kbp = "
                             f"{mp}*{kbp} = {mp * kbp} for rows={rows}, cols={cols} (rows padded "
                             f"to 128, cols to 4); check rows/cols")
        return ShapedArray((*swizzled.shape[:-1], rows, cols), jnp.uint8)

    reference = staticmethod(reference.unswizzle_scales)

    @staticmethod
    def cuda_attrs(*, rows, cols):
        return {"rows": np.int64(rows), "cols": np.int64(cols)}

    @staticmethod
    def sharding_rule(static):
        kw = static.kwargs
        rows_dim, flat = swizzled_rows(kw["rows"], kw["cols"])
        return sdy_rule([(True, [flat])], [(True, [rows_dim, [("c", kw["cols"])]])],
                        replicate=("sw", "c"))

    @staticmethod
    def partition(static, mesh, arg_shapes, result_shape, body):
        (s,) = arg_shapes
        axes = dim_axes(s.sharding, len(s.shape), "unswizzle_scales input")
        rows = static.kwargs["rows"]
        check_row_tiles("unswizzle_scales", rows, axes[-1], mesh)
        local_rows = rows // axes_size(mesh, axes[-1])
        return (named(mesh, axes[:-1] + [axes[-1], ()]), (named(mesh, axes),),
                body and functools.partial(body, rows=local_rows))


def swizzle_scales(scales):
    """Row-major scales [..., rows, K/32] -> F8_128x4 layout [..., Mp*Kbp], zero padded per batch index."""
    return Swizzle.bind(_checks.scales_to_uint8(scales))


def unswizzle_scales(swizzled, rows: int, cols: int):
    """Inverse of swizzle_scales: [..., Mp*Kbp] -> [..., rows, cols]."""
    return Unswizzle.bind(_checks.scales_to_uint8(swizzled), rows=int(rows), cols=int(cols))
