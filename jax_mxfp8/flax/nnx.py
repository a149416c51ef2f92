"""Flax NNX: `Mxfp8Linear` (an inference drop-in for nnx.Linear), `quantize_model`, and
torch-style `state_dict` / `load_state_dict` that speak the MXFP8 checkpoint layout."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jax_mxfp8.flax._common import (
    Progress, default_predicate, kernel_to_weight, output_dtype, resolve_backend, show_progress)
from jax_mxfp8.ops.linear import linear
from jax_mxfp8.ops.quantize import check_rounding
from jax_mxfp8.weight import MxWeight

Predicate = Callable[[str, nnx.Module], bool]


def get_value(variable):
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def set_value(variable, value) -> None:
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


class Mxfp8Linear(nnx.Module):
    """y = inputs @ W.T + bias with W an MXFP8 `MxWeight` [out, in].

    Called like nnx.Linear (same input, same output shape and dtype) but for inference only:
    the weight is `self.weight`, an nnx.Param holding the MxWeight (arrays as leaves, so the
    module works with nnx.jit, nnx.split/merge and nnx.state), and the bias keeps its dtype.
    quantize_activations: None = the backend's own math (see jax_mxfp8.linear).
    """

    def __init__(self, weight: MxWeight, bias=None, *, dtype=None, param_dtype=jnp.float32,
                 preferred_element_type=None, quantize_activations: bool | None = None):
        if not isinstance(weight, MxWeight):
            raise TypeError(f"weight must be an MxWeight (quantize_weight / prepare_weight); got "
                            f"{type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.weight = nnx.Param(weight)
        if bias is not None:
            bias = jnp.asarray(bias)
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias has shape {bias.shape}; expected ({self.out_features},)")
            self.bias = nnx.Param(bias)
        else:
            self.bias = None
        self.use_bias = bias is not None
        self.dtype = dtype
        self.param_dtype = jnp.dtype(param_dtype)
        self.preferred_element_type = preferred_element_type
        self.quantize_activations = quantize_activations

    @classmethod
    def from_linear(cls, module: nnx.Linear, *, rounding: str = "ceil", backend=None,
                    quantize_activations: bool | None = None, name: str = "Linear") -> "Mxfp8Linear":
        """Quantizes an nnx.Linear: kernel (in, out) becomes an MxWeight [out, in]."""
        kernel = get_value(module.kernel)
        weight = kernel_to_weight(kernel, rounding=rounding, backend=resolve_backend(backend),
                                  where=name)
        return cls(weight, None if module.bias is None else get_value(module.bias), dtype=module.dtype,
                   param_dtype=kernel.dtype,
                   preferred_element_type=getattr(module, "preferred_element_type", None),
                   quantize_activations=quantize_activations)

    def __call__(self, inputs, out_sharding=None):
        inputs = jnp.asarray(inputs)
        compute = jnp.dtype(self.dtype or jnp.result_type(inputs.dtype, self.param_dtype))
        out = output_dtype(inputs.dtype, self.dtype, self.param_dtype, self.preferred_element_type)
        bias = None if self.bias is None else get_value(self.bias)
        y = linear(inputs.astype(compute), get_value(self.weight), bias, out_dtype=out,
                   quantize_activations=self.quantize_activations)
        if out_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, out_sharding)
        return y


# ---- swapping modules in a graph -----------------------------------------------------------------

def _path_name(path) -> str:
    return ".".join(str(p) for p in path)


def _children(node):
    if isinstance(node, nnx.Module):
        # str(k): nnx.List of flax 0.12.0 keeps its elements under int keys
        return [(k, v) for k, v in vars(node).items() if not str(k).startswith("_pytree__")]
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    if isinstance(node, dict):
        return list(node.items())
    return []


def _references(root, wanted: set[int]) -> dict[int, list]:
    """Every (container, key) holding one of the wanted modules (a shared module has several)."""
    found: dict[int, list] = defaultdict(list)
    seen: set[int] = set()

    def visit(node):
        if id(node) in seen:
            return
        seen.add(id(node))
        for key, value in _children(node):
            if id(value) in wanted:
                if isinstance(node, tuple):
                    raise ValueError(f"a module to replace is held in a tuple (key {key}); hold "
                                     f"sub-modules in nnx.List or a list instead")
                found[id(value)].append((node, key))
            elif isinstance(value, (nnx.Module, list, tuple, dict)):
                visit(value)

    visit(root)
    return found


def _replace(references, new) -> None:
    for container, key in references:
        if isinstance(container, nnx.Module) and isinstance(key, str):
            setattr(container, key, new)
        else:
            container[key] = new


def quantize_model(model, *, predicate: Predicate | None = None, rounding: str = "ceil",
                   backend=None, quantize_activations: bool | None = None, progress=None):
    """Replaces every nnx.Linear in `model` (in place) with an Mxfp8Linear and returns it.

    predicate(path, module) -> bool picks layers; `path` is the dotted attribute path
    ("layers.0.mlp.up_proj"). Default: every nnx.Linear whose in_features is a multiple of
    32. Layers are converted one at a time (each bf16 kernel is released as its MXFP8 weight
    is installed). progress: True/False, or None = a bar on stderr for >= 16 layers on a
    terminal. To keep the original, convert a copy: quantize_model(nnx.clone(model)).
    """
    check_rounding(rounding)
    backend = resolve_backend(backend)
    targets = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            name = _path_name(path) or type(node).__name__
            if predicate(name, node) if predicate is not None else default_predicate(name, node.in_features):
                targets.append((name, node))
    references = _references(model, {id(node) for _, node in targets})
    bar = Progress(len(targets), "jax_mxfp8: quantizing", show_progress(progress, len(targets)))
    try:
        for name, module in targets:
            new = Mxfp8Linear.from_linear(module, rounding=rounding, backend=backend,
                                          quantize_activations=quantize_activations, name=name)
            if module is model:
                return new
            _replace(references[id(module)], new)
            bar.update()
    finally:
        bar.close()
    return model


def add_lora(model, rank: int, *, rngs, predicate: Predicate | None = None,
             param_dtype=jnp.float32):
    """Puts a LoRA adapter beside every Mxfp8Linear in `model` (in place) and returns it.

    Each picked layer becomes nnx.LoRA(base_module=layer): y = layer(x) + (x @ A) @ B with A
    [in, rank] and B [rank, out] trainable nnx.LoRAParam (B starts at zero, so the model's
    output is unchanged until training). The MXFP8 weight stays frozen: differentiate with
    nnx.grad(loss, wrt=nnx.LoRAParam) / nnx.DiffState(0, nnx.LoRAParam). predicate(path,
    module) picks layers (default: all). The adapters compute in the layer's `dtype` (the
    MXFP8 layer's compute dtype; None: promoted from x and param_dtype, as nnx.LoRA does).
    """
    if rank < 1:
        raise ValueError(f"add_lora: rank must be >= 1; got {rank}")
    targets = [(_path_name(path), node) for path, node in nnx.iter_graph(model)
               if isinstance(node, Mxfp8Linear)]
    targets = [(name, node) for name, node in targets if predicate is None or predicate(name, node)]
    if not targets:
        raise ValueError("add_lora: the model has no Mxfp8Linear layer (quantize_model first) "
                         "or the predicate picked none")
    references = _references(model, {id(node) for _, node in targets})
    for _, module in targets:
        # dtype: nnx.LoRA promotes x to it before calling the base, which must see its own dtype
        lora = nnx.LoRA(module.in_features, rank, module.out_features, base_module=module,
                        dtype=module.dtype, param_dtype=param_dtype, rngs=rngs)
        if module is model:
            return lora
        _replace(references[id(module)], lora)
    return model


# ---- torch-style flat tensors ----------------------------------------------------------------

SAVED_VARIABLES = (nnx.Param, nnx.BatchStat)


def state_dict(model) -> dict[str, Any]:
    """The model's parameters as flat, torch/HF-style names: an nnx.Linear's kernel (in, out)
    is saved transposed as '<path>.weight' [out, in], an Mxfp8Linear's weight as its MxWeight
    (save_safetensors writes '<path>.weight' + '<path>.weight_scale'), everything else under its
    dotted path. save_safetensors(path, state_dict(model)) writes a checkpoint."""
    nodes = dict(nnx.iter_graph(model))
    out: dict[str, Any] = {}
    for path, node in nodes.items():
        if not isinstance(node, SAVED_VARIABLES):
            continue
        value = get_value(node)
        if path[-1] == "kernel" and isinstance(nodes.get(path[:-1]), nnx.Linear):
            out[_path_name((*path[:-1], "weight"))] = jnp.transpose(value)
        else:
            out[_path_name(path)] = value
    return out


def load_state_dict(model, tensors: Mapping[str, Any], *, strict: bool = True, quantize_activations=None):
    """Loads flat tensors (e.g. load_safetensors output) into `model` in place and returns it.

    Names follow state_dict(). Where the checkpoint holds an MxWeight for an nnx.Linear, the
    layer becomes an Mxfp8Linear; arrays for an nnx.Linear are transposed into its kernel.
    Arrays are cast to the model's parameter dtypes. strict: missing or unexpected names raise.
    """
    nodes = dict(nnx.iter_graph(model))
    variables, linears = {}, {}
    for path, node in nodes.items():
        if isinstance(node, SAVED_VARIABLES):
            if path[-1] == "kernel" and isinstance(nodes.get(path[:-1]), nnx.Linear):
                linears[_path_name((*path[:-1], "weight"))] = nodes[path[:-1]]
            else:
                variables[_path_name(path)] = node
    expected = set(variables) | set(linears)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if strict and (missing or unexpected):
        raise ValueError(f"load_state_dict: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                         f", unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for name, variable in variables.items():
        if name not in tensors:
            continue
        current, value = get_value(variable), tensors[name]
        if isinstance(current, MxWeight) != isinstance(value, MxWeight):
            raise ValueError(f"{name}: the model holds {type(current).__name__} but the checkpoint "
                             f"has {type(value).__name__}")
        if value.shape != current.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model shape "
                             f"{tuple(current.shape)}")
        set_value(variable, value if isinstance(value, MxWeight) else jnp.asarray(value, current.dtype))
    swaps = {}
    for name, module in linears.items():
        if name not in tensors:
            continue
        kernel, value = get_value(module.kernel), tensors[name]
        want = (kernel.shape[1], kernel.shape[0])
        if tuple(value.shape) != want:
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != [out, in] = {want}")
        if isinstance(value, MxWeight):
            swaps[id(module)] = Mxfp8Linear(
                value, None if module.bias is None else get_value(module.bias), dtype=module.dtype,
                param_dtype=kernel.dtype,
                preferred_element_type=getattr(module, "preferred_element_type", None),
                quantize_activations=quantize_activations)
        else:
            set_value(module.kernel, jnp.asarray(value, kernel.dtype).T)
    if id(model) in swaps:
        return swaps[id(model)]
    references = _references(model, set(swaps))
    for key, new in swaps.items():
        _replace(references[key], new)
    return model
