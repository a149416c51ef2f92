"""The Marlin kernels' primitives: one launch each, with an explicit configuration.

- MarlinGemm: ffi/src/marlin.cu, mma.sync (SM80+), the small-M path; bf16 or fp16 x.
- MarlinWgmma: ffi/src/marlin_sm90.cu, wgmma with the weight as the register operand (sm_90a
  GPUs only), bf16 x.
- MarlinGroupedGemm: the mma.sync kernel over a stacked [E, ...] packed weight with x's rows
  grouped by expert (group_sizes read on the device): ragged_dot semantics, one launch.
- MarlinGroupedWgmma: the same on the wgmma kernel (sm_90a, bf16 x), for many rows per expert.
- MarlinDequantize: the packed weight to bf16 (the dequantize + dot path).

All read the packed layout of layout.py. K splits (splits > 1) divide K among that many blocks
per output tile, summed in split order (deterministic) either in a thread-block cluster or
through a hidden workspace. How many splits a launch really uses and how large its workspace is
are the kernels' own arithmetic, asked of the compiled host module, not repeated here.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_mxfp8 import _checks, _ffi, reference
from jax_mxfp8._compat import ShapedArray
from jax_mxfp8._devices import default_compute_capability
from jax_mxfp8.backends.emulation import grouped_dot_with_bias
from jax_mxfp8.backends.marlin.layout import TILE, unpack_padded
from jax_mxfp8.ops.base import Op, register
from jax_mxfp8.partitioning import move_to_front

GEMM_TARGET = "jax_mxfp8_marlin_gemm_cuda_v1"
GROUPED_TARGET = "jax_mxfp8_marlin_grouped_gemm_cuda_v1"
WGMMA_TARGET = "jax_mxfp8_marlin_wgmma_cuda_v1"
GROUPED_WGMMA_TARGET = "jax_mxfp8_marlin_grouped_wgmma_cuda_v1"
DEQUANT_TARGET = "jax_mxfp8_marlin_dequantize_cuda_v1"
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class Tile(NamedTuple):
    """A tile configuration compiled into ffi/src/marlin.cu (DispatchTile): a block computes
    16*m_blocks rows x 64*warps_n columns."""
    m_blocks: int
    warps_n: int


TILE_CONFIGS = (Tile(1, 1), Tile(1, 2), Tile(1, 4), Tile(2, 1), Tile(2, 2), Tile(2, 4), Tile(4, 1),
                Tile(4, 2), Tile(4, 4))


class WgmmaConfig(NamedTuple):
    """A configuration compiled into marlin_sm90.cu (DispatchWgmma): a block computes block_m
    rows of x against 64 * consumers weight rows (output columns); blocks_per_sm blocks share
    an SM (their register and shared-memory budgets are sized for it)."""
    block_m: int
    consumers: int
    blocks_per_sm: int


WGMMA_CONFIGS = (WgmmaConfig(64, 1, 2), WgmmaConfig(128, 1, 2), WgmmaConfig(64, 2, 1),
                 WgmmaConfig(64, 2, 2), WgmmaConfig(128, 2, 1), WgmmaConfig(256, 2, 1),
                 WgmmaConfig(64, 4, 1))


def _host():
    return _ffi.require_cpu_module()


def max_cluster_splits() -> int:
    """K splits summed in one thread-block cluster (SM90+; distributed shared memory, no
    workspace). Asked when needed, so the package imports without its compiled modules."""
    return int(_host().marlin_max_cluster_splits)


def max_wgmma_splits() -> int:
    """K splits of the wgmma kernel summed through the workspace."""
    return int(_host().wgmma_max_splits)


def effective_splits(k: int, splits: int) -> int:
    """The split count the mma.sync kernel really uses for K = k (no empty splits)."""
    return int(_host().marlin_effective_splits(int(k), int(splits)))


def workspace_bytes(m: int, n: int, k: int, m_blocks: int, warps_n: int, splits: int,
                    cluster: bool) -> int:
    """The mma.sync kernel's hidden scratch output (counters + fp32 partials of K splits)."""
    return int(_host().marlin_workspace_bytes(int(m), int(n), int(k), int(m_blocks),
                                              int(warps_n), int(splits), bool(cluster)))


def wgmma_workspace_bytes(m: int, n: int, block_m: int, consumers: int, splits: int,
                          cluster: bool) -> int:
    """The wgmma kernel's hidden scratch output (counters + fp32 partial tiles of K splits)."""
    return int(_host().wgmma_workspace_bytes(int(m), int(n), int(block_m), int(consumers),
                                             int(splits), bool(cluster)))


