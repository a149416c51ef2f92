"""Which kernel and configuration a [M, K] x [N, K]^T problem runs, chosen at trace time.

fp32 x: dequantize + fp32 dot (the reference math). fp16 x: always the mma.sync kernel. bf16 x:
the wgmma kernel above WGMMA_MIN_M rows on sm_90a GPUs; otherwise the mma.sync kernel up to
MAX_KERNEL_M rows and dequantize + bf16 cuBLAS above. Tile and K split of the mma.sync kernel
come from a sweep's tuning file (tuning/*.json, written by `python -m jax_mxfp8.bench.marlin
sweep --tuning-out FILE`, naming its GPU and date) where one matches the GPU and shape, else
from the rule in `_rule_plan`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax.numpy as jnp

from jax_mxfp8._devices import device_kind as _device_kind
from jax_mxfp8._devices import sm_count
from jax_mxfp8.backends.marlin.kernels import (
    KERNEL_DTYPES, WGMMA_CONFIGS, Tile, device_has_clusters, device_has_wgmma, max_cluster_splits)
from jax_mxfp8.backends.marlin.layout import TILE
from jax_mxfp8.backends.marlin.layout import round_up as _round_up

# Largest bf16 M that runs the mma.sync kernel where the wgmma kernel cannot (GPUs other than
# sm_90a); above it "dequantize + cuBLAS bf16" wins on every measured shape (H100 sweeps: at
# M = 1024 the best tile is 1.5-2.2x slower than dequant_dot; at M = 256 the
# kernel wins by 1.02-1.34x).
MAX_KERNEL_M = 256
M_BUCKETS = (16, 32, 64, 128, 256)
DEFAULT_SMS = 132  # assumed while tracing without a GPU (an H100 / H200)
TUNING_DIR = pathlib.Path(__file__).with_name("tuning")


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


@dataclasses.dataclass(frozen=True)
class TuningTable:
    """One sweep's winners: entries[(n, k)][m_bucket] = (m_blocks, warps_n, splits, cluster),
    or None where dequantize + cuBLAS won."""
    gpu: str
    device_kind_contains: str
    sms: int
    date: str
    entries: dict

    @classmethod
    def read(cls, path) -> "TuningTable":
        data = json.loads(pathlib.Path(path).read_text())
        entries: dict = {}
        for p in data["plans"]:
            row = entries.setdefault((p["n"], p["k"]), {})
            row[p["m_bucket"]] = (None if p["plan"] == "dequant_dot" else
                                  (p["m_blocks"], p["warps_n"], p["splits"], bool(p["cluster"])))
        return cls(data["gpu"], data["device_kind_contains"], int(data["sms"]), data["date"],
                   entries)


@functools.cache
def tuning_tables() -> tuple[TuningTable, ...]:
    return tuple(TuningTable.read(p) for p in sorted(TUNING_DIR.glob("*.json")))


def tuning_table(sms: int, device_kind: str) -> TuningTable | None:
    """The sweep of this GPU (same SM count and device kind), None where none was made."""
    return next((t for t in tuning_tables()
                 if t.sms == sms and t.device_kind_contains in device_kind), None)


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
# M and the mma.sync kernel above WGMMA_MIN_M rows. H200 sweeps (2026-11-30): from 33 rows
# the 64-row configurations with four (or two) consumer warpgroups per SM, K-split where N gives too few tiles, beat the mma.sync kernel on every
# swept shape (1.1-1.5x at M = 64); at M <= 32 the mma.sync kernel is as fast or faster.
WGMMA_MIN_M = 32
# A K split keeps at least this many 64-deep stages: shorter ones spend more of their time
# filling the pipeline and summing partials than streaming the weight. (12 while the tile's
# last block summed alone; with the sum shared by the tile's blocks, 8 stages won at 4096 x
# 4096 on the H200.)
WGMMA_MIN_SPLIT_STAGES = 8


def _wgmma_splits(tiles: int, k: int, slots: int) -> tuple[int, bool]:
    """(splits, cluster) for `tiles` output tiles and `slots` resident blocks: the most K splits
    whose blocks all fit at once (<= 8, >= WGMMA_MIN_SPLIT_STAGES stages each); summed in a
    cluster when its blocks are easy to place (pairs, or under 3/4 of the slots: a cluster needs
    all its blocks in one GPC, and larger ones left blocks waiting for a second wave on the
    H200), else through the workspace."""
    most = max(1, min(max_cluster_splits(), k // TILE // WGMMA_MIN_SPLIT_STAGES))
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
    split come from this GPU's tuning table for its shapes, else from _rule_plan.
    """
    x_dtype = jnp.dtype(x_dtype)
    sms = sms or sm_count(DEFAULT_SMS)
    if x_dtype == jnp.bfloat16 and m > WGMMA_MIN_M:  # the wgmma kernel wins (sweeps above)
        if device_has_wgmma() if wgmma is None else wgmma:
            return _wgmma_plan(m, n, k, sms)
    if x_dtype not in KERNEL_DTYPES or (x_dtype == jnp.bfloat16 and m > MAX_KERNEL_M):
        return Plan("dequant_dot")
    clusters = device_has_clusters() if clusters is None else clusters
    bucket = next((b for b in M_BUCKETS if m <= b), None)
    table = tuning_table(sms, _device_kind() if device_kind is None else device_kind)
    if table and clusters and bucket and (n, k) in table.entries:
        entry = table.entries[(n, k)][bucket]
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
