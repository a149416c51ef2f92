"""Flax NNX mixture-of-experts layer on stacked expert weights (docs/moe.md#the-moe-layer).

`MoE(x)` for x [..., H]:

- Router: logits = x @ gate.weight.T ([E, H], float32 accumulation); p = softmax(logits) in
  float32; the top k experts of p, their weights renormalized over the chosen k. That is
  Mixtral's routing and Qwen3-MoE's with norm_topk_prob=True (Qwen3-30B-A3B's setting), and
  equals a softmax over the k chosen logits; renormalize=False keeps p (norm_topk_prob=False).
- Dispatch: the T*k (token, choice) pairs sorted by expert id with a stable argsort (an
  expert's rows keep token order), group_sizes = bincount(ids, length=E): both on the device,
  so shapes are static and nothing is read on the host.
- Experts: h = gate_up_proj(rows) [T*k, 2I] and y = down_proj(SiLU(h[:, :I]) * h[:, I:]) [T*k, H],
  each one grouped GEMM: jax_mxfp8.ragged_linear for MXFP8 weights (Mxfp8RaggedLinear),
  jax.lax.ragged_dot for float ones (RaggedLinear). gate_up_proj holds the gate rows first, then
  the up rows (vLLM's w13 order).
- Combine: y back in (token, choice) order, out[t] = sum_j w[t, j] * y[t, j] in float32, one
  rounding to the compute dtype.

A float MoE (MoE.create, or from float weights) is the bf16 layer; quantize_moe turns its
experts into MXFP8 (the router stays in its float dtype, as MXFP8 exports keep it). moe_reference
computes the same math without sorting (every expert on every token, einsum), as a check.
state_dict names: `gate.weight` [E, H], `experts.gate_up_proj.weight` [E, 2I, H],
`experts.down_proj.weight` [E, H, I] (load_safetensors(experts="fuse") gives those names from a
Hugging Face or vLLM checkpoint).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jax_mxfp8 import reference
from jax_mxfp8.backends.emulation import grouped_dot_with_bias
from jax_mxfp8.flax._common import resolve_backend
from jax_mxfp8.flax.nnx import _references, _replace, get_value
from jax_mxfp8.ops.dequantize import dequantize
from jax_mxfp8.ops.quantize import check_rounding
from jax_mxfp8.ops.ragged_linear import ragged_linear
from jax_mxfp8.weight import MxWeight, quantize_weight

F32 = jnp.float32


def _stacked_bias(bias, weight_shape, where: str):
    if bias is None:
        return None
    bias = jnp.asarray(bias)
    if bias.shape != tuple(weight_shape[:2]):
        raise ValueError(f"{where}: bias has shape {bias.shape}; expected (experts, out_features) = "
                         f"{tuple(weight_shape[:2])}")
    return nnx.Param(bias)


class RaggedLinear(nnx.Module):
    """Float stacked expert weights: `weight` [E, N, K] (expert e's [out, in]), bias [E, N] or
    None. layer(x [T, K], group_sizes [E]) -> [T, N]: row block e times W[e].T, zero past the
    groups (jax.lax.ragged_dot), with ragged_linear's numerics: the weight cast to x's dot dtype
    (bf16 for bf16 x, else float32), float32 accumulation, one rounding to x's dtype."""

    def __init__(self, weight, bias=None):
        weight = jnp.asarray(weight)
        if weight.ndim != 3:
            raise ValueError(f"RaggedLinear: weight has shape {weight.shape}; expected stacked "
                             f"experts [E, N, K]")
        self.weight = nnx.Param(weight)
        self.bias = _stacked_bias(bias, weight.shape, "RaggedLinear")

    def __call__(self, x, group_sizes):
        op_dtype = reference.dot_dtype(x.dtype)
        bias = None if self.bias is None else get_value(self.bias)
        return grouped_dot_with_bias(x.astype(op_dtype), get_value(self.weight).astype(op_dtype),
                                     group_sizes, bias, x.dtype)


class Mxfp8RaggedLinear(nnx.Module):
    """MXFP8 stacked expert weights: `weight` a stacked MxWeight (E, N, K), bias [E, N] or None.
    layer(x [T, K], group_sizes [E]) -> [T, N] = jax_mxfp8.ragged_linear in x's dtype."""

    def __init__(self, weight: MxWeight, bias=None):
        if not isinstance(weight, MxWeight) or weight.num_experts is None:
            raise TypeError(f"Mxfp8RaggedLinear: weight must be a stacked MxWeight (E, N, K) "
                            f"(quantize_weight / prepare_weight of [E, N, K]); got "
                            f"{getattr(weight, 'shape', type(weight).__name__)}")
        self.weight = nnx.Param(weight)
        self.bias = _stacked_bias(bias, weight.shape, "Mxfp8RaggedLinear")

    @classmethod
    def from_float(cls, module: RaggedLinear, *, rounding: str = "ceil", backend=None,
                   where: str = "RaggedLinear") -> "Mxfp8RaggedLinear":
        """Quantizes a RaggedLinear's [E, N, K] weight along K (the bias is kept as it is)."""
        weight = get_value(module.weight)
        if weight.shape[-1] % 32:
            raise ValueError(f"{where}: in_features K={weight.shape[-1]} is not a multiple of 32, "
                             f"the MXFP8 block size; keep these experts in float")
        mx_weight = quantize_weight(weight, rounding=check_rounding(rounding),
                                    backend=resolve_backend(backend))
        return cls(mx_weight, None if module.bias is None else get_value(module.bias))

    def __call__(self, x, group_sizes):
        bias = None if self.bias is None else get_value(self.bias)
        return ragged_linear(x, get_value(self.weight), group_sizes, bias)


class Router(nnx.Module):
    """The router's `weight` [E, H] (Hugging Face's `mlp.gate.weight`); router(x [T, H]) -> float32
    logits [T, E] (the weight in x's dtype, float32 accumulation). Not an nnx.Linear, so
    quantize_model leaves it in float."""

    def __init__(self, weight):
        self.weight = nnx.Param(jnp.asarray(weight))

    def __call__(self, x):
        w = get_value(self.weight).astype(x.dtype)
        return jnp.dot(x, w.T, precision=lax.Precision.HIGHEST, preferred_element_type=F32)


class Experts(nnx.Module):
    """The experts' two grouped projections: gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""

    def __init__(self, gate_up_proj, down_proj):
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj


def _experts_linear(weight, bias, where: str):
    if isinstance(weight, MxWeight):
        return Mxfp8RaggedLinear(weight, bias)
    return RaggedLinear(weight, bias)


def route(logits, top_k: int, renormalize: bool = True):
    """(weights [T, k] float32, expert ids [T, k] int32) of the top k of softmax(logits [T, E]),
    the weights renormalized over the k chosen (renormalize=True)."""
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)
    weights, ids = lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def sort_by_expert(ids, num_experts: int):
    """(order [T*k]: the flat (token, choice) pairs sorted by expert, stably; group_sizes [E]
    int32) of expert ids [T, k]. Sorted row r is pair order[r], token order[r] // k."""
    flat = ids.reshape(-1)
    return jnp.argsort(flat, stable=True), jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def swiglu(h):
    """SiLU(gate) * up of fused rows h [..., 2I] (gate columns first), in float32, rounded to h's dtype."""
    gate, up = jnp.split(h.astype(F32), 2, axis=-1)
    return (jax.nn.silu(gate) * up).astype(h.dtype)


class MoE(nnx.Module):
    """A mixture-of-experts MLP: router, top-k, sorted tokens, two grouped GEMMs (module docstring).

    MoE(router_weight [E, H], gate_up [E, 2I, H], down [E, H, I], top_k=...): gate_up and down
    float arrays (a float layer, RaggedLinear) or stacked MxWeights (Mxfp8RaggedLinear); optional
    biases [E, 2I] / [E, H]. dtype: the activations' compute dtype (None: x's). Works under
    nnx.jit; x [..., H] -> [..., H] in the compute dtype. Inference (and gradients with respect
    to x) only: MXFP8 weights are frozen.
    """

    def __init__(self, router_weight, gate_up, down, *, top_k: int, gate_up_bias=None, down_bias=None,
                 renormalize: bool = True, dtype=None):
        router_weight = jnp.asarray(router_weight)
        if router_weight.ndim != 2:
            raise ValueError(f"MoE: router_weight has shape {router_weight.shape}; expected [E, H]")
        experts, hidden = router_weight.shape
        if gate_up.shape[0] != experts or gate_up.shape[2] != hidden or gate_up.shape[1] % 2:
            raise ValueError(f"MoE: gate_up has shape {tuple(gate_up.shape)}; expected [E, 2I, H] "
                             f"with E={experts}, H={hidden} from the router weight")
        inter = gate_up.shape[1] // 2
        if tuple(down.shape) != (experts, hidden, inter):
            raise ValueError(f"MoE: down has shape {tuple(down.shape)}; expected [E, H, I] = "
                             f"{(experts, hidden, inter)}")
        if not 1 <= top_k <= experts:
            raise ValueError(f"MoE: top_k={top_k}; expected 1 <= top_k <= {experts} experts")
        self.num_experts, self.hidden_size, self.intermediate_size = experts, hidden, inter
        self.top_k, self.renormalize, self.dtype = int(top_k), bool(renormalize), dtype
        self.gate = Router(router_weight)
        self.experts = Experts(_experts_linear(gate_up, gate_up_bias, "MoE gate_up"),
                               _experts_linear(down, down_bias, "MoE down"))

    @classmethod
    def create(cls, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
               rngs: nnx.Rngs, param_dtype=jnp.bfloat16, **kwargs) -> "MoE":
        """A float MoE with random weights (normal, variance 1 / fan-in)."""
        keys = jax.random.split(rngs.params(), 3)

        def init(key, shape):
            return (jax.random.normal(key, shape, F32) / jnp.sqrt(shape[-1])).astype(param_dtype)

        return cls(init(keys[0], (num_experts, hidden_size)),
                   init(keys[1], (num_experts, 2 * intermediate_size, hidden_size)),
                   init(keys[2], (num_experts, hidden_size, intermediate_size)), top_k=top_k, **kwargs)

    @property
    def is_mxfp8(self) -> bool:
        return isinstance(self.experts.gate_up_proj, Mxfp8RaggedLinear)

    def __call__(self, x):
        x = jnp.asarray(x)
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE: x has shape {x.shape}; expected [..., {self.hidden_size}]")
        lead = x.shape[:-1]
        tokens = x.reshape(-1, self.hidden_size).astype(self.dtype or x.dtype)
        weights, ids = route(self.gate(tokens), self.top_k, self.renormalize)
        order, group_sizes = sort_by_expert(ids, self.num_experts)
        rows = tokens[order // self.top_k]                                  # [T*k, H] by expert
        h = swiglu(self.experts.gate_up_proj(rows, group_sizes))             # [T*k, I]
        y = self.experts.down_proj(h, group_sizes)                          # [T*k, H]
        y = jnp.zeros_like(y).at[order].set(y, unique_indices=True)         # (token, choice) order
        y = y.reshape(-1, self.top_k, self.hidden_size).astype(F32)
        out = jnp.sum(y * weights[..., None], axis=1).astype(tokens.dtype)
        return out.reshape(*lead, self.hidden_size)


def quantize_moe(model, *, backend=None, rounding: str = "ceil"):
    """Turns every RaggedLinear in `model` (the experts of each MoE; `model` may be an MoE) into
    an Mxfp8RaggedLinear, in place, and returns the model: each [E, N, K] weight quantized along
    K for `backend` (default select_backend()). Routers stay in float; nnx.Linear layers are
    quantize_model's. For a copy: quantize_moe(nnx.clone(model))."""
    check_rounding(rounding)
    backend = resolve_backend(backend)
    targets = {id(node): (path, node) for path, node in nnx.iter_graph(model)
               if isinstance(node, RaggedLinear)}
    if isinstance(model, RaggedLinear):
        return Mxfp8RaggedLinear.from_float(model, rounding=rounding, backend=backend)
    references = _references(model, set(targets))
    for key, (path, module) in targets.items():
        where = ".".join(str(p) for p in path) or "RaggedLinear"
        _replace(references[key], Mxfp8RaggedLinear.from_float(module, rounding=rounding,
                                                               backend=backend, where=where))
    return model


def dequantized(model, dtype=jnp.bfloat16):
    """A float copy of a model whose Mxfp8RaggedLinear experts hold their MXFP8 weights
    dequantized exactly to `dtype` (the float layer computing what the MXFP8 one does)."""
    model = nnx.clone(model)
    targets = {id(node): node for _, node in nnx.iter_graph(model) if isinstance(node, Mxfp8RaggedLinear)}
    references = _references(model, set(targets))
    for key, module in targets.items():
        values, scales = get_value(module.weight).unpack()
        bias = None if module.bias is None else get_value(module.bias)
        _replace(references[key], RaggedLinear(dequantize(values, scales, dtype=dtype), bias))
    return model


def moe_reference(x, router_weight, gate_up, down, *, top_k: int, renormalize: bool = True,
                  gate_up_bias=None, down_bias=None):
    """MoE's math without sorting: every token through every expert (einsum over float weights
    [E, 2I, H] / [E, H, I], float32 accumulation, the same roundings), combined with the routing
    weights (zero for experts not chosen). E times the work: a check, not a layer."""
    x = jnp.asarray(x)
    tokens = x.reshape(-1, x.shape[-1])
    op = reference.dot_dtype(tokens.dtype)
    logits = jnp.dot(tokens, jnp.asarray(router_weight).astype(tokens.dtype).T,
                     precision=lax.Precision.HIGHEST, preferred_element_type=F32)
    weights, ids = route(logits, top_k, renormalize)
    rows = jnp.arange(tokens.shape[0])[:, None]
    dense = jnp.zeros((tokens.shape[0], router_weight.shape[0]), F32).at[rows, ids].add(weights)

    def project(a, w, bias):  # a [E, T, K] or [T, K] -> [E, T, N] per expert
        spec = "tk,enk->etn" if a.ndim == 2 else "etk,enk->etn"
        y = jnp.einsum(spec, a.astype(op), jnp.asarray(w).astype(op),
                       precision=lax.Precision.HIGHEST, preferred_element_type=F32)
        return (y if bias is None else y + jnp.asarray(bias, F32)[:, None]).astype(tokens.dtype)

    h = swiglu(project(tokens, gate_up, gate_up_bias))
    y = project(h, down, down_bias).astype(F32)                       # [E, T, H]
    out = jnp.sum(y * dense.T[..., None], axis=0).astype(tokens.dtype)
    return out.reshape(x.shape)
