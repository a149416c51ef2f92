"""MxWeight: a backend-prepared MXFP8 weight, and how its arrays lay out the (N, K) weight.

MxWeight is a pytree: arrays are the leaves (so it passes through jit, vmap, shard_map and
checkpointing); the logical shape (N, K), the backend and the backend's static layout metadata
are the treedef's static data. A backend declares, per prepared array, which dims are
tile-major over N or K (`BackendImpl.array_axes`), so a contiguous 1/p chunk of such a dim is
the prepared array of the sub-weight: that is what sharding and shard_map rely on.

Stacked experts: an MxWeight of shape (E, N, K) holds E expert weights of shape (N, K), each
prepared with the backend's 2-D layout, stacked on a leading expert axis of every array (dim
"e" of the layout, E_AXIS); its meta is the meta of one expert. ragged_linear computes with it;
vmap over its arrays' expert axis sees per-expert arrays (the treedef still says (E, N, K)).
"""
from __future__ import annotations

import functools
import json
from typing import Any, Hashable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_mxfp8 import _checks
from jax_mxfp8.backends import Backend, get_backend_impl, select_backend
from jax_mxfp8.backends.base import E_AXIS, K_AXIS, N_AXIS
from jax_mxfp8.ops.quantize import quantize
from jax_mxfp8.partitioning import axes_size
from jax_mxfp8.reference import BLOCK_SIZE


@jax.tree_util.register_pytree_with_keys_class
class MxWeight:
    __slots__ = ("arrays", "shape", "backend", "meta")

    def __init__(self, arrays: Mapping[str, Any], shape: tuple[int, ...], backend: Backend,
                 meta: Hashable = None):
        self.arrays = dict(arrays)
        shape = tuple(int(d) for d in shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"an MxWeight has shape (N, K) or, for stacked experts, (E, N, K); "
                             f"got {shape}")
        self.shape = shape
        self.backend = Backend.parse(backend)
        self.meta = meta

    @property
    def num_experts(self) -> int | None:  # E of a stacked weight, None for a dense one
        return self.shape[0] if len(self.shape) == 3 else None

    @property
    def expert_shape(self) -> tuple[int, int]:  # (N, K) of one expert (of the weight, if dense)
        return self.shape[-2:]

    @property
    def out_features(self) -> int:  # N
        return self.shape[-2]

    @property
    def in_features(self) -> int:  # K
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in self.arrays.values())

    def unpack(self):
        """The canonical (values [N, K] e4m3, scales [N, K/32] uint8) of this weight; of a
        stacked one, ([E, N, K], [E, N, K/32])."""
        impl = get_backend_impl(self.backend)
        if self.num_experts is None:
            return impl.unprepare(self.arrays, self.meta, self.shape)
        return jax.vmap(lambda a: impl.unprepare(a, self.meta, self.expert_shape))(self.arrays)

    def to_backend(self, backend) -> "MxWeight":
        """The same weight prepared for another backend (exact: unpack, then prepare)."""
        return prepare_weight(*self.unpack(), backend=backend)

    def tree_flatten_with_keys(self):
        keys = tuple(sorted(self.arrays))
        children = [(jax.tree_util.DictKey(k), self.arrays[k]) for k in keys]
        return children, (keys, self.shape, self.backend, self.meta)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, shape, backend, meta = aux
        return cls(dict(zip(keys, children)), shape, backend, meta)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={getattr(v, 'dtype', '?')}{list(getattr(v, 'shape', ()))}"
                          for k, v in sorted(self.arrays.items()))
        return f"MxWeight(shape={self.shape}, backend={self.backend.value}, {parts})"


def encode_meta(meta):
    """A backend's layout meta (None, or nested tuples of str / int) as JSON-ready data."""
    return {"tuple": [encode_meta(m) for m in meta]} if isinstance(meta, tuple) else meta


def decode_meta(data):
    if isinstance(data, dict):
        return tuple(decode_meta(m) for m in data["tuple"])
    return data


# Format 2 is a stacked (E, N, K) weight: readers of format 1 only take (N, K) shapes, so they
# refuse it instead of misreading it; dense weights keep writing format 1.
AUX_FORMATS = (1, 2)


def _serialize_aux(aux) -> bytes:
    keys, shape, backend, meta = aux
    return json.dumps({"format": 1 if len(shape) == 2 else 2, "keys": list(keys),
                       "shape": list(shape), "backend": backend.value,
                       "meta": encode_meta(meta)}).encode()


