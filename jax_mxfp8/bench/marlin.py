"""The Marlin kernels on a GPU: correctness smoke runs, sanitizer inputs, sweeps and tables.

  python -m jax_mxfp8.bench.marlin smoke            # every tile config vs float64 on small shapes
  python -m jax_mxfp8.bench.marlin sanitize         # tiny shapes, run under compute-sanitizer
  python -m jax_mxfp8.bench.marlin sweep  [--out D]  # tile x split candidates per (shape, M)
  python -m jax_mxfp8.bench.marlin sweep90 [--out D] # the sm_90a wgmma kernel's configs + peers
  python -m jax_mxfp8.bench.marlin table  [--out D] # linear(MARLIN) vs bf16 / emulation / scaled_matmul
  python -m jax_mxfp8.bench.marlin extras [--out D] # prepare time, memory analysis
  python -m jax_mxfp8.bench.marlin timeline --n N --k K --ms M..  # GPU activity of one unrolled jit
  python -m jax_mxfp8.bench.marlin calibrate [--shapes NxK..] [--ms M..] [--out D]  # every
                                                    # candidate plan per cell: the planner's data
  python -m jax_mxfp8.bench.marlin backward [--shapes NxK..] [--ms M..]  # dx = dy @ W vs bf16

Timing: jax_mxfp8.timing (profiler busy time by default, --metric rdiff for the R-difference).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

import jax_mxfp8 as mx
from jax_mxfp8 import reference, timing
from jax_mxfp8.backends import marlin
from jax_mxfp8.backends.marlin import planner

SHAPES = [(4096, 4096), (14336, 4096), (8192, 8192), (28672, 8192)]
MS = [1, 16, 32, 64, 128, 256, 1024, 4096]


def log(*a):
    print(*a, flush=True)


# ---- correctness smoke -----------------------------------------------------------------------

def _rel(got, want):
    got = np.asarray(got, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def smoke(args) -> int:
    rng = np.random.default_rng(0)
    bad = 0
    for n, k in [(64, 64), (256, 512), (512, 1536)]:
        w = rng.standard_normal((n, k)) * np.exp2(rng.integers(-3, 4, (n, 1)))
        values, scales = reference.quantize(jnp.asarray(w, jnp.float32))
        arrays, _ = marlin.pack_weight(values, scales)
        w64 = np.asarray(reference.dequantize(values, scales, jnp.float32), np.float64)
        for xt in (jnp.bfloat16, jnp.float16):
            for m in (1, 5, 17, 70):
                x = jnp.asarray(rng.standard_normal((m, k)), xt)
                want = np.asarray(x, np.float64) @ w64.T
                for tile in marlin.TILE_CONFIGS:
                    if n % (64 * tile.warps_n):
                        continue
                    for splits in (1, 3):
                        y = marlin.gemm(x, arrays["qweight"], arrays["scales"], arrays["flags"],
                                        m_blocks=tile.m_blocks, warps_n=tile.warps_n, splits=splits,
                                        out_dtype=jnp.float32)
                        err = _rel(y, want)
                        if not err < 1e-4:
                            bad += 1
                            log(f"FAIL n={n} k={k} m={m} x={jnp.dtype(xt).name} {tile} "
                                f"splits={splits}: rel err {err:.3e}")
        got = np.asarray(marlin.dequantize_packed(arrays["qweight"], arrays["scales"]), np.float32)
        ref = np.asarray(reference.dequantize(values, scales, jnp.bfloat16), np.float32)
        if not np.array_equal(got, ref):
            bad += 1
            log(f"FAIL dequantize n={n} k={k}: {np.sum(got != ref)} mismatches")
    log("smoke:", "OK" if bad == 0 else f"{bad} failures")
    return 1 if bad else 0


def probe(args) -> int:
    """One kernel call (own process: a device fault is sticky) vs float64."""
    rng = np.random.default_rng(3)
    n, k, m = args.n, args.k, args.m
    w = rng.standard_normal((n, k))
    values, scales = reference.quantize(jnp.asarray(w, jnp.float32))
    arrays, _ = marlin.pack_weight(values, scales)
    w64 = np.asarray(reference.dequantize(values, scales, jnp.float32), np.float64)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = marlin.gemm(x, arrays["qweight"], arrays["scales"], arrays["flags"], m_blocks=args.tile[0],
                    warps_n=args.tile[1], splits=args.splits, out_dtype=jnp.float32)
    err = _rel(y, np.asarray(x, np.float64) @ w64.T)
    log(f"probe n={n} k={k} m={m} tile={tuple(args.tile)} splits={args.splits} "
        f"evict_first={os.environ.get('JAX_MXFP8_MARLIN_EVICT_FIRST', '0')}: rel err {err:.2e}")
    return 0 if err < 1e-4 else 1


def sanitize(args) -> int:
    """Small shapes through every tile (splits 1; 2 in a cluster and through the workspace; 10)
    and the dequantize kernel (whole and a column slice), for compute-sanitizer memcheck /
    racecheck."""
    rng = np.random.default_rng(1)
    n, k = 256, 640
    values = jnp.asarray(rng.integers(0, 256, (n, k), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn))
    scales = jnp.asarray(rng.integers(100, 140, (n, k // 32), dtype=np.uint8))
    arrays, _ = marlin.pack_weight(values, scales)
    count = 0
    for xt in () if args.wgmma_only else (jnp.bfloat16,) if args.bf16_only else (jnp.bfloat16, jnp.float16):
        for m in args.ms or (3, 33):
            x = jnp.asarray(rng.standard_normal((m, k)), xt)
            bias = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
            for tile in marlin.TILE_CONFIGS:
                if args.tiles and f"{tile.m_blocks}{tile.warps_n}" not in args.tiles:
                    continue
                for splits, cluster in ((1, False), (2, True), (2, False), (10, False)):
                    marlin.gemm(x, arrays["qweight"], arrays["scales"], arrays["flags"], bias,
                                m_blocks=tile.m_blocks, warps_n=tile.warps_n, splits=splits,
                                cluster=cluster, out_dtype=jnp.bfloat16).block_until_ready()
                    count += 1
    if args.wgmma and marlin.device_has_wgmma():
        bias = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
        for m in args.ms or (3, 33):
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            for cfg in marlin.WGMMA_CONFIGS:
                for splits, cluster in ((1, False), (3, True), (3, False)):  # K splits: both sums
                    marlin.gemm_sm90(x, arrays["qweight"], arrays["scales"], arrays["flags"], bias,
                                     block_m=cfg.block_m, consumers=cfg.consumers,
                                     blocks_per_sm=cfg.blocks_per_sm, splits=splits,
                                     cluster=cluster, out_dtype=jnp.bfloat16).block_until_ready()
                    count += 1
    if not args.wgmma_only:
        count += _sanitize_grouped(rng, values, scales, args)
    marlin.dequantize_packed(arrays["qweight"], arrays["scales"]).block_until_ready()
    marlin.dequantize_packed(arrays["qweight"], arrays["scales"], 64, 128).block_until_ready()
    log("sanitize: ran", count + 2, "kernels")
    return 0


def _sanitize_grouped(rng, values, scales, args) -> int:
    """The grouped kernels over 3 stacked experts, with an empty expert, rows past the groups'
    sum (the zero tail) and each expert's rows not a multiple of the tile: every mma.sync tile
    and K-split variant, every wgmma configuration (sm_90a)."""
    packed = [marlin.pack_weight(jnp.roll(values, e, axis=0), jnp.roll(scales, e, axis=0))[0]
              for e in range(3)]
    stacked = {name: jnp.stack([p[name] for p in packed]) for name in packed[0]}
    bias = jnp.asarray(rng.standard_normal((3, values.shape[0])), jnp.bfloat16)
    count = 0
    for m in args.ms or (3, 33):
        t = 2 * m + 5
        x = jnp.asarray(rng.standard_normal((t, values.shape[1])), jnp.bfloat16)
        sizes = jnp.asarray([m, 0, m + 1], jnp.int32)  # 4 rows past the sum
        for tile in marlin.TILE_CONFIGS:
            if args.tiles and f"{tile.m_blocks}{tile.warps_n}" not in args.tiles:
                continue
            for splits, cluster in ((1, False), (2, True), (2, False)):
                marlin.grouped_gemm(x, stacked["qweight"], stacked["scales"], stacked["flags"],
                                    sizes, bias, m_blocks=tile.m_blocks, warps_n=tile.warps_n,
                                    splits=splits, cluster=cluster,
                                    out_dtype=jnp.bfloat16).block_until_ready()
                count += 1
        if marlin.device_has_grouped_wgmma():
            for cfg in marlin.WGMMA_CONFIGS:
                marlin.grouped_gemm_sm90(x, stacked["qweight"], stacked["scales"],
                                         stacked["flags"], sizes, bias, block_m=cfg.block_m,
                                         consumers=cfg.consumers,
                                         blocks_per_sm=cfg.blocks_per_sm,
                                         out_dtype=jnp.bfloat16).block_until_ready()
                count += 1
    return count


# ---- timing ----------------------------------------------------------------------------------

def packed_sets(n, k, sets, general=False):
    """R random packed weights made directly on the device (fast path unless general)."""
    out = []
    for i in range(sets):
        key = jax.random.key(100 + i)
        k1, k2 = jax.random.split(key)
        codes = jax.random.bits(k1, (n, k), jnp.uint8) & jnp.uint8(0xF7)  # no NaN codes
        q = marlin.pack_values(codes)
        s = jax.random.randint(k2, (k // 32, n), 118, 128, jnp.int32).astype(jnp.uint8)
        out.append({"qweight": q, "scales": s, "flags": jnp.full((1,), int(general), jnp.int32)})
    return out


def copy_bandwidth(nsets, repeats) -> float:
    bps = timing.copy_bandwidth(sets=nsets, repeats=repeats, profile=False)
    return bps[0] if isinstance(bps, tuple) else bps


def time_fn(fn, sets, repeats, metric="rdiff"):
    """us per call: "rdiff" = the harness's R-difference; "busy" = profiler GPU busy time (sum
    of kernel and memset durations), free of the host time the R-difference also carries."""
    try:
        if metric == "busy":
            return timing.profiled_us(fn, sets, runs=2) or float("nan")
        return timing.device_time_us(fn, sets, repeats)
    except Exception as err:  # noqa: BLE001
        log("   error:", type(err).__name__, str(err).splitlines()[0][:160])
        return float("nan")


def candidates(m, n, k):
    """(Tile, splits, cluster) worth timing at this M."""
    T = marlin.Tile
    if m <= 16:
        opts = [(T(1, 1), (1, 2, 3, 4, 8)), (T(1, 2), (1, 2, 4)), (T(1, 4), (1, 2, 4))]
    elif m <= 32:
        opts = [(T(2, 2), (1, 2, 4, 8)), (T(2, 4), (1, 2, 4)), (T(2, 1), (1, 2, 4)), (T(1, 1), (2, 4))]
    elif m <= 64:
        opts = [(T(4, 2), (1, 2, 3, 4, 8)), (T(4, 4), (1, 2, 4)), (T(4, 1), (1, 2, 4)), (T(2, 4), (1, 2))]
    else:
        opts = [(T(4, 4), (1, 2, 4)), (T(4, 2), (1, 2, 4)), (T(2, 4), (1,))]
    return [(t, s, c) for t, ss in opts if n % (64 * t.warps_n) == 0 for s in ss
            for c in ((False, True) if 1 < s <= marlin.MAX_CLUSTER_SPLITS else (False,))]


def _name(tile, splits, cluster=False):
    return f"t{tile.m_blocks}{tile.warps_n}x{splits}{'c' if cluster else ''}"


def plan_name(plan):
    if plan.kind == "dequant_dot":
        return "dequant_dot"
    if plan.kind == "wgmma":
        return wgmma_name(marlin.wgmma_config(plan.block_m, plan.consumers, plan.blocks_per_sm),
                          plan.splits, plan.cluster)
    return _name(marlin.Tile(plan.m_blocks, plan.warps_n), plan.splits, plan.cluster)


def wgmma_name(cfg, splits=1, cluster=False):
    """w{block_m}x{consumers}, o{blocks_per_sm} where it is not the default occupancy of that
    block, s{splits}[c] (K splits, summed in a cluster)."""
    default = marlin.wgmma_config(cfg.block_m, cfg.consumers).blocks_per_sm
    occupancy = f"o{cfg.blocks_per_sm}" if cfg.blocks_per_sm != default else ""
    split = f"s{splits}{'c' if cluster else ''}" if splits > 1 else ""
    return f"w{cfg.block_m}x{cfg.consumers}{occupancy}{split}"


def sweep(args) -> int:
    repeats, nsets = 5, 8
    copy = copy_bandwidth(nsets, repeats)
    log(f"copy bandwidth {copy / 1e12:.3f} TB/s (R-difference); metric {args.metric}")
    if args.metric == "busy":  # floors from the profiler's copy bandwidth, like for like
        copy = timing.copy_bandwidth(sets=nsets, repeats=repeats, profile=True)[1] or copy
        log(f"copy bandwidth {copy / 1e12:.3f} TB/s (profiler busy time)")
    rows = []
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes]
    ms = args.ms or [1, 16, 32, 64, 128, 256, 1024]
    for n, k in shapes:
        wsets = packed_sets(n, k, nsets)
        floor = n * k * (1 + 1 / 32) / copy * 1e6
        for m in ms:
            xs = [jax.random.normal(jax.random.key(7 + i), (m, k), jnp.bfloat16) for i in range(nsets)]
            sets = [(x, w) for x, w in zip(xs, wsets)]
            res, configs = {}, {}
            for tile, s, c in candidates(m, n, k):
                if args.only and _name(tile, s, c) not in args.only:
                    continue
                configs[_name(tile, s, c)] = (tile.m_blocks, tile.warps_n, s, c)

                def f(x, w, tile=tile, s=s, c=c):
                    return marlin.gemm(x, w["qweight"], w["scales"], w["flags"], m_blocks=tile.m_blocks,
                                       warps_n=tile.warps_n, splits=s, cluster=c, out_dtype=jnp.bfloat16)
                res[_name(tile, s, c)] = time_fn(f, sets, repeats, args.metric)
            if m > 64:  # dequantize + cuBLAS cannot win while the weight read dominates
                res["dequant_dot"] = time_fn(
                    lambda x, w: marlin.dequant_dot(x, w, None, jnp.bfloat16), sets, repeats,
                    args.metric)
            plan = marlin.choose_plan(m, n, k, jnp.bfloat16)
            best = min(((v, key) for key, v in res.items() if v == v), default=(float("nan"), "-"))
            log(f"{n}x{k} M={m:5d} floor {floor:7.1f}  best {best[1]:12s} {best[0]:8.1f} us  "
                f"plan={plan}  " + " ".join(f"{key}={v:.1f}" for key, v in res.items()))
            rows.append({"n": n, "k": k, "m": m, "floor_us": floor, **res})
        if args.general:
            sets = [(jax.random.normal(jax.random.key(7), (16, k), jnp.bfloat16), w)
                    for w in packed_sets(n, k, nsets, general=True)]
            plan = marlin.choose_plan(16, n, k, jnp.bfloat16)
            t = time_fn(lambda x, w: marlin.gemm(x, w["qweight"], w["scales"], w["flags"],
                                                 m_blocks=plan.m_blocks, warps_n=plan.warps_n,
                                                 splits=plan.splits, cluster=plan.cluster,
                                                 out_dtype=jnp.bfloat16),
                        sets, repeats, args.metric)
            log(f"{n}x{k} M=16 general-path {plan} {t:.1f} us")
        del wsets
        gc.collect()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "marlin_sweep.json"), "w") as fh:
            json.dump({"copy_bps": copy, "rows": rows}, fh, indent=1)
    return 0


def backward(args) -> int:
    """linear's backward product dx = dy @ W (the VJP of linear with respect to x; the forward
    is dead code in the timed jit) on MARLIN weights (dequantize kernel + bf16 GEMM) against
    bf16 jnp.dot's backward, by busy time, same run."""
    repeats, nsets = 5, 4
    copy = timing.copy_bandwidth(sets=nsets, repeats=repeats, profile=True)[1]
    log(f"copy bandwidth {copy / 1e12:.3f} TB/s (busy)")
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes]
    rows = []
    log("| M | N x K | MARLIN dx us | bf16 dx us | MARLIN / bf16 | weight-read floor us |")
    log("| ---: | --- | ---: | ---: | ---: | ---: |")
    for n, k in shapes:
        wsets = packed_sets(n, k, nsets)
        weights = [mx.MxWeight(w, (n, k), mx.Backend.MARLIN, marlin.layout_meta(n, k)) for w in wsets]
        dense = [jax.random.normal(jax.random.key(50 + i), (n, k), jnp.bfloat16) for i in range(nsets)]
        for m in args.ms or [16, 256, 2048]:
            xs = [jax.random.normal(jax.random.key(7 + i), (m, k), jnp.bfloat16) for i in range(nsets)]
            cts = [jax.random.normal(jax.random.key(90 + i), (m, n), jnp.bfloat16) for i in range(nsets)]

            def ours(x, w, ct):
                return jax.vjp(lambda x: mx.linear(x, w), x)[1](ct)[0]

            def bf16(x, w, ct):
                return jax.vjp(lambda x: jnp.dot(x, w.T, preferred_element_type=jnp.float32)
                               .astype(jnp.bfloat16), x)[1](ct)[0]
            t_ours = time_fn(ours, list(zip(xs, weights, cts)), repeats, "busy")
            t_bf16 = time_fn(bf16, list(zip(xs, dense, cts)), repeats, "busy")
            floor = n * k * (1 + 1 / 32) / copy * 1e6
            rows.append({"n": n, "k": k, "m": m, "marlin_us": t_ours, "bf16_us": t_bf16,
                         "floor_us": floor})
            log(f"| {m} | {n}x{k} | {t_ours:.1f} | {t_bf16:.1f} | {t_ours / t_bf16:.2f} | {floor:.1f} |")
        del wsets, weights, dense
        gc.collect()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "marlin_backward.json"), "w") as fh:
            json.dump({"copy_bps": copy, "rows": rows}, fh, indent=1)
    return 0


