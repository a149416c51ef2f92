"""MARLIN: fused-dequant W8A16 GEMMs for SM80+ (mma.sync) and sm_90a (wgmma), one packed weight.

layout.py is the packed format (prepare repacks [N, K] e4m3 values + [N, K/32] scales on the
device; unprepare is its exact inverse), kernels.py the primitives of the kernels, planner.py
which kernel and configuration each (M, N, K) runs. This module is the backend entry: linear
pads x along K and slices y along N where the weight was padded, and runs the planned kernel or
"dequantize the packed weight to bf16 (one kernel) + XLA dot" (in column slices for large
weights up to M = 2048: the emulation math, faster than the emulation path itself because the
dequantize kernel runs at copy bandwidth).

Stacked experts (E, N, K): every array of the packed layout gains a leading expert axis
(qweight [E, Kp/16, 16*Np], scales [E, Kp/32, Np], flags [E, 1]); marlin_ragged_linear is the
grouped GEMM over them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_mxfp8 import reference
from jax_mxfp8.backends.base import Backend, BackendImpl, register_backend
from jax_mxfp8.backends.emulation import grouped_dot_with_bias
from jax_mxfp8.backends.marlin.kernels import (  # noqa: F401  (the kernels' API)
    DEQUANT_TARGET, GEMM_TARGET, GROUPED_TARGET, GROUPED_WGMMA_TARGET, KERNEL_DTYPES, TILE_CONFIGS,
    WGMMA_CONFIGS, WGMMA_TARGET, Tile, WgmmaConfig, dequantize_packed, device_has_clusters,
    device_has_grouped_wgmma, device_has_wgmma, effective_splits, gemm, gemm_sm90, grouped_gemm,
    grouped_gemm_sm90, max_cluster_splits, max_wgmma_splits, wgmma_config, workspace_bytes,
    wgmma_workspace_bytes)
from jax_mxfp8.backends.marlin.layout import (  # noqa: F401  (the format's API)
    FAST_MAX_SCALE, META_TAG, TILE, layout_meta, pack_scales, pack_values, pack_weight,
    unpack_padded, unpack_scales, unpack_values, unpack_weight)
from jax_mxfp8.backends.marlin.planner import (  # noqa: F401  (the planner's API)
    MAX_KERNEL_M, WGMMA_MIN_M, WGMMA_MIN_SPLIT_STAGES, Plan, candidates, choose_plan,
    dequant_slices, plan_name, ragged_plan, rule_plan, run_plan)


def __getattr__(name):
    """MAX_CLUSTER_SPLITS / MAX_WGMMA_SPLITS: the kernels' limits, read from the compiled host
    module when first asked for (the package imports without it, e.g. from a source tree)."""
    limits = {"MAX_CLUSTER_SPLITS": max_cluster_splits, "MAX_WGMMA_SPLITS": max_wgmma_splits}
    if name in limits:
        return limits[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dequant_dot(x, weight_arrays, bias, out_dtype, slices=None):
    """x @ dequantize(packed weight).T: the dequantize kernel then an XLA dot, in column slices
    (planner.dequant_slices) so one slice of bf16 weight exists at a time."""
    qweight, scales = weight_arrays["qweight"], weight_arrays["scales"]
    op_dtype = reference.dot_dtype(x.dtype)
    x = x.astype(op_dtype)
    ys = []
    for n_begin, rows in slices or dequant_slices(scales.shape[1], x.shape[1], x.shape[0]):
        w = dequantize_packed(qweight, scales, n_begin, rows).astype(op_dtype)
        b = None if bias is None else bias[n_begin:n_begin + rows]
        ys.append(reference.dot_with_bias(x, w, b, out_dtype))
    return ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=1)


def _linear(x, weight, bias, out_dtype, quantize_activations):
    if quantize_activations:
        raise ValueError("marlin computes W8A16 only")
    n, k = weight.shape
    _, n_pad, k_pad = weight.meta
    m = x.shape[0]
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    if k_pad != k:
        x = jnp.pad(x, ((0, 0), (0, k_pad - k)))
    if bias is not None and n_pad != n:
        bias = jnp.pad(bias, (0, n_pad - n))
    plan = choose_plan(m, n_pad, k_pad, x.dtype)
    a = weight.arrays
    if plan.kind == "kernel":
        y = gemm(x, a["qweight"], a["scales"], a["flags"], bias, m_blocks=plan.m_blocks,
                 warps_n=plan.warps_n, splits=plan.splits, cluster=plan.cluster, out_dtype=out_dtype)
    elif plan.kind == "wgmma":
        y = gemm_sm90(x, a["qweight"], a["scales"], a["flags"], bias, block_m=plan.block_m,
                      consumers=plan.consumers, blocks_per_sm=plan.blocks_per_sm,
                      splits=plan.splits, cluster=plan.cluster, out_dtype=out_dtype)
    else:
        y = dequant_dot(x, a, bias, out_dtype)
    return y[:, :n] if n_pad != n else y


def _dequantize_weight(weight, dtype):
    """The bf16 weight by the dequantize kernel on the packed weight (exact: the emulation
    math's bf16 weight); linear's backward asks for it."""
    n, k = weight.shape
    w = dequantize_packed(weight.arrays["qweight"], weight.arrays["scales"])
    return w if w.shape == (n, k) else w[:n, :k]


def marlin_ragged_linear(x2d, weight, group_sizes, bias, out_dtype):
    """The grouped W8A16 GEMM: x2d [T, K] with rows grouped by expert (group_sizes [E] int32 on
    the device, rows [sum(gs[:e]), sum(gs[:e+1])) use expert e) against the stacked packed
    weight (E, N, K); bias [E, N] or None; -> [T, N] out_dtype, zero from row sum(gs) on.

    The weight's arrays: qweight uint8 [E, Kp/16, 16*Np], scales uint8 [E, Kp/32, Np], flags
    int32 [E, 1] (each expert packed as layout.py describes; weight.meta = (tag, Np, Kp) of one
    expert). x2d is bf16, fp16 or fp32 and holds K (unpadded) columns; out_dtype is bf16, fp16
    or fp32 (float32 for row-parallel partial products).

    bf16 / fp16 x: one launch of the grouped mma.sync kernel, or of the grouped wgmma kernel
    (sm_90a, bf16 x, many rows per expert), as planner.ragged_plan picks; fp32 x:
    the dequantize kernel per expert (exact bf16 weights) and a grouped float32 dot, the
    emulation math.
    """
    e, n, k = weight.shape
    _, n_pad, k_pad = weight.meta
    if x2d.shape[0] == 0:
        return jnp.zeros((0, n), out_dtype)
    if k_pad != k:
        x2d = jnp.pad(x2d, ((0, 0), (0, k_pad - k)))
    if bias is not None and n_pad != n:
        bias = jnp.pad(bias, ((0, 0), (0, n_pad - n)))
    a = weight.arrays
    plan = ragged_plan(x2d.shape[0], e, n_pad, k_pad, x2d.dtype)
    if plan.kind == "kernel":
        y = grouped_gemm(x2d, a["qweight"], a["scales"], a["flags"], group_sizes.astype(jnp.int32),
                         bias, m_blocks=plan.m_blocks, warps_n=plan.warps_n, splits=plan.splits,
                         cluster=plan.cluster, out_dtype=out_dtype)
    elif plan.kind == "wgmma":
        y = grouped_gemm_sm90(x2d, a["qweight"], a["scales"], a["flags"],
                              group_sizes.astype(jnp.int32), bias, block_m=plan.block_m,
                              consumers=plan.consumers, blocks_per_sm=plan.blocks_per_sm,
                              out_dtype=out_dtype)
    else:
        w = jax.vmap(lambda q, s: dequantize_packed(q, s))(a["qweight"], a["scales"])  # [E, Np, Kp]
        op_dtype = reference.dot_dtype(x2d.dtype)
        y = grouped_dot_with_bias(x2d.astype(op_dtype), w.astype(op_dtype), group_sizes, bias,
                                  out_dtype)
    return y[:, :n] if n_pad != n else y


def _array_axes(meta, shape):
    """qweight and scales are 64-tile-major along K (rows) and N (columns), so whole-tile
    chunks are the packed shards; flags go whole to every shard."""
    n, k = shape
    if n % TILE or k % TILE:  # padded tiles: only whole weights
        return {"qweight": (None, None), "scales": (None, None), "flags": (None,)}
    return {"qweight": ("k", "n"), "scales": ("k", "n"), "flags": (None,)}


def _shard_meta(meta, shape):
    return layout_meta(*shape[-2:])  # one expert's (N, K) of a stacked shape


register_backend(BackendImpl(
    backend=Backend.MARLIN, min_compute_capability=(8, 0),
    required_targets=(GEMM_TARGET, GROUPED_TARGET, DEQUANT_TARGET), default_quantize_activations=False,
    supports_w8a16=True, supports_w8a8=False, prepare=pack_weight, unprepare=unpack_weight,
    linear=_linear, array_axes=_array_axes, n_tile=TILE, k_tile=TILE, shard_meta=_shard_meta,
    dequantize_weight=_dequantize_weight, ragged_linear=marlin_ragged_linear))
