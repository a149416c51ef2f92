"""MARLIN: fused-dequant W8A16 GEMM for SM80+, tuned for H100 and H200.

Two kernels read one packed weight: ffi/src/marlin.cu (mma.sync, SM80+, the small-M path) and
ffi/src/marlin_sm90.cu (wgmma with the weight as the register operand, sm_90a GPUs, M > 32).
prepare repacks [N, K] e4m3 values + [N, K/32] scales on the device (one jnp transpose)
into the tile layout; unprepare is its exact inverse. linear picks, at trace time from the static
M: a wgmma block configuration and K splits (sm_90a, bf16 x, M > 32), an mma.sync tile
configuration (tile, K splits, and whether the splits reduce in a thread-block cluster), or, on
GPUs without wgmma and for large M where a bf16 tensor-core GEMM wins, "dequantize the packed
weight to bf16 (one kernel) + XLA dot", in column slices for large weights up to M = 2048 (the
emulation math, faster than the emulation path itself because the dequantize kernel runs at
copy bandwidth).

Layout (the kernel reads exactly this; see the header of ffi/src/marlin.cu):
  qweight uint8 [Kp/16, 16*Np]: word (((kt*Np/64 + nt)*2 + h)*32 + 4g + c)*4 + w holds the
      codes W[64nt + 32h + 8w + g, 16kt + 8*(b & 1) + 2c + (b >> 1)], b = 0..3, their bits
      interleaved (_interleave_bits) so that the kernels' dequantization is a few integer ops
  scales  uint8 [Kp/32, Np]: byte [grp, 64nt + 8g + j] holds S[64nt + g + 8j, grp]
  flags   int32 [1]: 1 when the weight needs the general dequantization (NaN value codes, or a
      scale byte > 134); the fast path is exact otherwise.
N and K are zero-padded to multiples of 64 (meta records the padded sizes); x is padded along
K and y sliced along N inside linear when the weight was padded.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_mxfp8 import _ffi, reference
from jax_mxfp8._compat import ShapedArray, mlir
from jax_mxfp8.backends.base import Backend, BackendImpl, register_backend
from jax_mxfp8.primitives import base

GEMM_TARGET = "jax_mxfp8_marlin_gemm_cuda"
DEQUANT_TARGET = "jax_mxfp8_marlin_dequantize_cuda"
WGMMA_TARGET = "jax_mxfp8_marlin_wgmma_cuda"  # sm_90a kernel (ffi/src/marlin_sm90.cu)
TILE = 64            # N and K granularity of the packed layout and of a pipeline stage
FAST_MAX_SCALE = 134  # largest e8m0 byte whose folded scale 2^(e-7) is a normal bf16
META_TAG = "marlin-v2"  # v2: bit-interleaved value words


class Tile(NamedTuple):
    """A tile configuration compiled into ffi/src/marlin.cu (DispatchTile): a block computes
    16*m_blocks rows x 64*warps_n columns."""
    m_blocks: int
    warps_n: int


TILE_CONFIGS = (Tile(1, 1), Tile(1, 2), Tile(1, 4), Tile(2, 1), Tile(2, 2), Tile(2, 4), Tile(4, 1),
                Tile(4, 2), Tile(4, 4))
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


# ---- packing ---------------------------------------------------------------------------------

def _interleave_bits(b):
    """Codes b[..., 0:4] (rows 2c, 2c+8, 2c+1, 2c+9) -> the bytes of the little-endian word
    Dequant (ffi/src/marlin_common.cuh) reads: code 0 at bits 15 (sign) and 10..4, code 2 at 31
    and 26..20 (already bf16-shaped), code 1 at 19, 14..11 and 2..0, code 3 at 3, 30..27 and
    18..16 (bf16-shaped after a rotation right by 4 and a shift left by 4)."""
    b0, b1, b2, b3 = (b[..., j].astype(jnp.uint32) for j in range(4))
    w = (((b0 & 0x80) << 8) | ((b0 & 0x7F) << 4) | ((b2 & 0x80) << 24) | ((b2 & 0x7F) << 20)
         | ((b1 & 0x80) << 12) | ((b1 & 0x78) << 8) | (b1 & 0x07)
         | ((b3 & 0x80) >> 4) | ((b3 & 0x78) << 24) | ((b3 & 0x07) << 16))
    return jnp.stack([(w >> (8 * j)) & 0xFF for j in range(4)], axis=-1).astype(jnp.uint8)


def _deinterleave_bits(b):
    w = sum(b[..., j].astype(jnp.uint32) << (8 * j) for j in range(4))
    b0 = ((w >> 8) & 0x80) | ((w >> 4) & 0x7F)
    b2 = ((w >> 24) & 0x80) | ((w >> 20) & 0x7F)
    b1 = ((w >> 12) & 0x80) | ((w >> 8) & 0x78) | (w & 0x07)
    b3 = ((w << 4) & 0x80) | ((w >> 24) & 0x78) | ((w >> 16) & 0x07)
    return jnp.stack([b0, b1, b2, b3], axis=-1).astype(jnp.uint8)


def pack_values(vbytes: jax.Array) -> jax.Array:
    """uint8 [N, K] (N, K multiples of 64) -> qweight uint8 [K/16, 16N]."""
    n, k = vbytes.shape
    v = vbytes.reshape(n // 64, 2, 4, 8, k // 16, 2, 4, 2)  # (nt, h, w, g, kt, b_lo, c, b_hi)
    words = v.transpose(4, 0, 1, 3, 6, 2, 7, 5).reshape(k // 16, 4 * n, 4)
    return _interleave_bits(words).reshape(k // 16, 16 * n)


def unpack_values(qweight: jax.Array) -> jax.Array:
    kt, n16 = qweight.shape
    n, k = n16 // 16, kt * 16
    codes = _deinterleave_bits(qweight.reshape(kt, 4 * n, 4))
    p = codes.reshape(kt, n // 64, 2, 8, 4, 4, 2, 2)  # (kt, nt, h, g, c, w, b_hi, b_lo)
    return p.transpose(1, 2, 5, 3, 0, 7, 4, 6).reshape(n, k)


def pack_scales(scales: jax.Array) -> jax.Array:
    """uint8 [N, K/32] -> [K/32, N] with each 64 columns ordered (g, j) for column g + 8j."""
    n, groups = scales.shape
    return scales.T.reshape(groups, n // 64, 8, 8).transpose(0, 1, 3, 2).reshape(groups, n)


def unpack_scales(packed: jax.Array) -> jax.Array:
    groups, n = packed.shape
    return packed.reshape(groups, n // 64, 8, 8).transpose(0, 1, 3, 2).reshape(groups, n).T


def weight_flags(vbytes: jax.Array, scales: jax.Array) -> jax.Array:
    nan_code = jnp.any((vbytes & 0x7F) == 0x7F)
    big_scale = jnp.any(scales > FAST_MAX_SCALE)
    return (nan_code | big_scale).astype(jnp.int32).reshape(1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _pack(values, scales, n_pad, k_pad):
    n, k = values.shape
    vbytes = lax.bitcast_convert_type(values, jnp.uint8)
    vbytes = jnp.pad(vbytes, ((0, n_pad - n), (0, k_pad - k)))
    scales = jnp.pad(scales, ((0, n_pad - n), (0, (k_pad - k) // 32)), constant_values=127)
    return {"qweight": pack_values(vbytes), "scales": pack_scales(scales),
            "flags": weight_flags(vbytes, scales)}


def _prepare(values, scales):
    n, k = values.shape
    n_pad, k_pad = _round_up(n, TILE), _round_up(k, TILE)
    return _pack(values, scales, n_pad, k_pad), (META_TAG, n_pad, k_pad)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _unpack(qweight, scales, n, k):
    vbytes = unpack_values(qweight)[:n, :k]
    return lax.bitcast_convert_type(vbytes, jnp.float8_e4m3fn), unpack_scales(scales)[:n, : k // 32]


def _unprepare(arrays, meta, shape):
    return _unpack(arrays["qweight"], arrays["scales"], *shape)


# ---- primitives ------------------------------------------------------------------------------

def _unpack_padded(qweight, scales):
    return lax.bitcast_convert_type(unpack_values(qweight), jnp.float8_e4m3fn), unpack_scales(scales)


def effective_splits(k: int, splits: int) -> int:
    """The split count the kernel really uses (no empty splits); mirrors MarlinGemmImpl."""
    kt_total = k // TILE
    s = max(1, min(splits, kt_total))
    per = -(-kt_total // s)
    return -(-kt_total // per)


# With cluster=True (SM90+, at most this many K splits: kMaxClusterSplits in marlin.cu) the
# splits of a tile are one thread-block cluster and reduce in distributed shared memory, with
# no workspace; otherwise through the workspace (partials + counters).
MAX_CLUSTER_SPLITS = 8


def device_has_clusters() -> bool:
    from jax_mxfp8.backends import compute_capability  # the package imports this module first
    try:
        cc = compute_capability(jax.devices()[0])
    except RuntimeError:  # no devices
        return False
    return cc is not None and cc >= (9, 0)


def workspace_bytes(m: int, n: int, k: int, m_blocks: int, warps_n: int, splits: int,
                    cluster: bool) -> int:
    """The kernel's hidden scratch output (mirrors MarlinGemmImpl)."""
    s = effective_splits(k, splits)
    if s == 1 or m == 0 or cluster:
        return 256
    rows = 16 * m_blocks
    m_chunks = -(-m // rows)
    counters = _round_up((n // (64 * warps_n)) * m_chunks * 4, 256)
    return counters + s * m_chunks * rows * n * 4


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


def _gemm_abstract(x, qweight, scales, flags, bias, *, m_blocks, warps_n, splits, cluster,
                   out_dtype, has_bias):
    base.check_dtype("marlin gemm x", x.dtype, KERNEL_DTYPES,
                     "The Marlin kernel takes bf16 or fp16 activations; linear() routes fp32 to "
                     "the dequantize path.")
    m, k, n = _check_packed("marlin gemm", x, qweight, scales, flags, bias, has_bias, 64 * warps_n)
    if Tile(m_blocks, warps_n) not in TILE_CONFIGS:
        raise ValueError(f"marlin gemm: {Tile(m_blocks, warps_n)} is not compiled; use one of "
                         f"{TILE_CONFIGS}")
    if cluster and effective_splits(k, splits) > MAX_CLUSTER_SPLITS:
        raise ValueError(f"marlin gemm: cluster=True takes at most {MAX_CLUSTER_SPLITS} K splits "
                         f"(got {effective_splits(k, splits)}); use cluster=False")
    return ShapedArray((m, n), out_dtype)


def _gemm_reference(x, qweight, scales, flags, bias, *, out_dtype, has_bias, **config):
    """The jnp lowering of both GEMM primitives (config: their kernel parameters, unused)."""
    values, s = _unpack_padded(qweight, scales)
    return reference.linear(x, values, s, bias if has_bias else None, out_dtype=out_dtype)


def _lower_with_workspace(ctx, target, workspace: int, operands, reference_params, **attrs):
    """CUDA lowering of a GEMM primitive: its FFI target with a hidden uint8 workspace result
    of `workspace` bytes (int32 attributes), or the jnp reference where the target is not built."""
    if not _ffi.has_cuda_target(target):
        return mlir.lower_fun(functools.partial(_gemm_reference, **reference_params),
                              multiple_results=False)(ctx, *operands)
    _ffi.register_cuda_targets()
    ws = ShapedArray((workspace,), jnp.uint8)
    hidden = ctx.replace(avals_out=[ctx.avals_out[0], ws])  # workspace: a hidden extra result
    results = jax.ffi.ffi_lowering(target)(hidden, *operands,
                                           **{name: np.int32(v) for name, v in attrs.items()})
    return list(results)[:1]


def _gemm_cuda(ctx, *operands, m_blocks, warps_n, splits, cluster, out_dtype, has_bias):
    m, k = ctx.avals_in[0].shape
    n = ctx.avals_out[0].shape[1]
    return _lower_with_workspace(
        ctx, GEMM_TARGET, workspace_bytes(m, n, k, m_blocks, warps_n, splits, cluster), operands,
        {"out_dtype": out_dtype, "has_bias": has_bias}, m_blocks=m_blocks, warps_n=warps_n,
        splits=splits, cluster=cluster)


def _batch_gemm(prim):
    """vmap rule of a GEMM primitive (x first, then the weight arrays and bias)."""
    def rule(args, dims, **params):
        x, *rest = args
        xd, *rest_dims = dims
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        if all(d is None for d in rest_dims):  # weight shared: fold the batch into M
            x = jnp.moveaxis(x, xd, 0)
            b, m, k = x.shape
            y = prim.bind(x.reshape(b * m, k), *rest, **params)
            return y.reshape(b, m, -1), 0
        moved = [base.move_to_front(a, d, size) for a, d in zip(args, dims)]
        ys = [prim.bind(*(a[i] for a in moved), **params) for i in range(size)]
        return jnp.stack(ys), 0
    return rule


marlin_gemm_p = base.define_primitive(
    "mxfp8_marlin_gemm", abstract_eval=_gemm_abstract, reference=_gemm_reference,
    batcher=lambda args, dims, **params: _batch_gemm(marlin_gemm_p)(args, dims, **params),
    multiple_results=False, lowerings={"cuda": _gemm_cuda})


# ---- the sm_90a wgmma kernel (ffi/src/marlin_sm90.cu): same packed weight, bf16 x only ----

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
MAX_WGMMA_SPLITS = 64  # K splits summed through the workspace (8 in a cluster: MAX_CLUSTER_SPLITS)


def wgmma_config(block_m: int, consumers: int, blocks_per_sm: int | None = None) -> WgmmaConfig:
    """The compiled configuration with these parameters (the first listed when blocks_per_sm
    is None); ValueError naming the compiled ones otherwise."""
    for c in WGMMA_CONFIGS:
        if (c.block_m, c.consumers) == (block_m, consumers) and blocks_per_sm in (None, c.blocks_per_sm):
            return c
    raise ValueError(f"marlin wgmma: block_m={block_m}, consumers={consumers}, blocks_per_sm="
                     f"{blocks_per_sm} is not compiled; use one of {WGMMA_CONFIGS}")


def _wgmma_abstract(x, qweight, scales, flags, bias, *, block_m, consumers, blocks_per_sm, splits,
                    cluster, out_dtype, has_bias):
    base.check_dtype("marlin wgmma x", x.dtype, (jnp.bfloat16,),
                     "The wgmma kernel takes bf16 activations; fp16 uses the mma.sync kernel.")
    m, k, n = _check_packed("marlin wgmma", x, qweight, scales, flags, bias, has_bias, 64 * consumers)
    wgmma_config(block_m, consumers, blocks_per_sm)
    most = MAX_CLUSTER_SPLITS if cluster else MAX_WGMMA_SPLITS
    if not 1 <= splits <= min(most, k // TILE):
        raise ValueError(f"marlin wgmma: splits={splits} must be in [1, min({most}, K/64 = "
                         f"{k // TILE})]" + (" with cluster=True" if cluster else ""))
    return ShapedArray((m, n), out_dtype)


def wgmma_workspace_bytes(m: int, n: int, block_m: int, consumers: int, splits: int,
                          cluster: bool) -> int:
    """The wgmma kernel's hidden scratch output (mirrors LaunchWgmma): K splits summed through
    global memory need a counter per output tile and every split's fp32 partial tile."""
    if splits == 1 or cluster or m == 0:
        return 256
    tiles = -(-m // block_m) * (n // (64 * consumers))
    return _round_up(tiles * 4, 256) + splits * tiles * block_m * 64 * consumers * 4


def _wgmma_cuda(ctx, *operands, block_m, consumers, blocks_per_sm, splits, cluster, out_dtype,
                has_bias):
    m = ctx.avals_in[0].shape[0]
    n = ctx.avals_out[0].shape[1]
    return _lower_with_workspace(
        ctx, WGMMA_TARGET, wgmma_workspace_bytes(m, n, block_m, consumers, splits, cluster),
        operands, {"out_dtype": out_dtype, "has_bias": has_bias}, block_m=block_m,
        consumers=consumers, blocks_per_sm=blocks_per_sm, splits=splits, cluster=cluster)


marlin_wgmma_p = base.define_primitive(
    "mxfp8_marlin_wgmma_gemm", abstract_eval=_wgmma_abstract, reference=_gemm_reference,
    batcher=lambda args, dims, **params: _batch_gemm(marlin_wgmma_p)(args, dims, **params),
    multiple_results=False, lowerings={"cuda": _wgmma_cuda})


def device_has_wgmma() -> bool:
    """The wgmma kernel can run: a compute capability 9.0 GPU and a build with sm_90a code."""
    from jax_mxfp8.backends import compute_capability  # the package imports this module first
    if not _ffi.has_cuda_target(WGMMA_TARGET):
        return False
    try:
        cc = compute_capability(jax.devices()[0])
    except RuntimeError:  # no devices
        return False
    archs = str(_ffi.cuda_module().build_info().get("cuda_architectures", ""))
    return cc == (9, 0) and "90a" in archs.split(",")


def _dequant_abstract(qweight, scales, *, n_begin, rows):
    groups, n = scales.shape
    if qweight.dtype != jnp.uint8 or scales.dtype != jnp.uint8 or qweight.shape != (groups * 2, 16 * n):
        raise ValueError(f"marlin dequantize: qweight {qweight.shape} / scales {scales.shape} are not "
                         f"a packed Marlin weight")
    if n_begin % TILE or rows % TILE or not 0 <= n_begin <= n_begin + rows <= n:
        raise ValueError(f"marlin dequantize: columns [{n_begin}, {n_begin + rows}) are not whole "
                         f"64-column tiles of N={n}")
    return ShapedArray((rows, groups * 32), jnp.bfloat16)


def _dequant_reference(qweight, scales, *, n_begin, rows):
    values, s = _unpack_padded(qweight, scales)
    return reference.dequantize(values[n_begin:n_begin + rows], s[n_begin:n_begin + rows],
                                jnp.bfloat16)


def _dequant_batch(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [base.move_to_front(a, d, size) for a, d in zip(args, dims)]
    return jnp.stack([marlin_dequantize_p.bind(*(a[i] for a in moved), **params)
                      for i in range(size)]), 0


marlin_dequantize_p = base.define_primitive(
    "mxfp8_marlin_dequantize", abstract_eval=_dequant_abstract, reference=_dequant_reference,
    batcher=_dequant_batch, multiple_results=False,
    lowerings={"cuda": base.cuda_ffi_lowering(
        DEQUANT_TARGET, _dequant_reference, False,
        attrs=lambda n_begin, rows: {"n_begin": np.int32(n_begin)})})


def gemm(x, qweight, scales, flags, bias=None, *, m_blocks, warps_n, splits, out_dtype,
         cluster=False):
    """One Marlin kernel launch with an explicit tile configuration (tests and tuning).
    cluster=True reduces the K splits inside a thread-block cluster (SM90+ only)."""
    has_bias = bias is not None
    if bias is None:
        bias = jnp.zeros((0,), x.dtype)
    return marlin_gemm_p.bind(x, qweight, scales, flags, bias, m_blocks=int(m_blocks),
                              warps_n=int(warps_n), splits=int(splits), cluster=bool(cluster),
                              out_dtype=jnp.dtype(out_dtype), has_bias=has_bias)


def gemm_sm90(x, qweight, scales, flags, bias=None, *, block_m, consumers, out_dtype,
              blocks_per_sm=None, splits=1, cluster=False):
    """One launch of the sm_90a wgmma kernel with an explicit configuration (tests, tuning).
    splits > 1 divides K among that many blocks per output tile, whose partials are summed in
    split order through a workspace, or with cluster=True in a thread-block cluster."""
    config = wgmma_config(int(block_m), int(consumers), blocks_per_sm)
    has_bias = bias is not None
    if bias is None:
        bias = jnp.zeros((0,), x.dtype)
    return marlin_wgmma_p.bind(x, qweight, scales, flags, bias, block_m=config.block_m,
                               consumers=config.consumers, blocks_per_sm=config.blocks_per_sm,
                               splits=int(splits), cluster=bool(cluster) and splits > 1,
                               out_dtype=jnp.dtype(out_dtype), has_bias=has_bias)


def dequantize_packed(qweight, scales, n_begin: int = 0, rows: int | None = None):
    """Packed weight -> bf16 [rows, Kp]: weight rows (output columns) [n_begin, n_begin + rows),
    all Np by default, multiples of 64 (exact dequantize of numerics.md)."""
    rows = scales.shape[1] - n_begin if rows is None else rows
    return marlin_dequantize_p.bind(qweight, scales, n_begin=int(n_begin), rows=int(rows))


# ---- per-M dispatch --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    kind: str            # "kernel" (mma.sync), "wgmma" (sm_90a) or "dequant_dot"
    m_blocks: int = 0
    warps_n: int = 0
    splits: int = 1
    cluster: bool = False  # K splits reduced in a thread-block cluster (SM90+)
    block_m: int = 0       # wgmma: x rows per block
    consumers: int = 0     # wgmma: consumer warpgroups (64 weight rows each) per block
    blocks_per_sm: int = 0  # wgmma: which compiled occupancy of (block_m, consumers)


# Largest bf16 M that runs the mma.sync kernel where the wgmma kernel cannot (GPUs other than
# sm_90a); above it "dequantize + cuBLAS bf16" wins on every measured shape (H100 sweeps in
# RESULTS.md: at M = 1024 the best tile is 1.5-2.2x slower than dequant_dot; at M = 256 the
# kernel wins by 1.02-1.34x).
MAX_KERNEL_M = 256
M_BUCKETS = (16, 32, 64, 128, 256)

# Measured on an H100 SXM (132 SMs) by `tools/marlin_dev.py sweep` (profiler busy time, every
# compiled tile x K splits x reduction; RESULTS.md): the fastest (m_blocks, warps_n, splits,
# cluster) per (N, K) and M bucket, None = dequant_dot. Other shapes and GPUs use the rule in
# _rule_plan, which picks within 1.16x of these on the same sweeps.
H100_SMS = 132
H100_TABLE = {
    (4096, 4096): {16: (1, 1, 3, True), 32: (2, 1, 2, True), 64: (4, 1, 2, True),
                   128: (4, 2, 2, True), 256: (4, 2, 2, True)},
    (14336, 4096): {16: (1, 1, 1, False), 32: (2, 2, 2, True), 64: (4, 2, 2, True),
                    128: (4, 2, 1, False), 256: (4, 4, 1, False)},
    (8192, 8192): {16: (1, 2, 2, True), 32: (2, 1, 2, True), 64: (4, 1, 2, True),
                   128: (4, 2, 2, True), 256: (4, 2, 1, False)},
    (28672, 8192): {16: (1, 4, 1, False), 32: (2, 2, 1, False), 64: (4, 2, 1, False),
                    128: (4, 2, 2, True), 256: (4, 2, 1, False)},
}


# The same sweep on an H200 (132 SMs, faster memory): other winners at M <= 64 (RESULTS.md,
# 2026-11-30; 8192 x 8192 at M = 32 re-swept once the K-split sum was shared by the tile's
# blocks, sixth session); the 128 and 256 buckets (fp16 x on the mma.sync kernel) keep the H100's.
H200_TABLE = {
    shape: {**row, **small} for (shape, row), small in zip(H100_TABLE.items(), (
        {16: (1, 1, 4, False), 32: (2, 2, 8, True), 64: (4, 1, 2, True)},     # 4096 x 4096
        {16: (1, 4, 4, True), 32: (2, 4, 4, True), 64: (4, 2, 2, True)},      # 14336 x 4096
        {16: (1, 2, 4, False), 32: (2, 2, 4, False), 64: (4, 1, 2, True)},    # 8192 x 8192
        {16: (1, 4, 2, True), 32: (2, 4, 2, True), 64: (4, 2, 1, False)}))}  # 28672 x 8192


def _device_kind() -> str:
    try:
        return str(jax.devices()[0].device_kind)
    except Exception:  # noqa: BLE001 - no devices while tracing for another platform
        return ""


def measured_table(sms: int, device_kind: str) -> dict | None:
    """The sweep table for this GPU (a 132-SM H100 or H200), None elsewhere."""
    if sms != H100_SMS:
        return None
    return H200_TABLE if "H200" in device_kind else H100_TABLE


def _sm_count() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or H100_SMS
    except Exception:  # noqa: BLE001 - no devices while tracing for another platform
        return H100_SMS


def _rule_plan(m: int, n: int, k: int, sms: int, clusters: bool) -> Plan:
    """Tile by M bucket (16 x 64 up to 16 rows, 16 x 256 when N alone gives ~a wave of blocks;
    32 x 64 and 64 x 64 up to 64 rows where N gives at most two blocks per SM, else 32 x 128
    and 64 x 128; 64 x 128 above), then the largest power-of-two K split that keeps the grid
    within ~two blocks per SM and >= 16 pipeline stages (1024 of K) per split; two splits
    reduce in a cluster where the GPU has them (faster than the workspace there; more splits
    were not). Above 128 rows: no split."""
    narrow = n // 64 <= 2 * sms  # 64-column tiles still give <= two blocks per SM
    if m <= 16:
        tile = Tile(1, 4) if n % 256 == 0 and n // 256 >= 0.75 * sms else Tile(1, 1)
    elif m <= 32:
        tile = Tile(2, 1) if narrow else Tile(2, 2)
    elif m <= 64:
        tile = Tile(4, 1) if narrow else Tile(4, 2)
    else:
        tile = Tile(4, 2)
    if n % (64 * tile.warps_n):  # N is only a multiple of 64: the 16 x 64 tile fits every N
        tile = Tile(1, 1)
    tiles = (n // (64 * tile.warps_n)) * -(-m // (16 * tile.m_blocks))
    splits = 1
    while (m <= 128 and tiles * splits * 2 <= 2 * sms and (k // TILE) // (splits * 2) >= 16):
        splits *= 2
    return Plan("kernel", tile.m_blocks, tile.warps_n, splits, splits == 2 and clusters)


# bf16 x on an sm_90a GPU (H100/H200): the wgmma kernel replaces dequantize + cuBLAS at every
# M and the mma.sync kernel above WGMMA_MIN_M rows. H200 sweeps (RESULTS.md, 2026-11-30 fourth
# and fifth sessions): from 33 rows the 64-row configurations with four (or two) consumer
# warpgroups per SM, K-split where N gives too few tiles, beat the mma.sync kernel on every
# swept shape (1.1-1.5x at M = 64); at M <= 32 the mma.sync kernel is as fast or faster.
WGMMA_MIN_M = 32
# A K split keeps at least this many 64-deep stages: shorter ones spend more of their time
# filling the pipeline and summing partials than streaming the weight. (12 while the tile's
# last block summed alone; with the sum shared by the tile's blocks, 8 stages won at 4096 x
# 4096: RESULTS.md, sixth session.)
WGMMA_MIN_SPLIT_STAGES = 8


def _wgmma_splits(tiles: int, k: int, slots: int) -> tuple[int, bool]:
    """(splits, cluster) for `tiles` output tiles and `slots` resident blocks: the most K splits
    whose blocks all fit at once (<= 8, >= WGMMA_MIN_SPLIT_STAGES stages each); summed in a
    cluster when its blocks are easy to place (pairs, or under 3/4 of the slots: a cluster needs
    all its blocks in one GPC, and larger ones left blocks waiting for a second wave on the
    H200), else through the workspace."""
    most = max(1, min(MAX_CLUSTER_SPLITS, k // TILE // WGMMA_MIN_SPLIT_STAGES))
    splits = 1
    while splits < most and tiles * (splits + 1) <= slots:
        splits += 1
    return splits, splits > 1 and (splits == 2 or tiles * splits <= 0.75 * slots)


def _wgmma_plan(m: int, n: int, k: int, sms: int) -> Plan:
    """Up to 128 rows: the largest block N allows (x rows x weight rows; the one with more x
    rows on a tie: four consumer warpgroups at M <= 64 read x once per 256 weight rows, 128 x
    128 above), then K splits where its tiles leave SMs idle. Above: the largest block that
    still gives ~one block per SM (larger blocks dequantize each weight tile for more rows of
    x), else the smallest, the most parallel. Blocks wider than M (rounded to 64) only add zero
    rows. `python tools/check_wgmma_rule.py` compares this with a sweep."""
    fits = [c for c in WGMMA_CONFIGS
            if n % (64 * c.consumers) == 0 and c.block_m <= max(64, _round_up(m, 64))]
    fits.sort(key=lambda c: (-c.block_m * c.consumers, -c.block_m, c.blocks_per_sm))
    if m <= 128:
        c = fits[0]
    else:
        c = next((c for c in fits if (n // (64 * c.consumers)) * -(-m // c.block_m) >= 0.8 * sms),
                 fits[-1])
    tiles = (n // (64 * c.consumers)) * -(-m // c.block_m)
    # K splits were swept up to M = 128 only; above it the unsplit plan is the measured one.
    splits, cluster = _wgmma_splits(tiles, k, sms * c.blocks_per_sm) if m <= 128 else (1, False)
    return Plan("wgmma", splits=splits, cluster=cluster, block_m=c.block_m,
                consumers=c.consumers, blocks_per_sm=c.blocks_per_sm)


def choose_plan(m: int, n: int, k: int, x_dtype, sms: int | None = None,
                clusters: bool | None = None, wgmma: bool | None = None,
                device_kind: str | None = None) -> Plan:
    """The path for a [m, k] x [n, k]^T problem (n, k already padded to 64), chosen at trace
    time from static shapes.

    fp32 x: dequantize + fp32 dot (the reference math). fp16 x: always the mma.sync kernel
    (the reference runs an fp32 GEMM for fp16, far slower than the kernel's two bf16 mma).
    bf16 x: on an sm_90a GPU the wgmma kernel above WGMMA_MIN_M rows; otherwise the mma.sync
    kernel up to MAX_KERNEL_M rows, dequantize + bf16 cuBLAS above; the tile and K
    split come from the H100 or H200 table for their shapes, else from _rule_plan.
    """
    x_dtype = jnp.dtype(x_dtype)
    sms = sms or _sm_count()
    if x_dtype == jnp.bfloat16 and m > WGMMA_MIN_M:  # the wgmma kernel wins (sweeps above)
        if device_has_wgmma() if wgmma is None else wgmma:
            return _wgmma_plan(m, n, k, sms)
    if x_dtype not in KERNEL_DTYPES or (x_dtype == jnp.bfloat16 and m > MAX_KERNEL_M):
        return Plan("dequant_dot")
    clusters = device_has_clusters() if clusters is None else clusters
    bucket = next((b for b in M_BUCKETS if m <= b), None)
    table = measured_table(sms, _device_kind() if device_kind is None else device_kind)
    if table and clusters and bucket and (n, k) in table:
        entry = table[(n, k)][bucket]
        if entry is None:
            if x_dtype == jnp.bfloat16:
                return Plan("dequant_dot")
        else:
            return Plan("kernel", *entry)
    return _rule_plan(m, n, k, sms, clusters)


# Above MAX_KERNEL_M (dequantize + cuBLAS), up to DEQUANT_SLICE_MAX_M rows, a weight whose bf16
# form exceeds DEQUANT_WHOLE_BYTES is dequantized in column slices of at most
# DEQUANT_SLICE_BYTES, each followed by its own GEMM, so one slice of dequantized weight exists
# at a time instead of the whole (H100: 28672 x 8192 at M = 1024 takes 120 MiB of temp instead
# of 560, 1.01-1.02x the emulation path's speed). Smaller weights, and M = 4096, go whole:
# slicing them measured 0.3-3% slower than the emulation path (the output concatenation and
# the smaller GEMMs), which linear must not be; they materialize the bf16 weight as it does.
DEQUANT_WHOLE_BYTES = 256 << 20
DEQUANT_SLICE_BYTES = 64 << 20
DEQUANT_SLICE_MAX_M = 2048


def dequant_slices(n: int, k: int, m: int = 0, slice_bytes: int = DEQUANT_SLICE_BYTES,
                   whole_bytes: int = DEQUANT_WHOLE_BYTES) -> list[tuple[int, int]]:
    """(n_begin, rows) column slices of whole 64-column tiles, near-equal, each <= slice_bytes
    of bf16 (one 64-column tile at least); one slice when the whole is <= whole_bytes or m is
    above DEQUANT_SLICE_MAX_M."""
    tiles = n // TILE
    whole = n * k * 2 <= whole_bytes or m > DEQUANT_SLICE_MAX_M
    count = 1 if whole else min(tiles, -(-(n * k * 2) // slice_bytes))
    bounds = [TILE * (tiles * i // count) for i in range(count + 1)]
    return [(b, e - b) for b, e in zip(bounds, bounds[1:])]


def _dequant_dot(x, weight_arrays, bias, out_dtype, slices=None):
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
        y = _dequant_dot(x, a, bias, out_dtype)
    return y[:, :n] if n_pad != n else y


def _array_axes(meta, shape):
    """Sharding (sharding.py): qweight and scales are 64-tile-major along K (rows) and N
    (columns), so whole-tile chunks are the packed shards; flags go whole to every shard."""
    n, k = shape
    if n % TILE or k % TILE:  # padded tiles: only whole weights
        return {"qweight": (None, None), "scales": (None, None), "flags": (None,)}
    return {"qweight": ("k", "n"), "scales": ("k", "n"), "flags": (None,)}


def _shard_meta(meta, shape):
    return (META_TAG, _round_up(shape[0], TILE), _round_up(shape[1], TILE))


register_backend(BackendImpl(
    backend=Backend.MARLIN, min_compute_capability=(8, 0),
    required_targets=(GEMM_TARGET, DEQUANT_TARGET), default_quantize_activations=False,
    supports_w8a16=True, supports_w8a8=False, prepare=_prepare, unprepare=_unprepare,
    linear=_linear, array_axes=_array_axes, n_tile=TILE, k_tile=TILE, shard_meta=_shard_meta))
