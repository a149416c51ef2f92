"""swizzle_scales / unswizzle_scales: row-major [..., M, Kb] <-> F8_128x4 [..., Mp*Kbp]."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_mxfp8 import reference, sharding
from jax_mxfp8._compat import ShapedArray
from jax_mxfp8.primitives import base
from jax_mxfp8.primitives.dequantize import scales_to_uint8


def _swizzle_abstract(scales):
    base.check_dtype("swizzle_scales input", scales.dtype, (jnp.uint8,), "")
    if len(scales.shape) < 2:
        raise ValueError(f"swizzle_scales needs scales with at least 2 dims [..., rows, K/32]; got "
                         f"shape {scales.shape}. Add a rows axis, e.g. scales[None]")
    *batch, rows, cols = scales.shape
    mp, kbp = reference.padded_scale_shape(rows, cols)
    return ShapedArray((*batch, mp * kbp), jnp.uint8)


def _swizzle_batch(args, dims):
    (s,), (d,) = args, dims
    return swizzle_p.bind(base.move_to_front(s, d, None)), 0


def _unswizzle_abstract(swizzled, *, rows, cols):
    base.check_dtype("unswizzle_scales input", swizzled.dtype, (jnp.uint8,), "")
    if rows < 1 or cols < 1:
        raise ValueError(f"unswizzle_scales needs rows >= 1 and cols >= 1; got rows={rows}, cols={cols}")
    mp, kbp = reference.padded_scale_shape(rows, cols)
    if len(swizzled.shape) < 1 or swizzled.shape[-1] != mp * kbp:
        raise ValueError(f"unswizzle_scales: last axis of {swizzled.shape} should be Mp*Kbp = "
                         f"{mp}*{kbp} = {mp * kbp} for rows={rows}, cols={cols} (rows padded to 128, "
                         f"cols to 4); check rows/cols")
    return ShapedArray((*swizzled.shape[:-1], rows, cols), jnp.uint8)


def _unswizzle_batch(args, dims, *, rows, cols):
    (s,), (d,) = args, dims
    return unswizzle_p.bind(base.move_to_front(s, d, None), rows=rows, cols=cols), 0


SWIZZLE_LOWERINGS = {
    "cuda": base.cuda_ffi_lowering("jax_mxfp8_swizzle_scales_cuda", reference.swizzle_scales, False),
}
UNSWIZZLE_LOWERINGS = {
    "cuda": base.cuda_ffi_lowering(
        "jax_mxfp8_unswizzle_scales_cuda", reference.unswizzle_scales, False,
        lambda *, rows, cols: {"rows": np.int64(rows), "cols": np.int64(cols)}),
}

swizzle_p = base.define_primitive(
    "mxfp8_swizzle_scales", abstract_eval=_swizzle_abstract, reference=reference.swizzle_scales,
    batcher=_swizzle_batch, multiple_results=False, lowerings=SWIZZLE_LOWERINGS)
unswizzle_p = base.define_primitive(
    "mxfp8_unswizzle_scales", abstract_eval=_unswizzle_abstract,
    reference=reference.unswizzle_scales, batcher=_unswizzle_batch, multiple_results=False,
    lowerings=UNSWIZZLE_LOWERINGS)
# What the public functions bind: partitions under jit (sharding.py), lowers to the above per shard.
swizzle_partitioned_p = sharding.define_partitioned(
    swizzle_p, abstract_eval=_swizzle_abstract, rule=sharding.swizzle_rule,
    partition=sharding.swizzle_partition)
unswizzle_partitioned_p = sharding.define_partitioned(
    unswizzle_p, abstract_eval=_unswizzle_abstract, rule=sharding.unswizzle_rule,
    partition=sharding.unswizzle_partition)


def swizzle_scales(scales):
    """Row-major scales [..., rows, K/32] -> F8_128x4 layout [..., Mp*Kbp], zero padded per batch index."""
    return swizzle_partitioned_p.bind(scales_to_uint8(scales))


def unswizzle_scales(swizzled, rows: int, cols: int):
    """Inverse of swizzle_scales: [..., Mp*Kbp] -> [..., rows, cols]."""
    return unswizzle_partitioned_p.bind(scales_to_uint8(swizzled), rows=int(rows), cols=int(cols))
