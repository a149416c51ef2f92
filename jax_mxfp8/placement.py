"""Placing prepared weights on a mesh: N split over one set of mesh axes (column-parallel),
K over another (row-parallel), the experts of a stacked weight over a third (expert-parallel),
whole backend tiles and whole experts per shard (checked up front, with the fix)."""
from __future__ import annotations

import jax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jax_mxfp8.backends import Backend, get_backend_impl, select_backend
from jax_mxfp8.backends.base import E_AXIS, K_AXIS, N_AXIS
from jax_mxfp8.partitioning import as_axes, named, spec_entry
from jax_mxfp8.weight import (
    MxWeight, backend_layout, check_expert_shards, check_shard_tiles, prepare_stacked,
    prepare_weight, shard_meta)


def _expert_axes(weight_shape, expert_axis) -> tuple[str, ...]:
    axes = as_axes(expert_axis)
    if axes and len(weight_shape) != 3:
        raise ValueError(f"expert_axis={expert_axis!r} splits the experts of a stacked (E, N, K) "
                         f"weight; this weight has shape {tuple(weight_shape)}. Leave it None")
    return axes


def weight_shardings(weight, mesh, *, n_axis=None, k_axis=None, expert_axis=None):
    """An MxWeight-shaped pytree of NamedShardings: N split over `n_axis` (column-parallel),
    K over `k_axis` (row-parallel), the experts of a stacked weight over `expert_axis`
    (expert-parallel); usable with jax.device_put and jit's in_shardings."""
    impl, axes = backend_layout(weight.backend, weight.meta, weight.shape)
    n_axes, k_axes = as_axes(n_axis), as_axes(k_axis)
    e_axes = _expert_axes(weight.shape, expert_axis)
    if axes is None and (n_axes or k_axes or e_axes):
        raise ValueError(f"backend {weight.backend.value} declares no BackendImpl.array_axes, so its "
                         f"prepared weights cannot be sharded; replicate them or use another backend")
    if e_axes:
        check_expert_shards(weight.num_experts, e_axes, mesh, "weight_shardings")
    n, k = weight.expert_shape
    check_shard_tiles("N (out_features)", n, impl.n_tile, n_axes, mesh, weight.backend)
    check_shard_tiles("K (in_features)", k, impl.k_tile, k_axes, mesh, weight.backend)
    by_kind = {E_AXIS: e_axes, N_AXIS: n_axes, K_AXIS: k_axes}
    shardings = {}
    for name, a in weight.arrays.items():
        kinds = axes[name] if axes is not None else (None,) * len(a.shape)
        shardings[name] = named(mesh, [by_kind.get(t, ()) for t in kinds])
    return MxWeight(shardings, weight.shape, weight.backend, weight.meta)


def shard_weight(weight, mesh, *, n_axis=None, k_axis=None, expert_axis=None):
    """device_put of a (global) prepared MxWeight split along N, K and/or its experts."""
    return jax.device_put(weight, weight_shardings(weight, mesh, n_axis=n_axis, k_axis=k_axis,
                                                   expert_axis=expert_axis))


def prepare_weight_sharded(values, scales, mesh, *, n_axis=None, k_axis=None, expert_axis=None,
                           backend=None):
    """prepare_weight run per shard: each device repacks only its [N/pn, K/pk] piece (of its
    E/pe experts for stacked [E, N, K] values; inside shard_map), and the result is the same
    global MxWeight as shard_weight(prepare_weight(...)). backend: as in prepare_weight (None:
    the fastest the mesh's devices run)."""
    backend = select_backend(mesh.devices.flat[0]) if backend is None else Backend.parse(backend)
    shape = tuple(values.shape)
    n_axes, k_axes = as_axes(n_axis), as_axes(k_axis)
    e_axes = _expert_axes(shape, expert_axis)
    template = jax.eval_shape(lambda v, s: prepare_weight(v, s, backend=backend), values, scales)
    out_shardings = weight_shardings(template, mesh, n_axis=n_axis, k_axis=k_axis,
                                     expert_axis=expert_axis)
    spec = PartitionSpec(*([spec_entry(e_axes)] if len(shape) == 3 else []),
                         spec_entry(n_axes), spec_entry(k_axes))
    impl = get_backend_impl(backend)
    metas = []
    _, axes = backend_layout(backend, template.meta, shape)
    split = tuple(dict.fromkeys(n_axes + k_axes))  # experts are never combined: not their axes

    def local(v, s):
        arrays, meta = impl.prepare(v, s) if v.ndim == 2 else prepare_stacked(impl, v, s)
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
