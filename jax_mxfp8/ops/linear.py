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
(activations only). vmap over a batched weight runs the per-device body under vmap, without
custom partitioning.

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

from jax_mxfp8 import _checks, _ffi, reference
from jax_mxfp8._compat import (
    Primitive, ShapedArray, ad, batching, is_symbolic_zero, mlir, primitive_impl,
    require_devices_during_lowering, symbolic_zero, without_explicit_shardings)
from jax_mxfp8.backends import get_backend_impl, why_unavailable
from jax_mxfp8.backends.base import K_AXIS, N_AXIS
from jax_mxfp8.ops.dequantize import dequantize
from jax_mxfp8.partitioning import (
    all_replicated, axes_size, dim_axes, mapped, move_to_front, named, sdy_rule,
    typed_abstract_eval, without_reused)
from jax_mxfp8.weight import (
    MxWeight, backend_layout, check_shard_tiles, local_weight_shape, shard_meta)


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
    return mesh, fn, result, tuple(arg_shardings)


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


def check_backend_runs_on(backend, platforms) -> None:
    """A weight's backend must run where linear is compiled (prepare_weight makes any backend's
    layout on any host): a clear error with the fix otherwise."""
    impl = get_backend_impl(backend)
    if impl.min_compute_capability is None or _ffi.kernel_references_enabled():
        return
    need = "%d.%d" % impl.min_compute_capability
    fix = (f"Run it on an NVIDIA GPU of compute capability >= {need}, or convert the weight "
           f"exactly with weight.to_backend('emulation')")
    for platform in platforms:
        if platform != "cuda":
            raise ValueError(f"linear: the weight was prepared for {backend.value}, which runs on "
                             f"NVIDIA GPUs, but this function is being compiled for {platform}. "
                             f"{fix}")
    if _ffi.jax_has_cuda_backend():  # compiling for this machine's GPU (export needs none)
        reason = why_unavailable(backend, jax.devices("cuda")[0])
        if reason is not None:
            raise ValueError(f"linear: the weight was prepared for {backend.value}: {reason}")


def _linear_lowering(ctx, *args, cfg):
    check_backend_runs_on(cfg.backend, ctx.module_context.platforms)
    call = LinearCall(cfg, tuple(tuple(a.shape) for a in ctx.avals_in))
    return mlir.lower_fun(lambda *a: _linear_cp(call, *a), multiple_results=False)(
        without_explicit_shardings(ctx), *args)


def _linear_batcher(args, dims, *, cfg):
    x, rest = args[0], args[1:]
    if not any(mapped(d) for d in dims[1:]):
        return linear_p.bind(jnp.moveaxis(x, dims[0], 0), *rest, cfg=cfg), 0
    # A batched weight (or bias): vmap the per-device body; no custom partitioning for it.
    size = next(a.shape[d] for a, d in zip(args, dims) if mapped(d))
    args = [move_to_front(a, d, size) for a, d in zip(args, dims)]
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


WEIGHT_GRADIENT_ERROR = (
    "linear: the MXFP8 weight is frozen: its e4m3 values and e8m0 scales have no gradient. "
    "Differentiate with respect to x, the bias or parameters of your own (e.g. LoRA adapters "
    "beside the MXFP8 linear: nnx.grad(..., wrt=nnx.LoRAParam)); for quantization-aware "
    "training keep a high-precision weight and use jax_mxfp8.fake_quantize on it")


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


def dense_weight(weight: MxWeight, dtype):
    """The exact [N, K] weight in `dtype` (bf16 / fp32), through the backend's own kernel
    where it has one."""
    impl = get_backend_impl(weight.backend)
    if impl.dequantize_weight is not None and jnp.dtype(dtype) == jnp.bfloat16:
        return impl.dequantize_weight(weight, jnp.dtype(dtype))
    return dequantize(*impl.unprepare(weight.arrays, weight.meta, weight.shape), dtype=dtype)


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
    shape = local_weight_shape(weight)  # inside shard_map: the shard's
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
    n, k = local_weight_shape(weight)  # a shard's (N, K) inside shard_map
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
