"""A plain numpy Llama / Mistral / Qwen2 forward pass: the reference the demo and the tests
check the Flax decoder against.

Deliberately independent of jax_mxfp8.models.decoder (nothing is imported from it, and it is
not meant to share code with it): it reads the raw config.json dict itself and computes
logits with the formulas of transformers' modeling_llama.py (RMSNorm, rotate-half RoPE with
the default or "llama3" inverse frequencies, grouped-query attention with a causal mask,
SiLU-gated MLP, optionally tied embeddings), in float64 (or float32) numpy. A mistake in the
decoder's config parsing (reading rope_theta from the wrong key, say) or in its math then
shows up as a disagreement instead of being shared by both sides.

Config semantics follow transformers 5 (which also reads 4.x configs): the RoPE dict is
`rope_parameters` (5.x) or `rope_scaling` (4.x); rope_theta comes from that dict, else the
top-level `rope_theta`, else transformers' default 10000. Keys a config.json may omit take
the transformers class defaults. Anything this reference does not compute (another
architecture or activation, other RoPE types, MLP biases, a sliding window shorter than the
sequence) raises ValueError.

    logits = forward(json.load(open("config.json")), weights, tokens)  # weights: HF names
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2"}
# transformers' class defaults (LlamaConfig, MistralConfig, Qwen2Config) of the keys that can
# change the math and that a config.json may leave out.
CLASS_DEFAULTS = {
    "llama": {"num_key_value_heads": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False},
    "mistral": {"num_key_value_heads": 8, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
}


def read_config(raw: Mapping) -> dict:
    """The numbers the forward pass needs, from a config.json dict."""
    names = list(raw.get("architectures") or [])
    unknown = [a for a in names if a not in MODEL_TYPES]
    if unknown:
        raise ValueError(f"reference: architecture {unknown[0]!r} is not computed here "
                         f"(only {', '.join(MODEL_TYPES)})")
    kind = raw.get("model_type") or (MODEL_TYPES[names[0]] if names else None)
    if kind not in CLASS_DEFAULTS or any(MODEL_TYPES[a] != kind for a in names):
        raise ValueError(f"reference: model_type {kind!r} with architectures {names} is not "
                         f"computed here (llama, mistral, qwen2)")

    def get(key):
        if key in raw:
            return raw[key]
        if key in CLASS_DEFAULTS[kind]:
            return CLASS_DEFAULTS[kind][key]
        raise ValueError(f"reference: config.json has no {key!r}")

    if raw.get("hidden_act", "silu") not in ("silu", "swish"):  # ACT2FN: both are x * sigmoid(x)
        raise ValueError(f"reference: hidden_act {raw['hidden_act']!r} is not computed here (silu)")
    if kind == "llama" and get("mlp_bias"):
        raise ValueError("reference: mlp_bias is not computed here")

    heads = get("num_attention_heads")
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"reference: rope type {rope_type!r} is not computed here "
                         f"(default, llama3)")
    if rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("reference: partial_rotary_factor is not computed here")

    if kind == "mistral":
        window = get("sliding_window")
    elif kind == "qwen2":
        window = get("sliding_window") if get("use_sliding_window") else None
        types = raw.get("layer_types")
        if window is not None and types is not None and "sliding_attention" not in types:
            window = None
        if window is not None and types is None and get("max_window_layers") >= get("num_hidden_layers"):
            window = None  # Qwen2Config: only layers >= max_window_layers slide
    else:
        window = None

    return {
        "layers": get("num_hidden_layers"), "heads": heads,
        "kv_heads": get("num_key_value_heads") or heads,
        "head_dim": raw.get("head_dim") or get("hidden_size") // heads,
        "eps": get("rms_norm_eps"), "tied": bool(get("tie_word_embeddings")),
        "qkv_bias": kind == "qwen2" or (kind == "llama" and bool(get("attention_bias"))),
        "o_bias": kind == "llama" and bool(get("attention_bias")),
        "theta": rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
        "rope_type": rope_type, "rope": rope,
        "max_positions": raw.get("max_position_embeddings"),
        "window": window,
    }


def inverse_frequencies(c: dict) -> np.ndarray:
    """RoPE inverse frequencies (transformers' _compute_default / _compute_llama3_parameters)."""
    d = c["head_dim"]
    inv = 1.0 / (c["theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if c["rope_type"] == "llama3":
        r = c["rope"]
        factor, low, high = r["factor"], r["low_freq_factor"], r["high_freq_factor"]
        old = r.get("original_max_position_embeddings", c["max_positions"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)  # long wavelengths: / factor
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, smoothed, scaled)
    return inv


def _rms_norm(x, weight, eps):
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def forward(config: Mapping, weights: Mapping, tokens, *, dtype=np.float64) -> np.ndarray:
    """tokens [batch, seq] int -> logits [batch, seq, vocab] in `dtype`.

    config: the raw config.json dict. weights: Hugging Face names ("model.layers.0.mlp.up_proj.
    weight", [out, in] like torch) -> dense arrays of any float dtype (read one at a time, so a
    mapping that dequantizes on access keeps only one tensor in `dtype` alive per step).
    """
    c = read_config(config)
    tokens = np.asarray(tokens)
    batch, seq = tokens.shape
    if c["window"] is not None and seq > c["window"]:
        raise ValueError(f"reference: sequence of {seq} tokens exceeds the sliding window "
                         f"{c['window']} (only full causal attention is computed here)")

    def w(name):
        if name not in weights:
            raise KeyError(f"reference: the weights have no {name!r}")
        return np.asarray(weights[name]).astype(dtype)

    def proj(x, name, bias=False):
        y = x @ w(name + ".weight").T
        return y + w(name + ".bias") if bias else y

    h, kv, d = c["heads"], c["kv_heads"], c["head_dim"]
    angles = np.arange(seq, dtype=np.float64)[:, None] * inverse_frequencies(c)[None, :]
    angles = np.concatenate([angles, angles], axis=-1)  # [seq, d]
    cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
    causal = np.tril(np.ones((seq, seq), bool))
    x = w("model.embed_tokens.weight")[tokens]  # [batch, seq, hidden]
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        a = _rms_norm(x, w(p + "input_layernorm.weight"), c["eps"])
        q = proj(a, p + "self_attn.q_proj", c["qkv_bias"]).reshape(batch, seq, h, d).transpose(0, 2, 1, 3)
        k = proj(a, p + "self_attn.k_proj", c["qkv_bias"]).reshape(batch, seq, kv, d).transpose(0, 2, 1, 3)
        v = proj(a, p + "self_attn.v_proj", c["qkv_bias"]).reshape(batch, seq, kv, d).transpose(0, 2, 1, 3)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)  # repeat_kv
        scores = np.where(causal, q @ k.transpose(0, 1, 3, 2) / math.sqrt(d), -np.inf)
        out = (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, h * d)
        x = x + proj(out, p + "self_attn.o_proj", c["o_bias"])
        m = _rms_norm(x, w(p + "post_attention_layernorm.weight"), c["eps"])
        gate = proj(m, p + "mlp.gate_proj")
        silu = gate * 0.5 * (1 + np.tanh(gate / 2))  # x * sigmoid(x), without overflow
        x = x + proj(silu * proj(m, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = _rms_norm(x, w("model.norm.weight"), c["eps"])
    head = w("model.embed_tokens.weight" if c["tied"] else "lm_head.weight")
    return x @ head.T
