"""The shape zoo: every linear layer of real models, MXFP8 `linear` against its peers.

    python -m jax_mxfp8 bench --zoo [--models llama3-8b,...] [--m 1,2,...,8192]
        [--fused | --unfused] [--quick] [--out DIR]

Every distinct projection (N, K) of the models (q, k, v, o, gate, up, down; fused q/k/v and
gate/up), deduplicated across models, at each M. Per cell: GPU busy time (jax_mxfp8.timing's
profiler helpers; one trace per shape) of `linear` with the default backend, bf16 `jnp.dot` on
the bf16 weight, and the EMULATION backend, on the same data; the floor = the MXFP8 weight's
bytes (values + scales) + x and output bytes over the copy bandwidth of the run (busy time too).
Without a GPU the profiler sees no device activity and the times are the R-difference.
R distinct argument sets per cell: enough weights that they do not all fit in L2 at small M
(as in the op harness), fewer as x grows (large M is compute-bound).

The targets (checked per cell, summarized per M band): M <= 16 within max(1.25 x floor,
floor + 3 us); M <= 64 at least 1.3x bf16 where the MXFP8 weight is >= 16 MiB and never slower
than bf16; 128 <= M <= 512 at least 1.0x bf16; M >= 1024 at least 0.95x bf16; never slower than
EMULATION.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import time

import jax
import jax.numpy as jnp

import jax_mxfp8 as mx
from jax_mxfp8 import timing
from jax_mxfp8.backends import Backend, select_backend
from jax_mxfp8.backends.marlin import planner
from jax_mxfp8.bench.report import positive_ints, write_report
from jax_mxfp8.models import kv_decoder as kd
from jax_mxfp8.timing import MiB

ZOO_MODELS = ("llama3-8b", "llama3-70b", "qwen2.5-7b", "qwen3-32b", "mistral-7b")
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
QUICK_MS = (1, 16, 64, 256, 1024, 4096)
BANDS = (("M<=16", 1, 16), ("17-64", 17, 64), ("128-512", 128, 512), (">=1024", 1024, 1 << 62))
BIG_WEIGHT = 16 * MiB  # M <= 64: the 1.3x-bf16 target applies from this MXFP8 weight size


_ints = positive_ints


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in kd.MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown}; known: {', '.join(kd.MODELS)}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jax_mxfp8 bench --zoo", description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", action="store_true", required=True)
    p.add_argument("--models", type=_names, default=list(ZOO_MODELS),
                   help=f"comma-separated (default {','.join(ZOO_MODELS)}; 'tiny' for a smoke test)")
    p.add_argument("--m", type=_ints, default=None,
                   help=f"rows of x (default {','.join(map(str, MS))}; --quick: {','.join(map(str, QUICK_MS))})")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--fused", dest="layouts", action="store_const", const=["fused"],
                        help="only the fused q/k/v and gate/up shapes (plus o and down)")
    layout.add_argument("--unfused", dest="layouts", action="store_const", const=["unfused"],
                        help="only the separate projections (default: both)")
    p.add_argument("--backend", type=Backend.parse, default=None,
                   help="backend of the MXFP8 column (default: the device's fastest)")
    p.add_argument("--quick", action="store_true", help=f"M in {QUICK_MS}, fewer sets and runs")
    p.add_argument("--runs", type=int, default=None, help="profiled runs per cell (default 2, --quick 1)")
    p.add_argument("--max-sets", type=int, default=None,
                   help="most argument sets per cell (default 32, --quick 16)")
    p.add_argument("--copy-mib", type=int, default=512, help="size of the copy-bandwidth arrays")
    p.add_argument("--out", help="directory for zoo.json, zoo.md and zoo.png")
    return p


# ---- the shapes ---------------------------------------------------------------------------------

def zoo_shapes(models, layouts) -> dict[tuple[int, int], list[str]]:
    """(N, K) -> the layers that have it ("llama3-8b k", ...), largest weights first."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for name in models:
        config = kd.MODELS[name]
        for layout in layouts:
            for proj, nk in config.linears(layout == "fused").items():
                label = f"{name} {proj}"
                if label not in shapes.setdefault(nk, []):
                    shapes[nk].append(label)
    return dict(sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1]))


