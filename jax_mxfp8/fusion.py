"""Fused projections: several MXFP8 weights that read the same input as one weight, one GEMM.

Weights [N_1, K], ..., [N_p, K] stacked along N are one [N_1 + ... + N_p, K] weight, exactly:
MXFP8 blocks run along K within a row, so the stacked values and scales are the pieces' own,
bit for bit (q/k/v, gate/up). `fuse_weights` stacks them (unpack, concatenate, prepare_weight)
into a `FusedWeight`; `linear_split(x, fused)` runs one `linear` and splits its output into the
pieces' outputs. Every output column is a dot of x with the same weight row as alone; the sum
over K may be grouped differently for the wider N (XLA's CPU dot blocks float32 by shape, a GPU
plan picks K splits by shape), so fused and separate outputs agree to float32 accumulation
order: bit-identical where the kernel's reduction order does not depend on N (EMULATION with
bf16 activations on CPU), else within the float32 summation bound before the output cast.

Sharding. A FusedWeight's rows are columns of the fused output. With shards=1 they are
[piece 1; piece 2; ...]: a column-parallel fused weight gives each device rows of whichever
pieces fall into its 1/p, so under jit the split is by global columns (correct, XLA moves the
outputs between devices), and inside shard_map a device's columns are not whole pieces (an
error). fuse_weights(..., shards=p) lays the rows out shard-major instead (device d's 1/p holds
the d-th 1/p of every piece, in order): column-parallel over p devices, the GEMM and the split
need no communication, and inside shard_map each device splits its own columns.
"""
from __future__ import annotations

import json
from typing import Sequence

import jax
import jax.numpy as jnp

from jax_mxfp8.backends import Backend
from jax_mxfp8.ops.linear import linear
from jax_mxfp8.weight import MxWeight, prepare_weight


@jax.tree_util.register_pytree_with_keys_class
class FusedWeight:
    """One MxWeight [sum(sizes), K] holding the rows of several [size_i, K] weights.

    A pytree whose leaves are the MxWeight's arrays and whose static data are `sizes` (rows of
    each piece) and `shards` (the row layout: pieces one after another when 1, shard-major for
    a column-parallel split over `shards` devices; see the module docstring).
    """
    __slots__ = ("weight", "sizes", "shards")

    def __init__(self, weight: MxWeight, sizes: Sequence[int], shards: int = 1):
        if not isinstance(weight, MxWeight):
            raise TypeError(f"FusedWeight holds an MxWeight; got {type(weight).__name__}")
        self.weight, self.sizes, self.shards = weight, tuple(int(s) for s in sizes), int(shards)
        if sum(self.sizes) != weight.shape[0]:
            raise ValueError(f"FusedWeight: piece sizes {self.sizes} add up to {sum(self.sizes)} "
                             f"rows, but the weight has N={weight.shape[0]}")
        _check_shards(self.sizes, self.shards)

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @property
    def backend(self) -> Backend:
        return self.weight.backend

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def unfuse(self) -> tuple[MxWeight, ...]:
        """The pieces as separate MxWeights of the same backend (exact: unpack, take rows)."""
        values, scales = self.weight.unpack()
        return tuple(prepare_weight(v, s, backend=self.backend) for v, s in
                     zip(_split_rows(values, self.sizes, self.shards),
                         _split_rows(scales, self.sizes, self.shards)))

    def to_backend(self, backend) -> "FusedWeight":
        """The same fused weight prepared for another backend (exact)."""
        return FusedWeight(self.weight.to_backend(backend), self.sizes, self.shards)

    def tree_flatten_with_keys(self):
        return [(jax.tree_util.GetAttrKey("weight"), self.weight)], (self.sizes, self.shards)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)  # no validation: under transforms the leaves are not arrays
        obj.weight, (obj.sizes, obj.shards) = children[0], aux
        return obj

    def __repr__(self) -> str:
        return f"FusedWeight(sizes={self.sizes}, shards={self.shards}, {self.weight!r})"


def _serialize_aux(aux) -> bytes:
    sizes, shards = aux
    return json.dumps({"format": 1, "sizes": list(sizes), "shards": shards}).encode()


def _deserialize_aux(data: bytes):
    aux = json.loads(data.decode())
    if aux.get("format") != 1:
        raise ValueError(f"an exported FusedWeight of format {aux.get('format')!r}; this "
                         f"jax_mxfp8 reads format 1: re-export with this version")
    return tuple(aux["sizes"]), int(aux["shards"])


# jax.export serializes the treedefs of its arguments: an exported function may take FusedWeights.
jax.export.register_pytree_node_serialization(
    FusedWeight, serialized_name="jax_mxfp8.FusedWeight", serialize_auxdata=_serialize_aux,
    deserialize_auxdata=_deserialize_aux)


def _check_shards(sizes, shards) -> None:
    if shards < 1:
        raise ValueError(f"shards must be >= 1 (the number of column-parallel devices); got {shards}")
    uneven = [s for s in sizes if s % shards]
    if uneven:
        raise ValueError(f"shards={shards}: piece sizes {tuple(sizes)} must all be multiples of "
                         f"{shards} so that every device holds the same share of every piece "
                         f"({uneven} are not); use fewer shards")


