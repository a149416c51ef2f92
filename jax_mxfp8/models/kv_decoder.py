"""A functional Llama-style decoder with a KV cache, for benchmarking real model shapes.

Plain jnp, no Flax: the parameters are a pytree, and each projection is either a bf16 [N, K]
array (the peer: x @ w.T through lax.dot_general, float32 accumulation) or an MxWeight
(jax_mxfp8.linear). Weights are random, with the real shapes of the configurations in MODELS;
nothing here loads a checkpoint (models/decoder.py does, without a cache).

- fused=True: q/k/v are ONE projection of N = (heads + 2 * kv_heads) * head_dim and gate/up one
  of N = 2 * intermediate, split after the GEMM. The fused matrix is the concatenation of the
  same random pieces, quantized as one: equal to concatenating the quantized pieces, because
  MXFP8 blocks run along K within a row.
- The KV cache is preallocated bf16, [batch, kv_heads, ctx, head_dim] per layer (kv_heads
  before ctx: each (batch, kv head) is then one contiguous [ctx, head_dim] matrix, so the
  attention GEMMs read the cache in place instead of a transposed copy). A step writes its
  keys and values at `pos` with dynamic_update_slice, then attends over the whole cache with
  the positions after it masked: the cost of a step is that of context `ctx`, whatever `pos`.
- Layers: a list of per-layer dicts runs as an unrolled Python loop, each layer's weights and
  cache separate jit arguments (no slicing); `stack_layers` makes them one stacked pytree
  (MxWeights included: their leaves stack, and linear runs on the per-layer slices lax.scan
  hands it) that runs under lax.scan, the cache then being [layers, batch, kv_heads, ctx,
  head_dim]. Both compute the same. The benchmarks unroll: under scan XLA copies each layer's
  slice of the cache (Llama-3-8B shapes on an H200, batch 64, context 1024: a bf16 decode
  step of 19.2 ms scanned against 8.1 ms unrolled).
- RoPE is the default rotate-half one (Llama 3's long-context frequency scaling changes no
  cost and is left out); Qwen2.5's q/k/v biases and Qwen3's per-head q/k RMSNorm are in.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from jax_mxfp8 import reference
from jax_mxfp8.backends import Backend
from jax_mxfp8.ops.linear import linear
from jax_mxfp8.weight import MxWeight, quantize_weight


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2.5: q/k/v projections have biases
    qk_norm: bool = False   # Qwen3: RMSNorm over head_dim of each q and k head, before RoPE

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads ({self.heads}) must be a multiple of kv_heads "
                             f"({self.kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: rotate-half RoPE needs an even head_dim, not {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    def with_layers(self, layers: int | None) -> "ModelConfig":
        return self if layers is None else dataclasses.replace(self, layers=int(layers))

    def linears(self, fused: bool) -> dict[str, tuple[int, int]]:
        """(N, K) of each projection of one layer."""
        h = self.hidden
        attn = ({"qkv": (self.q_size + 2 * self.kv_size, h)} if fused else
                {"q": (self.q_size, h), "k": (self.kv_size, h), "v": (self.kv_size, h)})
        mlp = ({"gate_up": (2 * self.intermediate, h)} if fused else
               {"gate": (self.intermediate, h), "up": (self.intermediate, h)})
        return {**attn, "o": (h, self.q_size), **mlp, "down": (h, self.intermediate)}


# Real dimensions from the models' Hugging Face config.json files.
MODELS = {
    "llama3-8b": ModelConfig("llama3-8b", 4096, 14336, 32, 8, 128, 32, 128256, 500000.0, 1e-5),
    "llama3-70b": ModelConfig("llama3-70b", 8192, 28672, 64, 8, 128, 80, 128256, 500000.0, 1e-5),
    "qwen2.5-7b": ModelConfig("qwen2.5-7b", 3584, 18944, 28, 4, 128, 28, 152064, 1e6, 1e-6,
                              qkv_bias=True),
    "mistral-7b": ModelConfig("mistral-7b", 4096, 14336, 32, 8, 128, 32, 32768, 1e6, 1e-5),  # v0.3
    "qwen3-32b": ModelConfig("qwen3-32b", 5120, 25600, 64, 8, 128, 64, 151936, 1e6, 1e-6,
                             qk_norm=True),
    # A smoke-test configuration (CPU tests, `bench --model tiny`): every code path, tiny sizes.
    "tiny": ModelConfig("tiny", 128, 256, 4, 2, 32, 2, 512, 10000.0, 1e-5),
}


def model_config(name: str, layers: int | None = None) -> ModelConfig:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name].with_layers(layers)


# The random pieces of a layer, in the order their keys are folded: fused and unfused models
# built from one key hold the same weights.
PIECES = ("q", "k", "v", "o", "gate", "up", "down")
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


# ---- building the parameters -----------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("shape", "scale", "dtype"))
def _normal(key, shape, scale, dtype):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


@functools.partial(jax.jit, static_argnames=("backend",))
def _quantize(w, backend):
    return quantize_weight(w, backend=backend)


def _dense(key, shape, dtype):
    return _normal(key, shape, float(shape[-1]) ** -0.5, jnp.dtype(dtype))


def _layer_params(config: ModelConfig, key, weights, fused: bool, dtype) -> dict[str, Any]:
    """One layer: projections as `weights` ("bf16": dense arrays; a Backend: MxWeights)."""
    keys = dict(zip(PIECES, jax.random.split(key, len(PIECES) + 3)))
    _, k_norm, k_bias, k_qk = jax.random.split(jax.random.fold_in(key, 1), 4)
    shapes = config.linears(False)
    pieces = {name: _dense(keys[name], shapes[name], dtype) for name in PIECES}
    if fused:
        for name, parts in FUSED.items():
            pieces[name] = jnp.concatenate([pieces.pop(p) for p in parts], axis=0)
    layer = {name: (w if weights == "bf16" else _quantize(w, weights))
             for name, w in pieces.items()}
    del pieces  # the bf16 copies of quantized weights
    n1, n2 = jax.random.split(k_norm)
    layer["attn_norm"] = 1.0 + _normal(n1, (config.hidden,), 0.1, dtype)
    layer["mlp_norm"] = 1.0 + _normal(n2, (config.hidden,), 0.1, dtype)
    if config.qkv_bias:
        biases = [_normal(b, (n,), 0.1, dtype) for b, n in zip(
            jax.random.split(k_bias, 3), (config.q_size, config.kv_size, config.kv_size))]
        if fused:
            layer["qkv_bias"] = jnp.concatenate(biases)
        else:
            layer["q_bias"], layer["k_bias"], layer["v_bias"] = biases
    if config.qk_norm:
        q1, q2 = jax.random.split(k_qk)
        layer["q_norm"] = 1.0 + _normal(q1, (config.head_dim,), 0.1, dtype)
        layer["k_norm"] = 1.0 + _normal(q2, (config.head_dim,), 0.1, dtype)
    return layer


def init_params(config: ModelConfig, key, *, weights: str | Backend = "bf16", fused: bool = False,
                lm_head: str = "bf16", dtype=jnp.bfloat16, progress: bool = True,
                desc: str | None = None) -> dict[str, Any]:
    """Random parameters of `config`, built on the default device one layer at a time (each
    layer's bf16 pieces are freed once quantized, so an MXFP8 model never needs its bf16 copy).

    weights: "bf16" (dense arrays) or a backend for MxWeights. lm_head: "bf16" (dense, for
    either kind of weights), "mxfp8" (quantized like the projections; "bf16" when weights is),
    or "none" (no head: the model returns its last hidden state). The embedding is always a
    dense table (a gather reads only the tokens' rows). The same key gives the same weights for
    every choice of weights / fused / lm_head: peers compare the same model."""
    if lm_head not in ("bf16", "mxfp8", "none"):
        raise ValueError(f"lm_head must be 'bf16', 'mxfp8' or 'none'; got {lm_head!r}")
    weights = "bf16" if weights == "bf16" else Backend.parse(weights)
    k_embed, k_head, k_norm, k_layers = jax.random.split(key, 4)
    params = {"embed": _normal(k_embed, (config.vocab, config.hidden), 1.0, jnp.dtype(dtype)),
              "final_norm": 1.0 + _normal(k_norm, (config.hidden,), 0.1, jnp.dtype(dtype))}
    if lm_head != "none":
        head = _dense(k_head, (config.vocab, config.hidden), dtype)
        params["lm_head"] = head if lm_head == "bf16" or weights == "bf16" else _quantize(head, weights)
    layers = []
    label = desc or f"{config.name} {weights if weights == 'bf16' else weights.value}"
    for i in tqdm(range(config.layers), desc=label, unit="layer", disable=not progress, leave=False):
        layers.append(jax.block_until_ready(
            _layer_params(config, jax.random.fold_in(k_layers, i), weights, fused, dtype)))
    params["layers"] = layers
    return params


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """The same parameters with the per-layer dicts stacked along a leading layer axis (what
    lax.scan runs over). Stacks one projection at a time, dropping the per-layer arrays as it
    goes, so the peak is the model plus one stacked projection."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return params
    layers = [dict(layer) for layer in layers]
    stacked = {}
    for name in list(layers[0]):
        stacked[name] = jax.tree.map(lambda *a: jnp.stack(a), *[layer.pop(name) for layer in layers])
    return {**params, "layers": stacked}


def _is_stacked(params) -> bool:
    return not isinstance(params["layers"], (list, tuple))


def init_cache(config: ModelConfig, batch: int, ctx: int, *, stacked: bool = False,
               dtype=jnp.bfloat16, key=None):
    """A KV cache of `ctx` positions: zeros, or random values with `key` (benchmarks: the
    attention then reads real-looking data). Per-layer (k, v) pairs of [batch, kv_heads, ctx,
    head_dim], or with stacked=True one (k, v) pair of [layers, batch, kv_heads, ctx, head_dim]
    (for stacked parameters)."""
    shape = (batch, config.kv_heads, ctx, config.head_dim)

    def one(i):
        if key is None:
            return jnp.zeros(shape, dtype)
        return _normal(jax.random.fold_in(key, i), shape, 1.0, jnp.dtype(dtype))

    if stacked:
        full = (config.layers, *shape)
        if key is None:
            return jnp.zeros(full, dtype), jnp.zeros(full, dtype)
        k1, k2 = jax.random.split(key)
        return _normal(k1, full, 1.0, jnp.dtype(dtype)), _normal(k2, full, 1.0, jnp.dtype(dtype))
    return [(one(2 * i), one(2 * i + 1)) for i in range(config.layers)]


def projection_bytes(params: dict[str, Any]) -> dict[str, int]:
    """Bytes a forward step reads from the weights: {"layers": the projections, "lm_head": the
    head (0 without one)}; norms and biases are left out (a few KiB)."""
    def nbytes(w):
        return w.nbytes if isinstance(w, MxWeight) else int(w.size) * w.dtype.itemsize

    layers = params["layers"]
    per_layer = layers if isinstance(layers, (list, tuple)) else [layers]
    total = sum(nbytes(w) for layer in per_layer for name, w in layer.items() if name in LINEAR_NAMES)
    head = params.get("lm_head")
    return {"layers": total, "lm_head": 0 if head is None else nbytes(head)}


LINEAR_NAMES = frozenset(PIECES) | frozenset(FUSED)


def kv_cache_bytes(config: ModelConfig, batch: int, ctx: int, itemsize: int = 2) -> int:
    """Bytes of keys and values a decode step reads (the whole cache, every layer)."""
    return 2 * config.layers * batch * config.kv_heads * ctx * config.head_dim * itemsize


# ---- the model -------------------------------------------------------------------------------

def project(x, w, bias=None):
    """x @ w.T (+ bias): jax_mxfp8.linear for an MxWeight, else a dot with float32
    accumulation and one cast to x's dtype (the peer's math)."""
    if isinstance(w, MxWeight):
        return linear(x, w, bias)
    return reference.dot_with_bias(x, w.astype(x.dtype), bias, x.dtype)


def rms_norm(x, weight, eps):
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_tables(config: ModelConfig, positions):
    """cos, sin [T, head_dim] in float32 for positions [T]."""
    dim = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv, jnp.float32)[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE of x [B, T, heads, head_dim]."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def _split(y, sizes):
    return jnp.split(y, np.cumsum(sizes)[:-1].tolist(), axis=-1)


def _qkv(config: ModelConfig, p, h):
    if "qkv" in p:
        return _split(project(h, p["qkv"], p.get("qkv_bias")),
                      (config.q_size, config.kv_size, config.kv_size))
    return [project(h, p[n], p.get(f"{n}_bias")) for n in ("q", "k", "v")]


def _mlp(config: ModelConfig, p, h):
    if "gate_up" in p:
        gate, up = _split(project(h, p["gate_up"]), (config.intermediate, config.intermediate))
    else:
        gate, up = project(h, p["gate"]), project(h, p["up"])
    act = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(h.dtype)
    return project(act, p["down"])


def attend(config: ModelConfig, q, keys, values, mask):
    """Grouped-query attention: q [B, T, heads, d], keys / values [B, kv_heads, S, d], mask
    [T, S] (True: attend) -> [B, T, heads * d]. Scores and softmax in float32."""
    b, t = q.shape[:2]
    g = config.heads // config.kv_heads
    q = q.reshape(b, t, config.kv_heads, g, config.head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * config.head_dim ** -0.5, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, values, preferred_element_type=jnp.float32)
    # [B, kv_heads, g, T, d] -> [B, T, heads * d] after the cast (XLA:CPU's bf16 dot cannot
    # write a transposed float32 output)
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, config.q_size)


def _layer(config: ModelConfig, p, x, cos, sin, mask, write_kv):
    """One decoder layer on x [B, T, hidden]. write_kv(k, v) stores this step's keys and values
    [B, kv_heads, T, d] in the cache and returns (all keys, all values, the updated cache)."""
    b, t, _ = x.shape
    h = rms_norm(x, p["attn_norm"], config.norm_eps)
    q, k, v = _qkv(config, p, h)
    q = q.reshape(b, t, config.heads, config.head_dim)
    k = k.reshape(b, t, config.kv_heads, config.head_dim)
    v = v.reshape(b, t, config.kv_heads, config.head_dim)
    if config.qk_norm:
        q = rms_norm(q, p["q_norm"], config.norm_eps)
        k = rms_norm(k, p["k_norm"], config.norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys, values, cache = write_kv(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    x = x + project(attend(config, q, keys, values, mask), p["o"])
    x = x + _mlp(config, p, rms_norm(x, p["mlp_norm"], config.norm_eps))
    return x, cache


def _body(config: ModelConfig, params, cache, tokens, pos):
    """tokens [B, T] at positions pos .. pos + T - 1 through every layer, writing the cache:
    (final-normed hidden [B, T, hidden], cache)."""
    t = tokens.shape[1]
    x = params["embed"][tokens]
    cos, sin = rope_tables(config, pos + jnp.arange(t))
    ctx = (cache[0] if _is_stacked(params) else cache[0][0]).shape[-2]
    mask = jnp.arange(ctx)[None, :] <= pos + jnp.arange(t)[:, None]
    at = lambda layer: (layer, 0, 0, pos, 0) if layer is not None else (0, 0, pos, 0)  # noqa: E731

    if not _is_stacked(params):  # unrolled: each layer's weights and cache are their own arrays
        new_cache = []
        for p, (ck, cv) in zip(params["layers"], cache):
            def write(k, v, ck=ck, cv=cv):
                ck, cv = lax.dynamic_update_slice(ck, k, at(None)), lax.dynamic_update_slice(cv, v, at(None))
                return ck, cv, (ck, cv)
            x, kv = _layer(config, p, x, cos, sin, mask, write)
            new_cache.append(kv)
    else:
        def step(carry, xs):
            x, ck, cv = carry
            p, i = xs

            def write(k, v):
                ck2 = lax.dynamic_update_slice(ck, k[None], at(i))
                cv2 = lax.dynamic_update_slice(cv, v[None], at(i))
                return (lax.dynamic_index_in_dim(ck2, i, keepdims=False),
                        lax.dynamic_index_in_dim(cv2, i, keepdims=False), (ck2, cv2))
            x, (ck, cv) = _layer(config, p, x, cos, sin, mask, write)
            return (x, ck, cv), None

        (x, ck, cv), _ = lax.scan(step, (x, *cache), (params["layers"], jnp.arange(config.layers)))
        new_cache = (ck, cv)
    return rms_norm(x, params["final_norm"], config.norm_eps), new_cache


def _head(params, h):
    head = params.get("lm_head")
    return h if head is None else project(h, head)


def decode_step(config: ModelConfig, params, cache, tokens, pos):
    """One token per sequence: tokens [B] at position pos (a scalar, shared by the batch) ->
    (logits [B, vocab], or the last hidden state [B, hidden] without an lm_head; cache).
    Jittable (config static); donate the cache."""
    h, cache = _body(config, params, cache, tokens[:, None], jnp.asarray(pos, jnp.int32))
    return _head(params, h[:, 0]), cache


def prefill(config: ModelConfig, params, tokens, ctx: int | None = None):
    """tokens [B, T] at positions 0 .. T-1 -> (logits of the last position [B, vocab] (or its
    hidden state), a cache of `ctx` (default T) positions holding them). Jittable (config and
    ctx static)."""
    b, t = tokens.shape
    ctx = t if ctx is None else ctx
    if ctx < t:
        raise ValueError(f"prefill: ctx={ctx} is shorter than the {t} prompt tokens")
    cache = init_cache(config, b, ctx, stacked=_is_stacked(params), dtype=params["embed"].dtype)
    h, cache = _body(config, params, cache, tokens, jnp.int32(0))
    return _head(params, h[:, -1]), cache


def forward(config: ModelConfig, params, tokens):
    """The full-sequence forward: tokens [B, T] -> logits [B, T, vocab] (or hidden states)."""
    b, t = tokens.shape
    cache = init_cache(config, b, t, stacked=_is_stacked(params), dtype=params["embed"].dtype)
    h, _ = _body(config, params, cache, tokens, jnp.int32(0))
    return _head(params, h)
