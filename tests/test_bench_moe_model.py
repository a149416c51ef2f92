"""The MoE layer benchmark (`bench --model mixtral-8x7b | qwen3-30b-a3b | tiny-moe`,
bench/moe_model.py) on CPU with the tiny configuration: the CLI end to end, the peers' layers
(the same weights, the MXFP8 one computing what the bf16 layer on its dequantized weights does)
and the option errors. No timing is checked, only that times and floors are there and finite."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mxfp8 import bench, cli
from jax_mxfp8.backends import Backend
from jax_mxfp8.bench import model as model_bench
from jax_mxfp8.bench import moe_model
from jax_mxfp8.flax import moe

TINY = moe_model.MODELS["tiny-moe"]
QUICK = ["--batch", "1,4", "--prefill", "16", "--steps", "2", "--rounds", "1", "--warmup", "1",
         "--no-busy", "--copy-mib", "8"]


def test_configs_have_the_real_models_dimensions():
    dims = {name: (c.experts, c.top_k, c.hidden, c.intermediate) for name, c in moe_model.MODELS.items()}
    assert dims["mixtral-8x7b"] == (8, 2, 4096, 14336)
    assert dims["qwen3-30b-a3b"] == (128, 8, 2048, 768)
    assert not set(moe_model.MODELS) & set(model_bench.kd.MODELS)  # the dispatch is unambiguous


def test_tiny_moe_cli_end_to_end(tmp_path, capsys):
    """Two stacked layers, decode at T = 1 and 4 and a 16-token prefill, for bf16 and the
    device's default MXFP8 backend (EMULATION on CPU): rows with finite times, floors from the
    touched experts' stored bytes, ratios against bf16, the kernel check, and the files."""
    code = cli.main(["bench", "--model", "tiny-moe", "--layers", "2", *QUICK, "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().out[-3000:]
    report = json.loads((tmp_path / "moe_model_bench.json").read_text())
    assert report["meta"]["model"] == "tiny-moe" and report["meta"]["layers"] == 2
    rows = report["results"]
    peers = ["bf16", *[b.value for b in moe_model.default_backends()]]
    assert [r["weights"] for r in rows] == [p for p in peers for _ in range(3)]
    assert [(r["phase"], r["tokens"]) for r in rows[:3]] == [("decode", 1), ("decode", 4), ("prefill", 16)]
    router = TINY.experts * TINY.hidden * 2
    expert = {"bf16": TINY.expert_params() * 2, "emulation": TINY.expert_params() * 33 // 32}
    for r in rows:
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["tokens_per_s"] > 0, r
        assert math.isfinite(r["x_floor"]) and r["floor_ms"] > 0 and r["vs_bf16"] > 0, r
        assert r["experts_touched"] == min(TINY.experts, r["tokens"] * TINY.top_k), r
        if r["weights"] in expert:  # the floor's bytes: 2 layers x (router + touched experts)
            assert r["floor_bytes"] == 2 * (router + r["experts_touched"] * expert[r["weights"]]), r
        if r["weights"] != "bf16":
            assert r["check_ok"] and r["check_rel_err"] <= moe_model.MAX_KERNEL_ERROR, r
    assert all(r["vs_bf16"] == 1.0 for r in rows if r["weights"] == "bf16")
    md = (tmp_path / "moe_model_bench.md").read_text()
    assert f"| {peers[-1]} | prefill | 16 |" in md and "experts touched" in md


def test_the_mxfp8_layer_is_the_bf16_layer_on_its_dequantized_weights(seed):
    """The peers hold the same weights (one key), and quantize_moe's layer computes what the
    bf16 layer does on the dequantized weights: exactly for EMULATION (dequantize + the same
    grouped dot), and within the kernel bound of the einsum over every expert (no sorting);
    against the bf16 layer itself it differs by the MXFP8 rounding only."""
    key = jax.random.key(seed)
    bf16, = moe_model.build_layers(TINY, 1, "bf16", key)
    mxfp8, = moe_model.build_layers(TINY, 1, Backend.EMULATION, key)
    assert mxfp8.is_mxfp8 and not bf16.is_mxfp8
    x = jax.random.normal(jax.random.fold_in(key, 1), (16, TINY.hidden), jnp.bfloat16)
    got = mxfp8(x)
    assert moe_model.kernel_error(mxfp8, x) == 0.0
    twin = moe.dequantized(mxfp8)
    weights = [p.weight.get_value() for p in (twin.gate, twin.experts.gate_up_proj, twin.experts.down_proj)]
    einsum = moe.moe_reference(x, *weights, top_k=TINY.top_k)
    assert moe_model.relative_error(got, einsum) <= moe_model.MAX_KERNEL_ERROR
    assert 1e-3 < moe_model.relative_error(got, bf16(x)) < 0.15
    np.testing.assert_array_equal(np.asarray(mxfp8.gate.weight.get_value()),
                                  np.asarray(bf16.gate.weight.get_value()))


@pytest.mark.parametrize("extra, flag", [(["--ctx", "64"], "--ctx"), (["--fused"], "--fused / --unfused"),
                                         (["--lm-head", "none"], "--lm-head"),
                                         (["--layer-loop", "scan"], "--layer-loop")])
def test_dense_decoder_options_are_a_usage_error(extra, flag, capsys):
    with pytest.raises(SystemExit) as err:
        model_bench.main(["--model", "tiny-moe", *extra])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert flag in message and "options of the dense decoders" in message, message


@pytest.mark.parametrize("extra, message", [(["--layers", "0"], "at least one layer"),
                                            (["--backend", "cutlass"], "cannot run here|no grouped GEMM")])
def test_bad_values_are_clear_errors(extra, message):
    with pytest.raises(SystemExit, match=message):
        model_bench.main(["--model", "tiny-moe", *QUICK, *extra])


def test_help_and_the_unknown_model_error_list_the_moe_models():
    assert "mixtral-8x7b, qwen3-30b-a3b, tiny-moe" in " ".join(model_bench.parser().format_help().split())
    with pytest.raises(SystemExit, match="known: llama3-8b.*mixtral-8x7b, qwen3-30b-a3b, tiny-moe"):
        bench.main(["--model", "llama4", "--copy-mib", "8"])
