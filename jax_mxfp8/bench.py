"""Benchmark harness: device time per call, copy bandwidth and peers measured in the same run.

Method (shared/design/perf_baseline.md): R distinct argument sets run unrolled inside ONE
jax.jit that returns every full output (no CSE, no dead-code elimination, no L2 reuse between
calls); its time minus the time of the same jit with one argument set, divided by R - 1, is
the device time of one call (the fixed dispatch cost drops out). A Python loop of jitted
calls would time dispatch (~40 us) instead of the kernel.

Ops are a small registry: `@register_op("name")` on a function returning `Case`s. A Case
names its argument maker, its implementations (ours and the peers, each a jittable function
of one argument set), and the bytes it must move at least (the roofline floor is those bytes
over the copy bandwidth of this run).

    python -m jax_mxfp8 bench [--op quantize|dequantize|linear ...] [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp

MiB = 1 << 20


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


# ---- timing -------------------------------------------------------------------------------

def _median_seconds(fn, arg, repeats: int) -> float:
    jax.block_until_ready(fn(arg))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_time_us(fn: Callable, arg_sets: list[tuple], repeats: int) -> float:
    """Device microseconds per call of fn(*args): (T(R sets) - T(1 set)) / (R - 1)."""
    unrolled = jax.jit(lambda sets: [fn(*args) for args in sets])
    t_many = _median_seconds(unrolled, arg_sets, repeats)
    t_one = _median_seconds(unrolled, arg_sets[:1], repeats)
    return (t_many - t_one) / (len(arg_sets) - 1) * 1e6


def profiled_us(fn: Callable, arg_sets: list[tuple], runs: int = 3) -> float | None:
    """Cross-check: GPU busy time per call from a profiler trace (sum of kernel durations on
    the device's stream lines while the unrolled jit runs), free of host overheads. None when
    no device activity was recorded (CPU, or no profiler support)."""
    import glob
    import tempfile
    unrolled = jax.jit(lambda sets: [fn(*args) for args in sets])
    jax.block_until_ready(unrolled(arg_sets))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            for _ in range(runs):
                jax.block_until_ready(unrolled(arg_sets))
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return None
        data = jax.profiler.ProfileData.from_file(paths[0])
    total_ns = 0.0
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):  # per-stream kernel/memcpy activity (not derived lines)
                total_ns += sum(event.duration_ns for event in line.events)
    return total_ns / (runs * len(arg_sets)) / 1e3 if total_ns else None


_TRIVIAL = re.compile(r"=\s*\S+\s+(parameter|tuple|get-tuple-element|bitcast|constant)\(")


def kernels_per_call(fn: Callable, args: tuple) -> int:
    """Instructions of the compiled ENTRY computation that launch work (fusions, custom calls,
    copies, ...): 1 means one kernel launch per call."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.find("\nENTRY"):]
    entry = entry[: entry.find("\n}")]
    lines = [ln for ln in entry.splitlines()[1:] if "=" in ln]
    return sum(1 for ln in lines if not _TRIVIAL.search(ln))


def copy_bandwidth(config: Config) -> tuple[float, float | None]:
    """Bytes/s of x * 2 on copy_mib MiB of bf16 (read + write), the ceiling for memory-bound ops:
    by the timing method, and by the profiler cross-check (None if unavailable)."""
    nbytes = config.copy_mib * MiB
    n = nbytes // 2
    sets = [(jax.random.normal(jax.random.key(i), (n,), jnp.bfloat16),) for i in range(config.sets)]
    us = device_time_us(lambda x: x * 2, sets, config.repeats)
    prof = profiled_us(lambda x: x * 2, sets) if config.profile else None
    del sets
    gc.collect()
    return 2 * nbytes / (us * 1e-6), (2 * nbytes / (prof * 1e-6) if prof else None)


# ---- ops ----------------------------------------------------------------------------------

_DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}


