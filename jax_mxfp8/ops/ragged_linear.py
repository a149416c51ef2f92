"""ragged_linear: rows grouped by expert times a stacked (E, N, K) MxWeight, one primitive.

    y[t] = x[t] @ dequantize(W[e]).T + bias[e]   for t in [sum(gs[:e]), sum(gs[:e+1]))
    y[t] = 0                                     for t >= sum(gs)

x [T, K], group_sizes gs [E] int32 (traced: no host synchronisation), bias [E, N]: the
semantics of jax.lax.ragged_dot(x, W^T, gs) plus a per-group bias, with the numerics of linear
(docs/numerics.md, docs/moe.md). The per-device body calls the backend's `ragged_linear`
(BackendImpl); its lowering is custom_partitioning of that body.

Sharding under jit (the partition callback below; no weight or scale is ever gathered, an
impossible placement is a ValueError naming the fix):
- experts split over mesh axes (expert-parallel): every device holds E/p experts and all the
  rows (x replicated over those axes); it computes the rows of its experts, zero elsewhere, in
  float32, and one psum over the expert axes adds the disjoint rows. group_sizes is read whole
  (a sharded one is gathered: E int32s).
- N split (column-parallel within experts): no communication; K split (row-parallel): float32
  partial products, the same one psum, bias added once.
- rows split over other mesh axes (data-parallel tokens): each device computes its window of
  rows, the groups clipped to it; no communication.
- vmap(linear) over stacked experts (every group the same static size) keeps x's rows split
  with the experts: each device's rows are exactly its experts', nothing is exchanged.
Tokens routed to the devices of their experts (an all-to-all of the user's own) are the
shard_map path: inside shard_map the arrays are shards and group_sizes the local experts'
(docs/moe.md).

vmap of ragged_linear sorts the rows of all batch entries by expert (a stable argsort of group
ids) into one grouped call and scatters the result back. Autodiff: linear in x (JVP; the
transpose is the grouped dx = dy @ W[e] in float32 through the dense weight), affine in bias (the
bias' tangent spread over the rows); the weight is frozen and group_sizes has no gradient.
Under Explicit-axes meshes (jax.set_mesh) jax's ragged dot infers no shardings: the grouped dots
name their output sharding, and dx is computed on whole rows then resharded like x.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import SdyShardingRule, custom_partitioning
from jax.sharding import PartitionSpec as P

from jax_mxfp8 import _checks, reference
from jax_mxfp8._compat import (
    Primitive, ShapedArray, ad, batching, is_symbolic_zero, mlir, primitive_impl,
    require_devices_during_lowering, symbolic_zero, without_explicit_shardings)
from jax_mxfp8.backends import get_backend_impl
from jax_mxfp8.backends.base import E_AXIS, K_AXIS, N_AXIS
from jax_mxfp8.backends.emulation import group_of_rows, rows_bias, rows_sharding
from jax_mxfp8.ops.prepared_gemm import (
    check_backend_runs_on, dense_weight, frozen_weight_error, leaf_factors, weight_mesh_axes)
from jax_mxfp8.partitioning import (
    all_replicated, axes_size, dim_axes, mapped, move_to_front, named, sdy_rule,
    shard_local, typed_abstract_eval)
from jax_mxfp8.weight import (
    MxWeight, backend_layout, check_expert_shards, check_shard_tiles, local_shape, shard_meta)

OP = "ragged_linear"
WEIGHT_GRADIENT_ERROR = frozen_weight_error(OP)
# dx [T, K] = ct [T, N] @ W[e] [N, K] on group e's rows
_DX_DIMS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [1]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


@dataclasses.dataclass(frozen=True)
class RaggedConfig:
    """Static description of one ragged_linear call (the primitive's only param)."""
    keys: tuple[str, ...]            # MxWeight array names, in leaf order
    shape: tuple[int, int, int]      # (E, N, K) as this call sees it (a shard inside shard_map)
    backend: Any                     # Backend
    meta: Hashable
    out_dtype: Any                   # numpy dtype
    has_bias: bool
    group_rows: int | None = None    # every group holds exactly this many rows (vmap(linear))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one device's shard of the problem sits (all empty: the whole problem)."""
    e_axes: tuple[str, ...] = ()     # mesh axes splitting the experts
    t_axes: tuple[str, ...] = ()     # mesh axes splitting the rows
    k_axes: tuple[str, ...] = ()     # mesh axes splitting K (partial products)
    aligned: bool = False            # t_axes == e_axes and each row shard is its experts' rows


@dataclasses.dataclass(frozen=True)
class RaggedCall:
    """The static argument of the custom_partitioning call."""
    cfg: RaggedConfig
    in_shapes: tuple[tuple[int, ...], ...]


def _shard_index(axes):
    return lax.axis_index(tuple(axes)) if axes else 0


def local_groups(group_sizes, experts: int, rows: int, place: Placement):
    """(this shard's group sizes [experts], the row of its first group in its row window):
    its experts' groups clipped to its rows. Rows of a contiguous range of experts are
    contiguous, so they are one block of the window."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    e0 = _shard_index(place.e_axes) * experts
    t0 = _shard_index(place.t_axes) * rows
    lo = jnp.clip(lax.dynamic_slice_in_dim(starts, e0, experts) - t0, 0, rows)
    hi = jnp.clip(lax.dynamic_slice_in_dim(ends, e0, experts) - t0, 0, rows)
    return hi - lo, lo[0]


def ragged_body(cfg: RaggedConfig, place: Placement, x, group_sizes, *rest):
    """The per-device ragged_linear of a shard: [T_local, K] rows -> [T_local, N]."""
    impl = get_backend_impl(cfg.backend)
    weight = MxWeight(dict(zip(cfg.keys, rest)), cfg.shape, cfg.backend, cfg.meta)
    bias = rest[len(cfg.keys)] if cfg.has_bias else None
    experts, rows = cfg.shape[0], x.shape[0]
    shift = None
    if place.e_axes or place.t_axes:
        group_sizes, first = local_groups(group_sizes, experts, rows, place)
        if place.e_axes and not place.aligned:
            shift = first  # this shard's rows start there: bring them to row 0 and back
    reduce = tuple(place.k_axes) + (() if place.aligned else tuple(place.e_axes))
    xs = x if shift is None else jnp.roll(x, -shift, axis=0)
    if not reduce:
        return impl.ragged_linear(xs, weight, group_sizes, bias, cfg.out_dtype)
    # Partial products in float32 (K split: partial sums; experts split: disjoint rows, zero
    # elsewhere), one psum, one cast. The bias goes in once: on the K shard 0 of its expert.
    f32 = jnp.dtype(jnp.float32)
    y = impl.ragged_linear(xs, weight, group_sizes, None if place.k_axes else bias, f32).astype(f32)
    if bias is not None and place.k_axes:
        y = y + jnp.where(_shard_index(place.k_axes) == 0, rows_bias(bias, group_sizes, rows), 0.0)
    if shift is not None:
        y = jnp.roll(y, shift, axis=0)  # rows past this shard's groups are zero: no mask needed
    return lax.psum(y, reduce).astype(cfg.out_dtype)


# ---- partitioning ------------------------------------------------------------------------------

def _aligned_rows(cfg: RaggedConfig, rows: int) -> bool:
    return cfg.group_rows is not None and rows == cfg.shape[0] * cfg.group_rows


def ragged_rule(call: RaggedCall, mesh, *types) -> SdyShardingRule:
    cfg, in_shapes = call.cfg, call.in_shapes
    impl = get_backend_impl(cfg.backend)
    e, n, k = cfg.shape
    rows = in_shapes[0][0]
    _, axes = backend_layout(cfg.backend, cfg.meta, cfg.shape)
    if axes is None:  # not shardable: every weight dim its own factor, replicated
        axes = {name: (None,) * len(s) for name, s in zip(cfg.keys, in_shapes[2:])}
    n_dim = [("nt", n // impl.n_tile), ("nx", impl.n_tile)]
    k_dim = [("kt", k // impl.k_tile), ("kx", impl.k_tile)]
    aligned = _aligned_rows(cfg, rows)
    # Equal static groups: rows are (expert, row in group), so a row split can be an expert split.
    t_dim = [("e", e), ("gr", cfg.group_rows)] if aligned else [("t", rows)]
    leaves, inner = leaf_factors(cfg.backend, cfg.meta, cfg.shape, cfg.keys, axes,
                                 in_shapes[2:2 + len(cfg.keys)], "nt", "kt")
    operands = [(False, [t_dim, k_dim]), (False, [[("g", e)]]), *leaves]
    if cfg.has_bias:
        operands.append((False, [[("e", e)], n_dim]))
    return sdy_rule(operands, [(False, [t_dim, n_dim])],
                    reduction=("kt",) if aligned else ("kt", "e"),
                    replicate=("nx", "kx", "g", *inner))


def ragged_partition(call: RaggedCall, mesh, arg_shapes, result_shape):
    cfg = call.cfg
    replicated = all_replicated(mesh, functools.partial(ragged_body, cfg, Placement()), arg_shapes,
                                result_shape)
    if replicated:
        return replicated
    impl, axes = backend_layout(cfg.backend, cfg.meta, cfg.shape)
    e, n, k = cfg.shape
    x, leaves = arg_shapes[0], arg_shapes[2:2 + len(cfg.keys)]
    rows = x.shape[0]
    x_axes = dim_axes(x.sharding, 2, "ragged_linear input x")
    e_axes, n_axes, k_axes = weight_mesh_axes(OP, cfg.backend, cfg.keys, leaves, axes)
    if not k_axes and axes is not None:
        k_axes = tuple(a for a in x_axes[1] if a not in n_axes + e_axes)  # weights whole on K: slice them
    check_expert_shards(e, e_axes, mesh, OP)
    check_shard_tiles("N (out_features)", n, impl.n_tile, n_axes, mesh, cfg.backend, OP)
    check_shard_tiles("K (in_features)", k, impl.k_tile, k_axes, mesh, cfg.backend, OP)
    t_axes = tuple(a for a in x_axes[0] if a not in n_axes + k_axes)
    aligned = bool(e_axes) and t_axes == e_axes and _aligned_rows(cfg, rows)
    if not aligned:  # an expert shard needs every row: rows split only over other axes
        t_axes = tuple(a for a in t_axes if a not in e_axes)
    if rows % axes_size(mesh, t_axes):
        t_axes = ()
    local = (e // axes_size(mesh, e_axes), n // axes_size(mesh, n_axes), k // axes_size(mesh, k_axes))
    local_cfg = dataclasses.replace(cfg, shape=local,
                                    meta=shard_meta(cfg.backend, cfg.meta, cfg.shape, local))
    by_kind = {E_AXIS: e_axes, N_AXIS: n_axes, K_AXIS: k_axes}
    arg_shardings = [named(mesh, [t_axes, k_axes]), named(mesh, [()])]
    for name, leaf in zip(cfg.keys, leaves):
        kinds = axes[name] if axes is not None else (None,) * len(leaf.shape)
        arg_shardings.append(named(mesh, [by_kind.get(t, ()) for t in kinds]))
    if cfg.has_bias:
        arg_shardings.append(named(mesh, [e_axes, n_axes]))
    result = named(mesh, [t_axes, n_axes])
    fn = functools.partial(ragged_body, local_cfg, Placement(e_axes, t_axes, k_axes, aligned))
    return mesh, shard_local(fn), result, tuple(arg_shardings)


_ragged_cp = custom_partitioning(
    lambda call, *args: ragged_body(call.cfg, Placement(), *args), static_argnums=(0,))
_ragged_cp.def_partition(partition=ragged_partition, sharding_rule=ragged_rule)


# ---- the primitive -----------------------------------------------------------------------------

def _ragged_abstract(x, group_sizes, *rest, cfg: RaggedConfig):
    return ShapedArray((x.shape[0], cfg.shape[1]), cfg.out_dtype)


def _ragged_lowering(ctx, *args, cfg):
    check_backend_runs_on(cfg.backend, ctx.module_context.platforms, OP)
    call = RaggedCall(cfg, tuple(tuple(a.shape) for a in ctx.avals_in))
    return mlir.lower_fun(lambda *a: _ragged_cp(call, *a), multiple_results=False)(
        without_explicit_shardings(ctx), *args)


def _ragged_out_sharding(mesh, args, *, cfg):
    call = RaggedCall(cfg, tuple(a.shape for a in args))
    return ragged_partition(call, mesh, args, None)[2]


def _ragged_batcher(args, dims, *, cfg: RaggedConfig):
    """Every batch entry's rows sorted by expert (a stable argsort of their groups) into one
    grouped call; a batched weight makes batch entry b's experts the groups b*E .. b*E+E-1."""
    size = next(a.shape[d] for a, d in zip(args, dims) if mapped(d))
    weight_batched = any(mapped(d) for d in dims[2:])
    x, group_sizes = (move_to_front(a, d, size) for a, d in zip(args[:2], dims[:2]))
    rest = [move_to_front(a, d, size) for a, d in zip(args[2:], dims[2:])] if weight_batched else args[2:]
    experts, rows = cfg.shape[0], x.shape[1]
    groups = jax.vmap(lambda g: group_of_rows(g, rows))(group_sizes)  # [B, T] in [0, E]
    if weight_batched:
        batch = jnp.arange(size, dtype=jnp.int32)[:, None]
        key = jnp.where(groups < experts, batch * experts + groups, size * experts)
        group_sizes = group_sizes.reshape(size * experts)
        rest = [a.reshape(size * experts, *a.shape[2:]) for a in rest]
        cfg = dataclasses.replace(cfg, shape=(size * experts, *cfg.shape[1:]), group_rows=None)
    else:
        key = groups
        group_sizes = jnp.sum(group_sizes, axis=0)
        cfg = dataclasses.replace(cfg, group_rows=None)
    order = jnp.argsort(key.reshape(-1), stable=True)
    y = ragged_linear_p.bind(x.reshape(size * rows, -1)[order], group_sizes, *rest, cfg=cfg)
    y = jnp.zeros_like(y).at[order].set(y, unique_indices=True)
    return y.reshape(size, rows, -1), 0


ragged_linear_p = Primitive("mxfp8_ragged_linear")
ragged_linear_p.def_impl(primitive_impl(ragged_linear_p))
ragged_linear_p.def_abstract_eval(typed_abstract_eval(_ragged_abstract, _ragged_out_sharding))
mlir.register_lowering(ragged_linear_p, _ragged_lowering)
batching.primitive_batchers[ragged_linear_p] = _ragged_batcher
require_devices_during_lowering(ragged_linear_p)


def _ragged_jvp(primals, tangents, *, cfg: RaggedConfig):
    n_w = len(cfg.keys)
    x, group_sizes, weights = primals[0], primals[1], primals[2:2 + n_w]
    dx, dweights = tangents[0], tangents[2:2 + n_w]
    dbias = tangents[2 + n_w] if cfg.has_bias else None
    if not all(is_symbolic_zero(t) for t in dweights):
        raise TypeError(WEIGHT_GRADIENT_ERROR)
    y = ragged_linear_p.bind(*primals, cfg=cfg)
    dy = None
    if not is_symbolic_zero(dx):
        dy = ragged_linear_p.bind(dx, group_sizes, *weights, cfg=dataclasses.replace(cfg, has_bias=False))
    if dbias is not None and not is_symbolic_zero(dbias):
        db = rows_bias(dbias, group_sizes, x.shape[0]).astype(cfg.out_dtype)
        dy = db if dy is None else dy + db
    return y, (symbolic_zero(jax.typeof(y)) if dy is None else dy)


def _ragged_transpose(ct, x, group_sizes, *rest, cfg: RaggedConfig):
    """dx[t] = ct[t] @ dequantize(W[e]) on group e's rows (x undefined, no bias)."""
    if (not ad.is_undefined_primal(x) or cfg.has_bias or ad.is_undefined_primal(group_sizes)
            or any(ad.is_undefined_primal(a) for a in rest)):
        raise TypeError(WEIGHT_GRADIENT_ERROR)
    x_aval = x.aval
    nones = [None] * (1 + len(rest))
    if is_symbolic_zero(ct):
        return [symbolic_zero(x_aval), *nones]
    weight = MxWeight(dict(zip(cfg.keys, rest)), cfg.shape, cfg.backend, cfg.meta)
    op_dtype = reference.dot_dtype(ct.dtype)
    w = dense_weight(weight, op_dtype)  # [E, N, K]
    ct = ct.astype(op_dtype)
    explicit = rows_sharding(ct) is not None
    if explicit:  # jax's ragged dot takes no row-sharded operand under Explicit axes
        ct = jax.sharding.reshard(ct, P())
    dx = lax.ragged_dot_general(ct, w, group_sizes.astype(jnp.int32), _DX_DIMS,
                                precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
                                out_sharding=rows_sharding(ct))
    if explicit:
        dx = jax.sharding.reshard(dx, x_aval.sharding.spec)
    return [dx.astype(x_aval.dtype), *nones]


ad.primitive_jvps[ragged_linear_p] = _ragged_jvp
ad.primitive_transposes[ragged_linear_p] = _ragged_transpose


# ---- binding -----------------------------------------------------------------------------------

def _config(keys, shape, weight_shape, backend, meta, out_dtype, has_bias, group_rows=None):
    return RaggedConfig(tuple(keys), tuple(shape), backend, shard_meta(backend, meta, weight_shape, shape),
                        jnp.dtype(out_dtype), bool(has_bias), group_rows)


def experts_linear(x, leaves, bias, *, keys, shape, backend, meta, out_dtype):
    """vmap(linear)'s route for stacked experts: x [E, ..., K] (entry e for expert e), the
    prepared arrays [E, ...] of (N, K) experts, bias [E, N] or None -> [E, ..., N], every entry
    a group of rows of one grouped call."""
    experts, lead = x.shape[0], x.shape[1:-1]
    n, k = shape
    rows = 1
    for d in lead:
        rows *= d
    if rows == 0:
        return jnp.zeros((experts, *lead, n), out_dtype)
    x2d = x.reshape(experts * rows, k)
    cfg = _config(keys, (experts, n, k), (experts, n, k), backend, meta, out_dtype, bias is not None,
                  group_rows=rows)
    group_sizes = jnp.full((experts,), rows, jnp.int32)
    args = [x2d, group_sizes, *leaves] + ([bias] if bias is not None else [])
    return ragged_linear_p.bind(*args, cfg=cfg).reshape(experts, *lead, n)


def ragged_linear(x, weight: MxWeight, group_sizes, bias=None, *, out_dtype=None):
    """y = x @ dequantize(weight[e]).T + bias[e] on the rows of group e; zero past the groups.

    x: [T, K] bf16/fp16/fp32, rows grouped by expert in order; weight: a stacked MxWeight of
    shape (E, N, K) (prepare_weight / quantize_weight of [E, N, K]); group_sizes: [E] integer
    (int32 on the device; their sum at most T; rows from sum(group_sizes) on are zero);
    bias: [E, N] or None. out_dtype defaults to x's dtype. Float32 accumulation, W8A16 (the
    numerics of linear): jax.lax.ragged_dot(x, W^T, group_sizes) semantics.
    """
    if not isinstance(weight, MxWeight):
        raise TypeError(f"{OP}: weight must be an MxWeight from prepare_weight()/quantize_weight() "
                        f"of stacked [E, N, K] experts; got {type(weight).__name__}")
    if weight.num_experts is None:
        raise ValueError(f"{OP}: the weight has shape {weight.shape}, one dense (N, K) weight; it "
                         f"needs stacked experts (E, N, K): prepare_weight(values [E, N, K], scales "
                         f"[E, N, K/32]) or quantize_weight(w [E, N, K]). For one weight use linear()")
    shape = local_shape(weight)  # a shard's (E, N, K) inside shard_map
    if len(shape) == 2:
        raise ValueError(f"{OP}: the weight's arrays hold one expert of its {weight.shape} (inside "
                         f"vmap over the expert axis?): ragged_linear takes all experts at once; "
                         f"call it outside that vmap, or use linear() on one expert")
    e, n, k = shape
    impl = get_backend_impl(weight.backend)
    if impl.ragged_linear is None:
        raise ValueError(f"{OP}: backend {weight.backend.value} has no grouped GEMM; convert the weight "
                         f"exactly with weight.to_backend('emulation') (or 'marlin' on SM80+ GPUs), "
                         f"or run jax.vmap(linear) over the experts")
    x = jnp.asarray(x)
    _checks.check_dtype(f"{OP} input x", x.dtype, _checks.FLOAT_INPUT_DTYPES,
                        "Cast activations to bfloat16 (recommended), float16 or float32.")
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"{OP}: x has shape {x.shape}; expected [T, K] rows with K={k} (weight "
                         f"shape [E, N, K] = {weight.shape}). Flatten leading axes into T, or vmap")
    group_sizes = jnp.asarray(group_sizes)
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(f"{OP}: group_sizes has dtype {group_sizes.dtype.name}; expected int32 "
                        f"counts of rows per expert")
    if group_sizes.shape != (e,):
        raise ValueError(f"{OP}: group_sizes has shape {group_sizes.shape}; expected ({e},), one "
                         f"row count per expert of the weight {weight.shape}")
    group_sizes = group_sizes.astype(jnp.int32)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    _checks.check_dtype(f"{OP} out_dtype", out_dtype, _checks.FLOAT_INPUT_DTYPES, "")
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (e, n):
            raise ValueError(f"{OP}: bias has shape {bias.shape}; expected ({e}, {n}) = "
                             f"(experts, out_features)")
        _checks.check_dtype(f"{OP} bias", bias.dtype, _checks.FLOAT_INPUT_DTYPES, "")
    keys = tuple(sorted(weight.arrays))
    cfg = _config(keys, shape, weight.shape, weight.backend, weight.meta, out_dtype, bias is not None)
    args = [x, group_sizes, *(weight.arrays[name] for name in keys)] + ([bias] if bias is not None else [])
    return ragged_linear_p.bind(*args, cfg=cfg)
