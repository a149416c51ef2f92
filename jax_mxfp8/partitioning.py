"""custom_partitioning + Shardy plumbing shared by the ops.

Every partitioned op binds an *outer* primitive whose lowering is `custom_partitioning(body)`,
`body` binding the per-device *inner* primitive (jnp reference or CUDA custom call). The op's
Shardy rule tells the propagator how the dims of operands and results relate; its partition
callback reads the shardings XLA hands it, checks that each shard is a valid MXFP8 problem
(raising a ValueError with the fix when it is not: weights and scales are never gathered behind
the user's back) and returns the per-shard body plus any collective. With one device, inside
shard_map (all mesh axes manual) and under pmap, custom_partitioning lowers `body` directly, so
those paths are the single-device ones.

Factors follow Transformer Engine's MXFP8 rules: the blocked K axis of data is the compound
`(kb 32)` and the scales' axis is `kb`, so a sharding of K is a sharding of whole blocks and
scales travel with them. Each op's own constraints are listed in its module (ops/).

General limits:
- Under Auto axes, a K sharding of partial blocks can fail inside JAX's decoding of the Shardy
  result (an IndivisibleError naming internal shapes, before our check runs: Shardy splits the
  mesh axis between `kb` and the 32-element factor). Explicit-axes meshes (jax.set_mesh) check
  at trace time, with our message.
- shard_map must be manual over every mesh axis (the default): with `axis_names` a strict
  subset, custom_partitioning (jax 0.10) cannot decode the remaining auto shardings and fails.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Hashable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import (
    BATCHING, CompoundFactor, SdyShardingRule, custom_partitioning)
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from jax_mxfp8._compat import (
    Primitive, ShapedArray, batching, mlir, primitive_impl, require_devices_during_lowering,
    without_explicit_shardings)
from jax_mxfp8.reference import BLOCK_SIZE as BLOCK, padded_scale_shape

ROW_TILE = 128  # rows of one F8_128x4 swizzle atom

# ---- Shardy rules --------------------------------------------------------------------------

def sdy_rule(operands, results, *, reduction=(), replicate=()) -> SdyShardingRule:
    """operands/results: (batched, dims) per value; `batched` puts the leading `...` factors first.

    Factors of size 1 are dropped from compounds; sizes are given for the factors that never
    span a whole dim (SdyShardingRule infers the rest).
    """
    whole, part, order = set(), {}, {}

    def mapping(batched, dims):
        out = [BATCHING] if batched else []
        for dim in dims:
            factors = [f for f in dim if f[1] != 1] or list(dim[:1])
            for name, _ in factors:
                order.setdefault(name, len(order))
            if len(factors) == 1:
                whole.add(factors[0][0])
                out.append(factors[0][0])
            else:
                part.update(factors)
                out.append(CompoundFactor(*(name for name, _ in factors)))
        return tuple(out)

    ops = tuple(mapping(*v) for v in operands)
    res = tuple(mapping(*v) for v in results)
    used = whole | set(part)
    sizes = {name: size for name, size in part.items() if name not in whole}
    # Shardy wants each special-factor list in factor-index order (order of first appearance).
    replicate = tuple(sorted(set(f for f in replicate if f in used), key=order.get))
    reduction = tuple(sorted(set(f for f in reduction if f in used and f not in replicate), key=order.get))
    return SdyShardingRule(ops, res, reduction_factors=reduction,
                           need_replication_factors=replicate, **sizes)


def blocked_dim(k: int, block: int = BLOCK, major: str = "kb", minor: str = "b") -> list:
    return [(major, k // block), (minor, block)]


# ---- reading and writing shardings in partition callbacks ---------------------------------

def dim_axes(sharding, ndim: int, what: str) -> list[tuple[str, ...]]:
    """Mesh axes sharding each dim of an operand (() for an unsharded dim)."""
    if not isinstance(sharding, NamedSharding):
        raise ValueError(
            f"jax_mxfp8: {what} has sharding {sharding!r}, which is not a NamedSharding; shard "
            f"arrays with jax.sharding.NamedSharding over a Mesh (or run inside `with mesh:` / "
            f"jax.set_mesh) so the partitioner can name the mesh axes")
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec]


def axes_size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def named(mesh, dims) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*[None if not a else a[0] if len(a) == 1 else tuple(a)
                                               for a in dims]))


def without_reused(dims) -> list[tuple[str, ...]]:
    """Drops a mesh axis from every dim after the first one that uses it."""
    seen, out = set(), []
    for axes in dims:
        out.append(tuple(a for a in axes if a not in seen))
        seen.update(axes)
    return out


def check_whole_blocks(op: str, what: str, k: int, axes, mesh, unit: int = BLOCK) -> None:
    p = axes_size(mesh, axes)
    if (k // unit) % p or k % unit:
        raise ValueError(
            f"{op}: the last axis of {what} (K={k}) is sharded over mesh axes {tuple(axes)} "
            f"({p} shards), but every shard must hold a whole number of {unit}-element units "
            f"(MXFP8 blocks{'' if unit == BLOCK else ' / backend K tiles'}): K/{unit}={k // unit} is not "
            f"divisible by {p}. Shard K over fewer devices, pad K to a multiple of {unit * p}, or "
            f"leave K unsharded")


def check_row_tiles(op: str, rows: int, axes, mesh) -> None:
    p = axes_size(mesh, axes)
    if p > 1 and rows % (ROW_TILE * p):
        raise ValueError(
            f"{op}: the swizzled (F8_128x4) scale layout interleaves 128-row tiles, so the rows "
            f"axis ({rows}) can only be sharded in whole tiles: rows must be a multiple of "
            f"128*{p}={ROW_TILE * p} for mesh axes {tuple(axes)}. Leave rows unsharded, or use "
            f"row-major scales (swizzle=False) and swizzle each shard's scales locally")


# ---- outer primitives ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Static:
    """The static argument of a custom_partitioning call: primitive params and operand shapes."""
    params: tuple[tuple[str, Hashable], ...]
    in_shapes: tuple[tuple[int, ...], ...]

    @property
    def kwargs(self) -> dict:
        return dict(self.params)


_NOT_MAPPED = getattr(batching, "not_mapped", None)


def mapped(bdim) -> bool:
    """Whether a vmap batch dimension is present (not None / not_mapped)."""
    return bdim is not None and bdim is not _NOT_MAPPED


def move_to_front(x, bdim, size):
    """A batched operand with its batch axis first (broadcast to `size` if it is unbatched)."""
    if not mapped(bdim):
        return jnp.broadcast_to(x, (size, *x.shape))
    return jnp.moveaxis(x, bdim, 0)


class _Typed:
    """An operand as partition callbacks see it: shape and sharding (from an aval's type)."""
    def __init__(self, aval):
        self.shape, self.dtype, self.sharding = tuple(aval.shape), aval.dtype, aval.sharding


def explicit_mesh(avals):
    """The mesh of the first operand whose type carries explicit sharding (jax.set_mesh with
    Explicit axes), else None (Auto axes leave types unsharded; the partitioner decides)."""
    for a in avals:
        sh = getattr(a, "sharding", None)
        if isinstance(sh, NamedSharding) and any(e is not None for e in sh.spec):
            return sh.mesh
    return None


def with_sharding(aval, sharding):
    return ShapedArray(aval.shape, aval.dtype, sharding=sharding)


def typed_abstract_eval(abstract_eval: Callable, out_shardings: Callable) -> Callable:
    """abstract_eval plus result shardings in explicit-sharding mode, from the partition logic
    (so invalid shardings raise at trace time there)."""
    def rule(*avals, **params):
        out = abstract_eval(*avals, **params)
        mesh = explicit_mesh(avals)
        if mesh is None:
            return out
        shardings = out_shardings(mesh, tuple(_Typed(a) for a in avals), **params)
        if isinstance(out, (tuple, list)):
            return type(out)(with_sharding(o, s) for o, s in zip(out, shardings))
        return with_sharding(out, shardings)
    return rule


def all_replicated(mesh, fn, arg_shapes, result_shape):
    """The partition result when every operand is replicated without a named mesh (eager calls
    under jax.set_mesh): run `fn` on whole arrays everywhere. None otherwise."""
    shardings = [a.sharding for a in jax.tree.leaves(arg_shapes)]
    if all(isinstance(s, NamedSharding) for s in shardings) or not all(
            getattr(s, "is_fully_replicated", False) for s in shardings):
        return None
    results = jax.tree.map(lambda _: shardings[0], result_shape)
    return mesh, shard_local(fn), results, tuple(shardings)


def shard_local(fn: Callable) -> Callable:
    """A partition's per-device function, traced under no mesh. custom_partitioning traces it
    from shard shapes that carry no sharding, and newer jax (0.11) does so inside the caller's
    mesh context; under an Explicit-axes mesh, ops that have no explicit sharding rule (the
    grouped dot) then refuse to trace. Per-device code has no mesh: collectives name their axes
    through the axis environment custom_partitioning sets up."""
    def local(*args):
        with jax.sharding.use_abstract_mesh(AbstractMesh((), ())):
            return fn(*args)
    return local


def define_partitioned(inner: Primitive, *, abstract_eval: Callable,
                       rule: Callable[[Static], SdyShardingRule],
                       partition: Callable) -> Primitive:
    """The outer primitive of `inner` (same operands, params and results).

    rule(static) -> SdyShardingRule; partition(static, mesh, arg_shapes, result_shape, body)
    -> (result_shardings, arg_shardings, per-shard function); `body(*args, **param_overrides)`
    binds `inner` (overrides: params that differ per shard, e.g. unswizzle's rows).
    Operands are batched along leading dims, which is true of every op here.
    """
    outer = Primitive(inner.name + "_partitioned")
    outer.multiple_results = inner.multiple_results
    outer.def_impl(primitive_impl(outer))
    def out_shardings(mesh, args, **params):
        static = Static(tuple(sorted(params.items())), tuple(a.shape for a in args))
        return partition(static, mesh, args, None, None)[0]

    outer.def_abstract_eval(typed_abstract_eval(abstract_eval, out_shardings))

    def body(static: Static, *args, **overrides):
        out = inner.bind(*args, **{**static.kwargs, **overrides})
        return tuple(out) if inner.multiple_results else out

    def partition_cb(static, mesh, arg_shapes, result_shape):
        fn = functools.partial(body, static)
        replicated = all_replicated(mesh, fn, arg_shapes, result_shape)
        if replicated:
            return replicated
        results, args, fn = partition(static, mesh, arg_shapes, result_shape, fn)
        return mesh, shard_local(fn), results, args

    partitioned = custom_partitioning(body, static_argnums=(0,))
    partitioned.def_partition(partition=partition_cb,
                              sharding_rule=lambda static, mesh, *types: rule(static))

    def lowering(ctx, *args, **params):
        static = Static(tuple(sorted(params.items())), tuple(tuple(a.shape) for a in ctx.avals_in))
        return mlir.lower_fun(lambda *a: partitioned(static, *a), multiple_results=outer.multiple_results)(
            without_explicit_shardings(ctx), *args)

    def batcher(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if mapped(d))
        out = outer.bind(*(move_to_front(a, d, size) for a, d in zip(args, dims)), **params)
        return out, ((0,) * len(out) if outer.multiple_results else 0)

    mlir.register_lowering(outer, lowering)
    batching.primitive_batchers[outer] = batcher
    require_devices_during_lowering(outer)
    return outer


def swizzled_rows(rows: int, cols: int):
    """Factors of a rows axis and of the flat swizzled (F8_128x4) scale axis: whole 128-row
    tiles shard."""
    mp, kbp = padded_scale_shape(rows, cols)
    if rows % ROW_TILE:
        return [("rows", rows)], [("sw", mp * kbp)]
    # Whole rows as one factor (a 128-row compound would let Shardy split a mesh axis into
    # sub-axes, which the partition callback cannot even see); partition checks tile alignment.
    return [("rows", rows)], [("rows", rows), ("sw", kbp)]


def as_axes(axis) -> tuple[str, ...]:
    """A mesh axis argument (None, a name or a sequence of names) as a tuple of names."""
    return () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)


def spec_entry(axes):
    """A PartitionSpec entry for a tuple of mesh axes."""
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
