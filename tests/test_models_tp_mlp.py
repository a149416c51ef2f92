"""The tensor-parallel MLP example (jax_mxfp8.models.tp_mlp) on the 8 fake CPU devices
(conftest.py asks for them): one all-reduce per MLP and the single-device result, under
Auto and Explicit sharding; `python -m jax_mxfp8 demo --tp` and the TP benchmark
(`python -m jax_mxfp8.bench.tp`) in fresh processes. Its two-process run is in
test_partitioning.py (the worker script there)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_mxfp8 as mx
from jax_mxfp8.models import tp_mlp as tp

from helpers import cpu_devices, hlo, local, put, random_x

CPUS = cpu_devices()
ONE = CPUS[0]
pytestmark = pytest.mark.skipif(len(CPUS) < 8, reason="needs 8 CPU devices (tests/conftest.py)")


@pytest.mark.parametrize("dp,tpn", [(1, 8), (2, 4), (1, 2)])
def test_tp_mlp_one_all_reduce_and_matches_single_device(dp, tpn, rng):
    mesh = tp.make_mesh(tpn, dp, CPUS)
    hidden, inter = 128, tp.tp_width(320, tpn, "emulation")
    params = tp.init_params(jax.random.key(0), hidden, inter, jnp.float32)
    x = random_x(rng, (2 * dp, 5, hidden))
    single = jax.device_put(tp.quantize_params(params, "emulation"), ONE)
    sharded = tp.quantize_params(params, "emulation", mesh)
    xs = put(x, mesh, P("data", None, None))
    want = jax.jit(tp.mlp)(single, local(x))
    got = jax.jit(tp.mlp)(sharded, xs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5 * float(np.abs(np.asarray(want)).max()))
    counts = tp.collectives(hlo(tp.mlp, sharded, xs))
    assert counts["all-reduce"] == 1 and counts["all-gather"] == 0, counts
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, None)), 3)


@pytest.mark.slow
def test_cli_demo_tp_runs_in_a_fresh_process(tmp_path):
    """`python -m jax_mxfp8 demo --tp 4` asks for fake CPU devices itself and exits 0."""
    out = subprocess.run([sys.executable, "-m", "jax_mxfp8", "demo", "--tp", "4", "--hidden", "64",
                          "--intermediate", "256", "--batch", "1", "--seq", "4", "--backend", "emulation"],
                         capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "'all-reduce': 1, 'all-gather': 0" in out.stdout and "OK" in out.stdout


@pytest.mark.xfail("jax.default_backend() != 'cpu'", raises=jax.errors.JaxRuntimeError, strict=False,
                   reason="known open failure on a GPU-default host (H100, jax 0.11.2): an Explicit-axes "
                          "mesh of the 8 CPU devices fails with 'No registered implementation for "
                          "untyped custom call to Sharding for Host'; passes where the CPU is the "
                          "default backend (CI).")
def test_tp_mlp_under_explicit_sharding_mode(rng):
    mesh = jax.make_mesh((2, 4), ("data", "model"), devices=CPUS[:8],
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    # Every array on a CPU: with a GPU as default device, params and x were created there, and
    # the run under the CPU mesh failed ("custom call to Sharding for Host" not found).
    with jax.default_device(ONE):
        params = tp.init_params(jax.random.key(1), 128, 256, jnp.float32)
        x = random_x(rng, (4, 128))
        want = jax.jit(tp.mlp)(jax.device_put(tp.quantize_params(params, "emulation"), ONE), local(x))
        with jax.set_mesh(mesh):
            sharded = tp.quantize_params(params, "emulation", mesh)
            xs = put(x, mesh, P("data", None))

            def step(p, a):
                h = mx.linear(a, p["up"])
                assert jax.typeof(h).sharding.spec == P("data", "model")  # typed, not replicated
                return mx.linear(jax.nn.gelu(h), p["down"])
            got = jax.jit(step)(sharded, xs)
            counts = tp.collectives(hlo(step, sharded, xs))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5 * float(np.abs(np.asarray(want)).max()))
    assert counts["all-reduce"] == 1 and counts["all-gather"] == 0, counts


@pytest.mark.slow
def test_tp_benchmark_runs_on_fake_cpu_devices(tmp_path):
    """python -m jax_mxfp8.bench.tp end to end on CPU: checks pass, results file written."""
    out_file = tmp_path / "tp.json"
    out = subprocess.run([sys.executable, "-m", "jax_mxfp8.bench.tp", "--cpu-devices", "8", "--tp", "1", "4",
                          "--quick", "--out", str(out_file)], capture_output=True, text=True, timeout=600,
                         cwd=str(tmp_path), env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out_file.read_text())
    assert result["failures"] == 0 and len(result["rows"]) == 6
    row = next(r for r in result["rows"] if r["case"] == "mlp" and r["tp"] == 4)
    assert row["collectives_mxfp8"]["all-reduce"] == 1 and row["collectives_mxfp8"]["all-gather"] == 0