def _deserialize_aux(data: bytes):
    aux = json.loads(data.decode())
    if aux.get("format") not in AUX_FORMATS:
        raise ValueError(f"an exported MxWeight of format {aux.get('format')!r}; this jax_mxfp8 "
                         f"reads formats {', '.join(map(str, AUX_FORMATS))}: re-export with this "
                         f"version")
    return (tuple(aux["keys"]), tuple(aux["shape"]), Backend.parse(aux["backend"]),
            decode_meta(aux["meta"]))


# jax.export serializes the treedefs of its arguments: an exported function may take MxWeights.
jax.export.register_pytree_node_serialization(
    MxWeight, serialized_name="jax_mxfp8.MxWeight", serialize_auxdata=_serialize_aux,
    deserialize_auxdata=_deserialize_aux)


def prepare_weight(values, scales, *, backend: Backend | str | None = None) -> MxWeight:
    """Repacks an MXFP8 weight ([N, K] float8_e4m3fn values, [N, K/32] uint8 or e8m0
    scales: the checkpoint layout) once, for `backend` (default: select_backend(), the fastest
    the default device runs). An explicit backend prepares on any host, e.g. MARLIN weights on
    a CPU machine for a GPU fleet (a layout transform); where the weight runs, linear checks
    that the device can run its backend.

    Stacked experts ([E, N, K] values, [E, N, K/32] scales) give one MxWeight of shape
    (E, N, K): each expert prepared with the backend's 2-D layout, stacked on a leading axis
    (for ragged_linear, or vmap(linear) over the experts)."""
    values = jnp.asarray(values)
    _checks.check_dtype("weight values", values.dtype, (jnp.float8_e4m3fn,),
                        "Quantize the weight first (quantize() or quantize_weight()).")
    if values.ndim not in (2, 3):
        raise ValueError(f"weight values must be 2-D [N, K] (out_features, in_features) or 3-D "
                         f"[E, N, K] (stacked experts); got shape {values.shape}")
    if values.ndim == 3 and values.shape[0] == 0:
        raise ValueError(f"stacked weight values {values.shape} hold no experts; E must be >= 1")
    _checks.check_last_axis_blocks("weight values", values.shape)
    scales = _checks.scales_to_uint8(scales)
    _checks.check_scales_match(values.shape, scales.shape, "weight scales")
    backend = select_backend() if backend is None else Backend.parse(backend)
    impl = get_backend_impl(backend)
    if values.ndim == 2:
        arrays, meta = impl.prepare(values, scales)
    else:
        arrays, meta = prepare_stacked(impl, values, scales)
    return MxWeight(arrays, values.shape, backend, meta)


def prepare_stacked(impl, values, scales):
    """impl.prepare of every expert of [E, N, K] values, stacked: (arrays [E, ...], the meta
    of one expert, which all share)."""
    metas = []

    def one(v, s):
        arrays, meta = impl.prepare(v, s)
        metas.append(meta)
        return arrays

    arrays = jax.vmap(one)(values, scales)
    return arrays, metas[0]


def quantize_weight(w, *, rounding: str = "ceil", backend: Backend | str | None = None) -> MxWeight:
    """Quantizes a high-precision [N, K] (or stacked [E, N, K]) weight and prepares it for
    `backend`."""
    values, scales = quantize(jnp.asarray(w), rounding=rounding)
    return prepare_weight(values, scales, backend=backend)


# ---- the layout of prepared arrays -----------------------------------------------------------

def backend_layout(backend, meta, shape):
    """(impl, {array name: per-dim axis tuple}) of a backend, validated. A stacked (E, N, K)
    shape gives every array a leading E_AXIS dim."""
    impl = get_backend_impl(backend)
    if impl.array_axes is None:
        return impl, None
    lead = (E_AXIS,) * (len(shape) - 2)
    return impl, {k: lead + tuple(v) for k, v in impl.array_axes(meta, tuple(shape[-2:])).items()}


def shard_meta(backend, meta, global_shape, local_shape):
    """The meta of a (local_shape) shard of a prepared (global_shape) weight (of one expert's
    (N, K) for stacked shapes: expert shards keep the meta)."""
    impl = get_backend_impl(backend)
    local, whole = tuple(local_shape[-2:]), tuple(global_shape[-2:])
    if local == whole or impl.shard_meta is None:
        return meta
    return impl.shard_meta(meta, local)