def weight_bytes(n: int, k: int) -> int:
    return n * k + n * k // 32  # e4m3 values + e8m0 scales


def sets_for(n: int, k: int, m: int, max_sets: int) -> int:
    """Argument sets of a cell: together >= 128 MiB of weight + x (over twice an H100's or
    H200's 50-60 MB of L2, so no call finds its inputs there), 2 at least. (Each set is one
    more GEMM in the profiled jit: compile time grows with them.)"""
    return int(min(max_sets, max(2, math.ceil(128 * MiB / (weight_bytes(n, k) + 2 * m * k)))))


def make_weights(n: int, k: int, count: int, backend: Backend, key):
    """count random weights: (bf16 [N, K], prepared for `backend`, prepared for EMULATION)."""
    out = []
    for i in range(count):
        w = (jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)
        values, scales = mx.quantize(w)
        ours = mx.prepare_weight(values, scales, backend=backend)
        emu = ours if backend == Backend.EMULATION else mx.prepare_weight(values, scales, backend=Backend.EMULATION)
        out.append(jax.block_until_ready((w, ours, emu)))
    return out


def plan_label(weight, m: int) -> str:
    """The Marlin planner's choice for this cell ("-" for other backends)."""
    if weight.backend != Backend.MARLIN:
        return "-"
    _, n_pad, k_pad = weight.meta
    return planner.plan_name(planner.choose_plan(m, n_pad, k_pad, jnp.bfloat16))


IMPLS = {
    "mxfp8": lambda x, w, ours, emu: mx.linear(x, ours),
    "bf16": lambda x, w, ours, emu: jnp.dot(x, w.T, preferred_element_type=jnp.bfloat16),
    "emulation": lambda x, w, ours, emu: mx.linear(x, emu),
}


