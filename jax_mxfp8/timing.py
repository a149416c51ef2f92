"""Device time of jitted functions, measured the two ways the benchmarks report.

- profiled_us: GPU busy time from a jax.profiler trace (kernel and memcpy durations on the
  device's stream lines while an unrolled jit runs): the number to report.
- profiled_many: the same for many functions from one trace (sweeps).
- device_time_us: the R-difference, (T(R argument sets unrolled in one jit) - T(1 set)) / (R-1),
  which cancels the fixed dispatch cost but still carries host time: a cross-check.
R distinct argument sets run inside ONE jit that returns every full output (no CSE, no
dead-code elimination, no L2 reuse between calls). A Python loop of jitted calls would time
dispatch (~40 us) instead of the kernel.
"""
from __future__ import annotations

import gc
import glob
import os
import re
import statistics
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp

MiB = 1 << 20


def median_seconds(fn, arg, repeats: int) -> float:
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
    t_many = median_seconds(unrolled, arg_sets, repeats)
    t_one = median_seconds(unrolled, arg_sets[:1], repeats)
    return (t_many - t_one) / (len(arg_sets) - 1) * 1e6


def profiled_us(fn: Callable, arg_sets: list[tuple], runs: int = 3) -> float | None:
    """Cross-check: GPU busy time per call from a profiler trace (sum of kernel durations on
    the device's stream lines while the unrolled jit runs), free of host overheads. None when
    no device activity was recorded (CPU, or no profiler support)."""
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


def profiled_many(cases: dict[str, tuple[Callable, list[tuple]]], runs: int = 2) -> dict[str, float | None]:
    """profiled_us of many functions from ONE profiler trace (starting a trace costs ~1 s):
    each case's runs sit inside a host annotation, and the device activity that starts inside
    that window is the case's (every run blocks, so its kernels finish inside its window).
    A case that fails to compile or run maps to None, like one with no recorded activity."""
    compiled, out = {}, {}
    for name, (fn, arg_sets) in cases.items():
        unrolled = jax.jit(lambda sets, fn=fn: [fn(*args) for args in sets])
        try:
            jax.block_until_ready(unrolled(arg_sets))
            compiled[name] = (unrolled, arg_sets)
        except Exception:  # noqa: BLE001  (a configuration a shape cannot run)
            out[name] = None
    windows = {}
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            for name, (unrolled, arg_sets) in compiled.items():
                with jax.profiler.TraceAnnotation(f"jax_mxfp8_case:{name}"):
                    for _ in range(runs):
                        jax.block_until_ready(unrolled(arg_sets))
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(paths[0]) if paths else None
    if data is None:
        return {**out, **{name: None for name in compiled}}
    device_events = []
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    device_events += [(e.start_ns, e.duration_ns) for e in line.events]
        else:
            for line in plane.lines:
                for e in line.events:
                    if e.name.startswith("jax_mxfp8_case:"):
                        windows[e.name.split(":", 1)[1]] = (e.start_ns, e.start_ns + e.duration_ns)
    for name, (_, arg_sets) in compiled.items():
        lo, hi = windows.get(name, (0, -1))
        busy = sum(d for t, d in device_events if lo <= t <= hi)
        out[name] = busy / (runs * len(arg_sets)) / 1e3 if busy else None
    return out


_TRIVIAL = re.compile(r"=\s*\S+\s+(parameter|tuple|get-tuple-element|bitcast|constant)\(")


def kernels_per_call(fn: Callable, args: tuple) -> int:
    """Instructions of the compiled ENTRY computation that launch work (fusions, custom calls,
    copies, ...): 1 means one kernel launch per call."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.find("\nENTRY"):]
    entry = entry[: entry.find("\n}")]
    lines = [ln for ln in entry.splitlines()[1:] if "=" in ln]
    return sum(1 for ln in lines if not _TRIVIAL.search(ln))


def copy_bandwidth(copy_mib: int = 512, sets: int = 8, repeats: int = 7,
                   profile: bool = True) -> tuple[float, float | None]:
    """Bytes/s of x * 2 on copy_mib MiB of bf16 (read + write), the ceiling for memory-bound ops:
    by the R-difference, and by profiler busy time (None if unavailable or profile=False)."""
    nbytes = copy_mib * MiB
    n = nbytes // 2
    sets = [(jax.random.normal(jax.random.key(i), (n,), jnp.bfloat16),) for i in range(sets)]
    us = device_time_us(lambda x: x * 2, sets, repeats)
    prof = profiled_us(lambda x: x * 2, sets) if profile else None
    del sets
    gc.collect()
    return 2 * nbytes / (us * 1e-6), (2 * nbytes / (prof * 1e-6) if prof else None)
