"""The multi-device benchmark (jax_mxfp8.bench.multi_gpu) on the 8 fake CPU devices (conftest.py
asks for them): the tensor-parallel decoder is kv_decoder's model with its weights placed on the
mesh (decode and prefill equal to the one-device forward, two all-reduces per layer, no weight
gathered), the expert-parallel MoE layer equals one device and a float64 reference, the HLO
check catches what it should, and both CLIs run end to end in fresh processes. No timing is
asserted."""
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
from jax_mxfp8.bench import multi_gpu as mg
from jax_mxfp8.models import kv_decoder as kd

from helpers import assert_same_bits, cpu_devices

CPUS = cpu_devices()
ONE = CPUS[0]
pytestmark = pytest.mark.skipif(len(CPUS) < 8, reason="needs 8 CPU devices (tests/conftest.py)")
BACKEND = "emulation"
CONFIG = mg.TINY_DECODER


def one_device_params(key, weights):
    with jax.default_device(ONE):
        return kd.init_params(CONFIG, key, weights=weights, progress=False)


# ---- decoder ------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [BACKEND, "bf16"])
def test_sharded_build_is_kv_decoders_model_split_as_specified(weights, seed):
    """The same bits as kv_decoder.init_params' one-device build, each projection split along N
    (q/k/v, gate/up) or K (o, down) over the mesh, no device holding a whole projection."""
    key = jax.random.key(seed)
    mesh = mg.make_mesh(4, CPUS)
    got = mg.build_decoder(CONFIG, key, mesh, weights)
    want = one_device_params(key, weights)
    assert_same_bits(got, want)
    layer = got["layers"][0]
    for name in kd.PIECES:
        arrays = layer[name].arrays if weights != "bf16" else {"w": layer[name]}
        for a in arrays.values():
            split = 0 if name in mg.COLUMN_PARALLEL else 1
            assert a.sharding.shard_shape(a.shape)[split] * 4 == a.shape[split], (name, a.sharding)
    assert got["lm_head"].sharding.spec == P(mg.MODEL, None)
    projections = lambda params: [{n: layer[n] for n in kd.PIECES} for layer in params["layers"]]  # noqa: E731
    assert max(mg.bytes_per_device(projections(got))) * 4 == sum(mg.bytes_per_device(projections(want)))


@pytest.mark.parametrize("tp", [4, 8])
def test_sharded_decode_and_prefill_equal_one_device(tp, seed, rng):
    key = jax.random.key(seed)
    mesh = mg.make_mesh(tp, CPUS)
    sharded = mg.build_decoder(CONFIG, key, mesh, BACKEND)
    single = one_device_params(key, BACKEND)
    shapes = mg.weight_shapes(sharded["layers"]) | mg.weight_shapes(sharded["lm_head"])
    batch, ctx, pos = 3, 32, 17
    cache_key = jax.random.fold_in(key, 7)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab, batch), jnp.int32)

    step = jax.jit(lambda p, c, t, i: kd.decode_step(CONFIG, p, c, t, i))
    cache = mg.random_cache(CONFIG, batch, ctx, cache_key, mesh)
    assert cache[0][0].sharding.spec == P(None, mg.MODEL, None, None)
    want, want_cache = step(single, jax.device_put(kd.init_cache(CONFIG, batch, ctx, key=cache_key), ONE),
                            jax.device_put(tokens, ONE), pos)
    got, got_cache = step(sharded, cache, tokens, pos)
    assert got.shape == (batch, CONFIG.vocab)
    assert mg.rel_error(got, want) <= mg.TOLERANCE["decoder"]
    assert mg.rel_error(got_cache[1][0], want_cache[1][0]) <= mg.TOLERANCE["decoder"]
    assert got_cache[0][0].sharding.is_equivalent_to(mg.cache_sharding(mesh), 4)  # stays split
    hlo = mg.check_hlo(step.lower(sharded, cache, tokens, pos).compile().as_text(), shapes,
                       2 * CONFIG.layers)
    assert hlo["ok"] and hlo["collectives"]["all-gather"] == 0, hlo

    prompt = jnp.asarray(rng.integers(0, CONFIG.vocab, (1, 24)), jnp.int32)
    fill = jax.jit(lambda p, t: kd.prefill(CONFIG, p, t))
    want, _ = fill(single, jax.device_put(prompt, ONE))
    got, _ = fill(sharded, prompt)
    assert mg.rel_error(got, want) <= mg.TOLERANCE["decoder"]
    hlo = mg.check_hlo(fill.lower(sharded, prompt).compile().as_text(), shapes, 2 * CONFIG.layers)
    assert hlo["ok"] and hlo["collectives"]["all-gather"] == 0, hlo


