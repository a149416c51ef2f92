"""EMULATION: the jnp math of docs/numerics.md on any device; weights stay [N, K] + [N, K/32]
(stacked experts: [E, N, K] + [E, N, K/32])."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jax_mxfp8 import reference
from jax_mxfp8.backends.base import Backend, BackendImpl, register_backend
from jax_mxfp8.ops.dequantize import dequantize
from jax_mxfp8.ops.quantize import quantize

# x [T, K] (rows grouped) against w [E, N, K]: contract K with w's last dim, groups on w's first.
_GROUPED_DIMS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


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


def group_of_rows(group_sizes, rows: int):
    """The group of each of `rows` rows grouped in order by group_sizes [E]: int32 [rows] in
    [0, E], E for the rows past sum(group_sizes)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(rows, dtype=jnp.int32), side="right").astype(jnp.int32)


def rows_bias(bias, group_sizes, rows: int):
    """bias [E, N] spread over grouped rows: float32 [rows, N], bias[e] on group e's rows, zero
    past the groups."""
    groups = group_of_rows(group_sizes, rows)
    picked = jnp.take(bias.astype(jnp.float32), jnp.minimum(groups, bias.shape[0] - 1), axis=0)
    return jnp.where((groups < bias.shape[0])[:, None], picked, 0.0)


def rows_sharding(x):
    """The out_sharding of a grouped dot of x under an Explicit-axes mesh (jax infers none for
    ragged dots): x's rows sharding, the output columns whole; None elsewhere."""
    sharding = jax.typeof(x).sharding
    if not isinstance(sharding, NamedSharding) or not any(
            t == AxisType.Explicit for t in sharding.mesh.axis_types):
        return None
    return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[:1]))


def grouped_dot_with_bias(x, w, group_sizes, bias, out_dtype):
    """x [T, K] @ w[e].T on the rows of group e (w [E, N, K]), float32 accumulation, + bias[e]
    in float32 on those rows, one cast to out_dtype; rows past sum(group_sizes) are zero: the
    ragged version of reference.dot_with_bias (operands used as given)."""
    y = lax.ragged_dot_general(x, w, group_sizes.astype(jnp.int32), _GROUPED_DIMS,
                               precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
                               out_sharding=rows_sharding(x))
    if bias is not None:
        y = y + rows_bias(bias, group_sizes, x.shape[0])
    return y.astype(out_dtype)


def _ragged_linear(x, weight, group_sizes, bias, out_dtype):
    op_dtype = reference.dot_dtype(x.dtype)
    w = dequantize(weight.arrays["values"], weight.arrays["scales"], dtype=op_dtype)  # [E, N, K]
    return grouped_dot_with_bias(x.astype(op_dtype), w, group_sizes, bias, out_dtype)


register_backend(BackendImpl(
    backend=Backend.EMULATION, min_compute_capability=None, required_targets=(),
    default_quantize_activations=False, supports_w8a16=True, supports_w8a8=True,
    prepare=_prepare, unprepare=_unprepare, linear=_linear,
    array_axes=lambda meta, shape: {"values": ("n", "k"), "scales": ("n", "k")},
    ragged_linear=_ragged_linear))