def wgmma_config(block_m: int, consumers: int, blocks_per_sm: int | None = None) -> WgmmaConfig:
    """The compiled configuration with these parameters (the first listed when blocks_per_sm
    is None); ValueError naming the compiled ones otherwise."""
    for c in WGMMA_CONFIGS:
        if (c.block_m, c.consumers) == (block_m, consumers) and blocks_per_sm in (None, c.blocks_per_sm):
            return c
    raise ValueError(f"marlin wgmma: block_m={block_m}, consumers={consumers}, blocks_per_sm="
                     f"{blocks_per_sm} is not compiled; use one of {WGMMA_CONFIGS}")


def device_has_clusters() -> bool:
    cc = default_compute_capability()
    return cc is not None and cc >= (9, 0)


def device_has_wgmma() -> bool:
    """The wgmma kernel can run: a compute capability 9.0 GPU and a build with sm_90a code."""
    if not _ffi.has_cuda_target(WGMMA_TARGET):
        return False
    archs = str(_ffi.cuda_module().build_info().get("cuda_architectures", ""))
    return default_compute_capability() == (9, 0) and "90a" in archs.split(",")


def device_has_grouped_wgmma() -> bool:
    """The grouped wgmma kernel can run (a build from before it has only the mma.sync one)."""
    return device_has_wgmma() and _ffi.has_cuda_target(GROUPED_WGMMA_TARGET)


