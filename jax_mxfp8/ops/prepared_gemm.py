"""What linear and ragged_linear share about GEMMs against prepared weights: whether the
weight's backend runs where the call is compiled, the Shardy factors of prepared arrays, the
mesh axes their shardings split E / N / K over, the exact dense weight of the backward, and the
frozen-weight error."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_mxfp8 import _ffi
from jax_mxfp8.backends import get_backend_impl, why_unavailable
from jax_mxfp8.backends.base import E_AXIS, K_AXIS, N_AXIS
from jax_mxfp8.ops.dequantize import dequantize
from jax_mxfp8.partitioning import dim_axes
from jax_mxfp8.weight import MxWeight, backend_layout


def check_backend_runs_on(backend, platforms, op: str = "linear") -> None:
    """A weight's backend must run where `op` is compiled (prepare_weight makes any backend's
    layout on any host): a clear error with the fix otherwise."""
    impl = get_backend_impl(backend)
    if impl.min_compute_capability is None or _ffi.kernel_references_enabled():
        return
    need = "%d.%d" % impl.min_compute_capability
    fix = (f"Run it on an NVIDIA GPU of compute capability >= {need}, or convert the weight "
           f"exactly with weight.to_backend('emulation')")
    for platform in platforms:
        if platform != "cuda":
            raise ValueError(f"{op}: the weight was prepared for {backend.value}, which runs on "
                             f"NVIDIA GPUs, but this function is being compiled for {platform}. "
                             f"{fix}")
    if _ffi.jax_has_cuda_backend():  # compiling for this machine's GPU (export needs none)
        reason = why_unavailable(backend, jax.devices("cuda")[0])
        if reason is not None:
            raise ValueError(f"{op}: the weight was prepared for {backend.value}: {reason}")


def leaf_factors(backend, meta, shape, keys, axes, shapes, n_factor, k_factor, e_factor="e"):
    """Factor lists of each prepared array of a `shape` ((N, K) or (E, N, K)) weight: tile-major
    dims get the n_factor / k_factor tile count, the expert dim e_factor; (operands, the
    per-array inner factors)."""
    n, k = shape[-2:]
    impl, _ = backend_layout(backend, meta, shape)
    tiles = {N_AXIS: (n_factor, n // impl.n_tile), K_AXIS: (k_factor, k // impl.k_tile)}
    out, inner = [], []
    for name, arr_shape in zip(keys, shapes):
        dims = []
        for d, size in enumerate(arr_shape):
            kind = axes[name][d]
            factor = f"{name}_{d}"
            if kind == E_AXIS:
                dims.append([(e_factor, size)])
                continue
            if kind in tiles:
                major, count = tiles[kind]
                if size % count:
                    raise ValueError(f"backend {backend.value}: array {name!r} dim {d} (size {size}) is "
                                     f"declared {kind}-tile-major but is not a multiple of the {count} "
                                     f"{kind.upper()} tiles; fix BackendImpl.array_axes / n_tile / k_tile")
                dims.append([(major, count), (factor, size // count)])
            else:
                dims.append([(factor, size)])
            inner.append(factor)
        out.append((False, dims))
    return out, inner


def _merge_axes(op, what, found, kind, axes, name):
    if axes and found and axes != found:
        raise ValueError(
            f"{op}: the weight arrays are sharded inconsistently along {kind.upper()}: {what} over "
            f"{found}, array {name!r} over {axes}. Shard every array of the MxWeight with "
            f"weight_shardings(weight, mesh, ...)")
    return found or axes


def weight_mesh_axes(op, backend, keys, leaves, axes):
    """(expert axes, N axes, K axes): the mesh axes the prepared arrays (partition-callback
    shapes) are split over, the same for every array; a split of a dim the backend cannot split
    is an error (gathering it would defeat sharding)."""
    found = {E_AXIS: (), N_AXIS: (), K_AXIS: ()}
    first = dict.fromkeys(found)
    for name, leaf in zip(keys, leaves):
        leaf_axes = dim_axes(leaf.sharding, len(leaf.shape), f"weight array {name!r}")
        for d, got in enumerate(leaf_axes):
            kind = None if axes is None else axes[name][d]
            if got and kind not in found:
                raise ValueError(
                    f"{op}: weight array {name!r} (backend {backend.value}) is sharded over "
                    f"{got} along dim {d}, which the backend cannot split"
                    + (" (it declares no array_axes)" if axes is None else
                       f" (array_axes says {axes[name]})") +
                    "; gathering it would defeat sharding, so this is an error. Replicate that dim, "
                    "or shard with weight_shardings()")
            if kind in found:
                found[kind] = _merge_axes(op, first[kind], found[kind], kind, got, name)
                first[kind] = first[kind] or (f"array {name!r}" if got else None)
    return found[E_AXIS], found[N_AXIS], found[K_AXIS]


def dense_weight(weight: MxWeight, dtype):
    """The exact [N, K] weight in `dtype` (bf16 / fp32), through the backend's own kernel
    where it has one; [E, N, K] for a stacked weight (expert by expert)."""
    impl = get_backend_impl(weight.backend)
    if weight.num_experts is not None:
        return jax.vmap(lambda a: dense_weight(
            MxWeight(a, weight.expert_shape, weight.backend, weight.meta), dtype))(weight.arrays)
    if impl.dequantize_weight is not None and jnp.dtype(dtype) == jnp.bfloat16:
        return impl.dequantize_weight(weight, jnp.dtype(dtype))
    return dequantize(*impl.unprepare(weight.arrays, weight.meta, weight.shape), dtype=dtype)


def frozen_weight_error(op: str) -> str:
    return (
        f"{op}: the MXFP8 weight is frozen: its e4m3 values and e8m0 scales have no gradient. "
        "Differentiate with respect to x, the bias or parameters of your own (e.g. LoRA adapters "
        "beside the MXFP8 linear: nnx.grad(..., wrt=nnx.LoRAParam)); for quantization-aware "
        "training keep a high-precision weight and use jax_mxfp8.fake_quantize on it")
