"""A small Llama-style decoder in Flax NNX for the demo, named like Hugging Face checkpoints.

Attribute paths mirror `LlamaForCausalLM` ("model.layers.0.self_attn.q_proj", "lm_head", ...)
so state_dict()/load_state_dict() read and write HF-named safetensors directly: bf16
checkpoints, and MXFP8 ones in the ModelOpt / compressed-tensors layout. Full-sequence
forward only (no KV cache): enough to measure quantization error and GEMM time.

DecoderConfig.from_hf reads transformers 4.x and 5.x config.json files of LlamaForCausalLM,
MistralForCausalLM and Qwen2ForCausalLM and refuses (ValueError) what the decoder would
compute differently from transformers. load_pretrained honours the checkpoint's quantization
config (jax_mxfp8.quant_config). llama_reference.py is an independent numpy forward pass the
tests and the demo check this model against.

Fused projections: q/k/v read the same input, and so do gate/up; quantized, each group can be
one MXFP8 GEMM (jax_mxfp8.flax.nnx.Mxfp8FusedLinear, "self_attn.q_k_v_proj" and
"mlp.gate_up_proj"): quantize_model(model, fuse=PROJECTIONS), load_pretrained(..., fuse=True)
or fuse_projections(model). The layers call them through call_fused, so the float, quantized
and fused models share one forward, and state_dict / save_pretrained still write the HF
per-projection names (a fused weight is split back exactly).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_mxfp8.backends import get_backend_impl
from jax_mxfp8.checkpoint import CheckpointError, load_safetensors, save_safetensors
from jax_mxfp8.flax.nnx import (
    Mxfp8FusedLinear, Mxfp8Linear, call_fused, fuse_linears, load_state_dict, state_dict)
from jax_mxfp8.ops.dequantize import dequantize
from jax_mxfp8.quant_config import read_quant_config  # the demo calls it as decoder.read_quant_config
from jax_mxfp8.weight import MxWeight

# architectures name -> model_type, for the three HF families this decoder computes exactly.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES.values())
SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Keys a config.json must carry: transformers' save_pretrained always writes them, so a missing
# one means a hand-made config, and transformers' 7B-sized class defaults would only be a guess.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads")
# transformers' class defaults (LlamaConfig / MistralConfig / Qwen2Config, the same in 4.x and
# 5.x) for the keys that change the math and that a config.json may omit: where transformers
# itself would fill a missing key in, so does from_hf, with the same value.
HF_CLASS_DEFAULTS = {
    "llama": {"num_key_value_heads": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"},
    "mistral": {"num_key_value_heads": 8, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "sliding_window": 4096, "hidden_act": "silu"},
    "qwen2": {"num_key_value_heads": 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
              "hidden_act": "silu"},
}
# transformers' RotaryEmbeddingConfigMixin.default_theta: what 4.x and 5.x use when a config has
# no rope_theta anywhere (neither a RoPE dict nor the top-level key).
HF_DEFAULT_ROPE_THETA = 10000.0
# Tensors some HF checkpoints carry that this model does not use (old rotary buffers, FP8 KV-cache
# and static activation scales of ModelOpt exports).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".k_scale", ".v_scale", ".input_scale")
# The projections that read the same input, and where they live: the `fuse` spec of
# quantize_model / fuse_linears for this model.
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
PROJECTIONS = {"model.layers.*.self_attn": QKV, "model.layers.*.mlp": GATE_UP}


def _model_type(config: dict) -> str:
    architectures = config.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if unknown:
        raise ValueError(f"architecture {unknown[0]!r} is not supported by the decoder (supported: "
                         f"{', '.join(ARCHITECTURES)})")
    model_type = config.get("model_type")
    if model_type is None:
        if not architectures:
            raise ValueError("config.json names neither model_type nor architectures (supported: "
                             f"{', '.join(ARCHITECTURES)})")
        model_type = ARCHITECTURES[architectures[0]]
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported by the decoder (supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    disagree = [a for a in architectures if ARCHITECTURES[a] != model_type]
    if disagree:
        raise ValueError(f"config.json says model_type {model_type!r} but architectures "
                         f"{architectures}: which one is it?")
    return model_type


def _rope(config: dict, head_dim: int) -> tuple[float, tuple | None]:
    """(rope_theta, normalized rope_scaling) from transformers 5's `rope_parameters` or 4.x's
    top-level `rope_theta` + `rope_scaling`; contradictions and unsupported types raise."""
    dicts = {key: config[key] for key in ("rope_parameters", "rope_scaling") if config.get(key)}
    for key, value in dicts.items():
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a dict; got {value!r}")
        if set(value) & {"full_attention", "sliding_attention"}:
            raise ValueError(f"{key} holds one RoPE dict per layer type ({sorted(value)}); the "
                             f"decoder supports one RoPE for all layers")
    types = {key: d.get("rope_type", d.get("type", "default")) for key, d in dicts.items()}
    if len(set(types.values())) > 1:
        raise ValueError(f"rope_parameters says rope type {types['rope_parameters']!r} but "
                         f"rope_scaling says {types['rope_scaling']!r}")
    rope_type = next(iter(types.values()), "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} (from {' and '.join(types)}) is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)}); the decoder would "
                         f"compute different positions than the checkpoint was trained with")
    merged: dict[str, Any] = {}
    for key, d in dicts.items():
        for name, value in d.items():
            if name in ("rope_type", "type"):
                continue
            if name in merged and merged[name] != value:
                raise ValueError(f"rope_parameters and rope_scaling disagree on {name!r}: "
                                 f"{dicts['rope_parameters'][name]!r} vs {dicts['rope_scaling'][name]!r}")
            merged[name] = value
    thetas = {key: v for key, v in ((f"{'/'.join(dicts)}.rope_theta", merged.get("rope_theta")),
                                    ("rope_theta", config.get("rope_theta"))) if v is not None}
    if len(set(thetas.values())) > 1:
        raise ValueError(f"config.json gives two different RoPE bases: {thetas}")
    if thetas:
        rope_theta = float(next(iter(thetas.values())))
    elif "rope_parameters" in dicts:
        # transformers 5 always writes rope_theta into rope_parameters: a rope_parameters dict
        # without it was not written by transformers, and guessing 10000 is how this loader once
        # ran Llama 3 (rope_theta 500000) with the wrong positions.
        raise ValueError(f"rope_parameters {dicts['rope_parameters']} has no rope_theta (and there "
                         f"is no top-level rope_theta): refusing to guess the RoPE base")
    else:
        rope_theta = HF_DEFAULT_ROPE_THETA  # a 4.x-style config without rope_theta: HF's default
    partial = merged.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is not supported (RoPE on the whole head)")
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} is odd: rotate-half RoPE needs an even head_dim")
    if rope_type == "default":
        return rope_theta, None
    if "original_max_position_embeddings" not in merged and "max_position_embeddings" in config:
        # transformers 5's standardize_rope_params fills it in from max_position_embeddings
        merged["original_max_position_embeddings"] = config["max_position_embeddings"]
    missing = [k for k in LLAMA3_ROPE_KEYS if merged.get(k) is None]
    if missing:
        raise ValueError(f"llama3 RoPE scaling needs {', '.join(missing)} (config has "
                         f"{sorted(merged)})")
    if not merged["high_freq_factor"] > merged["low_freq_factor"]:
        raise ValueError(f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor; got "
                         f"{merged['high_freq_factor']} and {merged['low_freq_factor']}")
    scaling = {k: merged[k] for k in LLAMA3_ROPE_KEYS}
    return rope_theta, tuple(sorted({**scaling, "rope_type": "llama3"}.items()))


def _sliding_window(config: dict, model_type: str, get) -> int | None:
    """The attention window transformers applies (None: full causal attention)."""
    if model_type == "mistral":  # MistralAttention: every layer, whenever sliding_window is set
        return get("sliding_window")
    if model_type == "qwen2" and get("use_sliding_window") and get("sliding_window") is not None:
        layer_types = config.get("layer_types")
        if layer_types is None:  # Qwen2Config: layers >= max_window_layers slide
            sliding = get("max_window_layers") < config["num_hidden_layers"]
        else:
            sliding = "sliding_attention" in layer_types
        return get("sliding_window") if sliding else None
    return None  # LlamaAttention has no window (a stray sliding_window key is ignored by HF too)


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
    rope_scaling: tuple | None = None  # llama3: sorted (key, value) pairs (hashable); None: default
    attention_bias: bool = False  # q/k/v projections have biases (llama attention_bias, qwen2)
    o_proj_bias: bool = False     # o_proj has a bias (llama attention_bias; never qwen2/mistral)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # mistral/qwen2: longer sequences raise (no window mask)
    model_type: str = "llama"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            if scaling.get("rope_type") != "llama3" or not set(LLAMA3_ROPE_KEYS) <= set(scaling):
                raise ValueError(f"rope_scaling {scaling} is not supported: None (default RoPE) or "
                                 f"rope_type 'llama3' with {', '.join(LLAMA3_ROPE_KEYS)}")

    @classmethod
    def from_hf(cls, config: dict) -> "DecoderConfig":
        """Parses a Hugging Face config.json dict (transformers 4.x or 5.x) of LlamaForCausalLM,
        MistralForCausalLM or Qwen2ForCausalLM. Whatever would make the decoder compute other
        logits than transformers on the same weights raises ValueError naming it: an unknown
        architecture, activation or RoPE type, MLP biases, contradicting RoPE settings."""
        model_type = _model_type(config)
        defaults = HF_CLASS_DEFAULTS[model_type]
        missing = [key for key in REQUIRED_KEYS if config.get(key) is None]
        if missing:
            raise ValueError(f"config.json has no {', '.join(missing)}")

        def get(key):
            return config[key] if key in config else defaults.get(key)

        if get("hidden_act") not in ("silu", "swish"):  # transformers' ACT2FN: the same SiLU
            raise ValueError(f"hidden_act {get('hidden_act')!r} is not supported (silu only)")
        if model_type == "llama" and get("mlp_bias"):
            raise ValueError("mlp_bias true is not supported (the MLP projections have no biases)")
        heads = config["num_attention_heads"]
        kv_heads = get("num_key_value_heads") or heads  # None: multi-head attention (HF)
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        if config.get("head_dim") is None and config["hidden_size"] % heads:
            raise ValueError(f"hidden_size {config['hidden_size']} is not a multiple of "
                             f"num_attention_heads {heads} and config.json gives no head_dim")
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}")
        rope_theta, rope_scaling = _rope(config, head_dim)
        qkv_bias = model_type == "qwen2" or (model_type == "llama" and bool(get("attention_bias")))
        return cls(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(get("rms_norm_eps")), rope_theta=rope_theta, rope_scaling=rope_scaling,
            attention_bias=qkv_bias, o_proj_bias=model_type == "llama" and qkv_bias,
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            sliding_window=_sliding_window(config, model_type, get), model_type=model_type)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers 4.x and 5.x (and from_hf) read back as this
        config: the RoPE settings both as 5.x's rope_parameters and as 4.x's top-level keys."""
        architecture = {v: k for k, v in ARCHITECTURES.items()}.get(self.model_type)
        representable = {"llama": self.attention_bias == self.o_proj_bias,
                         "mistral": not (self.attention_bias or self.o_proj_bias),
                         "qwen2": self.attention_bias and not self.o_proj_bias}
        if not representable.get(self.model_type, False):
            raise ValueError(f"model_type {self.model_type!r} with attention_bias="
                             f"{self.attention_bias}, o_proj_bias={self.o_proj_bias} has no "
                             f"Hugging Face config")
        scaling = dict(self.rope_scaling) if self.rope_scaling else None
        config = {"architectures": [architecture], "model_type": self.model_type,
                  "hidden_act": "silu", "torch_dtype": "bfloat16",
                  **{k: getattr(self, k) for k in (
                      "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                      "tie_word_embeddings")},
                  "rope_theta": self.rope_theta, "rope_scaling": scaling,
                  "rope_parameters": {"rope_type": "default", **(scaling or {}),
                                      "rope_theta": self.rope_theta}}
        if self.model_type == "llama":
            config["attention_bias"] = self.attention_bias
        if self.model_type == "mistral":
            config["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            config.update(use_sliding_window=self.sliding_window is not None,
                          sliding_window=self.sliding_window, max_window_layers=0)
        return config


def rope_inverse_frequencies(config: DecoderConfig) -> np.ndarray:
    """Rotary frequencies; with rope_scaling "llama3" the long wavelengths are stretched the way
    Llama 3.1+ does (scaled by `factor`, smoothly blended between the two cut-offs)."""
    dim = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = dict(config.rope_scaling or ())
    if scaling.get("rope_type") == "llama3":
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
        self.o_proj = _linear(self.heads * self.head_dim, c.hidden_size, dtype, rngs, c.o_proj_bias)

    def __call__(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = call_fused(self, QKV, x)  # one GEMM when fused
        q = rotate(q.reshape(b, t, self.heads, self.head_dim), cos, sin)
        k = rotate(k.reshape(b, t, self.kv_heads, self.head_dim), cos, sin)
        v = v.reshape(b, t, self.kv_heads, self.head_dim)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # grouped-query aware
        return self.o_proj(out.reshape(b, t, self.heads * self.head_dim))


class MLP(nnx.Module):
    def __init__(self, c: DecoderConfig, dtype, rngs):
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size, dtype, rngs)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size, dtype, rngs)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size, dtype, rngs)

    def __call__(self, x):
        gate, up = call_fused(self, GATE_UP, x)  # one GEMM when fused
        return self.down_proj(jax.nn.silu(gate) * up)


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
        window = self.config.sliding_window
        if window is not None and tokens.shape[-1] > window:
            raise ValueError(f"{tokens.shape[-1]} tokens exceed the checkpoint's sliding_window "
                             f"{window}: the decoder computes full causal attention only")
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


