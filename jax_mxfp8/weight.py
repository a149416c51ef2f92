"""MxWeight: a backend-prepared MXFP8 weight, registered as a pytree.

Arrays are the leaves (so it passes through jit, vmap, shard_map and
checkpointing); the logical shape (N, K), the backend and the backend's static
layout metadata are the treedef's static data.
"""
from __future__ import annotations

from typing import Any, Hashable, Mapping

import jax

from jax_mxfp8.backends.base import Backend


@jax.tree_util.register_pytree_with_keys_class
class MxWeight:
    __slots__ = ("arrays", "shape", "backend", "meta")

    def __init__(self, arrays: Mapping[str, Any], shape: tuple[int, int], backend: Backend,
                 meta: Hashable = None):
        self.arrays = dict(arrays)
        self.shape = (int(shape[0]), int(shape[1]))
        self.backend = Backend.parse(backend)
        self.meta = meta

    @property
    def out_features(self) -> int:  # N
        return self.shape[0]

    @property
    def in_features(self) -> int:  # K
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in self.arrays.values())

    def unpack(self):
        """The canonical (values [N, K] e4m3, scales [N, K/32] uint8) of this weight."""
        from jax_mxfp8.backends import get_backend_impl
        return get_backend_impl(self.backend).unprepare(self.arrays, self.meta, self.shape)

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
