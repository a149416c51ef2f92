"""The decoder model (jax_mxfp8.models.decoder): MXFP8 against bf16 with dequantized weights,
checkpoints with tied embeddings and extra tensors, Hugging Face config parsing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import jax_mxfp8 as mx  # noqa: E402
from jax_mxfp8.flax import load_state_dict, quantize_model, state_dict  # noqa: E402
from jax_mxfp8.models.decoder import (  # noqa: E402
    CausalLM, DecoderConfig, dequantized, load_pretrained, rope_inverse_frequencies, save_pretrained)

from helpers import SMALL_DECODER, jitted_logits, rel_fro  # noqa: E402

CONFIG = DecoderConfig(**SMALL_DECODER)


def test_mxfp8_model_matches_bf16_model_with_dequantized_weights(rng):
    """All of the demo's error is weight quantization: the emulated MXFP8 model computes what the
    bf16 model computes with dequantize(quantize(W)) weights, up to an occasional 1-ulp bf16
    rounding difference of the two dots (float32 vs XLA's bf16 dot output)."""
    reference = CausalLM(CONFIG, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    model = quantize_model(nnx.clone(reference), backend="emulation")
    fake_quant = load_state_dict(CausalLM(CONFIG, rngs=nnx.Rngs(0)), dequantized(state_dict(model)))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, CONFIG.vocab_size)
    got, fake, want = (jitted_logits(m, tokens) for m in (model, fake_quant, reference))
    assert 0.01 < rel_fro(got, want) < 0.15  # the quantization error
    assert rel_fro(got, fake) < 1e-3
    assert np.mean(got == fake) > 0.99


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
    np.testing.assert_array_equal(jitted_logits(loaded, tokens), jitted_logits(model, tokens))


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