def _check_packed(what, x, qweight, scales, flags, bias, has_bias, n_multiple):
    """(m, k, n) of a GEMM on a packed weight, or an error naming what does not fit."""
    if qweight.dtype != jnp.uint8 or scales.dtype != jnp.uint8 or flags.dtype != jnp.int32:
        raise TypeError(f"{what}: qweight/scales must be uint8 and flags int32 (use prepare_weight)")
    m, k = x.shape
    n = scales.shape[1]
    if (k % TILE or k == 0 or n % n_multiple or qweight.shape != (k // 16, 16 * n)
            or scales.shape != (k // 32, n)):
        raise ValueError(f"{what}: x {x.shape}, qweight {qweight.shape}, scales {scales.shape} do "
                         f"not form a packed problem with K % 64 == 0 and N % {n_multiple} == 0")
    if has_bias and bias.shape != (n,):
        raise ValueError(f"{what}: bias shape {bias.shape} != ({n},)")
    return m, k, n


def _gemm_reference(x, qweight, scales, flags, bias, *, out_dtype, has_bias, **config):
    """The jnp lowering of both GEMM primitives (config: their kernel parameters, unused)."""
    values, s = unpack_padded(qweight, scales)
    return reference.linear(x, values, s, bias if has_bias else None, out_dtype=out_dtype)


class _PackedGemm(Op):
    """What the two GEMM primitives share: operands (x, qweight, scales, flags, bias) with the
    bias an empty placeholder when has_bias=False, the reference, the int32 attributes."""
    reference = staticmethod(_gemm_reference)

    @classmethod
    def batch(cls, args, dims, **params):
        x, *rest = args
        xd, *rest_dims = dims
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        if all(d is None for d in rest_dims):  # weight shared: fold the batch into M
            x = move_to_front(x, xd, size)
            b, m, k = x.shape
            y = cls.inner.bind(x.reshape(b * m, k), *rest, **params)
            return y.reshape(b, m, -1), 0
        moved = [move_to_front(a, d, size) for a, d in zip(args, dims)]
        ys = [cls.inner.bind(*(a[i] for a in moved), **params) for i in range(size)]
        return jnp.stack(ys), 0


@register
class MarlinGemm(_PackedGemm):
    name = "mxfp8_marlin_gemm"
    cuda_target = GEMM_TARGET

    @staticmethod
    def abstract(x, qweight, scales, flags, bias, *, m_blocks, warps_n, splits, cluster,
                 out_dtype, has_bias):
        _checks.check_dtype("marlin gemm x", x.dtype, KERNEL_DTYPES,
                            "The Marlin kernel takes bf16 or fp16 activations; linear() routes "
                            "fp32 to the dequantize path.")
        m, k, n = _check_packed("marlin gemm", x, qweight, scales, flags, bias, has_bias,
                                64 * warps_n)
        if Tile(m_blocks, warps_n) not in TILE_CONFIGS:
            raise ValueError(f"marlin gemm: {Tile(m_blocks, warps_n)} is not compiled; use one of "
                             f"{TILE_CONFIGS}")
        if cluster and effective_splits(k, splits) > max_cluster_splits():
            raise ValueError(f"marlin gemm: cluster=True takes at most {max_cluster_splits()} K "
                             f"splits (got {effective_splits(k, splits)}); use cluster=False")
        return ShapedArray((m, n), out_dtype)

    @staticmethod
    def cuda_attrs(*, m_blocks, warps_n, splits, cluster, out_dtype, has_bias):
        return {"m_blocks": m_blocks, "warps_n": warps_n, "splits": splits, "cluster": int(cluster)}

    @staticmethod
    def cuda_workspace(avals_in, avals_out, *, m_blocks, warps_n, splits, cluster, **_):
        m, k = avals_in[0].shape
        return workspace_bytes(m, avals_out[0].shape[1], k, m_blocks, warps_n, splits, cluster)


@register
class MarlinWgmma(_PackedGemm):
    name = "mxfp8_marlin_wgmma_gemm"
    cuda_target = WGMMA_TARGET

    @staticmethod
    def abstract(x, qweight, scales, flags, bias, *, block_m, consumers, blocks_per_sm, splits,
                 cluster, out_dtype, has_bias):
        _checks.check_dtype("marlin wgmma x", x.dtype, (jnp.bfloat16,),
                            "The wgmma kernel takes bf16 activations; fp16 uses the mma.sync kernel.")
        m, k, n = _check_packed("marlin wgmma", x, qweight, scales, flags, bias, has_bias,
                                64 * consumers)
        wgmma_config(block_m, consumers, blocks_per_sm)
        most = max_cluster_splits() if cluster else max_wgmma_splits()
        if not 1 <= splits <= min(most, k // TILE):
            raise ValueError(f"marlin wgmma: splits={splits} must be in [1, min({most}, K/64 = "
                             f"{k // TILE})]" + (" with cluster=True" if cluster else ""))
        return ShapedArray((m, n), out_dtype)

    @staticmethod
    def cuda_attrs(*, block_m, consumers, blocks_per_sm, splits, cluster, out_dtype, has_bias):
        return {"block_m": block_m, "consumers": consumers, "blocks_per_sm": blocks_per_sm,
                "splits": splits, "cluster": int(cluster)}

    @staticmethod
    def cuda_workspace(avals_in, avals_out, *, block_m, consumers, splits, cluster, **_):
        return wgmma_workspace_bytes(avals_in[0].shape[0], avals_out[0].shape[1], block_m,
                                     consumers, splits, cluster)


@register
class MarlinDequantize(Op):
    name = "mxfp8_marlin_dequantize"
    cuda_target = DEQUANT_TARGET

    @staticmethod
    def abstract(qweight, scales, *, n_begin, rows):
        groups, n = scales.shape
        if (qweight.dtype != jnp.uint8 or scales.dtype != jnp.uint8
                or qweight.shape != (groups * 2, 16 * n)):
            raise ValueError(f"marlin dequantize: qweight {qweight.shape} / scales {scales.shape} "
                             f"are not a packed Marlin weight")
        if n_begin % TILE or rows % TILE or not 0 <= n_begin <= n_begin + rows <= n:
            raise ValueError(f"marlin dequantize: columns [{n_begin}, {n_begin + rows}) are not "
                             f"whole 64-column tiles of N={n}")
        return ShapedArray((rows, groups * 32), jnp.bfloat16)

    @staticmethod
    def reference(qweight, scales, *, n_begin, rows):
        values, s = unpack_padded(qweight, scales)
        return reference.dequantize(values[n_begin:n_begin + rows], s[n_begin:n_begin + rows],
                                    jnp.bfloat16)

    @staticmethod
    def cuda_attrs(*, n_begin, rows):
        return {"n_begin": n_begin}

    @classmethod
    def batch(cls, args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        moved = [move_to_front(a, d, size) for a, d in zip(args, dims)]
        return jnp.stack([cls.inner.bind(*(a[i] for a in moved), **params)
                          for i in range(size)]), 0


def grouped_chunks(t: int, experts: int, m_blocks: int) -> int:
    """Row chunks of a grouped launch's grid: ceil(T / rows) + min(E, T), the most any grouping
    of T rows over E experts needs (at most min(E, T) experts have rows, each adding at most one
    partial chunk; the rows past the groups' sum are chunks too). ffi/src/marlin.cu sizes its
    grid the same way."""
    return -(-t // (16 * m_blocks)) + min(experts, t)


def _grouped_reference(x, qweight, scales, flags, group_sizes, bias, *, out_dtype, has_bias,
                       **config):
    """dequantize every expert (exact) + the grouped float32-accumulated dot."""
    w = jax.vmap(lambda q, s: reference.dequantize(*unpack_padded(q, s), jnp.bfloat16))(
        qweight, scales)
    op_dtype = reference.dot_dtype(x.dtype)
    return grouped_dot_with_bias(x.astype(op_dtype), w.astype(op_dtype), group_sizes,
                                 bias if has_bias else None, out_dtype)


def _check_grouped(what, x, qweight, scales, flags, group_sizes, bias, has_bias, n_multiple):
    """(T, K, N, E) of a grouped problem on a stacked packed weight, or an error naming what
    does not fit."""
    if qweight.ndim != 3 or scales.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"{what}: qweight {qweight.shape} / scales {scales.shape} must be "
                         f"stacked [E, ...] and group_sizes 1-D")
    e = qweight.shape[0]
    if group_sizes.dtype != jnp.int32 or group_sizes.shape != (e,):
        raise ValueError(f"{what}: group_sizes must be int32 [{e}], got "
                         f"{group_sizes.dtype}{list(group_sizes.shape)}")
    if flags.shape != (e, 1) or flags.dtype != jnp.int32:
        raise ValueError(f"{what}: flags must be int32 [{e}, 1]")
    one = lambda a: ShapedArray(a.shape[1:], a.dtype)  # noqa: E731
    m, k, n = _check_packed(what, x, one(qweight), one(scales), ShapedArray((1,), flags.dtype),
                            None, False, n_multiple)
    if has_bias and bias.shape != (e, n):
        raise ValueError(f"{what}: bias shape {bias.shape} != ({e}, {n})")
    return m, k, n, e


@register
class MarlinGroupedGemm(Op):
    name = "mxfp8_marlin_grouped_gemm"
    cuda_target = GROUPED_TARGET
    reference = staticmethod(_grouped_reference)

    @staticmethod
    def abstract(x, qweight, scales, flags, group_sizes, bias, *, m_blocks, warps_n, splits,
                 cluster, out_dtype, has_bias):
        _checks.check_dtype("marlin grouped gemm x", x.dtype, KERNEL_DTYPES,
                            "The Marlin kernel takes bf16 or fp16 activations.")
        m, k, n, _ = _check_grouped("marlin grouped gemm", x, qweight, scales, flags,
                                    group_sizes, bias, has_bias, 64 * warps_n)
        if Tile(m_blocks, warps_n) not in TILE_CONFIGS:
            raise ValueError(f"marlin grouped gemm: {Tile(m_blocks, warps_n)} is not compiled; "
                             f"use one of {TILE_CONFIGS}")
        if cluster and effective_splits(k, splits) > max_cluster_splits():
            raise ValueError(f"marlin grouped gemm: cluster=True takes at most "
                             f"{max_cluster_splits()} K splits; use cluster=False")
        return ShapedArray((m, n), out_dtype)

    @staticmethod
    def cuda_attrs(*, m_blocks, warps_n, splits, cluster, out_dtype, has_bias):
        return {"m_blocks": m_blocks, "warps_n": warps_n, "splits": splits, "cluster": int(cluster)}

    @staticmethod
    def cuda_workspace(avals_in, avals_out, *, m_blocks, warps_n, splits, cluster, **_):
        t, k = avals_in[0].shape
        chunks = grouped_chunks(t, avals_in[1].shape[0], m_blocks)
        return workspace_bytes(chunks * 16 * m_blocks, avals_out[0].shape[1], k, m_blocks,
                               warps_n, splits, cluster)

    @classmethod
    def batch(cls, args, dims, **params):
        raise NotImplementedError("marlin grouped gemm is batched by ragged_linear's own vmap "
                                  "rule (rows of all batch entries sorted into one call)")


@register
class MarlinGroupedWgmma(Op):
    name = "mxfp8_marlin_grouped_wgmma"
    cuda_target = GROUPED_WGMMA_TARGET
    reference = staticmethod(_grouped_reference)

    @staticmethod
    def abstract(x, qweight, scales, flags, group_sizes, bias, *, block_m, consumers,
                 blocks_per_sm, out_dtype, has_bias):
        _checks.check_dtype("marlin grouped wgmma x", x.dtype, (jnp.bfloat16,),
                            "The wgmma kernel takes bf16 activations; fp16 uses the mma.sync "
                            "grouped kernel.")
        m, _, n, _ = _check_grouped("marlin grouped wgmma", x, qweight, scales, flags,
                                    group_sizes, bias, has_bias, 64 * consumers)
        wgmma_config(block_m, consumers, blocks_per_sm)
        return ShapedArray((m, n), out_dtype)

    @staticmethod
    def cuda_attrs(*, block_m, consumers, blocks_per_sm, out_dtype, has_bias):
        return {"block_m": block_m, "consumers": consumers, "blocks_per_sm": blocks_per_sm}

    @classmethod
    def batch(cls, args, dims, **params):
        raise NotImplementedError("marlin grouped wgmma is batched by ragged_linear's own vmap "
                                  "rule (rows of all batch entries sorted into one call)")


def grouped_gemm_sm90(x, qweight, scales, flags, group_sizes, bias=None, *, block_m, consumers,
                      out_dtype, blocks_per_sm=None):
    """One grouped launch of the sm_90a wgmma kernel (no K split): x [T, K] bf16 rows grouped
    by expert, stacked packed weight."""
    config = wgmma_config(int(block_m), int(consumers), blocks_per_sm)
    has_bias, bias = _bias_operand(bias, x)
    return MarlinGroupedWgmma.inner.bind(
        x, qweight, scales, flags, group_sizes.astype(jnp.int32), bias, block_m=config.block_m,
        consumers=config.consumers, blocks_per_sm=config.blocks_per_sm,
        out_dtype=jnp.dtype(out_dtype), has_bias=has_bias)


def grouped_gemm(x, qweight, scales, flags, group_sizes, bias=None, *, m_blocks, warps_n,
                 splits, out_dtype, cluster=False):
    """One grouped mma.sync launch: x [T, K] rows grouped by expert, stacked packed weight."""
    has_bias, bias = _bias_operand(bias, x)
    return MarlinGroupedGemm.inner.bind(
        x, qweight, scales, flags, group_sizes.astype(jnp.int32), bias, m_blocks=int(m_blocks),
        warps_n=int(warps_n), splits=int(splits), cluster=bool(cluster),
        out_dtype=jnp.dtype(out_dtype), has_bias=has_bias)


marlin_gemm_p, marlin_wgmma_p, marlin_dequantize_p = (
    MarlinGemm.inner, MarlinWgmma.inner, MarlinDequantize.inner)


def _bias_operand(bias, x):
    return (False, jnp.zeros((0,), x.dtype)) if bias is None else (True, bias)


def gemm(x, qweight, scales, flags, bias=None, *, m_blocks, warps_n, splits, out_dtype,
         cluster=False):
    """One mma.sync kernel launch with an explicit tile configuration (the planner, tests, tuning).
    cluster=True reduces the K splits inside a thread-block cluster (SM90+ only)."""
    has_bias, bias = _bias_operand(bias, x)
    return MarlinGemm.inner.bind(x, qweight, scales, flags, bias, m_blocks=int(m_blocks),
                                 warps_n=int(warps_n), splits=int(splits), cluster=bool(cluster),
                                 out_dtype=jnp.dtype(out_dtype), has_bias=has_bias)


def gemm_sm90(x, qweight, scales, flags, bias=None, *, block_m, consumers, out_dtype,
              blocks_per_sm=None, splits=1, cluster=False):
    """One launch of the sm_90a wgmma kernel with an explicit configuration. splits > 1 divides
    K among that many blocks per output tile, whose partials are summed in split order through
    a workspace, or with cluster=True in a thread-block cluster."""
    config = wgmma_config(int(block_m), int(consumers), blocks_per_sm)
    has_bias, bias = _bias_operand(bias, x)
    return MarlinWgmma.inner.bind(x, qweight, scales, flags, bias, block_m=config.block_m,
                                  consumers=config.consumers, blocks_per_sm=config.blocks_per_sm,
                                  splits=int(splits), cluster=bool(cluster) and splits > 1,
                                  out_dtype=jnp.dtype(out_dtype), has_bias=has_bias)


def dequantize_packed(qweight, scales, n_begin: int = 0, rows: int | None = None):
    """Packed weight -> bf16 [rows, Kp]: weight rows (output columns) [n_begin, n_begin + rows),
    all Np by default, multiples of 64 (the exact dequantize of docs/numerics.md)."""
    rows = scales.shape[1] - n_begin if rows is None else rows
    return MarlinDequantize.inner.bind(qweight, scales, n_begin=int(n_begin), rows=int(rows))