def _quantize_bytes(rows: int, k: int, itemsize: int, swizzle: bool) -> int:
    from jax_mxfp8.reference import padded_scale_shape
    mp, kbp = padded_scale_shape(rows, k // 32)
    scale_bytes = mp * kbp if swizzle else rows * k // 32
    return rows * k * (itemsize + 1) + scale_bytes


@register_op("quantize")
def quantize_cases(config: Config) -> list[Case]:
    import jax_mxfp8 as mx
    from jax_mxfp8 import reference

    shapes = [("bf16", 4096, 8192), ("bf16", 16384, 8192), ("bf16", 32768, 8192),
              ("bf16", 16384, 16384), ("f32", 16384, 8192), ("f16", 16384, 8192),
              ("bf16", 1, 4096), ("bf16", 16, 4096), ("bf16", 16, 16384)]
    if config.quick:
        shapes = [("bf16", 4096, 8192), ("bf16", 16384, 8192), ("bf16", 16, 16384)]
    cases = []
    for dtype_name, rows, k in shapes:
        dtype = _DTYPES[dtype_name]
        for swizzle in (False, True):
            def make(key, rows=rows, k=k, dtype=dtype):
                return (jax.random.normal(key, (rows, k), dtype),)

            def ours(x, swizzle=swizzle):
                return mx.quantize(x, swizzle=swizzle)

            def jnp_ref(x, swizzle=swizzle):
                values, scales = reference.quantize(x, "ceil")
                return values, (reference.swizzle_scales(scales) if swizzle else scales)

            nbytes = _quantize_bytes(rows, k, jnp.dtype(dtype).itemsize, swizzle)
            cases.append(Case(
                "quantize", f"{dtype_name} [{rows}, {k}] {'swizzled' if swizzle else 'row-major'}",
                make, {"jax_mxfp8": ours, "jnp": jnp_ref}, nbytes, baseline="jnp"))
    return cases


@register_op("dequantize")
def dequantize_cases(config: Config) -> list[Case]:
    import jax_mxfp8 as mx
    from jax_mxfp8 import reference

    shapes = [("bf16", 4096, 8192), ("bf16", 16384, 8192), ("bf16", 32768, 8192),
              ("f16", 16384, 8192), ("f32", 16384, 8192), ("bf16", 16, 16384)]
    if config.quick:
        shapes = [("bf16", 4096, 8192), ("bf16", 16384, 8192), ("bf16", 16, 16384)]
    cases = []
    for dtype_name, rows, k in shapes:
        dtype = _DTYPES[dtype_name]

        def make(key, rows=rows, k=k):
            kv, ks = jax.random.split(key)
            values = jax.random.normal(kv, (rows, k), jnp.float32).astype(jnp.float8_e4m3fn)
            scales = jax.random.randint(ks, (rows, k // 32), 100, 150).astype(jnp.uint8)
            return values, scales

        nbytes = rows * k * (1 + jnp.dtype(dtype).itemsize) + rows * k // 32
        cases.append(Case(
            "dequantize", f"->{dtype_name} [{rows}, {k}]", make,
            {"jax_mxfp8": lambda v, s, dtype=dtype: mx.dequantize(v, s, dtype=dtype),
             "jnp": lambda v, s, dtype=dtype: reference.dequantize(v, s, dtype)},
            nbytes, baseline="jnp"))
    return cases


@register_op("linear")
def linear_cases(config: Config) -> list[Case]:
    import jax_mxfp8 as mx
    from jax_mxfp8 import reference
    from jax_mxfp8.backends import registered_backends, why_unavailable

    weights = [(4096, 4096), (14336, 4096), (8192, 8192), (28672, 8192)]
    ms = [1, 16, 64, 256, 1024, 4096]
    if config.quick:
        weights, ms = [(4096, 4096), (28672, 8192)], [1, 16, 256]
    device = jax.devices()[0]
    backends = [b for b in registered_backends() if why_unavailable(b, device) is None]
    cases = []
    for n, k in weights:
        for m in ms:
            def make(key, m=m, n=n, k=k):
                kx, kw = jax.random.split(key)
                x = jax.random.normal(kx, (m, k), jnp.bfloat16)
                w = jax.random.normal(kw, (n, k), jnp.bfloat16) * 0.05
                values, scales = reference.quantize(w, "ceil")
                xv, xs = reference.quantize(x, "ceil")
                prepared = {b.value: mx.prepare_weight(values, scales, backend=b) for b in backends}
                return x, w.astype(jnp.bfloat16), values, scales, xv, xs, prepared

            def scaled_matmul(x, w, values, scales, xv, xs, prepared):
                def e8m0(s):
                    return jax.lax.bitcast_convert_type(s, jnp.float8_e8m0fnu)[None]
                return jax.nn.scaled_matmul(
                    xv[None], values[None], e8m0(xs), e8m0(scales),
                    preferred_element_type=jnp.bfloat16)[0]

            impls = {f"jax_mxfp8[{b.value}]":
                     (lambda x, w, v, s, xv, xs, p, b=b.value: mx.linear(x, p[b])) for b in backends}
            impls.update({
                "bf16": lambda x, w, *rest: jnp.dot(x, w.T, preferred_element_type=jnp.bfloat16),
                "emulation": lambda x, w, v, s, *rest: reference.linear(x, v, s),
                "scaled_matmul": scaled_matmul,
            })
            nbytes = n * k + n * k // 32 + 2 * m * k + 2 * m * n
            cases.append(Case("linear", f"M={m} {n}x{k}", make, impls, nbytes, baseline="bf16",
                              size=float(m), flops=2 * m * n * k))
    return cases


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
    copy_bandwidth(config)  # warm-up: clocks, allocator, first-run effects
    copy_bps, copy_prof_bps = copy_bandwidth(config)
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
    parser = argparse.ArgumentParser(prog="python -m jax_mxfp8 bench", description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