@functools.lru_cache(maxsize=256)
def prepared_shapes(backend, n: int, k: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays prepare() makes for a global [N, K] weight (one expert of a stacked
    weight: its arrays have these shapes behind the expert axis)."""
    impl = get_backend_impl(backend)
    out = jax.eval_shape(lambda v, s: impl.prepare(v, s)[0],
                         jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn),
                         jax.ShapeDtypeStruct((n, k // BLOCK_SIZE), np.uint8))
    return {name: tuple(a.shape) for name, a in out.items()}


def _expert_axis(weight, actual, expected) -> tuple[int | None, dict]:
    """(experts the arrays hold, or None where they have no expert axis; per-expert shapes)."""
    extra = {len(actual[name]) - len(expected[name]) for name in actual}
    if extra == {0}:
        return None, actual
    if extra == {1} and weight.num_experts is not None:
        sizes = {shape[0] for shape in actual.values()}
        if len(sizes) == 1:
            return sizes.pop(), {name: shape[1:] for name, shape in actual.items()}
    if extra == {1}:
        raise ValueError(
            f"MxWeight arrays {actual} have one more leading axis than the {weight.backend.value} "
            f"layout of a {weight.shape} weight, {expected}: a weight stacked by vmap(prepare_weight). "
            f"Prepare stacked experts with prepare_weight(values [E, N, K], scales [E, N, K/32]) "
            f"(an (E, N, K) MxWeight for ragged_linear), or use it only under vmap")
    raise ValueError(f"MxWeight arrays {actual} do not match the {weight.backend.value} layout of "
                     f"a {weight.shape} weight: per expert {expected}" +
                     (", stacked on a leading expert axis" if weight.num_experts else ""))


def local_shape(weight) -> tuple[int, ...]:
    """The shape of the weight (shard) that `weight`'s arrays hold: (N, K), or (E, N, K) where
    they carry the expert axis.

    Equal to weight.shape under jit (arrays are global). Inside shard_map the treedef still
    says the global shape while the arrays are shards; the backend's array_axes say which dims
    were split, so the shard's (E/pe, N/pn, K/pk) follows from the array shapes. Under vmap over
    the expert axis of a stacked weight the arrays are one expert's: (N, K).
    """
    n, k = weight.expert_shape
    expected = prepared_shapes(weight.backend, n, k)
    actual = {name: tuple(a.shape) for name, a in weight.arrays.items()}
    if set(actual) != set(expected):
        raise ValueError(f"MxWeight arrays {sorted(actual)} are not the arrays of the "
                         f"{weight.backend.value} layout, {sorted(expected)}")
    experts, actual = _expert_axis(weight, actual, expected)
    lead = () if experts is None else (experts,)
    if experts is not None and (experts == 0 or weight.num_experts % experts):
        raise ValueError(f"MxWeight arrays hold {experts} experts, not a whole shard of the "
                         f"{weight.num_experts} of a {weight.shape} weight")
    if actual == expected:
        return (*lead, n, k)
    _, axes = backend_layout(weight.backend, weight.meta, weight.expert_shape)
    if axes is None:
        raise ValueError(f"MxWeight arrays {actual} do not match the {weight.backend.value} layout "
                         f"of a ({n}, {k}) weight, {expected}; backend {weight.backend.value} declares "
                         f"no array_axes, so its weights cannot be used sharded (inside shard_map)")
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
    return (*lead, n // pn, k // pk)


def local_weight_shape(weight) -> tuple[int, int]:
    """(N, K) of the weight shard (of one expert's, for stacked weights) that `weight`'s arrays
    hold; see local_shape."""
    return local_shape(weight)[-2:]


def check_shard_tiles(what, size, tile, axes, mesh, backend, op="linear"):
    p = axes_size(mesh, axes)
    if p > 1 and (size % tile or (size // tile) % p):
        raise ValueError(
            f"{op}: {what}={size} is sharded over mesh axes {tuple(axes)} ({p} shards), but backend "
            f"{backend.value} needs every shard to be a whole number of its {tile}-element tiles "
            f"({size}/{tile} tiles are not divisible by {p}). Use fewer shards, pad the weight, or "
            f"shard the other weight axis")


def check_expert_shards(num_experts, axes, mesh, op):
    p = axes_size(mesh, axes)
    if num_experts % p:
        raise ValueError(
            f"{op}: the {num_experts} experts of the weight are sharded over mesh axes {tuple(axes)} "
            f"({p} shards), which does not divide them: every shard must hold whole experts. Use a "
            f"mesh axis whose size divides E, or replicate the expert axis")
