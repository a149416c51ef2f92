"""The demo (`python -m jax_mxfp8 demo`, jax_mxfp8/cli/demo.py): its report, its tolerance
check (against the independent numpy reference for --checkpoint, and the float32 Flax model
against that reference always), saving and loading checkpoints through it, the checkpoints of
tests/fixtures, and its errors. The decoder model itself: test_models_decoder.py; the
tensor-parallel demo (`demo --tp`): test_models_tp_mlp.py."""
import argparse
import contextlib
import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import jax_mxfp8 as mx  # noqa: E402
from jax_mxfp8.cli import demo  # noqa: E402
from jax_mxfp8.backends import get_backend_impl  # noqa: E402
from jax_mxfp8.flax import Mxfp8Linear  # noqa: E402
from jax_mxfp8.models import decoder  # noqa: E402
from jax_mxfp8.models.decoder import CausalLM, DecoderConfig, load_pretrained, save_pretrained  # noqa: E402

from helpers import SMALL_DECODER, cpu_only, jitted_logits  # noqa: E402

SMALL = ["--layers", "2", "--hidden", "128", "--intermediate", "256", "--heads", "4",
         "--kv-heads", "2", "--vocab", "512", "--batch", "2", "--seq", "8", "--repeats", "2"]
CONFIG = DecoderConfig(**SMALL_DECODER)  # the model of SMALL's arguments
FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT_RUN = ["--batch", "2", "--seq", "8", "--repeats", "0"]


