"""dequantize: (values e4m3 [..., K], scales uint8 [..., K/32]) -> [..., K] in bf16/fp16/fp32.

Sharding: any leading axis shards freely; K only in whole blocks (K/32 divisible by the number
of K shards). The values' sharding decides; the scales only fill in dims the values leave
unsharded (a scale reshard is 32x smaller than a values one).
"""
from __future__ import annotations

import jax.numpy as jnp

from jax_mxfp8 import _checks, reference
from jax_mxfp8._compat import ShapedArray
from jax_mxfp8.ops.base import Op, register
from jax_mxfp8.partitioning import (
    BLOCK, blocked_dim, check_whole_blocks, dim_axes, named, sdy_rule, without_reused)


@register
class Dequantize(Op):
    name = "mxfp8_dequantize"
    cuda_target = "jax_mxfp8_dequantize_cuda_v1"
    selectable_kernel = True
    not_differentiable = (
        "dequantize is not differentiable in its inputs: e4m3 values and e8m0 scales are "
        "codes, not trainable parameters. Differentiate with respect to a high-precision tensor "
        "(jax_mxfp8.fake_quantize gives a straight-through gradient) or train parameters of your "
        "own beside the frozen MXFP8 weight")

    @staticmethod
    def abstract(values, scales, *, dtype):
        _checks.check_dtype("dequantize values", values.dtype, (jnp.float8_e4m3fn,),
                            "Pass the e4m3 values returned by quantize().")
        _checks.check_dtype("dequantize scales", scales.dtype, (jnp.uint8,),
                            "Pass uint8 (or float8_e8m0fnu) e8m0 scale bytes.")
        _checks.check_last_axis_blocks("dequantize values", values.shape)
        _checks.check_scales_match(values.shape, scales.shape)
        _checks.check_dtype("dequantize output dtype", dtype, _checks.FLOAT_INPUT_DTYPES, "")
        return ShapedArray(values.shape, dtype)

    @staticmethod
    def reference(values, scales, *, dtype):
        return reference.dequantize(values, scales, dtype)

    @staticmethod
    def sharding_rule(static):
        shape, _ = static.in_shapes
        k = shape[-1]
        data = [blocked_dim(k)]
        return sdy_rule([(True, data), (True, [[("kb", k // BLOCK)]])], [(True, data)],
                        replicate=("b",))

    @staticmethod
    def partition(static, mesh, arg_shapes, result_shape, body):
        values, scales = arg_shapes
        v_axes = dim_axes(values.sharding, len(values.shape), "dequantize values")
        s_axes = dim_axes(scales.sharding, len(scales.shape), "dequantize scales")
        axes = without_reused([v or s for v, s in zip(v_axes, s_axes)])
        check_whole_blocks("dequantize", "values", values.shape[-1], axes[-1], mesh)
        sharding = named(mesh, axes)
        return sharding, (sharding, sharding), body


def dequantize(values, scales, *, dtype=jnp.bfloat16):
    """values [..., K] float8_e4m3fn and row-major scales [..., K/32] (uint8 or
    float8_e8m0fnu) -> values * 2^(scale - 127) in dtype (bf16, fp16 or fp32)."""
    dtype = jnp.dtype(dtype)
    _checks.check_dtype("dequantize output dtype", dtype, _checks.FLOAT_INPUT_DTYPES, "")
    return Dequantize.bind(jnp.asarray(values), _checks.scales_to_uint8(scales), dtype=dtype)