def test_compile_only_cells_check_the_real_models_layers():
    """Abstract Llama-3-70B-shaped layers (one here) compile on the mesh with two all-reduces."""
    mesh = mg.make_mesh(8, CPUS)
    config = kd.model_config("llama3-70b", 1)
    args = mg.parser().parse_args(["decoder", "--tp", "8", "--batch", "2", "--prefill", "8", "--ctx", "16"])
    rows = mg.compile_cells(config, mesh, BACKEND, args)
    assert [r["cell"] for r in rows] == ["decode b=2", "prefill 8"]
    for r in rows:
        assert r["ok"] and r["hlo"]["collectives"]["all-reduce"] == 2, r


def test_tp_that_does_not_divide_the_kv_heads_is_refused():
    with pytest.raises(ValueError, match="does not divide its 8 kv heads"):
        mg.check_decoder_tp(kd.model_config("llama3-70b"), 16)
    with pytest.raises(ValueError, match="does not divide its 8 experts"):
        mg.check_moe_tp(mg.moe_config("mixtral-8x7b"), 16)


# ---- the HLO check ------------------------------------------------------------------------------

def test_hlo_check_finds_a_gathered_weight_and_a_wrong_all_reduce_count(rng):
    mesh = mg.make_mesh(4, CPUS)
    w = jax.device_put(jnp.asarray(rng.standard_normal((64, 128)), jnp.float32),
                       NamedSharding(mesh, P(mg.MODEL, None)))
    shapes = mg.weight_shapes(w)
    assert {(64, 128), (16, 128)} <= shapes
    gather = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P()))
    found = mg.check_hlo(gather.lower(w).compile().as_text(), shapes, 0)
    assert not found["ok"] and found["weight_gathers"], found
    x = jax.device_put(jnp.ones((4, 64), jnp.float32), NamedSharding(mesh, P(None, mg.MODEL)))
    reduce = jax.jit(lambda a, b: a @ b, out_shardings=NamedSharding(mesh, P()))
    text = reduce.lower(x, jax.device_put(w, NamedSharding(mesh, P(mg.MODEL, None)))).compile().as_text()
    assert mg.check_hlo(text, shapes, 1)["ok"]
    assert not mg.check_hlo(text, shapes, 0)["ok"]


# ---- MoE ----------------------------------------------------------------------------------------

MOE = mg.moe_config("tiny")


def dense_moe_reference(params, x) -> np.ndarray:
    """float64: every token through its top-k experts (dequantized weights), weighed and added."""
    def dense(w):
        if isinstance(w, mx.MxWeight):
            values, scales = w.unpack()
            return np.asarray(mx.dequantize(values, scales, dtype=jnp.float32), np.float64)
        return np.asarray(w, np.float64)
    experts, probs = jax.jit(lambda r, a: mg.route(MOE, r, a))(params["router"], x)
    gate_up, down = dense(params["gate_up"]), dense(params["down"])
    xs = np.asarray(x, np.float64)
    out = np.zeros_like(xs)
    for t in range(xs.shape[0]):
        for e, p in zip(np.asarray(experts[t]), np.asarray(probs[t], np.float64)):
            gate, up = np.split(gate_up[e] @ xs[t], 2)
            out[t] += p * (down[e] @ (gate / (1 + np.exp(-gate)) * up))
    return out


