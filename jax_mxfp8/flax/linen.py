"""Flax Linen: `Mxfp8Dense` (an inference drop-in for nn.Dense), `Mxfp8FusedDense` (several
Dense layers that read the same input as one MXFP8 GEMM), `quantize_params` for nn.Dense
parameter trees, and `intercept_dense` to run unchanged nn.Dense models on quantized params."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import jax
from flax.core import FrozenDict

from jax_mxfp8.flax._common import (
    Progress, default_predicate, kernel_to_weight, output_dtype, resolve_backend, show_progress)
from jax_mxfp8.fusion import FusedWeight, fuse_weights, split_outputs
from jax_mxfp8.ops.linear import linear
from jax_mxfp8.ops.quantize import check_rounding
from jax_mxfp8.weight import MxWeight


def _apply(inputs, weight, bias, *, features, dtype, param_dtype, quantize_activations):
    """nn.Dense's forward with an MxWeight: same output shape and dtype."""
    inputs = jnp.asarray(inputs)
    if not isinstance(weight, MxWeight):
        raise TypeError(f"param 'weight' must be an MxWeight (from quantize_params); got "
                        f"{type(weight).__name__}")
    if weight.shape != (features, inputs.shape[-1]):
        raise ValueError(f"MXFP8 weight has shape {weight.shape} but this layer maps "
                         f"{inputs.shape[-1]} -> {features} features (expects [out, in])")
    compute = jnp.dtype(dtype or jnp.result_type(inputs.dtype, param_dtype))
    out = output_dtype(inputs.dtype, dtype, param_dtype)
    return linear(inputs.astype(compute), weight, bias, out_dtype=out,
                  quantize_activations=quantize_activations)


class Mxfp8Dense(nn.Module):
    """nn.Dense at inference with an MXFP8 weight: params {'weight': MxWeight [out, in],
    'bias': [out]}, as quantize_params produces. `init` draws a float kernel with kernel_init
    and quantizes it (rounding, backend), so init/apply trees match quantize_params output.
    `precision` is accepted for nn.Dense compatibility (accumulation is always float32)."""
    features: int
    use_bias: bool = True
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    quantize_activations: Optional[bool] = None
    rounding: str = "ceil"
    backend: Optional[str] = None

    @nn.compact
    def __call__(self, inputs):
        in_features = jnp.shape(inputs)[-1]

        def init_weight(key):
            kernel = self.kernel_init(key, (in_features, self.features), self.param_dtype)
            return kernel_to_weight(kernel, rounding=self.rounding,
                                    backend=resolve_backend(self.backend), where=self.name or "Mxfp8Dense")

        # Read an existing weight directly: self.param would re-trace init_weight to compare leaf
        # shapes, which breaks for weights prepared for another backend; _apply checks [out, in].
        if self.has_variable("params", "weight"):
            weight = self.get_variable("params", "weight")
        else:
            weight = self.param("weight", init_weight)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        return _apply(inputs, weight, bias, features=self.features, dtype=self.dtype,
                      param_dtype=self.param_dtype, quantize_activations=self.quantize_activations)


