"""Which kernel and configuration a [M, K] x [N, K]^T problem runs, chosen at trace time.

A general rule, from the GPU's SM count and the problem's tiles, stages and rows (no table of
shapes): fp32 x runs dequantize + fp32 dot (the reference math); fp16 x the mma.sync kernel;
bf16 x the mma.sync kernel up to WGMMA_MIN_M rows, the wgmma kernel above on sm_90a GPUs
(elsewhere the mma.sync kernel up to MAX_KERNEL_M rows, dequantize + cuBLAS above), and
dequantize + cuBLAS where a large M meets a weight too small to give the wgmma kernel's
blocks a wave. `python -m jax_mxfp8.bench.marlin calibrate` times every candidate plan
(`candidates`) per shape; the rules below are what its H200 data supports (docs/performance.md
has the fit). With JAX_MXFP8_AUTOTUNE=1, autotune.py measures the candidates once per shape
class and GPU and its winner replaces the rule's plan (results stay within the tolerance of
docs/numerics.md: plans differ only in the order fp32 partial sums are added).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jax_mxfp8 import reference
from jax_mxfp8._devices import device_kind as _device_kind
from jax_mxfp8._devices import sm_count
from jax_mxfp8.backends.marlin import autotune, kernels
from jax_mxfp8.backends.marlin.kernels import (
    KERNEL_DTYPES, TILE_CONFIGS, WGMMA_CONFIGS, Tile, device_has_clusters, device_has_grouped_wgmma,
    device_has_wgmma)
from jax_mxfp8.backends.marlin.layout import TILE, pack_values
from jax_mxfp8.backends.marlin.layout import round_up as _round_up

# Largest bf16 M that runs the mma.sync kernel where the wgmma kernel cannot (GPUs other than
# sm_90a); above it "dequantize + cuBLAS bf16" wins on every measured shape (H100 sweeps: at
# M = 1024 the best tile is 1.5-2.2x slower than dequant_dot; at M = 256 the kernel wins by
# 1.02-1.34x).
MAX_KERNEL_M = 256
DEFAULT_SMS = 132  # assumed while tracing without a GPU (an H100 / H200)
# bf16 x on an sm_90a GPU: the wgmma kernel above this many rows (at M <= 32 the mma.sync
# kernel is as fast or faster, H200 calibration).
WGMMA_MIN_M = 32
# A K split keeps at least this many 64-deep stages: shorter splits spend more of their time
# filling the pipeline and summing partials than streaming the weight. The mma.sync kernel's
# small blocks fill in ~6 stages; the wgmma kernel's 64- and 128-row blocks in 8; its 256-row
# blocks carry four times the fp32 partials of a 64-row one and need 32.
MMA_MIN_SPLIT_STAGES = 6
WGMMA_MIN_SPLIT_STAGES = 8
WGMMA_256_MIN_SPLIT_STAGES = 32
MAX_MMA_SPLITS = 16
MAX_WGMMA_SPLITS = 8


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


def _powers_of_two(most: int):
    s = 1
    while s <= most:
        yield s
        s *= 2


def _mma_plan(m: int, n: int, k: int, sms: int, clusters: bool, experts: int = 0) -> Plan:
    """The memory-bound regime: the weight streams once, so the plan is about keeping enough
    blocks in flight. Rows: 16 x m_blocks covering M (4 above 32 rows). Width: the widest tile
    (fewer, longer x reads per weight byte) whose tiles times the most K splits still reach
    ~0.9 of a block per SM, else 64 columns. K splits: the smallest power of two that gives
    ~1.4 blocks per SM (<= MAX_MMA_SPLITS, >= MMA_MIN_SPLIT_STAGES stages each; none above
    128 rows, where the tiles alone fill the GPU). Two splits, or splits of <= 16 stages,
    reduce in a cluster where the GPU has them (their reduction is a larger share of a short
    split; long splits of 4-8 blocks were faster through the workspace, their clusters harder
    to place). experts > 0: a grouped launch of m rows spread over that many experts, planned
    for the rows an expert that has tokens gets on average (m / min(experts, m))."""
    active = min(experts, m) if experts else 1
    rows = -(-m // active)
    mb = 1 if rows <= 16 else 2 if rows <= 32 else 4
    stages = k // TILE
    most = 1 if rows > 128 else max(1, min(MAX_MMA_SPLITS, stages // MMA_MIN_SPLIT_STAGES))
    for wn in (4, 2, 1):
        tiles = n // (64 * wn) * -(-rows // (16 * mb)) * active
        if n % (64 * wn) == 0 and (tiles * most >= 0.9 * sms or wn == 1):
            break
    splits = 1
    while splits * 2 <= most and tiles * splits < 1.4 * sms:
        splits *= 2
    cluster = clusters and 1 < splits <= 8 and (splits == 2 or stages / splits <= 16)
    return Plan("kernel", mb, wn, splits, cluster)


# Above 128 rows the wgmma kernel is compute-bound: the relative throughput of each block
# shape with every SM busy (H200 calibration at M = 1024, w256x2 = 1; the dequantization of
# each weight tile is shared by the block's rows, so larger blocks do more per weight byte).
WGMMA_BLOCK_EFFICIENCY = {(256, 2): 1.0, (128, 2): 0.75, (128, 1): 0.68, (64, 4): 0.6,
                          (64, 2): 0.42, (64, 1): 0.41}
WGMMA_SPLIT_COST = 0.1  # per K split above one: partial tiles stored and summed


def _wgmma_large_m(m: int, n: int, k: int, sms: int) -> Plan:
    """Above 128 rows: the candidate (block, power-of-two K splits within the stage minimums
    and one wave, none above 512 rows) of least modelled time, waves x one block's work / its efficiency
    (WGMMA_BLOCK_EFFICIENCY) x (1 + WGMMA_SPLIT_COST per split): large blocks unless they
    leave most SMs idle, K splits only where tiles are few. Two splits sum in a cluster, more
    through the workspace (4- and 8-block clusters of these blocks were up to 1.5x slower)."""
    stages = k // TILE
    best = None
    for c in WGMMA_CONFIGS:
        if n % (64 * c.consumers) or c.block_m > _round_up(m, 64):
            continue
        tiles = n // (64 * c.consumers) * -(-m // c.block_m)
        minimum = WGMMA_256_MIN_SPLIT_STAGES if c.block_m == 256 else WGMMA_MIN_SPLIT_STAGES
        most = 1 if m > 512 else max(1, min(MAX_WGMMA_SPLITS, stages // minimum))
        for s in _powers_of_two(most):
            if s > 1 and tiles * s > sms * c.blocks_per_sm:
                break  # splits only fill idle SMs: past one wave they only add reduction work
            waves = -(-tiles * s // (sms * c.blocks_per_sm))
            cost = (waves * c.block_m * c.consumers * (k / s) * c.blocks_per_sm
                    / WGMMA_BLOCK_EFFICIENCY[(c.block_m, c.consumers)]
                    * (1 + WGMMA_SPLIT_COST * s * (s > 1)))
            if best is None or cost < best[0]:
                best = (cost, c, s)
    _, c, s = best
    return Plan("wgmma", splits=s, cluster=s == 2, block_m=c.block_m, consumers=c.consumers,
                blocks_per_sm=c.blocks_per_sm)


def _wgmma_plan(m: int, n: int, k: int, sms: int) -> Plan:
    """Up to 128 rows, the memory-bound regime: candidates are every compiled block that M
    needs (no block wider than M rounded to 64) with any K split count that keeps one wave of
    blocks (<= MAX_WGMMA_SPLITS, >= WGMMA_MIN_SPLIT_STAGES stages each). Each has a
    utilization, its blocks over the resident-block slots (1 when the tiles alone fill a
    wave); among those within 0.8 of the best, the largest block (it reads x once for the most
    weight rows), then the most splits. Splits sum in a cluster for pairs or under 3/4 of the
    slots (a cluster needs all its blocks in one GPC), else through the workspace. Above 128
    rows: _wgmma_large_m. `python tools/check_wgmma_rule.py` compares this with a sweep."""
    if m > 128:
        return _wgmma_large_m(m, n, k, sms)
    stages = k // TILE
    cands = []
    for c in WGMMA_CONFIGS:
        if n % (64 * c.consumers) or c.block_m > max(64, _round_up(m, 64)):
            continue
        tiles = n // (64 * c.consumers) * -(-m // c.block_m)
        slots = sms * c.blocks_per_sm
        most = max(1, min(MAX_WGMMA_SPLITS, stages // WGMMA_MIN_SPLIT_STAGES))
        for s in range(1, most + 1):
            if s > 1 and tiles * s > slots:
                break
            cands.append((min(1.0, tiles * s / slots), c, s, tiles))
    best = max(u for u, *_ in cands)
    _, c, s, tiles = min((x for x in cands if x[0] >= 0.8 * best),
                         key=lambda x: (-x[1].block_m * x[1].consumers, -x[1].block_m,
                                        x[1].blocks_per_sm, -x[2]))
    cluster = s > 1 and (s == 2 or tiles * s <= 0.75 * sms * c.blocks_per_sm)
    return Plan("wgmma", splits=s, cluster=cluster, block_m=c.block_m, consumers=c.consumers,
                blocks_per_sm=c.blocks_per_sm)


def _dequant_dot_wins(m: int, n: int) -> bool:
    """From 1024 rows the wgmma kernel is compute-bound; where even its largest block (256 x
    128) gives under half a wave of tiles, dequantizing the (small) weight for cuBLAS wins
    (H200: 512 x 3584 and 1024 x 4096 at M = 1024)."""
    return m >= 1024 and (n // 128) * -(-m // 256) < 0.5 * DEFAULT_SMS


def _wgmma_grouped_plan(rows: int, active: int, n: int, k: int, sms: int) -> Plan:
    """The grouped wgmma launch: `active` experts of ~`rows` rows each. Every block is one
    expert's chunk of block_m rows (a partial chunk costs a whole block), one K range each.
    The block of least modelled time, as _wgmma_large_m: waves x one block's work / its
    efficiency."""
    best = None
    for c in WGMMA_CONFIGS:
        if n % (64 * c.consumers) or c.block_m > _round_up(rows, 64):
            continue
        tiles = n // (64 * c.consumers) * -(-rows // c.block_m) * active
        waves = -(-tiles // (sms * c.blocks_per_sm))
        cost = (waves * c.block_m * c.consumers * k * c.blocks_per_sm
                / WGMMA_BLOCK_EFFICIENCY[(c.block_m, c.consumers)])
        if best is None or cost < best[0]:
            best = (cost, c)
    c = best[1]
    return Plan("wgmma", block_m=c.block_m, consumers=c.consumers, blocks_per_sm=c.blocks_per_sm)


def ragged_plan(t: int, experts: int, n: int, k: int, x_dtype, sms: int | None = None,
                clusters: bool | None = None, wgmma: bool | None = None) -> Plan:
    """A grouped launch of t rows over `experts` stacked weights, planned for the rows an
    expert that has tokens gets on average (t / min(experts, t)): the mma.sync grouped kernel
    up to WGMMA_MIN_M of them (memory-bound: the experts' weights stream once), the wgmma one
    above on sm_90a GPUs with bf16 x (compute-bound: its blocks share each dequantized weight
    tile among up to 256 rows); fp32 x: dequantize + the grouped dot."""
    x_dtype = jnp.dtype(x_dtype)
    if x_dtype not in KERNEL_DTYPES:
        return Plan("dequant_dot")
    sms = sms or sm_count(DEFAULT_SMS)
    clusters = device_has_clusters() if clusters is None else clusters
    wgmma = device_has_grouped_wgmma() if wgmma is None else wgmma
    t = max(t, 1)
    active = min(experts, t)
    rows = -(-t // active)
    if wgmma and x_dtype == jnp.bfloat16 and rows > WGMMA_MIN_M:
        return _wgmma_grouped_plan(rows, active, n, k, sms)
    return _mma_plan(t, n, k, sms, clusters, experts=experts)


def rule_plan(m: int, n: int, k: int, x_dtype, sms: int, clusters: bool, wgmma: bool) -> Plan:
    """The rule's plan for a [m, k] x [n, k]^T problem (n, k padded to 64)."""
    x_dtype = jnp.dtype(x_dtype)
    if x_dtype not in KERNEL_DTYPES:
        return Plan("dequant_dot")
    if x_dtype == jnp.bfloat16 and m > WGMMA_MIN_M and wgmma:
        return Plan("dequant_dot") if _dequant_dot_wins(m, n) else _wgmma_plan(m, n, k, sms)
    if x_dtype == jnp.bfloat16 and m > MAX_KERNEL_M:
        return Plan("dequant_dot")
    return _mma_plan(m, n, k, sms, clusters)


def choose_plan(m: int, n: int, k: int, x_dtype, sms: int | None = None,
                clusters: bool | None = None, wgmma: bool | None = None,
                tune: bool | None = None) -> Plan:
    """The path for a [m, k] x [n, k]^T problem (n, k already padded to 64), chosen at trace
    time from static shapes: the autotuned winner where JAX_MXFP8_AUTOTUNE=1 (autotune.py),
    else rule_plan. sms / clusters / wgmma default to the default device's."""
    sms = sms or sm_count(DEFAULT_SMS)
    clusters = device_has_clusters() if clusters is None else clusters
    wgmma = device_has_wgmma() if wgmma is None else wgmma
    plan = rule_plan(m, n, k, x_dtype, sms, clusters, wgmma)
    if jnp.dtype(x_dtype) in KERNEL_DTYPES and (autotune.enabled() if tune is None else tune):
        return tuned_plan(m, n, k, x_dtype, sms, clusters, wgmma, plan)
    return plan


def tuned_plan(m, n, k, x_dtype, sms, clusters, wgmma, rule: Plan) -> Plan:
    """The cached winner of this shape class, measured now if there is none: the candidates
    (thin set) and the rule's plan, on random packed weights and x of the class's M."""
    x_dtype = jnp.dtype(x_dtype)
    bucket = autotune.m_bucket(m)
    key = f"{_device_kind()}|sms{sms}|{x_dtype.name}|{n}x{k}|m{bucket}"
    entry = autotune.lookup(key)
    if entry is None:
        plans = {plan_name(p): p for p in candidates(bucket, n, k, sms, clusters, wgmma, thin=True)
                 if x_dtype == jnp.bfloat16 or p.kind == "kernel"}
        plans.setdefault(plan_name(rule), rule)
        sets = []
        for i in range(3):
            k1, k2, k3 = jax.random.split(jax.random.key(i), 3)
            codes = jax.random.bits(k1, (n, k), jnp.uint8) & jnp.uint8(0xF7)  # no NaN codes
            scales = jax.random.randint(k2, (k // 32, n), 118, 128, jnp.int32).astype(jnp.uint8)
            sets.append((jax.random.normal(k3, (bucket, k), x_dtype), pack_values(codes), scales,
                         jnp.zeros((1,), jnp.int32)))
        cases = {name: (functools.partial(run_plan, p), sets) for name, p in plans.items()}
        winner = autotune.fastest(key, cases)
        entry = dataclasses.asdict(plans[winner])
        autotune.store(key, entry)
    return Plan(**entry)


def run_plan(plan: Plan, x, qweight, scales, flags, bias=None, out_dtype=jnp.bfloat16):
    """One launch of `plan` on a packed weight (the benchmarks' and the autotuner's runner)."""
    if plan.kind == "kernel":
        return kernels.gemm(x, qweight, scales, flags, bias, m_blocks=plan.m_blocks,
                            warps_n=plan.warps_n, splits=plan.splits, cluster=plan.cluster,
                            out_dtype=out_dtype)
    if plan.kind == "wgmma":
        return kernels.gemm_sm90(x, qweight, scales, flags, bias, block_m=plan.block_m,
                                 consumers=plan.consumers, blocks_per_sm=plan.blocks_per_sm,
                                 splits=plan.splits, cluster=plan.cluster, out_dtype=out_dtype)
    w = kernels.dequantize_packed(qweight, scales).astype(reference.dot_dtype(x.dtype))
    return reference.dot_with_bias(x.astype(w.dtype), w, bias, out_dtype)


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


# ---- candidate plans (the sweeps' and the autotuner's search space) --------------------------

CANDIDATE_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
CANDIDATE_MIN_STAGES = 2  # K stages per split below which a split only adds reduction work


def candidates(m: int, n: int, k: int, sms: int, clusters: bool, wgmma: bool,
               thin: bool = False) -> list[Plan]:
    """Every plan worth timing for a bf16 [m, k] x [n, k]^T problem: the mma.sync tiles of
    M's row count (one smaller where M is between) and the wgmma configurations above
    WGMMA_MIN_M rows, each with the K splits that keep >= CANDIDATE_MIN_STAGES stages per
    split and at most ~four waves of blocks, reduced in a cluster (<= 8 splits, SM90+) or the
    workspace; dequantize + cuBLAS above 64 rows. thin: power-of-two splits, the narrowest and
    widest mma.sync tile only (a quicker sweep)."""
    stages = k // TILE
    out: list[Plan] = []

    def split_options(tiles: int, slots: int, most: int):
        seen = set()
        for s in CANDIDATE_SPLITS:
            if thin and s & (s - 1):
                continue
            if s > 1 and (s > most or stages // s < CANDIDATE_MIN_STAGES or tiles * s > 4 * slots):
                continue
            s_eff = -(-stages // -(-stages // s))  # the kernels' effective split count
            if s_eff not in seen:
                seen.add(s_eff)
                yield s_eff

    if m <= max(WGMMA_MIN_M, 0 if wgmma else MAX_KERNEL_M):
        mbs = sorted({min(4, -(-m // 16)), max(1, min(4, -(-m // 16)) // 2)})
        if thin:
            mbs = mbs[-1:]
        widest = max(w for w in (1, 2, 4) if n % (64 * w) == 0)
        for mb in (b for b in (1, 2, 4) if b in mbs or (mbs[-1] > 2 and b == 4)):
            for wn in (1, 2, 4):
                if n % (64 * wn) or Tile(mb, wn) not in TILE_CONFIGS:
                    continue
                if thin and wn not in (1, widest):
                    continue
                tiles = n // (64 * wn) * -(-m // (16 * mb))
                for s in split_options(tiles, 2 * sms, 64):
                    for cluster in ((False, True) if clusters and 1 < s <= 8 else (False,)):
                        out.append(Plan("kernel", mb, wn, s, cluster))
    if wgmma and m > WGMMA_MIN_M:
        for c in WGMMA_CONFIGS:
            if n % (64 * c.consumers) or c.block_m > max(64, _round_up(m, 64)):
                continue
            tiles = n // (64 * c.consumers) * -(-m // c.block_m)
            for s in split_options(tiles, c.blocks_per_sm * sms, 64):
                for cluster in ((False, True) if 1 < s <= 8 else (False,)):
                    out.append(Plan("wgmma", splits=s, cluster=cluster, block_m=c.block_m,
                                    consumers=c.consumers, blocks_per_sm=c.blocks_per_sm))
    if m > 64:
        out.append(Plan("dequant_dot"))
    return out


def plan_name(plan: Plan) -> str:
    """t{m_blocks}{warps_n}x{splits}[c] (mma.sync), w{block_m}x{consumers}[o{blocks_per_sm}]
    [s{splits}[c]] (wgmma), dequant_dot."""
    if plan.kind == "dequant_dot":
        return "dequant_dot"
    if plan.kind == "wgmma":
        from jax_mxfp8.backends.marlin.kernels import wgmma_config
        default = wgmma_config(plan.block_m, plan.consumers).blocks_per_sm
        occupancy = f"o{plan.blocks_per_sm}" if plan.blocks_per_sm != default else ""
        split = f"s{plan.splits}{'c' if plan.cluster else ''}" if plan.splits > 1 else ""
        return f"w{plan.block_m}x{plan.consumers}{occupancy}{split}"
    return f"t{plan.m_blocks}{plan.warps_n}x{plan.splits}{'c' if plan.cluster else ''}"