def run_demo(*argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = demo.main(parser.parse_args(list(argv)))
    return code, out.getvalue()


def reported(text: str, line_start: str, what: str = "relative error") -> float:
    """A number the demo printed: `what` on the line starting with `line_start`."""
    line = next(line for line in text.splitlines() if line.startswith(line_start))
    return float(re.search(rf"{what} ([-+.0-9e]+)", line).group(1))


@pytest.mark.slow
def test_cli_demo_runs_and_reports():
    out = subprocess.run([sys.executable, "-m", "jax_mxfp8", "demo", *SMALL], capture_output=True,
                         text=True, timeout=600, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    # The automatic choice for the default device (emulation on a CPU, marlin on an H100).
    backend = mx.select_backend()
    assert jax.devices()[0].platform != "cpu" or backend is mx.Backend.EMULATION, backend
    math = "W8A8" if get_backend_impl(backend).default_quantize_activations else "W8A16"
    for expected in (f"backend {backend.value} ({math})", f"math: {math}", "cosine similarity",
                     "logits vs numpy reference", "logits vs bf16 model", "weight memory",
                     "time per step (device time", "PASS"):
        assert expected in text, text
    # the numpy reference on the bf16 model's weights: float32 rounding apart, the Flax model's
    assert reported(text, "float32 Flax model vs numpy reference") < 1e-4, text


def test_demo_fails_outside_tolerance():
    code, text = run_demo(*SMALL, "--repeats", "0", "--max-rel-error", "1e-6")
    assert code == 1 and "FAIL" in text


def test_save_then_load_mxfp8_checkpoint(tmp_path):
    code, text = run_demo(*SMALL, "--repeats", "0", "--save", str(tmp_path / "ck"))
    assert code == 0, text
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and config["hidden_size"] == 128
    assert quantization["config_groups"]["group_0"]["input_activations"] is None  # W8A16 on CPU
    raw = mx.checkpoint.read_safetensors(tmp_path / "ck")
    assert raw["model.layers.0.mlp.down_proj.weight"].dtype == jnp.float8_e4m3fn
    assert raw["model.layers.0.mlp.down_proj.weight_scale"].shape == (128, 256 // 32)
    assert raw["model.embed_tokens.weight"].dtype == jnp.bfloat16

    model, loaded_config, n_mxfp8 = load_pretrained(tmp_path / "ck", backend="emulation")
    assert loaded_config == CONFIG and n_mxfp8 == 2 * 7 + 1
    assert isinstance(model.model.layers[1].self_attn.k_proj, Mxfp8Linear)
    assert isinstance(model.lm_head, Mxfp8Linear)
    # The demo on the saved checkpoint: its check is the numpy reference on the checkpoint's own
    # weights dequantized (float32), which differs from the MXFP8 model only by the bf16
    # activations (~1e-2). Against the bf16 model with the same weights only accumulation-order
    # differences remain, amplified by bf16 activations between layers (on a GPU the selected
    # Marlin kernel sums in another order than XLA's dot: 1.7e-3 seen).
    code, text = run_demo("--checkpoint", str(tmp_path / "ck"), *CHECKPOINT_RUN,
                          "--max-rel-error", "3e-2", "--min-cosine", "0.999")
    assert code == 0 and "MXFP8 checkpoint" in text, text
    assert "math: W8A16" in text and "compressed-tensors quantization config: weight-only" in text, text
    assert reported(text, "logits vs bf16 model") < 5e-3, text
    assert reported(text, "float32 Flax model vs numpy reference") < 1e-4, text


def test_w8a8_checkpoint_is_run_w8a8(tmp_path):
    """A checkpoint whose quantization config quantizes activations runs W8A8 without --w8a8."""
    code, text = run_demo(*SMALL, "--repeats", "0", "--w8a8", "--backend", "emulation",
                          "--save", str(tmp_path / "ck"))
    assert code == 0, text
    code, text = run_demo("--checkpoint", str(tmp_path / "ck"), *CHECKPOINT_RUN,
                          "--backend", "emulation")  # a backend that computes W8A8
    assert code == 0 and "math: W8A8" in text and "weights and activations" in text, text


def test_bf16_checkpoint_is_quantized_by_the_demo(tmp_path):
    reference = CausalLM(CONFIG, rngs=nnx.Rngs(3))
    save_pretrained(reference, tmp_path / "bf16", max_shard_bytes=400_000)
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    loaded, _, n_mxfp8 = load_pretrained(tmp_path / "bf16")
    assert n_mxfp8 == 0 and isinstance(loaded.lm_head, nnx.Linear)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, CONFIG.vocab_size)
    np.testing.assert_array_equal(jitted_logits(loaded, tokens), jitted_logits(reference, tokens))
    code, text = run_demo("--checkpoint", str(tmp_path / "bf16"), *CHECKPOINT_RUN, "--keep-lm-head")
    assert code == 0 and "bf16 checkpoint" in text and "14 linear layers in MXFP8" in text, text
    assert "no quantization config" in text, text


def test_demo_check_sees_a_wrong_rope_theta(tmp_path, monkeypatch):
    """A decoder that parses the config wrongly (here: rope_theta 10000 instead of the
    checkpoint's 500000, the bug of a loader reading only the top-level key) fails the demo's
    check, since the reference parses config.json itself."""
    config = dataclasses.replace(CONFIG, rope_theta=500000.0)
    save_pretrained(CausalLM(config, rngs=nnx.Rngs(4)), tmp_path / "bf16")
    code, text = run_demo("--checkpoint", str(tmp_path / "bf16"), *CHECKPOINT_RUN)
    assert code == 0 and "rope_theta 500000" in text, text
    parse = DecoderConfig.from_hf
    monkeypatch.setattr(decoder.DecoderConfig, "from_hf", classmethod(
        lambda cls, hf: dataclasses.replace(parse(hf), rope_theta=10000.0)))
    code, text = run_demo("--checkpoint", str(tmp_path / "bf16"), *CHECKPOINT_RUN)
    assert code == 1 and "FAIL" in text and "disagrees with the numpy reference" in text, text
    assert reported(text, "float32 Flax model vs numpy reference") > 1e-2, text


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())
                         if FIXTURES.is_dir() else [])
def test_demo_on_the_fixture_checkpoints(name):
    """Each checkpoint of tests/fixtures (written by transformers and the quantizers themselves):
    the demo loads it, runs what its quantization config says and passes its check against the
    reference on the checkpoint's own weights."""
    code, text = run_demo("--checkpoint", str(FIXTURES / name), "--batch", "1", "--seq", "12",
                          "--repeats", "0")
    assert code == 0 and "PASS" in text, text
    assert reported(text, "float32 Flax model vs numpy reference") < 1e-4, text
    quant = decoder.read_quant_config(FIXTURES / name)
    if quant is not None:
        w8a8 = quant.quantize_activations and get_backend_impl(mx.select_backend()).supports_w8a8
        assert f"math: {'W8A8' if w8a8 else 'W8A16'}" in text, text  # MARLIN: W8A16, said so
        if quant.quantize_activations and not w8a8:
            assert "computes W8A16 only" in text, text


@cpu_only("needs a device that cannot run CUTLASS (CPU)")
def test_unavailable_backend_is_a_clear_error():
    code, text = run_demo(*SMALL, "--backend", "cutlass")
    assert code == 2 and "error: backend 'cutlass' cannot run here" in text


def test_checkpoint_option_needs_a_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_demo("--checkpoint", str(tmp_path))