def read_config(directory) -> dict:
    """The raw config.json dict of a Hugging Face style checkpoint directory."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --checkpoint needs a Hugging Face style "
                                f"directory (config.json + model.safetensors[.index.json])")
    return json.loads(config_path.read_text())


def is_ignored(module: str, patterns) -> bool:
    """Whether a module name (e.g. "model.layers.0.mlp.gate_proj") is one a quantization config's
    ignore / exclude list leaves in high precision: an exact name or a parent module, a
    compressed-tensors "re:" regular expression, or a ModelOpt / Quark glob ("*lm_head*")."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module):
                return True
        elif module == pattern or module.startswith(pattern + ".") or fnmatch.fnmatchcase(module, pattern):
            return True
    return False


def _linear_names(config: DecoderConfig) -> list[str]:
    names = [f"model.layers.{i}.{part}" for i in range(config.num_hidden_layers) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return names if config.tie_word_embeddings else [*names, "lm_head"]


def _check_against_quant_config(tensors, config: DecoderConfig, quant, where) -> None:
    """MXFP8 scales cover 32 values, and no module the config leaves in high precision may hold
    MXFP8 weights. (A quantized module stored dense is allowed: fake-quantized exports.)"""
    if quant.group_size != 32:
        raise CheckpointError(f"{where}: quantization group_size {quant.group_size}; MXFP8 has one "
                              f"scale per 32 values")
    for module in _linear_names(config):
        if isinstance(tensors.get(module + ".weight"), MxWeight) and is_ignored(module, quant.ignore):
            raise CheckpointError(f"{where}: {module} is MXFP8 but the {quant.producer} quantization "
                                  f"config's ignore list {list(quant.ignore)} leaves it in high "
                                  f"precision: the checkpoint contradicts its config")


def _check_activation_math(tensors, quantize_activations: bool, why: str, where) -> None:
    """The MXFP8 weights' backends must compute the activation math asked for."""
    for backend in sorted({v.backend for v in tensors.values() if isinstance(v, MxWeight)},
                          key=lambda b: b.value):
        impl = get_backend_impl(backend)
        if not (impl.supports_w8a8 if quantize_activations else impl.supports_w8a16):
            want, can = ("W8A8", "W8A16") if quantize_activations else ("W8A16", "W8A8")
            raise ValueError(f"{where}: {want} ({why}) but backend {backend.value} computes {can} "
                             f"only: pass quantize_activations={not quantize_activations} to run "
                             f"{can}, or backend='emulation'")


def _quantized_projections(path: str, module) -> list[tuple[str, ...]]:
    """The projection groups of one module whose linears are all MXFP8 (a checkpoint whose
    ignore list leaves one of them in high precision keeps that group unfused)."""
    groups = {Attention: [QKV], MLP: [GATE_UP]}.get(type(module), [])
    return [g for g in groups if all(isinstance(getattr(module, n, None), Mxfp8Linear) for n in g)]


def fuse_projections(model: CausalLM, *, shards: int = 1) -> CausalLM:
    """Fuses (in place, exactly) q/k/v and gate/up wherever all of a group's linears are
    Mxfp8Linear; returns the model. shards: as in jax_mxfp8.fuse_weights (column-parallel)."""
    return fuse_linears(model, _quantized_projections, shards=shards)


def load_pretrained(directory, *, dtype=jnp.bfloat16, backend=None, dequantize_weights=False,
                    quantize_activations=None, fuse: bool = False):
    """(model, config, n_mxfp8) from a directory with config.json + safetensors. MXFP8
    tensors become Mxfp8Linear layers (or Linears of `dtype` with dequantize_weights=True);
    fuse=True fuses the MXFP8 q/k/v and gate/up projections into one GEMM each
    (fuse_projections), attribute names change ("self_attn.q_k_v_proj"), and state_dict still
    writes the checkpoint's names.

    quantize_activations: None = what the checkpoint's quantization config says (W8A8 or
    weight-only W8A16; W8A16 when it has none); True/False override it. The config's ignore
    list and group size are checked against the tensors (CheckpointError where they disagree).
    dtype=jnp.float32 computes the non-MXFP8 parts in float32 (tests compare it with a float64
    reference)."""
    directory = Path(directory)
    config = DecoderConfig.from_hf(read_config(directory))
    quant = read_quant_config(directory)  # None: a plain checkpoint; raises for non-MXFP8 schemes
    tensors = {k: v for k, v in load_safetensors(directory, backend=backend).items()
               if not k.endswith(IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied: transformers ignores a stored copy too
    elif "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        raise CheckpointError(f"{directory}: no lm_head.weight, and config.json says "
                              f"tie_word_embeddings is false (an untied model needs its lm_head)")
    if quant is not None:
        _check_against_quant_config(tensors, config, quant, directory)
    if quantize_activations is not None:
        why = f"quantize_activations={quantize_activations}"
    elif quant is not None:
        quantize_activations = bool(quant.quantize_activations)
        why = f"the checkpoint's {quant.producer} quantization config"
    else:
        quantize_activations, why = False, "the checkpoint has no quantization config"
    n_mxfp8 = sum(isinstance(v, MxWeight) for v in tensors.values())
    if dequantize_weights:
        tensors = dequantized(tensors, dtype)
    else:
        _check_activation_math(tensors, quantize_activations, why, directory)
    model = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    model = load_state_dict(model, tensors, quantize_activations=quantize_activations)
    if fuse:
        fuse_projections(model)
    return model, config, n_mxfp8


def _quantization_config(model: CausalLM) -> dict[str, Any] | None:
    """The compressed-tensors "mxfp8-quantized" quantization_config (what llm-compressor writes
    for its MXFP8 / MXFP8A16 schemes, the same tensor layout) of a model holding Mxfp8Linear
    layers: input_activations null for weight-only (W8A16) layers; the nnx.Linear layers left
    in high precision are its ignore list. None for a model without MXFP8 layers."""
    modes = {bool(get_backend_impl(node.weight.get_value().backend).default_quantize_activations
                  if node.quantize_activations is None else node.quantize_activations)
             for _, node in nnx.iter_graph(model)
             if isinstance(node, (Mxfp8Linear, Mxfp8FusedLinear))}
    if not modes:
        return None
    if len(modes) > 1:
        raise ValueError("the model mixes W8A8 and weight-only Mxfp8Linear layers; one "
                         "quantization config cannot describe both")
    ignore = sorted(".".join(map(str, path)) for path, node in nnx.iter_graph(model)
                    if isinstance(node, nnx.Linear))
    args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group",
            "group_size": 32, "scale_dtype": "torch.uint8"}
    group = {"targets": ["Linear"], "format": "mxfp8-quantized",
             "weights": {**args, "dynamic": False},
             "input_activations": {**args, "dynamic": True} if modes.pop() else None,
             "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "mxfp8-quantized",
            "quantization_status": "compressed", "config_groups": {"group_0": group},
            "ignore": ignore, "kv_cache_scheme": None}


def save_pretrained(model: CausalLM, directory, *, max_shard_bytes: int | None = None) -> list[Path]:
    """Writes config.json (with a compressed-tensors MXFP8 quantization_config when the model
    holds Mxfp8Linear layers, saying whether they quantize activations) and the HF-named
    safetensors (MXFP8 weights as `<name>` F8_E4M3 + `<name>_scale` U8; fused projections
    split back into q/k/v and gate/up, exactly)."""
    directory = Path(directory)
    config = model.config.to_hf()
    quantization = _quantization_config(model)
    if quantization is not None:
        config["quantization_config"] = quantization
    files = save_safetensors(directory, state_dict(model), max_shard_bytes=max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # A ModelOpt hf_quant_config.json left from an earlier export would describe other tensors.
    (directory / "hf_quant_config.json").unlink(missing_ok=True)
    return files