@pytest.mark.parametrize("weights", [BACKEND, "bf16"])
def test_moe_layer_on_one_device_is_the_dense_mixture(weights, seed, rng):
    key = jax.random.key(seed)
    mesh = mg.make_mesh(1, CPUS)
    params = mg.build_moe(MOE, key, mesh, weights)
    x = jnp.asarray(rng.standard_normal((24, MOE.hidden)), jnp.bfloat16)
    got = jax.jit(lambda p, a: mg.moe_layer(MOE, mesh, p, a))(params, x)
    assert mg.rel_error(got, dense_moe_reference(params, x)) <= 1e-2


@pytest.mark.parametrize("tp", [4, 8])
@pytest.mark.parametrize("weights", [BACKEND, "bf16"])
def test_moe_expert_parallel_equals_one_device(tp, weights, seed, rng):
    key = jax.random.key(seed)
    x = jnp.asarray(rng.standard_normal((40, MOE.hidden)), jnp.bfloat16)
    one, mesh = mg.make_mesh(1, CPUS), mg.make_mesh(tp, CPUS)
    want = jax.jit(lambda p, a: mg.moe_layer(MOE, one, p, a))(mg.build_moe(MOE, key, one, weights), x)
    params = mg.build_moe(MOE, key, mesh, weights)
    for name in ("gate_up", "down"):
        for a in jax.tree.leaves(params[name]):
            assert a.sharding.shard_shape(a.shape)[0] * tp == MOE.experts  # whole experts per device
    xs = jax.device_put(x, NamedSharding(mesh, P()))
    fn = jax.jit(lambda p, a: mg.moe_layer(MOE, mesh, p, a))
    got = fn(params, xs)
    assert mg.rel_error(got, want) <= mg.TOLERANCE["moe"]
    shapes = mg.weight_shapes({k: v for k, v in params.items() if k != "router"})
    hlo = mg.check_hlo(fn.lower(params, xs).compile().as_text(), shapes, 1)
    assert hlo["ok"] and hlo["collectives"]["all-gather"] == 0, hlo


# ---- the command line ---------------------------------------------------------------------------

def run_cli(args, tmp_path, env=None):
    out = subprocess.run([sys.executable, "-m", "jax_mxfp8.bench.multi_gpu", *args, "--out", str(tmp_path),
                          "--warmup", "0", "--rounds", "1"], capture_output=True, text=True, timeout=600,
                         cwd=str(tmp_path), env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_decoder_cli_end_to_end(tmp_path):
    stdout = run_cli(["decoder", "--cpu-devices", "8", "--tp", "8", "--model", CONFIG.name, "--batch", "2",
                      "--ctx", "16", "--prefill", "8", "--steps", "1", "--backend", BACKEND], tmp_path)
    report = json.loads((tmp_path / "multi_gpu_decoder.json").read_text())
    assert report["failures"] == 0 and report["env"]["nccl_nvls_enable"] == "0"
    cells = {(r["peer"], r["tp"], r["cell"]) for r in report["rows"]}
    assert cells == {(p, tp, c) for p in ("mxfp8", "bf16") for tp in (1, 8) for c in ("decode b=2", "prefill 8")}
    row = next(r for r in report["rows"] if r["peer"] == "mxfp8" and r["tp"] == 8 and r["cell"] == "decode b=2")
    assert row["hlo"]["collectives"]["all-reduce"] == 2 * CONFIG.layers and row["rel_err_vs_mxfp8_1"] <= 1e-2
    assert row["tokens_per_s"] > 0 and "memory" in row
    assert "| mxfp8 | 8 | decode b=2 |" in (tmp_path / "multi_gpu_decoder.md").read_text()
    assert "0 failed checks" in stdout


@pytest.mark.slow
def test_moe_cli_end_to_end_with_xla_flags_devices(tmp_path):
    run_cli(["moe", "--tp", "8", "--model", "tiny", "--tokens", "8", "--backend", BACKEND], tmp_path,
            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    report = json.loads((tmp_path / "multi_gpu_moe.json").read_text())
    assert report["failures"] == 0 and len(report["rows"]) == 4  # {mxfp8, bf16} x tp {1, 8}
    assert all(r["hlo"]["collectives"]["all-reduce"] == (r["tp"] > 1) for r in report["rows"])
