"""linear: y = x @ dequantize(weight).T + bias, one primitive for every backend.

x [..., K] and a backend-prepared MxWeight. The primitive's lowering is custom_partitioning of
the per-device body, which calls the backend's `linear` (BackendImpl) on a 2-D [M, K] x.
N sharded (column-parallel): no communication. K sharded (row-parallel): float32 partial
products and one psum over the K mesh axes, bias added after it.

Sharding constraints (each raises a ValueError naming the fix; none is met by gathering weights
or scales): N shards are whole `n_tile`, K shards whole `k_tile` (EMULATION 1 / 32, MARLIN 64 /
64, CUTLASS 128 / 128); a weight whose N or K is not a multiple of its backend's tile (padded
tiles) cannot be sharded; all arrays of an MxWeight split N and K over the same mesh axes
(placement.py makes such placements and checks divisibility up front). Activations keep any
leading-axis sharding; an activation K sharding that disagrees with the weight's is resharded
(activations only). vmap over a batched weight (stacked experts: every array of the MxWeight batched) runs
as one ragged_linear over the experts (x's batch index e meets expert e, each a group of rows)
where the backend has a grouped GEMM and the math is W8A16; otherwise the per-device body
runs under vmap, one GEMM per batch index, without custom partitioning.

Autodiff: linear is linear in x and affine in bias, so it has a JVP rule (the tangent is
linear(dx) + db) and a transpose rule (dx = dy @ dequantize(W), float32 accumulation, through
the backend's `dequantize_weight`). The weight is frozen: a tangent for it is an error (its
e4m3 values and e8m0 scales are not trainable parameters; train adapters, or fake_quantize a
high-precision weight). With W8A8 math the activation quantization counts as the identity in the
backward (a straight-through estimator).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import SdyShardingRule, custom_partitioning

from jax_mxfp8 import _checks, reference
from jax_mxfp8._compat import (
    Primitive, ShapedArray, ad, batching, is_symbolic_zero, mlir, primitive_impl,
    require_devices_during_lowering, symbolic_zero, without_explicit_shardings)
from jax_mxfp8.backends import get_backend_impl
from jax_mxfp8.backends.base import K_AXIS, N_AXIS
from jax_mxfp8.ops import ragged_linear as ragged
from jax_mxfp8.ops.prepared_gemm import (  # noqa: F401  (dense_weight: linear's API before)
    check_backend_runs_on, dense_weight, frozen_weight_error, leaf_factors, weight_mesh_axes)
from jax_mxfp8.partitioning import (
    all_replicated, axes_size, dim_axes, mapped, move_to_front, named, sdy_rule,
    shard_local, typed_abstract_eval, without_reused)
from jax_mxfp8.weight import (
    MxWeight, backend_layout, check_shard_tiles, local_shape, shard_meta)


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """Static description of one linear call (the outer primitive's only param)."""
    keys: tuple[str, ...]           # MxWeight array names, in leaf order
    shape: tuple[int, int]          # (N, K) of the weight as this call sees it (a shard inside shard_map)
    backend: Any                    # Backend
    meta: Hashable
    out_dtype: Any                  # numpy dtype
    quantize_activations: bool
    has_bias: bool


@dataclasses.dataclass(frozen=True)
class LinearCall:
    """The static argument of the linear custom_partitioning call."""
    cfg: LinearConfig
    in_shapes: tuple[tuple[int, ...], ...]


def linear_rule(call: LinearCall, mesh, *types) -> SdyShardingRule:
    cfg, in_shapes = call.cfg, call.in_shapes
    impl = get_backend_impl(cfg.backend)
    n, k = cfg.shape
    _, axes = backend_layout(cfg.backend, cfg.meta, cfg.shape)
    n_dim = [("nt", n // impl.n_tile), ("nx", impl.n_tile)]
    x_dim = [("kt", k // impl.k_tile), ("kx", impl.k_tile)]
    if axes is None:  # not shardable: every weight dim is its own factor, replicated
        axes = {name: (None,) * len(s) for name, s in zip(cfg.keys, in_shapes[1:])}
    leaves, inner = leaf_factors(cfg.backend, cfg.meta, cfg.shape, cfg.keys, axes,
                                 in_shapes[1:1 + len(cfg.keys)], "nt", "kt")
    operands = [(True, [x_dim]), *leaves] + ([(False, [n_dim])] if cfg.has_bias else [])
    return sdy_rule(operands, [(True, [n_dim])], reduction=("kt",), replicate=("nx", "kx", *inner))


def linear_partition(call: LinearCall, mesh, arg_shapes, result_shape):
    cfg = call.cfg
    replicated = all_replicated(mesh, functools.partial(linear_body, cfg, ()), arg_shapes, result_shape)
    if replicated:
        return replicated
    impl, axes = backend_layout(cfg.backend, cfg.meta, cfg.shape)
    n, k = cfg.shape
    x, leaves = arg_shapes[0], arg_shapes[1:1 + len(cfg.keys)]
    x_axes = dim_axes(x.sharding, len(x.shape), "linear input x")
    _, n_axes, k_axes = weight_mesh_axes("linear", cfg.backend, cfg.keys, leaves, axes)
    if not k_axes and axes is not None:
        k_axes = tuple(a for a in x_axes[-1] if a not in n_axes)  # weights replicated on K: slice them
    check_shard_tiles("N (out_features)", n, impl.n_tile, n_axes, mesh, cfg.backend)
    check_shard_tiles("K (in_features)", k, impl.k_tile, k_axes, mesh, cfg.backend)
    lead = [tuple(a for a in dims if a not in n_axes and a not in k_axes) for dims in without_reused(x_axes[:-1])]
    local = (n // axes_size(mesh, n_axes), k // axes_size(mesh, k_axes))
    local_cfg = dataclasses.replace(cfg, shape=local, meta=shard_meta(cfg.backend, cfg.meta, cfg.shape, local))

    arg_shardings = [named(mesh, [*lead, k_axes])]
    for name, leaf in zip(cfg.keys, leaves):
        kinds = axes[name] if axes is not None else (None,) * len(leaf.shape)
        arg_shardings.append(named(mesh, [n_axes if t == N_AXIS else k_axes if t == K_AXIS else ()
                                          for t in kinds]))
    if cfg.has_bias:
        arg_shardings.append(named(mesh, [n_axes]))
    result = named(mesh, [*lead, n_axes])
    fn = functools.partial(linear_body, local_cfg, k_axes)
    return mesh, shard_local(fn), result, tuple(arg_shardings)


def linear_body(cfg: LinearConfig, k_axes, x, *rest):
    """The per-device linear: [..., K] x (N, K) weight -> [..., N]; psum over `k_axes` if any."""
    impl = get_backend_impl(cfg.backend)
    weight = MxWeight(dict(zip(cfg.keys, rest)), cfg.shape, cfg.backend, cfg.meta)
    bias = rest[len(cfg.keys)] if cfg.has_bias else None
    n, k = cfg.shape
    x2d = x.reshape(-1, k)
    if not k_axes:
        y = impl.linear(x2d, weight, bias, cfg.out_dtype, cfg.quantize_activations)
    else:  # row-parallel: float32 partial products, one psum, then bias and the output cast
        y = impl.linear(x2d, weight, None, jnp.dtype(jnp.float32), cfg.quantize_activations)
        y = lax.psum(y.astype(jnp.float32), tuple(k_axes))
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        y = y.astype(cfg.out_dtype)
    return y.reshape(*x.shape[:-1], n)


def _linear_abstract(x, *rest, cfg: LinearConfig):
    return ShapedArray((*x.shape[:-1], cfg.shape[0]), cfg.out_dtype)


_linear_cp = custom_partitioning(lambda call, x, *rest: linear_body(call.cfg, (), x, *rest),
                                 static_argnums=(0,))
_linear_cp.def_partition(partition=linear_partition, sharding_rule=linear_rule)


def _linear_lowering(ctx, *args, cfg):
    check_backend_runs_on(cfg.backend, ctx.module_context.platforms)
    call = LinearCall(cfg, tuple(tuple(a.shape) for a in ctx.avals_in))
    return mlir.lower_fun(lambda *a: _linear_cp(call, *a), multiple_results=False)(
        without_explicit_shardings(ctx), *args)


def _linear_batcher(args, dims, *, cfg):
    x, rest = args[0], args[1:]
    if not any(mapped(d) for d in dims[1:]):
        return linear_p.bind(jnp.moveaxis(x, dims[0], 0), *rest, cfg=cfg), 0
    size = next(a.shape[d] for a, d in zip(args, dims) if mapped(d))
    args = [move_to_front(a, d, size) for a, d in zip(args, dims)]
    n_w = len(cfg.keys)
    if (all(mapped(d) for d in dims[1:1 + n_w]) and not cfg.quantize_activations
            and get_backend_impl(cfg.backend).ragged_linear is not None):
        # The weight batched along its arrays' leading axis: stacked experts, and x's batch
        # index e meets expert e. One grouped GEMM over all of them instead of E GEMMs.
        bias = args[1 + n_w] if cfg.has_bias else None
        return ragged.experts_linear(args[0], args[1:1 + n_w], bias, keys=cfg.keys, shape=cfg.shape,
                                     backend=cfg.backend, meta=cfg.meta, out_dtype=cfg.out_dtype), 0
    # Otherwise vmap the per-device body (one GEMM per batch index); no custom partitioning.
    return jax.vmap(functools.partial(linear_body, cfg, ()))(*args), 0


linear_p = Primitive("mxfp8_linear")
linear_p.def_impl(primitive_impl(linear_p))
def _linear_out_sharding(mesh, args, *, cfg):
    call = LinearCall(cfg, tuple(a.shape for a in args))
    return linear_partition(call, mesh, args, None)[2]


linear_p.def_abstract_eval(typed_abstract_eval(_linear_abstract, _linear_out_sharding))
mlir.register_lowering(linear_p, _linear_lowering)
batching.primitive_batchers[linear_p] = _linear_batcher
require_devices_during_lowering(linear_p)


WEIGHT_GRADIENT_ERROR = frozen_weight_error("linear")


def _linear_jvp(primals, tangents, *, cfg: LinearConfig):
    n_w = len(cfg.keys)
    weights = primals[1:1 + n_w]
    dx, dweights = tangents[0], tangents[1:1 + n_w]
    dbias = tangents[1 + n_w] if cfg.has_bias else None
    if not all(is_symbolic_zero(t) for t in dweights):
        raise TypeError(WEIGHT_GRADIENT_ERROR)
    y = linear_p.bind(*primals, cfg=cfg)
    dy = None
    if not is_symbolic_zero(dx):
        dy = linear_p.bind(dx, *weights, cfg=dataclasses.replace(cfg, has_bias=False))
    if dbias is not None and not is_symbolic_zero(dbias):
        db = jnp.broadcast_to(dbias.astype(cfg.out_dtype), y.shape)
        dy = db if dy is None else dy + db
    return y, (symbolic_zero(jax.typeof(y)) if dy is None else dy)


def _linear_transpose(ct, x, *rest, cfg: LinearConfig):
    """dx = ct @ dequantize(W) for the tangent linear (x undefined, weights known, no bias)."""
    if not ad.is_undefined_primal(x) or cfg.has_bias or any(
            ad.is_undefined_primal(a) for a in rest):
        raise TypeError(WEIGHT_GRADIENT_ERROR)
    x_aval = x.aval
    if is_symbolic_zero(ct):
        return [symbolic_zero(x_aval), *([None] * len(rest))]
    weight = MxWeight(dict(zip(cfg.keys, rest)), cfg.shape, cfg.backend, cfg.meta)
    op_dtype = reference.dot_dtype(ct.dtype)
    w = dense_weight(weight, op_dtype)
    dx = lax.dot_general(ct.astype(op_dtype), w, (((ct.ndim - 1,), (0,)), ((), ())),
                         precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return [dx.astype(x_aval.dtype), *([None] * len(rest))]


ad.primitive_jvps[linear_p] = _linear_jvp
ad.primitive_transposes[linear_p] = _linear_transpose


def _bind(x, weight, bias, out_dtype, quantize_activations: bool):
    """Binds the partitioned linear (after linear() validated its arguments)."""
    keys = tuple(sorted(weight.arrays))
    shape = local_shape(weight)  # inside shard_map: the shard's
    cfg = LinearConfig(keys, shape, weight.backend, shard_meta(weight.backend, weight.meta, weight.shape, shape),
                       jnp.dtype(out_dtype), bool(quantize_activations), bias is not None)
    args = [x, *(weight.arrays[k] for k in keys)] + ([bias] if bias is not None else [])
    return linear_p.bind(*args, cfg=cfg)


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
    _checks.check_dtype("linear input x", x.dtype, _checks.FLOAT_INPUT_DTYPES,
                     "Cast activations to bfloat16 (recommended), float16 or float32.")
    shape = local_shape(weight)  # a shard's (N, K) inside shard_map; one expert's inside vmap
    if len(shape) == 3:
        raise ValueError(
            f"linear: the weight holds {shape[0]} stacked experts (shape {weight.shape}); use "
            f"ragged_linear(x, weight, group_sizes) for tokens grouped by expert, or "
            f"jax.vmap(linear) over the experts (x [E, ..., K], the weight's arrays on axis 0)")
    n, k = shape
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"linear: x has shape {x.shape} but the weight expects in_features K={k} "
                         f"on the last axis (weight shape [N, K] = {weight.shape})")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    _checks.check_dtype("linear out_dtype", out_dtype, _checks.FLOAT_INPUT_DTYPES, "")
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (n,):
            raise ValueError(f"linear: bias has shape {bias.shape}; expected ({n},) = (out_features,)")
        _checks.check_dtype("linear bias", bias.dtype, _checks.FLOAT_INPUT_DTYPES, "")
    impl = get_backend_impl(weight.backend)
    qa = impl.default_quantize_activations if quantize_activations is None else bool(quantize_activations)
    if qa and not impl.supports_w8a8:
        raise ValueError(f"backend {weight.backend.value} computes W8A16 only; pass "
                         f"quantize_activations=False/None or prepare the weight for 'emulation'")
    if not qa and not impl.supports_w8a16:
        raise ValueError(f"backend {weight.backend.value} computes W8A8 only (activations are "
                         f"quantized); pass quantize_activations=True/None or use 'emulation'")
    return _bind(x, weight, bias, out_dtype, qa)  # impl.linear per shard, partitioned