def sweep90(args) -> int:
    """The sm_90a wgmma kernel: every compiled config per (shape, M) by busy time, next to the
    mma.sync plan, dequantize + cuBLAS, bf16 jnp.dot and the emulation path (same run)."""
    repeats, nsets = 5, 4
    copy = timing.copy_bandwidth(sets=nsets, repeats=repeats, profile=True)[1]
    log(f"copy bandwidth {copy / 1e12:.3f} TB/s (profiler busy time)")
    rows = []
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes]
    for n, k in shapes:
        wsets = packed_sets(n, k, nsets)
        vsets = [marlin.unpack_padded(w["qweight"], w["scales"]) for w in wsets]
        vsets = [(v, s_, reference.dequantize(v, s_, jnp.bfloat16)) for v, s_ in vsets]  # + bf16 W
        floor = n * k * (1 + 1 / 32) / copy * 1e6
        for m in args.ms or [64, 128, 256, 512, 1024, 2048, 4096]:
            xs = [jax.random.normal(jax.random.key(7 + i), (m, k), jnp.bfloat16) for i in range(nsets)]
            sets = [(x, w, v) for x, w, v in zip(xs, wsets, vsets)]
            res = {}
            for cfg in marlin.WGMMA_CONFIGS:  # blocks wider than M only add zero rows
                if n % (64 * cfg.consumers) or cfg.block_m > max(64, -(-m // 64) * 64):
                    continue
                for splits in args.wgmma_splits:
                    for cluster in (False, True) if splits > 1 else (False,):
                        if splits > k // 64 or (cluster and splits > marlin.MAX_CLUSTER_SPLITS):
                            continue
                        res[wgmma_name(cfg, splits, cluster)] = time_fn(
                            lambda x, w, v, cfg=cfg, splits=splits, cluster=cluster: marlin.gemm_sm90(
                                x, w["qweight"], w["scales"], w["flags"], block_m=cfg.block_m,
                                consumers=cfg.consumers, blocks_per_sm=cfg.blocks_per_sm,
                                splits=splits, cluster=cluster, out_dtype=jnp.bfloat16),
                            sets, repeats, "busy")
            old = marlin.choose_plan(m, n, k, jnp.bfloat16, wgmma=False)
            if old.kind == "kernel":
                res["mma:" + plan_name(old)] = time_fn(
                    lambda x, w, v: marlin.gemm(x, w["qweight"], w["scales"], w["flags"],
                                                m_blocks=old.m_blocks, warps_n=old.warps_n,
                                                splits=old.splits, cluster=old.cluster,
                                                out_dtype=jnp.bfloat16), sets, repeats, "busy")
            if not args.few_peers:
                res["dequant_dot"] = time_fn(lambda x, w, v: marlin.dequant_dot(x, w, None, jnp.bfloat16),
                                             sets, repeats, "busy")
                res["emulation"] = time_fn(lambda x, w, v: reference.linear(x, v[0], v[1]), sets,
                                           repeats, "busy")
            res["bf16"] = time_fn(lambda x, w, v: jnp.dot(x, v[2].T, preferred_element_type=jnp.bfloat16),
                                  sets, repeats, "busy")
            ours = {key: v for key, v in res.items() if key.startswith("w") and v == v}
            best = min(ours.items(), key=lambda kv: kv[1], default=("-", float("nan")))
            tf = 2 * m * n * k / (best[1] * 1e-6) / 1e12 if best[1] == best[1] else float("nan")
            log(f"{n}x{k} M={m:5d} floor {floor:6.1f} best {best[0]} {best[1]:8.1f} us ({tf:4.0f} TFLOP/s) "
                f"plan={plan_name(marlin.choose_plan(m, n, k, jnp.bfloat16))} "
                + " ".join(f"{key}={v:.1f}" for key, v in res.items()))
            rows.append({"n": n, "k": k, "m": m, "floor_us": floor, **res})
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "wgmma_sweep.json"), "w") as fh:
                    json.dump({"copy_bps": copy, "rows": rows}, fh, indent=1)
        del wsets, vsets
        gc.collect()
    return 0


