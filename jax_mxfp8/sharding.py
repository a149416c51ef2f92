"""Sharded execution of quantize, dequantize, swizzle and linear under jit.

Every public op binds an *outer* primitive whose lowering is `custom_partitioning(body)`,
`body` binding the per-device *inner* primitive (jnp reference or CUDA custom call). The
Shardy rule tells the propagator how the dims of operands and results relate; the
partition callback reads the shardings XLA hands it, checks that each shard is a valid
MXFP8 problem (raising a ValueError with the fix when it is not: we never gather weights
or scales behind the user's back) and returns the per-shard body plus any collective.
With one device, inside shard_map (all mesh axes manual) and under pmap,
custom_partitioning lowers `body` directly, so those paths are the single-device ones.

Factors follow Transformer Engine's MXFP8 rules (transformer_engine/jax/quantize/
scaling_modes.py): the blocked K axis of data is the compound `(kb 32)` and the scales' axis
is `kb`, so a sharding of K is a sharding of whole blocks and scales travel with them.

linear: x [..., K] and a backend-prepared MxWeight. The backend declares, per prepared array,
which dims are tile-major over N or K (`BackendImpl.array_axes`, granularity `n_tile`,
`k_tile`), so a contiguous 1/p chunk of such a dim is the prepared array of the sub-weight.
N sharded (column-parallel): no communication. K sharded (row-parallel): float32 partial
products and one psum over the K mesh axes, bias added after it.

Constraints (each raises a ValueError naming the fix; none is met by gathering weights/scales):
- quantize/dequantize: any leading axis shards freely (uneven shards too: rows are
  independent); K shards only in whole blocks, K/32 divisible by the number of K shards.
- quantize(swizzle=True), swizzle_scales, unswizzle_scales: leading batch axes freely; the
  rows axis only in whole 128-row tiles (rows a multiple of 128 * shards); K never.
- linear: N shards are whole `n_tile`, K shards whole `k_tile` (EMULATION 1 / 32, MARLIN 64 /
  64, CUTLASS 128 / 128); a weight whose N or K is not a multiple of its backend's tile (padded
  tiles) cannot be sharded; all arrays of an MxWeight must split N and K over the same mesh
  axes (weight_shardings / shard_weight / prepare_weight_sharded make such placements and check
  divisibility up front). Activations keep any leading-axis sharding; an activation K sharding
  that disagrees with the weight's is resharded (activations only).
- Under Auto axes, a K sharding of partial blocks can fail inside JAX's decoding of the
  Shardy result (an IndivisibleError naming internal shapes, before our check runs: Shardy
  splits the mesh axis between `kb` and the 32-element factor). Explicit-axes meshes
  (jax.set_mesh) check at trace time, with our message.
- vmap over a batched weight runs the per-device body under vmap, without custom partitioning.
- shard_map must be manual over every mesh axis (the default): with `axis_names` a strict
  subset, custom_partitioning (jax 0.10) cannot decode the remaining auto shardings and fails.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import (
    BATCHING, CompoundFactor, SdyShardingRule, custom_partitioning)
from jax.sharding import NamedSharding, PartitionSpec

from jax_mxfp8._compat import (
    Primitive, ShapedArray, batching, mlir, primitive_impl, require_devices_during_lowering,
    without_explicit_shardings)

BLOCK = 32
ROW_TILE = 128  # rows of one F8_128x4 swizzle atom
N_AXIS, K_AXIS = "n", "k"  # the values BackendImpl.array_axes uses for tile-major dims


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


def _mapped(bdim) -> bool:
    return bdim is not None and bdim is not _NOT_MAPPED


def _move_to_front(x, bdim, size):
    if not _mapped(bdim):
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
    return mesh, fn, results, tuple(shardings)


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
        return mesh, fn, results, args

    partitioned = custom_partitioning(body, static_argnums=(0,))
    partitioned.def_partition(partition=partition_cb,
                              sharding_rule=lambda static, mesh, *types: rule(static))

    def lowering(ctx, *args, **params):
        static = Static(tuple(sorted(params.items())), tuple(tuple(a.shape) for a in ctx.avals_in))
        return mlir.lower_fun(lambda *a: partitioned(static, *a), multiple_results=outer.multiple_results)(
            without_explicit_shardings(ctx), *args)

    def batcher(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if _mapped(d))
        out = outer.bind(*(_move_to_front(a, d, size) for a, d in zip(args, dims)), **params)
        return out, ((0,) * len(out) if outer.multiple_results else 0)

    mlir.register_lowering(outer, lowering)
    batching.primitive_batchers[outer] = batcher
    require_devices_during_lowering(outer)
    return outer


# ---- quantize / dequantize / swizzle rules ---------------------------------------------------

def quantize_rule(static: Static) -> SdyShardingRule:
    (shape,) = static.in_shapes
    k = shape[-1]
    if not static.kwargs["swizzle"]:
        data = [blocked_dim(k)]
        return sdy_rule([(True, data)], [(True, data), (True, [[("kb", k // BLOCK)]])],
                        replicate=("b",))
    rows_dim, flat = _swizzled_rows(shape[-2], k // BLOCK)
    return sdy_rule([(True, [rows_dim, [("k", k)]])], [(True, [rows_dim, [("k", k)]]), (True, [flat])],
                    replicate=("sw", "k"))


def _swizzled_rows(rows: int, cols: int):
    """Factors of a rows axis and of the flat swizzled scale axis: whole 128-row tiles shard."""
    from jax_mxfp8.reference import padded_scale_shape
    mp, kbp = padded_scale_shape(rows, cols)
    if rows % ROW_TILE:
        return [("rows", rows)], [("sw", mp * kbp)]
    # Whole rows as one factor (a 128-row compound would let Shardy split a mesh axis into
    # sub-axes, which the partition callback cannot even see); partition checks tile alignment.
    return [("rows", rows)], [("rows", rows), ("sw", kbp)]


def quantize_partition(static, mesh, arg_shapes, result_shape, body):
    (x,) = arg_shapes
    axes = dim_axes(x.sharding, len(x.shape), "quantize input x")
    check_whole_blocks("quantize", "x", x.shape[-1], axes[-1], mesh)
    scale_axes = axes
    if static.kwargs["swizzle"]:
        if axes[-1]:
            raise ValueError(
                f"quantize(swizzle=True): x's K axis is sharded over {axes[-1]}, but the swizzled "
                f"scale layout interleaves K blocks of 4 within each 128-row tile, so a K shard "
                f"is not a contiguous piece of it. Quantize with swizzle=False (row-major scales "
                f"shard along K) and swizzle per shard, or leave K unsharded")
        check_row_tiles("quantize(swizzle=True)", x.shape[-2], axes[-2], mesh)
        scale_axes = axes[:-2] + [axes[-2]]
    x_sharding = named(mesh, axes)
    return (x_sharding, named(mesh, scale_axes)), (x_sharding,), body


def dequantize_rule(static: Static) -> SdyShardingRule:
    shape, _ = static.in_shapes
    k = shape[-1]
    data = [blocked_dim(k)]
    return sdy_rule([(True, data), (True, [[("kb", k // BLOCK)]])], [(True, data)], replicate=("b",))


def dequantize_partition(static, mesh, arg_shapes, result_shape, body):
    values, scales = arg_shapes
    v_axes = dim_axes(values.sharding, len(values.shape), "dequantize values")
    s_axes = dim_axes(scales.sharding, len(scales.shape), "dequantize scales")
    # Values decide; scales only fill in dims the values leave unsharded (a scale reshard is
    # 32x smaller than a values one).
    axes = without_reused([v or s for v, s in zip(v_axes, s_axes)])
    check_whole_blocks("dequantize", "values", values.shape[-1], axes[-1], mesh)
    sharding = named(mesh, axes)
    return sharding, (sharding, sharding), body


def swizzle_rule(static: Static) -> SdyShardingRule:
    (shape,) = static.in_shapes
    rows_dim, flat = _swizzled_rows(shape[-2], shape[-1])
    return sdy_rule([(True, [rows_dim, [("c", shape[-1])]])], [(True, [flat])],
                    replicate=("sw", "c"))


def swizzle_partition(static, mesh, arg_shapes, result_shape, body):
    (s,) = arg_shapes
    axes = dim_axes(s.sharding, len(s.shape), "swizzle_scales input")
    if axes[-1]:
        raise ValueError(f"swizzle_scales: the scale-column axis is sharded over {axes[-1]}; the "
                         f"swizzled layout needs whole rows of scales per shard. Leave it unsharded")
    check_row_tiles("swizzle_scales", s.shape[-2], axes[-2], mesh)
    return named(mesh, axes[:-2] + [axes[-2]]), (named(mesh, axes),), body


def unswizzle_rule(static: Static) -> SdyShardingRule:
    kw = static.kwargs
    rows_dim, flat = _swizzled_rows(kw["rows"], kw["cols"])
    return sdy_rule([(True, [flat])], [(True, [rows_dim, [("c", kw["cols"])]])],
                    replicate=("sw", "c"))


def unswizzle_partition(static, mesh, arg_shapes, result_shape, body):
    (s,) = arg_shapes
    axes = dim_axes(s.sharding, len(s.shape), "unswizzle_scales input")
    rows = static.kwargs["rows"]
    check_row_tiles("unswizzle_scales", rows, axes[-1], mesh)
    local_rows = rows // axes_size(mesh, axes[-1])
    return (named(mesh, axes[:-1] + [axes[-1], ()]), (named(mesh, axes),),
            body and functools.partial(body, rows=local_rows))


# ---- linear ----------------------------------------------------------------------------------

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


def backend_layout(backend, meta, shape):
    """(impl, {array name: per-dim axis tuple}) of a backend, validated."""
    from jax_mxfp8.backends import get_backend_impl
    impl = get_backend_impl(backend)
    if impl.array_axes is None:
        return impl, None
    return impl, {k: tuple(v) for k, v in impl.array_axes(meta, tuple(shape)).items()}


def shard_meta(backend, meta, global_shape, local_shape):
    """The meta of a (local_shape) shard of a prepared (global_shape) weight."""
    from jax_mxfp8.backends import get_backend_impl
    impl = get_backend_impl(backend)
    if tuple(local_shape) == tuple(global_shape) or impl.shard_meta is None:
        return meta
    return impl.shard_meta(meta, tuple(local_shape))


@functools.lru_cache(maxsize=256)
def prepared_shapes(backend, n: int, k: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays prepare() makes for a global [N, K] weight."""
    import numpy as np
    from jax_mxfp8.backends import get_backend_impl
    impl = get_backend_impl(backend)
    out = jax.eval_shape(lambda v, s: impl.prepare(v, s)[0],
                         jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn),
                         jax.ShapeDtypeStruct((n, k // BLOCK), np.uint8))
    return {name: tuple(a.shape) for name, a in out.items()}


def local_weight_shape(weight) -> tuple[int, int]:
    """(N, K) of the weight shard that `weight`'s arrays hold.

    Equal to weight.shape under jit (arrays are global). Inside shard_map the treedef still
    says the global shape while the arrays are shards; the backend's array_axes say which dims
    were split, so the shard's (N/pn, K/pk) follows from the array shapes.
    """
    n, k = weight.shape
    expected = prepared_shapes(weight.backend, n, k)
    actual = {name: tuple(a.shape) for name, a in weight.arrays.items()}
    if actual == expected:
        return n, k
    _, axes = backend_layout(weight.backend, weight.meta, weight.shape)
    if axes is None or set(actual) != set(expected):
        raise ValueError(f"MxWeight arrays {actual} do not match the {weight.backend.value} layout "
                         f"of a ({n}, {k}) weight, {expected}" +
                         ("" if axes is not None else f"; backend {weight.backend.value} declares no "
                          f"array_axes, so its weights cannot be used sharded (inside shard_map)"))
    ratio = {N_AXIS: set(), K_AXIS: set()}
    for name, shape in actual.items():
        want = expected[name]
        for d, (got, full, kind) in enumerate(zip(shape, want, axes[name])):
            if kind in ratio and got and full % got == 0:
                ratio[kind].add(full // got)
            elif got != full:
                raise ValueError(
                    f"MxWeight array {name!r} has shape {shape}; the {weight.backend.value} layout of a "
                    f"({n}, {k}) weight is {want}, and only dims declared N- or K-tile-major "
                    f"({axes[name]}) may be shards of it (dim {d} is not)")
    if len(ratio[N_AXIS]) > 1 or len(ratio[K_AXIS]) > 1:
        raise ValueError(f"MxWeight arrays {actual} are inconsistent shards of a ({n}, {k}) "
                         f"{weight.backend.value} weight {expected}: arrays split N or K differently")
    pn, pk = (next(iter(ratio[a]), 1) for a in (N_AXIS, K_AXIS))
    if n % pn or k % pk:
        raise ValueError(f"MxWeight arrays {actual} imply a ({n}/{pn}, {k}/{pk}) shard, which is not whole")
    return n // pn, k // pk


def _leaf_dims(cfg: LinearConfig, axes, shapes, n_factor, k_factor):
    """Factor lists of each prepared array (tile-major dims get the nt / kt factor)."""
    n, k = cfg.shape
    impl, _ = backend_layout(cfg.backend, cfg.meta, cfg.shape)
    tiles = {N_AXIS: (n_factor, n // impl.n_tile), K_AXIS: (k_factor, k // impl.k_tile)}
    out, inner = [], []
    for name, shape in zip(cfg.keys, shapes):
        dims = []
        for d, size in enumerate(shape):
            kind = axes[name][d]
            factor = f"{name}_{d}"
            if kind in tiles:
                major, count = tiles[kind]
                if size % count:
                    raise ValueError(f"backend {cfg.backend.value}: array {name!r} dim {d} (size {size}) is "
                                     f"declared {kind}-tile-major but is not a multiple of the {count} "
                                     f"{kind.upper()} tiles; fix BackendImpl.array_axes / n_tile / k_tile")
                dims.append([(major, count), (factor, size // count)])
            else:
                dims.append([(factor, size)])
            inner.append(factor)
        out.append((False, dims))
    return out, inner


@dataclasses.dataclass(frozen=True)
class LinearCall:
    """The static argument of the linear custom_partitioning call."""
    cfg: LinearConfig
    in_shapes: tuple[tuple[int, ...], ...]


def linear_rule(call: LinearCall, mesh, *types) -> SdyShardingRule:
    from jax_mxfp8.backends import get_backend_impl
    cfg, in_shapes = call.cfg, call.in_shapes
    impl = get_backend_impl(cfg.backend)
    n, k = cfg.shape
    _, axes = backend_layout(cfg.backend, cfg.meta, cfg.shape)
    n_dim = [("nt", n // impl.n_tile), ("nx", impl.n_tile)]
    x_dim = [("kt", k // impl.k_tile), ("kx", impl.k_tile)]
    if axes is None:  # not shardable: every weight dim is its own factor, replicated
        axes = {name: (None,) * len(s) for name, s in zip(cfg.keys, in_shapes[1:])}
    leaves, inner = _leaf_dims(cfg, axes, in_shapes[1:1 + len(cfg.keys)], "nt", "kt")
    operands = [(True, [x_dim]), *leaves] + ([(False, [n_dim])] if cfg.has_bias else [])
    return sdy_rule(operands, [(True, [n_dim])], reduction=("kt",), replicate=("nx", "kx", *inner))


def _merge_axes(what, found, kind, axes, name):
    if axes and found and axes != found:
        raise ValueError(
            f"linear: the weight arrays are sharded inconsistently along {kind.upper()}: {what} over "
            f"{found}, array {name!r} over {axes}. Shard every array of the MxWeight with "
            f"weight_shardings(weight, mesh, n_axis=..., k_axis=...)")
    return found or axes


def linear_partition(call: LinearCall, mesh, arg_shapes, result_shape):
    cfg = call.cfg
    replicated = all_replicated(mesh, functools.partial(linear_body, cfg, ()), arg_shapes, result_shape)
    if replicated:
        return replicated
    impl, axes = backend_layout(cfg.backend, cfg.meta, cfg.shape)
    n, k = cfg.shape
    x, leaves = arg_shapes[0], arg_shapes[1:1 + len(cfg.keys)]
    x_axes = dim_axes(x.sharding, len(x.shape), "linear input x")
    n_axes, k_axes, first = (), (), {N_AXIS: None, K_AXIS: None}
    for name, leaf in zip(cfg.keys, leaves):
        leaf_axes = dim_axes(leaf.sharding, len(leaf.shape), f"weight array {name!r}")
        for d, got in enumerate(leaf_axes):
            kind = None if axes is None else axes[name][d]
            if got and kind not in (N_AXIS, K_AXIS):
                raise ValueError(
                    f"linear: weight array {name!r} (backend {cfg.backend.value}) is sharded over "
                    f"{got} along dim {d}, which the backend cannot split"
                    + (" (it declares no array_axes)" if axes is None else
                       f" (array_axes says {axes[name]})") +
                    "; gathering it would defeat sharding, so this is an error. Replicate that dim, "
                    "or shard with weight_shardings()")
            if kind == N_AXIS:
                n_axes = _merge_axes(first[N_AXIS], n_axes, kind, got, name)
                first[N_AXIS] = first[N_AXIS] or (f"array {name!r}" if got else None)
            elif kind == K_AXIS:
                k_axes = _merge_axes(first[K_AXIS], k_axes, kind, got, name)
                first[K_AXIS] = first[K_AXIS] or (f"array {name!r}" if got else None)
    if not k_axes and axes is not None:
        k_axes = tuple(a for a in x_axes[-1] if a not in n_axes)  # weights replicated on K: slice them
    _check_tiles("N (out_features)", n, impl.n_tile, n_axes, mesh, cfg)
    _check_tiles("K (in_features)", k, impl.k_tile, k_axes, mesh, cfg)
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
    return mesh, fn, result, tuple(arg_shardings)


def _check_tiles(what, size, tile, axes, mesh, cfg):
    p = axes_size(mesh, axes)
    if p > 1 and (size % tile or (size // tile) % p):
        raise ValueError(
            f"linear: {what}={size} is sharded over mesh axes {tuple(axes)} ({p} shards), but backend "
            f"{cfg.backend.value} needs every shard to be a whole number of its {tile}-element tiles "
            f"({size}/{tile} tiles are not divisible by {p}). Use fewer shards, pad the weight, or "
            f"shard the other weight axis")


def linear_body(cfg: LinearConfig, k_axes, x, *rest):
    """The per-device linear: [..., K] x (N, K) weight -> [..., N]; psum over `k_axes` if any."""
    from jax_mxfp8.backends import get_backend_impl
    from jax_mxfp8.weight import MxWeight
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
    call = LinearCall(cfg, tuple(tuple(a.shape) for a in ctx.avals_in))
    return mlir.lower_fun(lambda *a: _linear_cp(call, *a), multiple_results=False)(
        without_explicit_shardings(ctx), *args)


def _linear_batcher(args, dims, *, cfg):
    x, rest = args[0], args[1:]
    if not any(_mapped(d) for d in dims[1:]):
        return linear_p.bind(jnp.moveaxis(x, dims[0], 0), *rest, cfg=cfg), 0
    # A batched weight (or bias): vmap the per-device body; no custom partitioning for it.
    size = next(a.shape[d] for a, d in zip(args, dims) if _mapped(d))
    args = [_move_to_front(a, d, size) for a, d in zip(args, dims)]
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


def linear(x, weight, bias, out_dtype, quantize_activations: bool):
    """Binds the partitioned linear (called by jax_mxfp8.linear after validation)."""
    keys = tuple(sorted(weight.arrays))
    shape = local_weight_shape(weight)  # inside shard_map: the shard's
    cfg = LinearConfig(keys, shape, weight.backend, shard_meta(weight.backend, weight.meta, weight.shape, shape),
                       jnp.dtype(out_dtype), bool(quantize_activations), bias is not None)
    args = [x, *(weight.arrays[k] for k in keys)] + ([bias] if bias is not None else [])
    return linear_p.bind(*args, cfg=cfg)


# ---- placing weights -------------------------------------------------------------------------

def weight_shardings(weight, mesh, *, n_axis=None, k_axis=None):
    """An MxWeight-shaped pytree of NamedShardings: N split over `n_axis` (column-parallel),
    K over `k_axis` (row-parallel); usable with jax.device_put and jit's in_shardings."""
    from jax_mxfp8.weight import MxWeight
    impl, axes = backend_layout(weight.backend, weight.meta, weight.shape)
    n_axes, k_axes = _as_axes(n_axis), _as_axes(k_axis)
    if axes is None and (n_axes or k_axes):
        raise ValueError(f"backend {weight.backend.value} declares no BackendImpl.array_axes, so its "
                         f"prepared weights cannot be sharded; replicate them or use another backend")
    cfg = LinearConfig(tuple(sorted(weight.arrays)), weight.shape, weight.backend, weight.meta,
                       jnp.dtype(jnp.float32), False, False)
    _check_tiles("N (out_features)", weight.shape[0], impl.n_tile, n_axes, mesh, cfg)
    _check_tiles("K (in_features)", weight.shape[1], impl.k_tile, k_axes, mesh, cfg)
    shardings = {}
    for name, a in weight.arrays.items():
        kinds = axes[name] if axes is not None else (None,) * len(a.shape)
        shardings[name] = named(mesh, [n_axes if t == N_AXIS else k_axes if t == K_AXIS else ()
                                       for t in kinds])
    return MxWeight(shardings, weight.shape, weight.backend, weight.meta)


def shard_weight(weight, mesh, *, n_axis=None, k_axis=None):
    """device_put of a (global) prepared MxWeight split along N and/or K."""
    return jax.device_put(weight, weight_shardings(weight, mesh, n_axis=n_axis, k_axis=k_axis))


def prepare_weight_sharded(values, scales, mesh, *, n_axis=None, k_axis=None, backend=None):
    """prepare_weight run per shard: each device repacks only its [N/pn, K/pk] piece (inside
    shard_map), and the result is the same global MxWeight as shard_weight(prepare_weight(...))."""
    from jax_mxfp8.backends import Backend, ensure_available, get_backend_impl, select_backend
    from jax_mxfp8.linear import prepare_weight
    from jax_mxfp8.weight import MxWeight
    backend = select_backend(mesh.devices.flat[0]) if backend is None else ensure_available(
        Backend.parse(backend), mesh.devices.flat[0])
    shape = tuple(values.shape)
    n_axes, k_axes = _as_axes(n_axis), _as_axes(k_axis)
    template = jax.eval_shape(lambda v, s: prepare_weight(v, s, backend=backend), values, scales)
    out_shardings = weight_shardings(template, mesh, n_axis=n_axis, k_axis=k_axis)
    spec = PartitionSpec(_entry(n_axes), _entry(k_axes))
    impl = get_backend_impl(backend)
    metas = []
    _, axes = backend_layout(backend, template.meta, shape)
    split = tuple(dict.fromkeys(n_axes + k_axes))

    def local(v, s):
        arrays, meta = impl.prepare(v, s)
        metas.append((meta, tuple(v.shape)))
        for name, kinds in (axes or {}).items():  # arrays every shard gets whole: max over shards
            if split and not any(t in (N_AXIS, K_AXIS) for t in kinds):
                arrays[name] = lax.pmax(arrays[name], split)
        return arrays

    in_sharding = NamedSharding(mesh, spec)
    run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec),
                                out_specs={k: s.spec for k, s in out_shardings.arrays.items()}),
                  out_shardings=out_shardings.arrays)
    arrays = run(jax.device_put(values, in_sharding), jax.device_put(scales, in_sharding))
    if metas:
        meta, local_shape = metas[-1]
        expected = shard_meta(backend, template.meta, shape, local_shape)
        if meta != expected:
            raise ValueError(f"backend {backend.value}: prepare() of a {local_shape} shard gave meta "
                             f"{meta!r}, but BackendImpl.shard_meta of the whole weight's meta says "
                             f"{expected!r}; fix shard_meta")
    return MxWeight(arrays, shape, backend, template.meta)


def _as_axes(axis) -> tuple[str, ...]:
    return () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)


def _entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