def measure_shape(n, k, ms, backend, args, key) -> list[dict]:
    """Every M of one (N, K): one profiler trace for all cells and peers."""
    weights = make_weights(n, k, max(sets_for(n, k, m, args.max_sets) for m in ms), backend, key)
    impls = [name for name in IMPLS if not (name == "emulation" and backend == Backend.EMULATION)]
    cases = {}
    for m in ms:
        count = sets_for(n, k, m, args.max_sets)
        xs = [jax.random.normal(jax.random.fold_in(key, 1000 + 64 * m + i), (m, k), jnp.bfloat16)
              for i in range(count)]
        sets = [(x, *w) for x, w in zip(xs, weights)]
        for name in impls:
            cases[(m, name)] = (IMPLS[name], sets)
    busy = timing.profiled_many({f"{m}/{name}": case for (m, name), case in cases.items()}, runs=args.runs)
    times = {}
    for (m, name), (fn, sets) in cases.items():
        t = busy.get(f"{m}/{name}")
        if t is None:  # no device activity recorded (a CPU run): the R-difference
            try:
                t = timing.device_time_us(fn, sets, repeats=3)
            except Exception as err:  # noqa: BLE001  (a peer that cannot run this shape)
                print(f"  {n}x{k} M={m} {name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                t = None
        times[(m, name)] = t
    rows = []
    for m in ms:
        t = {name: times.get((m, name)) for name in IMPLS}
        if backend == Backend.EMULATION:
            t["emulation"] = t["mxfp8"]
        rows.append({"n": n, "k": k, "m": m, "sets": sets_for(n, k, m, args.max_sets),
                     "weight_bytes": weight_bytes(n, k), "mxfp8_us": t["mxfp8"], "bf16_us": t["bf16"],
                     "emulation_us": t["emulation"], "plan": plan_label(weights[0][1], m)})
    del weights, cases
    gc.collect()
    return rows


# ---- targets -------------------------------------------------------------------------------------

def annotate(row: dict, copy_bps: float) -> None:
    n, k, m = row["n"], row["k"], row["m"]
    row["bytes"] = weight_bytes(n, k) + 2 * m * k + 2 * m * n
    row["floor_us"] = row["bytes"] / copy_bps * 1e6
    t = row["mxfp8_us"]
    if not t:
        row["misses"] = ["no time"]
        return
    row["x_floor"] = t / row["floor_us"]
    row["vs_bf16"] = row["bf16_us"] / t if row["bf16_us"] else None
    row["vs_emulation"] = row["emulation_us"] / t if row["emulation_us"] else None
    row["misses"] = misses(row)


def misses(row: dict) -> list[str]:
    """The targets this cell misses."""
    m, t, floor = row["m"], row["mxfp8_us"], row["floor_us"]
    vs_bf16, vs_emu = row.get("vs_bf16"), row.get("vs_emulation")
    out = []
    if m <= 16 and t > max(1.25 * floor, floor + 3.0):
        out.append(f"> max(1.25x floor, floor + 3 us) = {max(1.25 * floor, floor + 3.0):.1f} us")
    if vs_bf16 is not None:
        if m <= 64 and row["weight_bytes"] >= BIG_WEIGHT and vs_bf16 < 1.3:
            out.append("< 1.3x bf16 (weight >= 16 MiB)")
        need = 1.0 if m <= 512 else 0.95
        if vs_bf16 < need:
            out.append(f"< {need:.2f}x bf16")
    if vs_emu is not None and vs_emu < 1.0:
        out.append("slower than emulation")
    return out


def band_of(m: int) -> str | None:
    return next((name for name, lo, hi in BANDS if lo <= m <= hi), None)


def summary(rows: list[dict]) -> list[dict]:
    """Per M band: cells, cells missing a target, and the worst cell by each measure."""
    out = []
    for name, lo, hi in BANDS:
        band = [r for r in rows if lo <= r["m"] <= hi and r.get("mxfp8_us")]
        if not band:
            continue

        def worst(field, pick):
            have = [r for r in band if r.get(field) is not None]
            return pick(have, key=lambda r: r[field]) if have else None
        # x floor only where the weight read is the bound (M <= 64); above, the GEMM is
        # compute-bound and bf16 is the bar
        out.append({"band": name, "cells": len(band), "missing": sum(1 for r in band if r["misses"]),
                    "worst_vs_bf16": worst("vs_bf16", min),
                    "worst_x_floor": worst("x_floor", max) if hi <= 64 else None,
                    "worst_vs_emulation": worst("vs_emulation", min)})
    return out


# ---- reporting ------------------------------------------------------------------------------------

def _shape(r) -> str:
    return f"{r['n']}x{r['k']}"


def _cell(r) -> str:
    return f"{_shape(r)} M={r['m']}"


def _f(value, fmt):
    return "" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    meta, rows = report["meta"], report["results"]
    out = [f"# jax_mxfp8 shape zoo ({meta['date']})", "",
           f"device: {meta['device']}; jax {meta['jax']}; MXFP8 = `linear` with backend "
           f"{meta['backend']}; models {', '.join(meta['models'])} ({', '.join(meta['layouts'])}); "
           f"{len(meta['shapes'])} distinct (N, K); times: {meta['timer']}; copy bandwidth "
           f"{meta['copy_tbps']:.3f} TB/s; {meta['runs']} profiled run(s) per cell; "
           f"{meta['elapsed_s']:.0f} s.", "",
           "floor = (MXFP8 weight + x + output bytes) / copy bandwidth; vs bf16 = bf16 time / MXFP8 "
           "time (> 1: MXFP8 faster); vs emulation likewise; x floor = MXFP8 time / floor (the "
           "bound up to M = 64; larger M is compute-bound).", "",
           "## Worst cell per M band", "",
           "| M band | cells | missing a target | worst vs bf16 | worst x floor | worst vs emulation |",
           "| --- | ---: | ---: | --- | --- | --- |"]
    for s in report["summary"]:
        def show(r, field, fmt):
            return "" if r is None else f"{r[field]:{fmt}}x ({_cell(r)}, {r['plan']})"
        out.append(f"| {s['band']} | {s['cells']} | {s['missing']} | {show(s['worst_vs_bf16'], 'vs_bf16', '.2f')} | "
                   f"{show(s['worst_x_floor'], 'x_floor', '.2f')} | "
                   f"{show(s['worst_vs_emulation'], 'vs_emulation', '.2f')} |")
    missed = [r for r in rows if r.get("misses")]
    out += ["", f"## Cells missing a target ({len(missed)} of {len(rows)})", ""]
    if missed:
        out += ["| cell | layers | MXFP8 us | floor us | bf16 us | plan | misses |",
                "| --- | --- | ---: | ---: | ---: | --- | --- |"]
        for r in missed:
            layers = meta["shapes"][_shape(r)]
            out.append(f"| {_cell(r)} | {layers[0]}{' +' if len(layers) > 1 else ''} | "
                       f"{_f(r['mxfp8_us'], '.1f')} | {r['floor_us']:.1f} | {_f(r['bf16_us'], '.1f')} | "
                       f"{r['plan']} | {'; '.join(r['misses'])} |")
    else:
        out.append("none")
    out += ["", "## Every cell", "",
            "| N x K | layers | M | MXFP8 us | floor us | x floor | bf16 us | vs bf16 | emulation us "
            "| vs emulation | plan |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        out.append(f"| {_shape(r)} | {', '.join(meta['shapes'][_shape(r)])} | {r['m']} | "
                   f"{_f(r['mxfp8_us'], '.1f')} | {r['floor_us']:.1f} | {_f(r.get('x_floor'), '.2f')} | "
                   f"{_f(r['bf16_us'], '.1f')} | {_f(r.get('vs_bf16'), '.2f')} | "
                   f"{_f(r['emulation_us'], '.1f')} | {_f(r.get('vs_emulation'), '.2f')} | {r['plan']} |")
    return "\n".join(out) + "\n"


def plot(report: dict, path: str) -> str | None:
    """MXFP8 speed-up over bf16 against M, one line per shape, with the targets."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install 'jax_mxfp8[plot]')"
    rows, meta = report["results"], report["meta"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    for shape in meta["shapes"]:
        pts = [r for r in rows if _shape(r) == shape and r.get("vs_bf16")]
        if pts:
            ax.plot([r["m"] for r in pts], [r["vs_bf16"] for r in pts], "o-", markersize=3, label=shape)
        pts = [r for r in rows if _shape(r) == shape and r.get("x_floor") and r["m"] <= 64]
        if pts:
            bx.plot([r["m"] for r in pts], [r["x_floor"] for r in pts], "o-", markersize=3, label=shape)
    for lo, hi, y in ((1, 64, 1.3), (1, 512, 1.0), (1024, 8192, 0.95)):
        ax.hlines(y, lo, hi, colors="k", linestyles="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M")
    ax.set_ylabel("bf16 time / MXFP8 time (dashed: targets)")
    ax.set_title(f"shape zoo, MXFP8 ({meta['backend']}) vs bf16 on {meta['device']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=5, ncol=2)
    bx.axhline(1.25, color="k", linestyle="--", linewidth=0.8)
    bx.set_xscale("log", base=2)
    bx.set_xlabel("M (<= 64)")
    bx.set_ylabel("MXFP8 time / floor")
    bx.set_title("against the weight-read floor")
    bx.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(report: dict, out_dir: str) -> None:
    write_report(report, out_dir, "zoo", markdown, plot)


def print_summary(report: dict) -> None:
    print("\nworst cell per M band (vs bf16 = bf16 / MXFP8 time):")
    for s in report["summary"]:
        w, f = s["worst_vs_bf16"], s["worst_x_floor"]
        print(f"  {s['band']:8s} {s['cells']:4d} cells, {s['missing']:3d} missing a target; worst vs bf16 "
              + (f"{w['vs_bf16']:.2f}x at {_cell(w)} ({w['plan']})" if w else "-")
              + (f"; worst x floor {f['x_floor']:.2f} at {_cell(f)}" if f else ""))
    missed = [r for r in report["results"] if r.get("misses")]
    print(f"cells missing a target: {len(missed)} of {len(report['results'])}")
    for r in missed:
        print(f"  {_cell(r):24s} {_f(r['mxfp8_us'], '8.1f')} us  plan {r['plan']:12s} {'; '.join(r['misses'])}")


# ---- running ---------------------------------------------------------------------------------------

def run(args) -> dict:
    start = time.perf_counter()
    layouts = args.layouts or ["unfused", "fused"]
    backend = args.backend or select_backend()
    ms = args.m or (QUICK_MS if args.quick else MS)
    shapes = zoo_shapes(args.models, layouts)
    device = jax.devices()[0]
    rdiff_bps, busy_bps = timing.copy_bandwidth(copy_mib=args.copy_mib, profile=True)
    copy_bps = busy_bps or rdiff_bps
    timer = "GPU busy time (profiler)" if busy_bps else "R-difference (no profiler device activity)"
    print(f"shape zoo: {len(shapes)} distinct (N, K) of {', '.join(args.models)} ({', '.join(layouts)}) x "
          f"{len(ms)} M on {device.device_kind}; MXFP8 backend {backend.value}; copy bandwidth "
          f"{copy_bps / 1e12:.3f} TB/s ({timer})", flush=True)
    rows = []
    for i, ((n, k), labels) in enumerate(shapes.items()):
        t0 = time.perf_counter()
        shape_rows = measure_shape(n, k, ms, backend, args, jax.random.key(i))
        for r in shape_rows:
            annotate(r, copy_bps)
        rows += shape_rows
        print(f"[{i + 1}/{len(shapes)}] {n}x{k} ({', '.join(labels)}): {time.perf_counter() - t0:.1f} s, "
              f"elapsed {time.perf_counter() - start:.0f} s", flush=True)
        for r in shape_rows:
            print(f"    M={r['m']:5d} mxfp8 {_f(r['mxfp8_us'], '9.1f')} us  floor {r['floor_us']:8.1f}  "
                  f"bf16 {_f(r['bf16_us'], '9.1f')} ({_f(r.get('vs_bf16'), '.2f')}x)  emu "
                  f"{_f(r['emulation_us'], '9.1f')}  plan {r['plan']}"
                  + (f"  MISS: {'; '.join(r['misses'])}" if r.get("misses") else ""), flush=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device.device_kind,
            "platform": device.platform, "jax": jax.__version__, "backend": backend.value,
            "models": list(args.models), "layouts": layouts, "ms": list(ms),
            "shapes": {f"{n}x{k}": labels for (n, k), labels in shapes.items()},
            "copy_tbps": copy_bps / 1e12, "timer": timer, "runs": args.runs,
            "max_sets": args.max_sets, "elapsed_s": time.perf_counter() - start,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    report = {"meta": meta, "results": rows}
    report["summary"] = summary(rows)
    return report


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 2)
    args.max_sets = args.max_sets or (16 if args.quick else 32)
    if args.max_sets < 2:
        parser().error("--max-sets must be >= 2")
    # As in the op harness: no CUDA-graph command buffers while timing R argument sets.
    if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    report = run(args)
    print_summary(report)
    if args.out:
        write(report, args.out)
        print(f"wrote {os.path.join(args.out, 'zoo.md')} (.json, .png)")
    return 0
