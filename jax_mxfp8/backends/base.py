"""The backend table: each backend is one `BackendImpl` entry; nothing else branches on backends."""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Optional

N_AXIS, K_AXIS = "n", "k"  # BackendImpl.array_axes' names of dims laid out tile-major over N / K
E_AXIS = "e"  # the leading expert dim of every array of a stacked (E, N, K) weight (weight.py)

class Backend(enum.Enum):
    EMULATION = "emulation"  # jnp on any device (CPU, TPU, any GPU)
    MARLIN = "marlin"        # fused-dequant W8A16 GEMM, SM80+
    CUTLASS = "cutlass"      # native W8A8 block-scaled GEMM, SM100+

    @classmethod
    def parse(cls, value: "Backend | str") -> "Backend":
        if isinstance(value, Backend):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(b.value for b in cls)
            raise ValueError(f"unknown backend {value!r}; use one of: {names}") from None


@dataclasses.dataclass(frozen=True)
class BackendImpl:
    """What a backend provides.

    prepare(values [N,K] e4m3, scales [N,K/32] uint8) -> (arrays: dict[str, Array], meta: hashable)
        repacks a weight once; `meta` is static (goes into the MxWeight treedef).
    unprepare(arrays, meta, shape) -> (values [N,K], scales [N,K/32]): the exact inverse.
    linear(x2d [M,K], weight: MxWeight, bias [N] | None, out_dtype, quantize_activations: bool) -> [M,N]
        out_dtype may be float32 (row-parallel partial products, ops/linear.py) whatever x's dtype.
    dequantize_weight(weight: MxWeight, bf16) -> [N, K] bf16 (optional): the exact dense weight
        by the backend's own kernel, for linear's backward (dx = dy @ W); otherwise, and for
        float32, unprepare + dequantize.
    ragged_linear(x2d [T,K], weight: stacked MxWeight (E,N,K), group_sizes [E] int32, bias [E,N]
        | None, out_dtype) -> [T,N] (optional; without it ragged_linear refuses the backend):
        rows [sum(gs[:e]), sum(gs[:e+1])) use expert e, rows from sum(gs) on are zero (W8A16,
        the numerics of linear; out_dtype may be float32 for partial products). The weight's
        arrays are the prepared 2-D layout of each expert stacked on a leading expert axis.

    Sharding (weight.py, ops/linear.py). array_axes(meta, shape) -> {array name: one entry per dim}: "n" for a
    dim laid out N-tile-major (split into p equal contiguous chunks, chunk i is that array of the
    prepared weight rows [i*N/p, (i+1)*N/p)), "k" likewise over K, None for a dim every shard
    needs whole (an array with no "n"/"k" dim is given whole to every shard; prepared per shard,
    it is combined by elementwise max over shards, e.g. a "needs the slow path" flag). Shards
    are whole n_tile / k_tile element tiles (k_tile a multiple of 32). shard_meta(meta, (n, k))
    -> the meta of an (n, k) shard (None: meta does not depend on the shape). array_axes=None:
    the backend's weights cannot be sharded (a sharded one raises).
    """
    backend: Backend
    min_compute_capability: Optional[tuple[int, int]]  # None: runs on any device
    required_targets: tuple[str, ...]  # CUDA FFI targets that must have been built
    default_quantize_activations: bool
    supports_w8a16: bool
    supports_w8a8: bool
    prepare: Callable[..., Any]
    unprepare: Callable[..., Any]
    linear: Callable[..., Any]
    array_axes: Optional[Callable[..., Any]] = None
    n_tile: int = 1
    k_tile: int = 32
    shard_meta: Optional[Callable[..., Any]] = None
    dequantize_weight: Optional[Callable[..., Any]] = None
    ragged_linear: Optional[Callable[..., Any]] = None


_REGISTRY: dict[Backend, BackendImpl] = {}


def register_backend(impl: BackendImpl) -> None:
    _REGISTRY[impl.backend] = impl


def get_backend_impl(backend: Backend) -> BackendImpl:
    try:
        return _REGISTRY[backend]
    except KeyError:
        raise ValueError(
            f"backend {backend.value!r} is not available in this build of jax_mxfp8") from None


def registered_backends() -> tuple[Backend, ...]:
    return tuple(_REGISTRY)