def table(args) -> int:
    """The Marlin table: linear(MARLIN) and peers, same run, each timed two ways (the harness's
    R-difference, and profiler GPU busy time); floors from this run's copy bandwidth by the
    same two methods."""
    repeats, nsets = 5, 8
    copy, copy_busy = timing.copy_bandwidth(sets=nsets, repeats=repeats, profile=True)
    copy_busy = copy_busy or copy
    log(f"copy bandwidth {copy / 1e12:.3f} TB/s (R-difference), {copy_busy / 1e12:.3f} TB/s (busy)")
    rows = []
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes]
    ms = args.ms or MS
    names = ["marlin", "bf16", "emulation"] + ([] if args.no_scaled_matmul else ["scaled_matmul"])
    log("| M | N x K | metric | MARLIN us | floor us | x floor | " +
        " | ".join(f"{nm} us (MARLIN speedup)" for nm in names[1:]) + " | plan |")
    for n, k in shapes:
        base = []
        for i in range(nsets):
            kw = jax.random.key(200 + i)
            w = jax.random.normal(kw, (n, k), jnp.bfloat16) * 0.05
            values, scales = reference.quantize(w, "ceil")
            base.append((w, values, scales, mx.prepare_weight(values, scales, backend="marlin")))
        nbytes = n * k * (1 + 1 / 32)
        floors = {"busy": nbytes / copy_busy * 1e6, "rdiff": nbytes / copy * 1e6}
        for m in ms:
            sets = []
            for i, (w, values, scales, prepared) in enumerate(base):
                x = jax.random.normal(jax.random.key(300 + i), (m, k), jnp.bfloat16)
                sets.append((x, w, values, scales, prepared))
            impls = {
                "marlin": lambda x, w, v, s, p: mx.linear(x, p),
                "bf16": lambda x, w, v, s, p: jnp.dot(x, w.T, preferred_element_type=jnp.bfloat16),
                "emulation": lambda x, w, v, s, p: reference.linear(x, v, s),
            }
            if not args.no_scaled_matmul:
                def scaled_matmul(x, w, v, s, p):
                    xv, xs = reference.quantize(x, "ceil")
                    e8 = lambda a: jax.lax.bitcast_convert_type(a, jnp.float8_e8m0fnu)[None]  # noqa: E731
                    return jax.nn.scaled_matmul(xv[None], v[None], e8(xs), e8(s),
                                                preferred_element_type=jnp.bfloat16)[0]
                impls["scaled_matmul"] = scaled_matmul
            plan = marlin.choose_plan(m, n, k, jnp.bfloat16)
            pname = plan_name(plan)
            row = {"n": n, "k": k, "m": m, "plan": pname}
            for metric in ("busy", "rdiff"):
                t = {name: time_fn(fn, sets, repeats, metric) for name, fn in impls.items()}
                row[metric] = t
                row[f"floor_{metric}_us"] = floors[metric]
                log(f"| {m} | {n}x{k} | {metric} | {t['marlin']:.1f} | {floors[metric]:.1f} | "
                    f"{t['marlin'] / floors[metric]:.2f} | "
                    + " | ".join(f"{t[nm]:.1f} ({t[nm] / t['marlin']:.2f}x)" for nm in names[1:])
                    + f" | {pname} |")
            rows.append(row)
            if args.out:  # after every row: a time-boxed run keeps what it measured
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "marlin_bench.json"), "w") as fh:
                    json.dump({"copy_bps_rdiff": copy, "copy_bps_busy": copy_busy, "rows": rows},
                              fh, indent=1)
        del base
        gc.collect()
    if args.out:
        plot(rows, os.path.join(args.out, "marlin_roofline.png"))
    return 0


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no matplotlib: skipping the plot")
        return
    shapes = sorted({(r["n"], r["k"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes):
        rs = sorted((r for r in rows if (r["n"], r["k"]) == (n, k)), key=lambda r: r["m"])
        ms = [r["m"] for r in rs]
        for name in ("marlin", "bf16", "emulation", "scaled_matmul"):
            if name in rs[0]["busy"]:
                ax.plot(ms, [r["busy"][name] for r in rs], marker="o", label=name)
        ax.plot(ms, [r["floor_busy_us"] for r in rs], "k--", label="weight-read floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"N x K = {n} x {k}")
        ax.set_xlabel("M")
        ax.set_ylabel("GPU busy us per call (profiler)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log("plot:", path)


def slices(args) -> int:
    """Large-M path: dequantize + GEMM in column slices of at most S bytes of bf16 (S = whole
    weight, 256, 128, 64, 32 MiB) against the emulation path and bf16, busy time, and each
    program's compiled temp memory."""
    repeats, nsets = 5, 4
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes]
    for n, k in shapes:
        wsets = packed_sets(n, k, nsets)
        vsets = [(lax.bitcast_convert_type(jax.random.bits(jax.random.key(50 + i), (n, k), jnp.uint8)
                                           & jnp.uint8(0xF7), jnp.float8_e4m3fn),
                  jax.random.randint(jax.random.key(60 + i), (n, k // 32), 118, 128, jnp.int32).astype(jnp.uint8))
                 for i in range(nsets)]
        for m in args.ms or [512, 1024, 4096]:
            xs = [jax.random.normal(jax.random.key(7 + i), (m, k), jnp.bfloat16) for i in range(nsets)]
            sets = [(x, w, v) for x, w, v in zip(xs, wsets, vsets)]
            impls = {"emulation": lambda x, w, v: reference.linear(x, *v),
                     "bf16": lambda x, w, v: jnp.dot(x, v[0].astype(jnp.bfloat16).T,
                                                     preferred_element_type=jnp.bfloat16)}
            for mib in (1 << 30, 256, 128, 64, 32):
                sl = marlin.dequant_slices(n, k, 0, mib << 20, whole_bytes=0)
                impls[f"slice{mib if mib < 1 << 30 else 'all'}"] = (
                    lambda x, w, v, sl=sl: marlin.dequant_dot(x, w, None, jnp.bfloat16, sl))
            out = []
            for name, fn in impls.items():
                t = time_fn(fn, sets, repeats, "busy")
                mem = jax.jit(fn).lower(*sets[0]).compile().memory_analysis()
                out.append(f"{name}={t:.1f}us/{mem.temp_size_in_bytes / 2**20:.0f}MiB")
            log(f"slices {n}x{k} M={m}: " + " ".join(out))
        del wsets, vsets
        gc.collect()
    return 0


def extras(args) -> int:
    """prepare_weight time for 28672 x 8192 and compiled memory of linear vs emulation."""
    n, k = 28672, 8192
    w = jax.random.normal(jax.random.key(0), (n, k), jnp.bfloat16) * 0.05
    values, scales = reference.quantize(w, "ceil")
    jax.block_until_ready((values, scales))
    del w
    prepared = mx.prepare_weight(values, scales, backend="marlin")  # compiles the packer
    jax.block_until_ready(prepared.arrays)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        p = mx.prepare_weight(values, scales, backend="marlin")
        jax.block_until_ready(p.arrays)
        times.append(time.perf_counter() - t0)
        del p
    log(f"prepare_weight {n}x{k}: {min(times) * 1e3:.1f} ms (best of 3, compiled); "
        f"{prepared.nbytes / (n * k):.4f} bytes/param")
    t0 = time.perf_counter()
    vals, sc = prepared.unpack()
    jax.block_until_ready((vals, sc))
    log(f"unpack: {(time.perf_counter() - t0) * 1e3:.1f} ms, identity:",
        bool(jnp.array_equal(jax.lax.bitcast_convert_type(vals, jnp.uint8),
                             jax.lax.bitcast_convert_type(values, jnp.uint8)) and jnp.array_equal(sc, scales)))
    del vals, sc
    for m in (16, 64, 256, 1024, 4096):
        x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
        for name, fn, wargs in (("marlin", lambda x, p: mx.linear(x, p), (prepared,)),
                                ("emulation", lambda x, v, s: reference.linear(x, v, s), (values, scales))):
            mem = jax.jit(fn).lower(x, *wargs).compile().memory_analysis()
            log(f"memory M={m} {name:9s}: temp {mem.temp_size_in_bytes / 2**20:8.1f} MiB, "
                f"args {mem.argument_size_in_bytes / 2**20:8.1f} MiB, out {mem.output_size_in_bytes / 2**20:6.1f} MiB")
    return 0


def timeline(args) -> int:
    """Where the time of one unrolled jit goes: every GPU activity (start offset, duration) of
    R = 8 sets, for bf16 jnp.dot and linear(MARLIN), so the R-difference can be read against
    the kernels' own durations (gaps between kernels = host or runtime cost)."""
    import glob
    import tempfile
    n, k = args.n, args.k
    nsets = 8
    for m in args.ms or [1, 16]:
        sets = []
        for i in range(nsets):
            w = jax.random.normal(jax.random.key(400 + i), (n, k), jnp.bfloat16) * 0.05
            v, s = reference.quantize(w, "ceil")
            x = jax.random.normal(jax.random.key(500 + i), (m, k), jnp.bfloat16)
            sets.append((x, w, mx.prepare_weight(v, s, backend="marlin")))
        for name, fn in (("bf16", lambda x, w, p: jnp.dot(x, w.T, preferred_element_type=jnp.bfloat16)),
                         ("marlin", lambda x, w, p: mx.linear(x, p))):
            rdiff = timing.device_time_us(fn, sets, 5)
            unrolled = jax.jit(lambda sets, fn=fn: [fn(*a) for a in sets])
            jax.block_until_ready(unrolled(sets))
            with tempfile.TemporaryDirectory() as tmp:
                jax.profiler.start_trace(tmp)
                jax.block_until_ready(unrolled(sets))
                jax.profiler.stop_trace()
                path = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)[0]
                data = jax.profiler.ProfileData.from_file(path)
            events = []
            for plane in data.planes:
                if plane.name.startswith("/device:GPU"):
                    for line in plane.lines:
                        if line.name.startswith("Stream"):
                            events += [(e.start_ns, e.duration_ns, e.name) for e in line.events]
            events.sort()
            if not events:
                log(f"{name} M={m}: no GPU events")
                continue
            t0 = events[0][0]
            busy = sum(e[1] for e in events) / 1e3
            span = (events[-1][0] + events[-1][1] - t0) / 1e3
            log(f"== {name} M={m} {n}x{k}: R-diff {rdiff:.1f} us/call; profiler busy {busy / nsets:.1f} "
                f"us/call, span {span / nsets:.1f} us/call, {len(events)} events")
            for st, dur, nm in events[:24]:
                log(f"   +{(st - t0) / 1e3:9.1f} us  {dur / 1e3:8.1f} us  {nm[:90]}")
    return 0


CALIBRATION_SHAPES = ["1024x4096", "4096x14336", "512x3584", "8192x28672", "4096x4096",
                      "3584x18944", "6144x4096", "28672x4096", "10240x8192"]


def calibrate(args) -> int:
    """Every candidate plan (planner.candidates, thin unless --full) per (shape, M) with bf16
    jnp.dot and the emulation path, all from one profiler trace per cell (busy time): the data
    the planner's cost model is fitted to. Stops starting new shapes after --budget-s."""
    start = time.time()
    nsets = 4
    rdiff, copy = timing.copy_bandwidth(sets=nsets, repeats=5, profile=True)
    copy = copy or rdiff  # no profiler activity (a CPU run): the R-difference
    log(f"copy bandwidth {copy / 1e12:.3f} TB/s (profiler busy time)")
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    rows = []
    for shape in args.shapes or CALIBRATION_SHAPES:
        if time.time() - start > args.budget_s:
            log(f"budget of {args.budget_s} s spent: {shape} and later shapes skipped")
            break
        n, k = map(int, shape.split("x"))
        wsets = packed_sets(n, k, nsets)
        vsets = [marlin.unpack_padded(w["qweight"], w["scales"]) for w in wsets]
        dense = [reference.dequantize(v, s_, jnp.bfloat16) for v, s_ in vsets]
        for m in args.ms or [1, 16, 32, 64, 256, 1024]:
            xs = [jax.random.normal(jax.random.key(7 + i), (m, k), jnp.bfloat16) for i in range(nsets)]
            plans = planner.candidates(m, n, k, sms, marlin.device_has_clusters(),
                                       marlin.device_has_wgmma(), thin=not args.full)
            plans.append(marlin.choose_plan(m, n, k, jnp.bfloat16, tune=False))  # the rule's
            cases = {planner.plan_name(p): (lambda x, w, v, d, p=p: planner.run_plan(
                p, x, w["qweight"], w["scales"], w["flags"]),
                                            list(zip(xs, wsets, vsets, dense))) for p in plans}
            cases["bf16"] = (lambda x, w, v, d: jnp.dot(x, d.T, preferred_element_type=jnp.bfloat16),
                             list(zip(xs, wsets, vsets, dense)))
            cases["emulation"] = (lambda x, w, v, d: reference.linear(x, v[0], v[1]),
                                  list(zip(xs, wsets, vsets, dense)))
            res = timing.profiled_many(cases)
            chosen = planner.plan_name(plans[-1])
            ours = {key: v for key, v in res.items() if key not in ("bf16", "emulation") and v}
            best = min(ours.items(), key=lambda kv: kv[1], default=("-", float("nan")))
            floor = (n * k * (1 + 1 / 32) + 2 * m * k + 2 * m * n) / copy * 1e6
            log(f"{n}x{k} M={m:5d} floor {floor:6.1f} bf16 {res['bf16'] or float('nan'):7.1f} "
                f"emu {res['emulation'] or float('nan'):7.1f} best {best[0]} {best[1]:7.1f} "
                f"chosen {chosen} {res.get(chosen) or float('nan'):7.1f}  ({time.time() - start:.0f} s)")
            rows.append({"n": n, "k": k, "m": m, "sms": sms, "floor_us": floor, "chosen": chosen,
                         "times": res})
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "calibration.json"), "w") as fh:
                    json.dump({"copy_bps": copy, "device": jax.devices()[0].device_kind,
                               "rows": rows}, fh, indent=1)
        del wsets, vsets, dense
        gc.collect()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["smoke", "probe", "sanitize", "sweep", "sweep90", "table", "extras",
                                    "timeline", "slices", "backward", "calibrate"])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--k", type=int, default=1536)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--tile", type=int, nargs=2, default=[1, 1])
    ap.add_argument("--splits", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--shapes", nargs="*")
    ap.add_argument("--ms", nargs="*", type=int)
    ap.add_argument("--general", action="store_true")
    ap.add_argument("--metric", choices=["busy", "rdiff"], default="busy")
    ap.add_argument("--only", nargs="*", help="sweep only these candidates (names as printed)")
    ap.add_argument("--bf16-only", action="store_true")
    ap.add_argument("--tiles", nargs="*", help="sanitize only these tiles (e.g. 41 22)")
    ap.add_argument("--no-scaled-matmul", action="store_true")
    ap.add_argument("--wgmma", action="store_true", help="sanitize: the wgmma kernel's configs too")
    ap.add_argument("--wgmma-only", action="store_true", help="sanitize: only the wgmma kernel")
    ap.add_argument("--wgmma-splits", type=int, nargs="*", default=[1],
                    help="sweep90: K splits to time for every wgmma configuration")
    ap.add_argument("--budget-s", type=float, default=420, help="calibrate: stop starting shapes after")
    ap.add_argument("--full", action="store_true", help="calibrate: every candidate, not the thin set")
    ap.add_argument("--few-peers", action="store_true", help="sweep90: only bf16 and mma.sync")
    args = ap.parse_args(argv)
    # as the harness does: no command buffers (their host re-record cost grows with R)
    if ("xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", "")
            and not os.environ.get("MXFP8_KEEP_CMDBUF")):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    log("devices:", jax.devices(), "core_count:", getattr(jax.devices()[0], "core_count", None))
    return {"smoke": smoke, "probe": probe, "sanitize": sanitize, "sweep": sweep, "sweep90": sweep90,
            "table": table, "backward": backward, "calibrate": calibrate,
            "extras": extras, "timeline": timeline, "slices": slices}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