class Mxfp8FusedDense(nn.Module):
    """Dense layers of `features` (a tuple) that read the same input, as one MXFP8 GEMM:
    returns the tuple of their outputs. params {'weight': FusedWeight, 'bias': [sum(features)]
    in the fused row order}; from existing layers: jax_mxfp8.fuse_weights of their MxWeights
    and jax_mxfp8.fuse_biases of their biases. `init` draws one kernel per piece with
    kernel_init, quantizes and fuses them. Other fields as Mxfp8Dense."""
    features: Sequence[int]
    use_bias: bool = True
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    quantize_activations: Optional[bool] = None
    rounding: str = "ceil"
    backend: Optional[str] = None

    @nn.compact
    def __call__(self, inputs) -> tuple:
        in_features, features = jnp.shape(inputs)[-1], tuple(self.features)

        def init_weight(key):
            where = self.name or "Mxfp8FusedDense"
            return fuse_weights([
                kernel_to_weight(self.kernel_init(k, (in_features, n), self.param_dtype),
                                 rounding=self.rounding, backend=resolve_backend(self.backend),
                                 where=where)
                for k, n in zip(jax.random.split(key, len(features)), features)])

        if self.has_variable("params", "weight"):  # as Mxfp8Dense: no re-traced init
            weight = self.get_variable("params", "weight")
        else:
            weight = self.param("weight", init_weight)
        if not isinstance(weight, FusedWeight) or weight.sizes != features:
            raise ValueError(f"param 'weight' must be a FusedWeight of pieces {features} (fuse_weights); "
                             f"got {weight!r}")
        bias = (self.param("bias", self.bias_init, (sum(features),), self.param_dtype)
                if self.use_bias else None)
        y = _apply(inputs, weight.weight, bias, features=sum(features), dtype=self.dtype,
                   param_dtype=self.param_dtype, quantize_activations=self.quantize_activations)
        return split_outputs(y, weight)


def _dense_leaves(params, path=()):
    """(path, dict) of every sub-dict that looks like nn.Dense params: a 2-D float 'kernel'."""
    for key, value in params.items():
        if isinstance(value, Mapping):
            kernel = value.get("kernel")
            if getattr(kernel, "ndim", None) == 2 and jnp.issubdtype(kernel.dtype, jnp.floating):
                yield (*path, key), value
            yield from _dense_leaves(value, (*path, key))


def quantize_params(params, *, predicate: Callable[[str, Any], bool] | None = None,
                    rounding: str = "ceil", backend=None, progress=None):
    """A copy of a Linen params tree with each chosen nn.Dense's {'kernel': (in, out), 'bias'}
    replaced by {'weight': MxWeight [out, in], 'bias'} for Mxfp8Dense / intercept_dense.

    predicate(path, kernel) -> bool, path like "Dense_0" or "block.mlp.fc1" (dots), picks
    layers; default: every 2-D float kernel with in_features % 32 == 0. Works on
    {'params': ...} variable dicts too.
    """
    check_rounding(rounding)
    backend = resolve_backend(backend)
    chosen = []
    for path, layer in _dense_leaves(params):
        name = ".".join(str(p) for p in path)
        kernel = layer["kernel"]
        if predicate(name, kernel) if predicate is not None else default_predicate(name, kernel.shape[0]):
            chosen.append((path, name))
    converted = {}
    bar = Progress(len(chosen), "jax_mxfp8: quantizing", show_progress(progress, len(chosen)))
    try:
        for path, name in chosen:
            layer = _lookup(params, path)
            new = {k: v for k, v in layer.items() if k != "kernel"}
            new["weight"] = kernel_to_weight(layer["kernel"], rounding=rounding, backend=backend,
                                             where=name)
            converted[path] = new
            bar.update()
    finally:
        bar.close()
    return _rebuild(params, converted)


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _rebuild(tree, converted, path=()):
    if path in converted:
        return converted[path]
    if not isinstance(tree, Mapping):
        return tree
    out = {k: _rebuild(v, converted, (*path, k)) for k, v in tree.items()}
    return FrozenDict(out) if isinstance(tree, FrozenDict) else out


@contextlib.contextmanager
def intercept_dense(quantize_activations: bool | None = None):
    """Inside this context, every nn.Dense whose params hold an MxWeight 'weight' (from
    quantize_params) computes with it; other nn.Dense layers run unchanged. Lets a Linen model
    written with nn.Dense run quantized without editing its code:

        with intercept_dense():
            y = model.apply({"params": quantize_params(params)}, x)
    """
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (type(module) is nn.Dense and context.method_name == "__call__"
                and module.has_variable("params", "weight")):
            weight = module.get_variable("params", "weight")
            bias = module.get_variable("params", "bias") if module.use_bias else None
            return _apply(args[0], weight, bias, features=module.features, dtype=module.dtype,
                          param_dtype=module.param_dtype, quantize_activations=quantize_activations)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