def _join_rows(arrays, shards):
    """[n_i, ...] pieces -> [sum n_i, ...] rows, shard-major when shards > 1."""
    if shards == 1:
        return jnp.concatenate(arrays, axis=0)
    grouped = [a.reshape(shards, a.shape[0] // shards, *a.shape[1:]) for a in arrays]
    joined = jnp.concatenate(grouped, axis=1)
    return joined.reshape(-1, *joined.shape[2:])


def _split_rows(a, sizes, shards):
    """The inverse of _join_rows."""
    grouped = a.reshape(shards, a.shape[0] // shards, *a.shape[1:])
    offsets = [sum(sizes[:i]) // shards for i in range(1, len(sizes))]
    return [p.reshape(-1, *a.shape[1:]) for p in jnp.split(grouped, offsets, axis=1)]


def fuse_weights(weights: Sequence[MxWeight], *, backend=None, shards: int = 1) -> FusedWeight:
    """One FusedWeight of weights that read the same input (same K), stacked along N in order.

    Exact: the pieces' canonical values and scales are concatenated along N and prepared for
    `backend` (default: the weights' backend; weights of different backends need an explicit
    one). shards: 1, or the number of devices the fused weight will be split over along N
    (column-parallel; every piece's N must be a multiple of it).
    """
    weights = list(weights)
    if not weights:
        raise ValueError("fuse_weights: no weights given; pass the MxWeights that read the same "
                         "input, e.g. [q, k, v]")
    for i, w in enumerate(weights):
        if not isinstance(w, MxWeight):
            raise TypeError(f"fuse_weights: weight {i} is a {type(w).__name__}, not an MxWeight "
                            f"(quantize_weight / prepare_weight)")
    ks = [w.shape[1] for w in weights]
    if len(set(ks)) > 1:
        raise ValueError(f"fuse_weights: the weights have different in_features K {ks} (shapes "
                         f"{[w.shape for w in weights]}); only weights that read the same input "
                         f"can be fused: fuse those with equal K")
    backends = sorted({w.backend.value for w in weights})
    if backend is None:
        if len(backends) > 1:
            raise ValueError(f"fuse_weights: the weights were prepared for different backends "
                             f"{backends}; pass backend=... to prepare the fused weight for one")
        backend = weights[0].backend
    backend = Backend.parse(backend)
    sizes = tuple(w.shape[0] for w in weights)
    _check_shards(sizes, shards)
    canonical = [w.unpack() for w in weights]
    values = _join_rows([v for v, _ in canonical], shards)
    scales = _join_rows([s for _, s in canonical], shards)
    return FusedWeight(prepare_weight(values, scales, backend=backend), sizes, shards)


def fuse_biases(biases: Sequence, fused: FusedWeight):
    """The [N] bias of a fused weight from the pieces' biases, in its row order: None when every
    piece has none; a piece without a bias contributes zeros (the biases' common dtype)."""
    biases = list(biases)
    if len(biases) != len(fused.sizes):
        raise ValueError(f"fuse_biases: {len(biases)} biases for {len(fused.sizes)} pieces "
                         f"{fused.sizes}; give one per piece (None for a piece without a bias)")
    given = [jnp.asarray(b) for b in biases if b is not None]
    if not given:
        return None
    dtype = jnp.result_type(*given)
    pieces = []
    for i, (b, n) in enumerate(zip(biases, fused.sizes)):
        b = jnp.zeros((n,), dtype) if b is None else jnp.asarray(b, dtype)
        if b.shape != (n,):
            raise ValueError(f"fuse_biases: bias {i} has shape {b.shape}; piece {i} has {n} rows, "
                             f"so expected ({n},)")
        pieces.append(b)
    return _join_rows(pieces, fused.shards)


def split_outputs(y, fused: FusedWeight) -> tuple:
    """The pieces' outputs from the fused output y [..., N] (columns in the fused row order);
    inside shard_map, a device's columns of a column-parallel fused weight."""
    total, n_local = sum(fused.sizes), y.shape[-1]
    group = total // fused.shards  # the rows of one shard-major group: every piece's 1/shards
    if n_local % group or (fused.shards * n_local) % total:
        raise ValueError(
            f"linear_split: this device holds {n_local} of the fused weight's {total} output "
            f"columns (pieces {fused.sizes}), which is not a whole number of its shard groups "
            f"({fused.shards} groups of {group} columns): inside shard_map a column-parallel fused "
            f"weight must be made with fuse_weights(..., shards=<devices along N>), so that "
            f"every device holds whole shares of every piece")
    lead, groups = y.shape[:-1], n_local // group
    grouped = y.reshape(*lead, groups, group)
    offsets = [sum(fused.sizes[:i]) // fused.shards for i in range(1, len(fused.sizes))]
    return tuple(p.reshape(*lead, -1) for p in jnp.split(grouped, offsets, axis=-1))


def linear_split(x, fused: FusedWeight, bias=None, *, out_dtype=None, quantize_activations=None):
    """(x @ W_1^T + b_1, x @ W_2^T + b_2, ...) for the pieces of `fused`, by one `linear`.

    bias: None, one per piece (a sequence; None entries for pieces without one), or one [N]
    array in the fused row order (fuse_biases). out_dtype, quantize_activations: as in linear.
    Works under jit, vmap, grad (in x and bias) and shard_map (see the module docstring).
    """
    if not isinstance(fused, FusedWeight):
        raise TypeError(f"linear_split takes a FusedWeight (fuse_weights); got {type(fused).__name__}"
                        + (": call linear for a single MxWeight" if isinstance(fused, MxWeight) else ""))
    if isinstance(bias, (list, tuple)):
        bias = fuse_biases(bias, fused)
    y = linear(x, fused.weight, bias, out_dtype=out_dtype, quantize_activations=quantize_activations)
    return split_outputs(y, fused)
