"""The benchmark harness: ops' implementations and their peers timed in the same run.

Ops are a small registry: `@register_op("name")` on a function returning `Case`s. A Case
names its argument maker, its implementations (ours and the peers, each a jittable function
of one argument set), and the bytes it must move at least (the roofline floor is those bytes
over the copy bandwidth of this run). Timing: jax_mxfp8.timing.

    python -m jax_mxfp8 bench [--op quantize|dequantize|linear ...] [--out DIR] [--quick]
    python -m jax_mxfp8 bench --model NAME ...   (a whole decoder: bench/model.py)
    python -m jax_mxfp8 bench --zoo ...          (every linear of real models: bench/zoo.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import sys
from typing import Callable

import jax

from jax_mxfp8.bench import model as model_bench
from jax_mxfp8.bench import zoo
from jax_mxfp8.timing import MiB, copy_bandwidth, device_time_us, kernels_per_call, profiled_us


@dataclasses.dataclass
class Case:
    op: str
    label: str                       # shown in tables, e.g. "bf16 [16384, 8192] swizzled"
    make_args: Callable[[jax.Array], tuple]   # PRNG key -> one argument set (device arrays)
    impls: dict[str, Callable]       # name -> jittable fn(*args); the first entry is "ours"
    bytes_moved: int                 # minimum DRAM traffic of one call
    baseline: str | None = None      # impl the speedup column divides by
    size: float = 0.0                # x axis of the plot (default: bytes_moved)
    flops: int = 0


_OPS: dict[str, Callable[["Config"], list[Case]]] = {}


def register_op(name: str):
    """Adds an op to the harness: fn(config) -> list[Case]. Other kernels add theirs here."""
    def wrap(fn):
        _OPS[name] = fn
        return fn
    return wrap


def registered_ops() -> tuple[str, ...]:
    return tuple(_OPS)


@dataclasses.dataclass
class Config:
    sets: int = 8          # R: distinct argument sets per timed jit
    repeats: int = 7       # timed runs per jit (median)
    quick: bool = False    # fewer / smaller shapes
    max_mib: float = float("inf")   # skip cases that move more than this per call
    copy_mib: int = 512    # array size of the copy-bandwidth measurement
    profile: bool = True   # also measure kernel time with the profiler (cross-check)


# ---- running and reporting ----------------------------------------------------------------

def sets_for(case: Case, config: Config) -> int:
    """R: at least config.sets, more for small cases so that R calls take well over the host
    timing noise (decode-size kernels run for a few microseconds)."""
    wanted = -(-256 * MiB // max(case.bytes_moved, 1))
    return int(min(64, max(config.sets, wanted)))


def run_case(case: Case, config: Config) -> list[dict]:
    sets = sets_for(case, config)
    repeats = config.repeats if sets == config.sets else max(config.repeats, 15)
    keys = jax.random.split(jax.random.key(hash(case.label) & 0x7FFFFFFF), sets)
    arg_sets = [case.make_args(key) for key in keys]
    jax.block_until_ready(arg_sets)
    rows = []
    for name, fn in case.impls.items():
        row = {"op": case.op, "case": case.label, "impl": name, "bytes": case.bytes_moved,
               "size": case.size or case.bytes_moved, "flops": case.flops, "sets": sets}
        try:
            row["time_us"] = device_time_us(fn, arg_sets, repeats)
            row["kernels"] = kernels_per_call(fn, arg_sets[0])
            if config.profile:
                row["prof_us"] = profiled_us(fn, arg_sets)
        except Exception as err:  # a peer that cannot run here (e.g. unsupported on this GPU)
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        rows.append(row)
        print(_format_row(row), flush=True)
    del arg_sets
    gc.collect()
    return rows


def _format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['op']:10s} {row['case']:32s} {row['impl']:22s} error: {row['error']}"
    return (f"{row['op']:10s} {row['case']:32s} {row['impl']:22s} {row['time_us']:9.2f} us"
            f"  {row.get('gbps', 0):7.1f} GB/s  kernels={row.get('kernels')}")


def annotate(rows: list[dict], cases: list[Case], copy_bps: float, copy_prof_bps: float | None = None) -> None:
    """Adds bandwidth, fraction of copy bandwidth, roofline floor and speedup vs the baseline;
    frac_copy_prof compares profiler kernel times with the profiler's copy bandwidth."""
    baseline_of = {(c.op, c.label): c.baseline for c in cases}
    times = {(r["op"], r["case"], r["impl"]): r.get("time_us") for r in rows}
    for r in rows:
        r["floor_us"] = r["bytes"] / copy_bps * 1e6
        if copy_prof_bps and r.get("prof_us"):
            r["frac_copy_prof"] = r["bytes"] / copy_prof_bps * 1e6 / r["prof_us"]
        if r.get("time_us") and r["time_us"] > 0:
            r["gbps"] = r["bytes"] / (r["time_us"] * 1e-6) / 1e9
            r["frac_copy"] = r["floor_us"] / r["time_us"]
            if r["flops"]:
                r["tflops"] = r["flops"] / (r["time_us"] * 1e-6) / 1e12
            base = times.get((r["op"], r["case"], baseline_of.get((r["op"], r["case"]))))
            if base:
                r["speedup"] = base / r["time_us"]


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"# jax_mxfp8 bench ({meta['date']})", "",
           f"device: {meta['device']}; jax {meta['jax']}; R = {meta['sets']} argument sets (up to 64 for "
           f"small cases), median of {meta['repeats']}; copy bandwidth (x*2, {meta['copy_mib']} MiB bf16) **{meta['copy_tbps']:.3f} TB/s**.", "",
           "time = device us per call; % copy = floor / time (floor = minimum bytes / copy bandwidth); "
           "speedup vs the op's baseline peer; kernels = launching instructions in the compiled HLO; "
           f"prof us = GPU busy time per call from a profiler trace (cross-check, no host overhead), "
           f"% copy (prof) = the same ratio against the profiler's copy bandwidth "
           f"({(meta.get('copy_tbps_profiler') or 0):.3f} TB/s).", "",
           "| op | case | impl | time us | GB/s | % copy | floor us | speedup | kernels | prof us | % copy (prof) |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['op']} | {r['case']} | {r['impl']} | error: {r['error']} | | | | | | | |")
            continue
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        prof = (f"{r['prof_us']:.2f} | {100 * r.get('frac_copy_prof', 0):.1f}" if r.get("prof_us") else " | ")
        out.append(f"| {r['op']} | {r['case']} | {r['impl']} | {r['time_us']:.2f} | {r.get('gbps', 0):.0f} | "
                   f"{100 * r.get('frac_copy', 0):.1f} | {r['floor_us']:.2f} | {speed} | {r.get('kernels', '')} | "
                   f"{prof} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], meta: dict, path: str) -> str | None:
    """Bandwidth (memory-bound ops) or time (linear) vs size, against the floor. None if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install 'jax_mxfp8[plot]')"
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        op_rows = [r for r in rows if r["op"] == op and "time_us" in r]
        for impl in dict.fromkeys(r["impl"] for r in op_rows):
            pts = sorted((r for r in op_rows if r["impl"] == impl), key=lambda r: r["size"])
            if op == "linear":
                ax.plot([r["size"] for r in pts], [r["time_us"] for r in pts], "o", label=impl)
            else:
                ax.plot([r["bytes"] / MiB for r in pts], [r.get("gbps", 0) for r in pts], "o", label=impl)
        if op == "linear":
            ax.plot([r["size"] for r in op_rows], [r["floor_us"] for r in op_rows], "k_", markersize=12,
                    label="floor (bytes/copy bw)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("M (rows of x), all weight shapes")
            ax.set_ylabel("device time per call (us)")
        else:
            ax.axhline(meta["copy_tbps"] * 1e3, color="k", linestyle="--", label="copy bandwidth")
            ax.axhline(0.9 * meta["copy_tbps"] * 1e3, color="gray", linestyle=":", label="90% of copy")
            ax.set_xscale("log")
            ax.set_xlabel("bytes moved per call (MiB)")
            ax.set_ylabel("effective bandwidth (GB/s)")
        ax.set_title(f"{op} on {meta['device']}")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def run(ops: list[str], config: Config, out_dir: str | None) -> dict:
    unknown = [op for op in ops if op not in _OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; registered: {list(_OPS)}")
    device = jax.devices()[0]
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
            "sets": config.sets, "repeats": config.repeats, "copy_mib": config.copy_mib}
    copy = dict(copy_mib=config.copy_mib, sets=config.sets, repeats=config.repeats,
                profile=config.profile)
    copy_bandwidth(**copy)  # warm-up: clocks, allocator, first-run effects
    copy_bps, copy_prof_bps = copy_bandwidth(**copy)
    meta["copy_tbps"] = copy_bps / 1e12
    meta["copy_tbps_profiler"] = copy_prof_bps / 1e12 if copy_prof_bps else None
    meta["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    print(f"copy bandwidth: {copy_bps / 1e12:.3f} TB/s (profiler: {meta['copy_tbps_profiler']}) on "
          f"{meta['device']}", flush=True)
    cases = [case for op in ops for case in _OPS[op](config) if case.bytes_moved <= config.max_mib * MiB]
    rows = [row for case in cases for row in run_case(case, config)]
    annotate(rows, cases, copy_bps, copy_prof_bps)
    report = {"meta": meta, "results": rows}
    text = markdown(rows, meta)
    print(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "bench.md"), "w") as f:
            f.write(text)
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump(report, f, indent=1)
        note = plot(rows, meta, os.path.join(out_dir, "bench.png"))
        if note:
            print(note)
            with open(os.path.join(out_dir, "bench.md"), "a") as f:
                f.write(f"\n{note}\n")
    return report


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--model" or a.startswith("--model=") for a in argv):
        return model_bench.main(argv)
    if "--zoo" in argv:
        return zoo.main(argv)
    parser = argparse.ArgumentParser(prog="python -m jax_mxfp8 bench", description=__doc__.split("\n\n")[0],
                                     epilog="--model NAME: the model benchmark (bench --model NAME --help); "
                                            "--zoo: the shape zoo (bench --zoo --help)")
    parser.add_argument("--op", action="append", choices=registered_ops(),
                        help="op to benchmark (repeatable; default: quantize and dequantize)")
    parser.add_argument("--out", help="directory for bench.md, bench.json and bench.png")
    parser.add_argument("--sets", type=int, default=8, help="R, distinct argument sets per jit (>= 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per jit (median)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    parser.add_argument("--max-mib", type=float, default=float("inf"),
                        help="skip cases moving more than this many MiB per call")
    parser.add_argument("--copy-mib", type=int, default=512, help="size of the copy-bandwidth arrays")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiler cross-check")
    parser.add_argument("--command-buffers", action="store_true",
                        help="keep XLA's CUDA-graph command buffers (off by default: re-recording them "
                             "when buffer addresses change adds host time that grows with R)")
    args = parser.parse_args(argv)
    if args.sets < 2:
        parser.error("--sets must be >= 2 (the method subtracts one set)")
    if not args.command_buffers and "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    config = Config(args.sets, args.repeats, args.quick, args.max_mib, args.copy_mib, not args.no_profile)
    run(args.op or ["quantize", "dequantize"], config, args.out)
    return 0
