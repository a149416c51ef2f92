"""A small Llama-style decoder in Flax NNX for the demo, named like Hugging Face checkpoints.

Attribute paths mirror `LlamaForCausalLM` ("model.layers.0.self_attn.q_proj", "lm_head", ...)
so state_dict()/load_state_dict() read and write HF-named safetensors directly: bf16
checkpoints, and MXFP8 ones in the ModelOpt / compressed-tensors layout. Full-sequence
forward only (no KV cache): enough to measure quantization error and GEMM time.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_mxfp8.checkpoint import load_safetensors, save_safetensors
from jax_mxfp8.flax.nnx import Mxfp8Linear, load_state_dict, state_dict
from jax_mxfp8.ops.dequantize import dequantize
from jax_mxfp8.weight import MxWeight

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Tensors some HF checkpoints carry that this model does not use (old rotary buffers, FP8 KV-cache
# and static activation scales of ModelOpt exports).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".k_scale", ".v_scale", ".input_scale")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 4096
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # sorted (key, value) pairs of HF's dict (hashable)
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_hf(cls, config: dict) -> "DecoderConfig":
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported by the demo decoder "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (silu only)")
        scaling = config.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("default", "llama3"):
            raise ValueError(f"rope_scaling {scaling} is not supported (default or llama3 only)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        kwargs["rope_scaling"] = tuple(sorted(scaling.items())) if scaling else None
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = config["num_attention_heads"]
        kwargs["attention_bias"] = config.get("attention_bias", model_type == "qwen2")
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        config["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
                "torch_dtype": "bfloat16", **config}


def rope_inverse_frequencies(config: DecoderConfig) -> np.ndarray:
    """Rotary frequencies; with rope_scaling "llama3" the long wavelengths are stretched the way
    Llama 3.1+ does (scaled by `factor`, smoothly blended between the two cut-offs)."""
    dim = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = dict(config.rope_scaling or ())
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv
        smooth = np.clip((context / wavelength - low) / (high - low), 0.0, 1.0)
        inv = (1 - smooth) * inv / factor + smooth * inv
    return inv.astype(np.float32)


def rotate(x, cos, sin):
    """HF's rotate-half RoPE on [batch, seq, heads, dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim), dtype))

    def __call__(self, tokens):
        return jnp.take(self.weight[...], tokens, axis=0)


def _linear(d_in, d_out, dtype, rngs, bias=False):
    # lecun-normal (std 1/sqrt(in)): every sublayer contributes O(1) to the residual stream, so a
    # random model exercises the quantization error of every layer.
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, c: DecoderConfig, dtype, rngs):
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = _linear(c.hidden_size, self.heads * self.head_dim, dtype, rngs, c.attention_bias)
        self.k_proj = _linear(c.hidden_size, self.kv_heads * self.head_dim, dtype, rngs, c.attention_bias)
        self.v_proj = _linear(c.hidden_size, self.kv_heads * self.head_dim, dtype, rngs, c.attention_bias)
        self.o_proj = _linear(self.heads * self.head_dim, c.hidden_size, dtype, rngs)

    def __call__(self, x, cos, sin):
        b, t, _ = x.shape
        q = rotate(self.q_proj(x).reshape(b, t, self.heads, self.head_dim), cos, sin)
        k = rotate(self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # grouped-query aware
        return self.o_proj(out.reshape(b, t, self.heads * self.head_dim))


class MLP(nnx.Module):
    def __init__(self, c: DecoderConfig, dtype, rngs):
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size, dtype, rngs)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size, dtype, rngs)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, c: DecoderConfig, dtype, rngs):
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.self_attn = Attention(c, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.mlp = MLP(c, dtype, rngs)

    def __call__(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nnx.Module):
    def __init__(self, c: DecoderConfig, dtype, rngs):
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype, rngs)
        self.layers = nnx.List([DecoderLayer(c, dtype, rngs) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)


class CausalLM(nnx.Module):
    """tokens [batch, seq] int -> logits [batch, seq, vocab] (causal, full sequence)."""

    def __init__(self, config: DecoderConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.config = config
        self.model = DecoderStack(config, dtype, rngs)
        self.lm_head = None if config.tie_word_embeddings else _linear(
            config.hidden_size, config.vocab_size, dtype, rngs)

    def __call__(self, tokens):
        x = self.model.embed_tokens(tokens)
        positions = jnp.arange(tokens.shape[-1], dtype=jnp.float32)
        angles = positions[:, None] * rope_inverse_frequencies(self.config)[None, :]
        angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
        cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        if self.lm_head is None:
            return x @ self.model.embed_tokens.weight[...].T
        return self.lm_head(x)


# ---- HF-style directories ----------------------------------------------------------------------

def dequantized(tensors: dict[str, Any], dtype=jnp.bfloat16) -> dict[str, Any]:
    """The same tensors with every MxWeight dequantized to a dense [out, in] array."""
    return {name: dequantize(*value.unpack(), dtype=dtype) if isinstance(value, MxWeight) else value
            for name, value in tensors.items()}


def load_pretrained(directory, *, dtype=jnp.bfloat16, backend=None, dequantize_weights=False,
                    quantize_activations=None):
    """(model, config, n_mxfp8) from a directory with config.json + safetensors. MXFP8
    tensors become Mxfp8Linear layers (or bf16 Linears with dequantize_weights=True)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --checkpoint needs a Hugging Face style "
                                f"directory (config.json + model.safetensors[.index.json])")
    config = DecoderConfig.from_hf(json.loads(config_path.read_text()))
    tensors = {k: v for k, v in load_safetensors(directory, backend=backend).items()
               if not k.endswith(IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    n_mxfp8 = sum(isinstance(v, MxWeight) for v in tensors.values())
    if dequantize_weights:
        tensors = dequantized(tensors, dtype)
    model = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    model = load_state_dict(model, tensors, quantize_activations=quantize_activations)
    return model, config, n_mxfp8


def save_pretrained(model: CausalLM, directory, *, max_shard_bytes: int | None = None) -> list[Path]:
    """Writes config.json (+ ModelOpt-style MXFP8 quantization config when the model holds
    Mxfp8Linear layers) and the HF-named safetensors."""
    directory = Path(directory)
    tensors = state_dict(model)
    config = model.config.to_hf()
    quantized = [path for path, node in nnx.iter_graph(model) if isinstance(node, Mxfp8Linear)]
    if quantized:
        excluded = sorted(".".join(map(str, path)) for path, node in nnx.iter_graph(model)
                          if isinstance(node, nnx.Linear))
        config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "MXFP8",
                                         "group_size": 32, "ignore": excluded}
    files = save_safetensors(directory, tensors, max_shard_bytes=max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if quantized:
        (directory / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "jax_mxfp8"},
            "quantization": {"quant_algo": "MXFP8", "kv_cache_quant_algo": None, "group_size": 32,
                             "exclude_modules": config["quantization_config"]["ignore"]}}, indent=2) + "\n")
    return files
