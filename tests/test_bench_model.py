"""The functional KV-cache decoder (jax_mxfp8.models.kv_decoder) and the benchmarks built on it
(`bench --model`, bench/model.py; `bench --zoo`, bench/zoo.py), on CPU with tiny configurations.
No timing is checked: only that the model computes what a full forward computes and that the
CLIs run end to end and write their reports."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp8 as mx
from jax_mxfp8 import bench
from jax_mxfp8.bench import model as model_bench
from jax_mxfp8.bench import zoo
from jax_mxfp8.models import kv_decoder as kd

TINY = kd.model_config("tiny")
# Qwen-style options on the tiny shapes: q/k/v biases (Qwen2.5), per-head q/k RMSNorm (Qwen3).
TINY_QWEN = dataclasses.replace(TINY, name="tiny-qwen", qkv_bias=True, qk_norm=True)

forward = jax.jit(kd.forward, static_argnums=0)
prefill = jax.jit(kd.prefill, static_argnums=(0, 3))
decode_step = jax.jit(kd.decode_step, static_argnums=0)


def decode_after_prefill(config, params, tokens, prompt, ctx):
    """Logits at positions prompt-1 .. T-1: prefill of tokens[:, :prompt], then one decode step
    per remaining token."""
    logits, cache = prefill(config, params, tokens[:, :prompt], ctx)
    out = [logits]
    for pos in range(prompt, tokens.shape[1]):
        logits, cache = decode_step(config, params, cache, tokens[:, pos], pos)
        out.append(logits)
    return np.stack([np.asarray(o.astype(jnp.float32)) for o in out], axis=1)


def dequantized(params):
    """The same parameters with every MxWeight replaced by its exact bf16 weight."""
    return jax.tree.map(
        lambda w: mx.dequantize(*w.unpack(), dtype=jnp.bfloat16) if isinstance(w, mx.MxWeight) else w,
        params, is_leaf=lambda w: isinstance(w, mx.MxWeight))


def tokens_for(config, seed, shape=(2, 12)):
    return jax.random.randint(jax.random.key(seed), shape, 0, config.vocab, jnp.int32)


@pytest.mark.parametrize("config", [TINY, TINY_QWEN], ids=lambda c: c.name)
@pytest.mark.parametrize("layer_loop", ["unroll", "scan"])
def test_decode_after_prefill_matches_the_full_forward(config, layer_loop, seed):
    """The cache is right: decode steps after a prefill give the full-sequence forward's logits.
    float32 weights and activations: to float32 summation order; bf16: within two bf16 ulps of
    the largest logit (the scan body is fused differently from the full forward)."""
    tokens = tokens_for(config, seed + 1)
    for dtype, rel in ((jnp.float32, 1e-5), (jnp.bfloat16, 2 ** -6)):
        params = kd.init_params(config, jax.random.key(seed), dtype=dtype, progress=False)
        if layer_loop == "scan":
            params = kd.stack_layers(params)
        want = np.asarray(forward(config, params, tokens).astype(jnp.float32))[:, 7:]
        got = decode_after_prefill(config, params, tokens, prompt=8, ctx=16)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= rel * scale, (jnp.dtype(dtype).name, np.abs(got - want).max(), scale)


def test_the_cache_changes_the_logits(seed):
    """The cache is read: the same token at the same position after different prompts gives
    different logits (a step that ignored the cache would not)."""
    params = kd.init_params(TINY, jax.random.key(seed), progress=False)
    a, b = tokens_for(TINY, seed + 1, (1, 9)), tokens_for(TINY, seed + 2, (1, 9))
    b = b.at[:, -1].set(a[:, -1])
    la = decode_after_prefill(TINY, params, a, prompt=8, ctx=9)[:, -1]
    lb = decode_after_prefill(TINY, params, b, prompt=8, ctx=9)[:, -1]
    assert np.abs(la - lb).max() > 1e-2


@pytest.mark.parametrize("config", [TINY, TINY_QWEN], ids=lambda c: c.name)
def test_mxfp8_emulation_model_is_the_bf16_model_of_its_dequantized_weights(config, seed):
    """EMULATION linear is the bf16 peer's dot on the exact dequantized weight: the two models
    agree bit for bit (forward and cached decode)."""
    params = kd.init_params(config, jax.random.key(seed), weights="emulation", lm_head="mxfp8",
                            progress=False)
    assert isinstance(params["layers"][0]["q"], mx.MxWeight) and isinstance(params["lm_head"], mx.MxWeight)
    dense = dequantized(params)
    tokens = tokens_for(config, seed + 1)
    np.testing.assert_array_equal(np.asarray(forward(config, params, tokens).astype(jnp.float32)),
                                  np.asarray(forward(config, dense, tokens).astype(jnp.float32)))
    np.testing.assert_array_equal(decode_after_prefill(config, params, tokens, 8, 12),
                                  decode_after_prefill(config, dense, tokens, 8, 12))


@pytest.mark.parametrize("config", [TINY, TINY_QWEN], ids=lambda c: c.name)
def test_fused_projections_equal_separate_ones(config, seed):
    """fused=True holds the same weights (q/k/v and gate/up quantized as one matrix) and
    computes the same logits: bit for bit with EMULATION weights on CPU, as with bf16 ones."""
    key, tokens = jax.random.key(seed), tokens_for(config, seed + 1)
    for weights in ("emulation", "bf16"):
        unfused = kd.init_params(config, key, weights=weights, progress=False)
        fused = kd.init_params(config, key, weights=weights, fused=True, progress=False)
        assert set(fused["layers"][0]) >= {"qkv", "gate_up"} and "q" not in fused["layers"][0]
        np.testing.assert_array_equal(np.asarray(forward(config, unfused, tokens).astype(jnp.float32)),
                                      np.asarray(forward(config, fused, tokens).astype(jnp.float32)))
    n, k = config.linears(True)["qkv"]
    qkv = fused["layers"][0]["qkv"]
    assert qkv.shape == (n, k) == (config.q_size + 2 * config.kv_size, config.hidden)
    # the fused MXFP8 weight is the concatenation of the separately quantized pieces, exactly
    emu = kd.init_params(config, key, weights="emulation", progress=False)["layers"][0]
    emu_fused = kd.init_params(config, key, weights="emulation", fused=True, progress=False)["layers"][0]
    for part, names in (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))):
        values, scales = emu_fused[part].unpack()
        pieces = [emu[n].unpack() for n in names]
        np.testing.assert_array_equal(np.asarray(values).view(np.uint8),
                                      np.concatenate([np.asarray(v).view(np.uint8) for v, _ in pieces]))
        np.testing.assert_array_equal(np.asarray(scales), np.concatenate([np.asarray(s) for _, s in pieces]))


def test_linear_runs_inside_scan_over_stacked_mxweights(seed):
    """stack_layers stacks MxWeights leaf by leaf; lax.scan slices them per layer and linear
    runs on the slices: the logits of the unrolled layers, to float32 summation order with
    float32 activations, to two bf16 ulps of the largest logit with bf16 ones (the scan body is
    fused differently)."""
    tokens = tokens_for(TINY, seed + 1)
    for dtype, rel in ((jnp.float32, 1e-5), (jnp.bfloat16, 2 ** -6)):
        params = kd.init_params(TINY, jax.random.key(seed), weights="emulation", dtype=dtype,
                                progress=False)
        stacked = kd.stack_layers(params)
        q = stacked["layers"]["q"]
        assert isinstance(q, mx.MxWeight) and q.shape == TINY.linears(False)["q"]
        assert q.arrays["values"].shape[0] == TINY.layers
        a = np.asarray(forward(TINY, params, tokens).astype(jnp.float32))
        b = np.asarray(forward(TINY, stacked, tokens).astype(jnp.float32))
        assert np.abs(a - b).max() <= rel * np.abs(a).max(), (jnp.dtype(dtype).name, np.abs(a - b).max())


def test_lm_head_none_returns_the_hidden_state_and_bytes_count_the_weights(seed):
    params = kd.init_params(TINY, jax.random.key(seed), weights="emulation", lm_head="none", progress=False)
    logits, cache = prefill(TINY, params, tokens_for(TINY, seed, (2, 4)), 8)
    assert logits.shape == (2, TINY.hidden) and len(cache) == TINY.layers
    assert cache[0][0].shape == (2, TINY.kv_heads, 8, TINY.head_dim)
    nbytes = kd.projection_bytes(params)
    per_layer = sum(n * k + n * k // 32 for n, k in TINY.linears(False).values())
    assert nbytes == {"layers": TINY.layers * per_layer, "lm_head": 0}
    dense = kd.projection_bytes(kd.init_params(TINY, jax.random.key(seed), progress=False))
    assert dense["lm_head"] == TINY.vocab * TINY.hidden * 2
    assert kd.kv_cache_bytes(TINY, 2, 8) == 2 * TINY.layers * 2 * TINY.kv_heads * 8 * TINY.head_dim * 2


def test_known_models_have_their_real_dimensions_and_unknown_names_list_them():
    c = kd.model_config("llama3-8b")
    assert (c.hidden, c.intermediate, c.heads, c.kv_heads, c.head_dim, c.layers, c.vocab) == (
        4096, 14336, 32, 8, 128, 32, 128256)
    assert kd.model_config("qwen3-32b").linears(False)["q"] == (8192, 5120)  # heads * head_dim != hidden
    assert kd.model_config("llama3-70b").linears(True)["gate_up"] == (57344, 8192)
    assert kd.model_config("llama3-70b", layers=4).layers == 4
    with pytest.raises(ValueError, match="known: llama3-8b, llama3-70b"):
        kd.model_config("llama4")
    with pytest.raises(SystemExit):
        bench.main(["--model", "llama4", "--copy-mib", "8"])


def test_zoo_shapes_are_deduplicated_across_models():
    shapes = zoo.zoo_shapes(zoo.ZOO_MODELS, ["unfused", "fused"])
    assert len(shapes) == 25  # Mistral-7B's projections are Llama-3-8B's
    assert shapes[(6144, 4096)] == ["llama3-8b qkv", "mistral-7b qkv"]
    assert shapes[(1024, 4096)] == ["llama3-8b k", "llama3-8b v", "mistral-7b k", "mistral-7b v"]
    assert (512, 3584) in shapes and (51200, 5120) in shapes and (5120, 8192) in shapes
    sizes = [n * k for n, k in shapes]
    assert sizes == sorted(sizes, reverse=True)
    assert set(zoo.zoo_shapes(["llama3-8b"], ["unfused"])) == {
        (4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)}


def test_zoo_targets():
    def row(m, t, bf16, emu, n=4096, k=4096):
        r = {"n": n, "k": k, "m": m, "weight_bytes": zoo.weight_bytes(n, k), "mxfp8_us": t,
             "bf16_us": bf16, "emulation_us": emu}
        zoo.annotate(r, copy_bps=3.36e12)
        return r
    floor = row(1, 1.0, 1.0, 1.0)["floor_us"]  # ~5.2 us for the 16.5 MiB weight
    assert row(1, floor * 1.2, 3 * floor, 4 * floor)["misses"] == []
    assert any("floor" in m for m in row(1, floor * 1.6, 3 * floor, 4 * floor)["misses"])
    assert row(64, 10.0, 12.0, 20.0)["misses"] == ["< 1.3x bf16 (weight >= 16 MiB)"]
    assert row(64, 10.0, 12.0, 20.0, n=1024)["misses"] == []  # a 4 MiB weight: not slower is enough
    assert row(256, 10.0, 9.9, 20.0)["misses"] == ["< 1.00x bf16"]
    assert row(1024, 10.0, 9.6, 20.0)["misses"] == []
    assert row(1024, 10.0, 9.4, 9.0)["misses"] == ["< 0.95x bf16", "slower than emulation"]
    summary = zoo.summary([row(1, floor * 1.6, 3 * floor, 4 * floor), row(256, 10.0, 9.9, 20.0),
                           row(256, 10.0, 12.0, 20.0)])
    assert [s["band"] for s in summary] == ["M<=16", "128-512"]
    assert summary[1]["cells"] == 2 and summary[1]["missing"] == 1
    assert summary[1]["worst_vs_bf16"]["bf16_us"] == 9.9


def run_cpu(args, cwd, timeout=600):
    """A fresh CPU-only process running the jax_mxfp8 these tests import (the source tree or the
    installed package: its parent directory goes first on PYTHONPATH)."""
    root = str(Path(mx.__file__).resolve().parents[1])
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(cwd), env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path))


@pytest.mark.slow
def test_bench_model_cli_on_the_tiny_model(tmp_path):
    """`python -m jax_mxfp8 bench --model tiny` end to end: both layouts, bf16 and the
    device's backend (EMULATION on CPU), decode at two batch sizes and a prefill, JSON and
    markdown written."""
    out = run_cpu(["-m", "jax_mxfp8", "bench", "--model", "tiny", "--batch", "1,2", "--ctx", "32",
                   "--prefill", "16", "--steps", "2", "--rounds", "1", "--warmup", "1",
                   "--copy-mib", "8", "--out", "out"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "model_bench.json").read_text())
    assert report["meta"]["model"] == "tiny" and report["meta"]["platform"] == "cpu"
    rows = report["results"]
    assert {(r["layout"], r["weights"]) for r in rows} == {
        (layout, w) for layout in ("unfused", "fused") for w in ("bf16", "emulation")}
    assert sorted(r["batch"] for r in rows if r["phase"] == "decode") == [1, 1, 1, 1, 2, 2, 2, 2]
    assert sum(r["phase"] == "prefill" for r in rows) == 4
    for r in rows:
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["vs_bf16"] > 0, r
        if r["phase"] == "decode":
            assert r["floor_kv_ms"] > r["floor_ms"] > 0, r
    emu = [r for r in rows if r["weights"] == "emulation"]
    assert all(r["projection_bytes"] < 0.6 * rows[0]["projection_bytes"] for r in emu)  # 1 + 1/32 bytes vs 2
    md = (tmp_path / "out" / "model_bench.md").read_text()
    assert "| fused | emulation | decode | 2 |" in md and "dense bf16 in every peer" in md


@pytest.mark.slow
def test_bench_zoo_cli_quick_on_the_tiny_model(tmp_path):
    """`python -m jax_mxfp8 bench --zoo --quick` on the tiny model's shapes: every (shape, M)
    cell timed (the R-difference on CPU), targets checked, JSON and markdown written."""
    out = run_cpu(["-m", "jax_mxfp8", "bench", "--zoo", "--quick", "--models", "tiny", "--m", "1,32",
                   "--copy-mib", "8", "--out", "out"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "zoo.json").read_text())
    assert report["meta"]["backend"] == "emulation" and "R-difference" in report["meta"]["timer"]
    rows = report["results"]
    assert {(r["n"], r["k"]) for r in rows} == set(zoo.zoo_shapes(["tiny"], ["unfused", "fused"]))
    assert sorted({r["m"] for r in rows}) == [1, 32] and len(rows) == 2 * len(report["meta"]["shapes"])
    for r in rows:  # R-differences on a busy CPU may even come out negative: no sign checks
        assert all(isinstance(r[f"{impl}_us"], float) for impl in ("mxfp8", "bf16", "emulation")), r
        assert r["floor_us"] > 0 and isinstance(r["misses"], list), r
    assert [s["band"] for s in report["summary"]] == ["M<=16", "17-64"]
    md = (tmp_path / "out" / "zoo.md").read_text()
    assert "## Worst cell per M band" in md and "## Every cell" in md
