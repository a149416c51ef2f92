"""The demo (`python -m jax_mxfp8 demo`) and the decoder model it runs."""
import argparse
import contextlib
import io
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import jax_mxfp8 as mx  # noqa: E402
from jax_mxfp8 import demo  # noqa: E402
from jax_mxfp8.backends import get_backend_impl  # noqa: E402
from jax_mxfp8.flax import Mxfp8Linear, load_state_dict, quantize_model, state_dict  # noqa: E402
from jax_mxfp8.flax.decoder import (  # noqa: E402
    CausalLM, DecoderConfig, dequantized, load_pretrained, rope_inverse_frequencies, save_pretrained)

SMALL = ["--layers", "2", "--hidden", "128", "--intermediate", "256", "--heads", "4",
         "--kv-heads", "2", "--vocab", "512", "--batch", "2", "--seq", "8", "--repeats", "2"]
CONFIG = DecoderConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


def run_demo(*argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = demo.main(parser.parse_args(list(argv)))
    return code, out.getvalue()


def jitted(model, tokens):
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens), np.float64)


def test_cli_demo_runs_and_reports():
    out = subprocess.run([sys.executable, "-m", "jax_mxfp8", "demo", *SMALL], capture_output=True,
                         text=True, timeout=600, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    # The automatic choice for the default device (emulation on a CPU, marlin on an H100).
    backend = mx.select_backend()
    assert jax.devices()[0].platform != "cpu" or backend is mx.Backend.EMULATION, backend
    math = "W8A8" if get_backend_impl(backend).default_quantize_activations else "W8A16"
    for expected in (f"backend {backend.value} ({math})", "cosine similarity", "relative error",
                     "weight memory", "time per step (device time", "PASS"):
        assert expected in text, text


def test_demo_fails_outside_tolerance():
    code, text = run_demo(*SMALL, "--repeats", "0", "--max-rel-error", "1e-6")
    assert code == 1 and "FAIL" in text


def test_mxfp8_model_matches_bf16_model_with_dequantized_weights():
    """All of the demo's error is weight quantization: the emulated MXFP8 model computes what the
    bf16 model computes with dequantize(quantize(W)) weights, up to an occasional 1-ulp bf16
    rounding difference of the two dots (float32 vs XLA's bf16 dot output)."""
    reference = CausalLM(CONFIG, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
    model = quantize_model(nnx.clone(reference), backend="emulation")
    fake_quant = load_state_dict(CausalLM(CONFIG, rngs=nnx.Rngs(0)), dequantized(state_dict(model)))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, CONFIG.vocab_size)
    got, fake, want = jitted(model, tokens), jitted(fake_quant, tokens), jitted(reference, tokens)
    quantization_error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0.01 < quantization_error < 0.15
    assert np.linalg.norm(got - fake) / np.linalg.norm(fake) < 1e-3
    assert np.mean(got == fake) > 0.99


def test_save_then_load_mxfp8_checkpoint(tmp_path):
    code, text = run_demo(*SMALL, "--repeats", "0", "--save", str(tmp_path / "ck"))
    assert code == 0, text
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "MXFP8" and config["hidden_size"] == 128
    raw = mx.checkpoint.read_safetensors(tmp_path / "ck")
    assert raw["model.layers.0.mlp.down_proj.weight"].dtype == jnp.float8_e4m3fn
    assert raw["model.layers.0.mlp.down_proj.weight_scale"].shape == (128, 256 // 32)
    assert raw["model.embed_tokens.weight"].dtype == jnp.bfloat16

    model, loaded_config, n_mxfp8 = load_pretrained(tmp_path / "ck", backend="emulation")
    assert loaded_config == CONFIG and n_mxfp8 == 2 * 7 + 1
    assert isinstance(model.model.layers[1].self_attn.k_proj, Mxfp8Linear)
    assert isinstance(model.lm_head, Mxfp8Linear)
    # The demo on the saved checkpoint compares it with its own weights dequantized: only
    # accumulation-order differences remain, amplified by bf16 activations between layers
    # (on a GPU the selected Marlin kernel sums in another order than XLA's dot: 1.7e-3 seen).
    code, text = run_demo("--checkpoint", str(tmp_path / "ck"), "--batch", "2", "--seq", "8",
                          "--repeats", "0", "--max-rel-error", "5e-3", "--min-cosine", "0.9999")
    assert code == 0 and "MXFP8 checkpoint" in text, text


def test_bf16_checkpoint_is_quantized_by_the_demo(tmp_path):
    reference = CausalLM(CONFIG, rngs=nnx.Rngs(3))
    save_pretrained(reference, tmp_path / "bf16", max_shard_bytes=400_000)
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    loaded, _, n_mxfp8 = load_pretrained(tmp_path / "bf16")
    assert n_mxfp8 == 0 and isinstance(loaded.lm_head, nnx.Linear)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, CONFIG.vocab_size)
    np.testing.assert_array_equal(jitted(loaded, tokens), jitted(reference, tokens))
    code, text = run_demo("--checkpoint", str(tmp_path / "bf16"), "--batch", "2", "--seq", "8",
                          "--repeats", "0", "--keep-lm-head")
    assert code == 0 and "bf16 checkpoint" in text and "14 linear layers in MXFP8" in text, text


def test_tied_embeddings_and_ignored_tensors(tmp_path):
    config = DecoderConfig(**{**CONFIG.__dict__, "tie_word_embeddings": True})
    model = CausalLM(config, rngs=nnx.Rngs(0))
    assert model.lm_head is None
    save_pretrained(model, tmp_path / "tied")
    extra = {**mx.load_safetensors(tmp_path / "tied"),
             "lm_head.weight": jnp.zeros((512, 128), jnp.bfloat16),  # some exports keep it
             "model.layers.0.self_attn.rotary_emb.inv_freq": jnp.ones(16)}
    mx.save_safetensors(tmp_path / "tied", extra)
    loaded, _, _ = load_pretrained(tmp_path / "tied")
    tokens = jnp.arange(8)[None]
    np.testing.assert_array_equal(jitted(loaded, tokens), jitted(model, tokens))


def test_hf_config_parsing():
    hf = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": None,
          "rope_theta": 500000.0, "max_position_embeddings": 8192,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    config = DecoderConfig.from_hf(hf)
    assert config.num_key_value_heads == 4 and config.head_dim == 16
    assert DecoderConfig.from_hf(config.to_hf()) == config
    inv = rope_inverse_frequencies(config).astype(np.float64)
    plain = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    wavelength = 2 * np.pi / plain
    assert np.allclose(inv[wavelength < 8192 / 4], plain[wavelength < 8192 / 4])  # short: unchanged
    assert np.allclose(inv[wavelength > 8192], plain[wavelength > 8192] / 8)        # long: / factor
    with pytest.raises(ValueError, match="not supported"):
        DecoderConfig.from_hf({**hf, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_scaling"):
        DecoderConfig.from_hf({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.skipif(any(d.platform == "gpu" for d in jax.devices()),
                    reason="needs a device that cannot run CUTLASS (CPU)")
def test_unavailable_backend_is_a_clear_error():
    code, text = run_demo(*SMALL, "--backend", "cutlass")
    assert code == 2 and "error: backend 'cutlass' cannot run here" in text


def test_checkpoint_option_needs_a_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_demo("--checkpoint", str(tmp_path))
