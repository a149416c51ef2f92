"""The benchmark CLIs on CPU (jax_mxfp8.bench): `python -m jax_mxfp8 bench` (the op harness,
harness.py + ops.py) and the Marlin lab's sweep (`python -m jax_mxfp8.bench.marlin sweep`, whose
GEMM primitives lower to their jnp reference on CPU), each in a fresh CPU-only process, with
the smallest sizes they take. The TP benchmark (bench/tp.py): test_models_tp_mlp.py."""
import json
import re
import os
import subprocess
import sys

import pytest

from jax_mxfp8 import bench
from jax_mxfp8.backends import marlin


def run_cpu(args, cwd, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(cwd), env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_harness_registers_the_ops_and_rejects_unknown_ones(tmp_path):
    assert {"quantize", "dequantize", "linear"} <= set(bench.registered_ops())
    with pytest.raises(ValueError, match="unknown op"):
        bench.run(["nope"], bench.Config(), str(tmp_path))
    with pytest.raises(SystemExit):  # argparse: R = 1 leaves nothing to subtract
        bench.main(["--sets", "1"])


@pytest.mark.slow
def test_bench_cli_quantize_and_dequantize(tmp_path):
    """The op harness end to end: every case under 4 MiB (the decode-size ones) timed with the
    R-difference and annotated (speedup, kernel count), bench.md and bench.json written. The
    copy-bandwidth arrays are 8 MiB instead of 512 (a 2-core CPU needs ~20 s more for those)."""
    out = run_cpu(["-m", "jax_mxfp8", "bench", "--op", "quantize", "--op", "dequantize", "--quick",
                   "--sets", "2", "--repeats", "1", "--no-profile", "--max-mib", "4", "--copy-mib", "8",
                   "--out", "out"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "out" / "bench.md").is_file()
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["meta"]["platform"] == "cpu" and report["meta"]["copy_mib"] == 8
    rows = report["results"]
    assert {r["op"] for r in rows} == {"quantize", "dequantize"}
    ours = [r for r in rows if r["impl"] == "jax_mxfp8"]
    assert len(ours) == 3, rows  # quantize row-major and swizzled, dequantize: [16, 16384] bf16
    for r in ours:
        assert "error" not in r and r["time_us"] > 0 and r["bytes"] <= 4 << 20, r
        assert r["speedup"] > 0 and r["kernels"] >= 1, r
    assert {r["impl"] for r in rows} == {"jax_mxfp8", "jnp"}
    assert all("time_us" in r for r in rows), rows


# The sweep measures copy bandwidth on 512 MiB arrays in 8 sets (4 GiB, ~2 minutes on a 2-core
# CPU) and has no option for it: this runs the lab's main() with 8 MiB arrays instead.
MARLIN_LAB = """
import functools, sys
from jax_mxfp8 import timing
timing.copy_bandwidth = functools.partial(timing.copy_bandwidth, copy_mib=8)
from jax_mxfp8.bench import marlin
sys.exit(marlin.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_marlin_lab_sweep_times_every_candidate(tmp_path):
    """The sweep over every candidate tile x K split at one (shape, M), on CPU: one row with a
    time per candidate, and the winner it prints is the fastest of them."""
    out = run_cpu(["-c", MARLIN_LAB, "sweep", "--shapes", "128x128", "--ms", "16", "--metric", "rdiff",
                   "--out", "out"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep = json.loads((tmp_path / "out" / "marlin_sweep.json").read_text())
    (row,) = sweep["rows"]
    assert (row["n"], row["k"], row["m"]) == (128, 128, 16)
    times = {key: v for key, v in row.items() if key.startswith("t") and v == v}
    assert len(times) >= 4
    best = re.search(r"best (\S+)", out.stdout).group(1)
    assert times[best] == min(times.values())


def test_moe_bench_runs_on_cpu_and_writes_its_rows(tmp_path):
    """The MoE GEMM benchmark end to end on CPU (EMULATION; no GPU busy times here): one row per
    (shape, tokens, routing) with the groupings it claims."""
    from jax_mxfp8.bench import moe
    assert moe.main(["--shapes", "4x128x256", "--tokens", "1,8", "--backend", "emulation",
                     "--copy-mib", "8", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "moe.json").read_text())["rows"]
    assert [(r["tokens"], r["routing"]) for r in rows] == [(1, "even"), (1, "skewed"), (8, "even"),
                                                           (8, "skewed")]
    for r in rows:
        gs = moe.group_sizes_for(r["rows"], r["experts"], r["routing"])
        assert gs.sum() == r["rows"] == r["tokens"] * 2 and (gs > 0).sum() == r["active_experts"]
    assert moe.group_sizes_for(10, 4, "skewed").tolist() == [7, 1, 1, 1]
