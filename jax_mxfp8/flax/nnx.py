"""Flax NNX: `Mxfp8Linear` (an inference drop-in for nnx.Linear), `Mxfp8FusedLinear` (sibling
linears that read the same input as one MXFP8 GEMM), `quantize_model`, `fuse_linears`, and
torch-style `state_dict` / `load_state_dict` that speak the MXFP8 checkpoint layout (a fused
module is saved and loaded under its pieces' own names)."""
from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jax_mxfp8.flax._common import (
    Progress, default_predicate, kernel_to_weight, output_dtype, resolve_backend, show_progress)
from jax_mxfp8.fusion import FusedWeight, fuse_biases, fuse_weights, linear_split, split_outputs
from jax_mxfp8.ops.linear import linear
from jax_mxfp8.ops.quantize import check_rounding
from jax_mxfp8.weight import MxWeight

Predicate = Callable[[str, nnx.Module], bool]
# Which sibling linears read the same input: {parent path pattern: (names, ...)}, or
# fn(path, module) -> [(names, ...), ...] (see quantize_model).
FuseSpec = Mapping[str, Sequence[str]] | Callable[[str, nnx.Module], Sequence[Sequence[str]]]


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


LAYER_SETTINGS = ("dtype", "param_dtype", "preferred_element_type", "quantize_activations")


class Mxfp8FusedLinear(nnx.Module):
    """Sibling linears that read the same input as one MXFP8 GEMM: `layer(x)` returns the tuple
    of their outputs in `names` order, each the output its Mxfp8Linear would give.

    weight: a FusedWeight (jax_mxfp8.fuse_weights; one `linear` and a split, see
    jax_mxfp8.fusion). biases: None, or one per piece (None for a piece without one: the fused
    bias holds zeros there, and state_dict writes biases only for the pieces that had one).
    names: the pieces' attribute names; state_dict writes them as siblings of this module
    ("<parent>.<name>.weight"), so checkpoints keep the unfused names. The other arguments are
    Mxfp8Linear's, shared by every piece. Inference only, like Mxfp8Linear (differentiable in
    the input and the bias).
    """

    def __init__(self, weight: FusedWeight, biases=None, *, names: Sequence[str], dtype=None,
                 param_dtype=jnp.float32, preferred_element_type=None,
                 quantize_activations: bool | None = None):
        if not isinstance(weight, FusedWeight):
            raise TypeError(f"weight must be a FusedWeight (jax_mxfp8.fuse_weights); got "
                            f"{type(weight).__name__}")
        names = _group_names(names, "Mxfp8FusedLinear")
        if len(names) != len(weight.sizes):
            raise ValueError(f"Mxfp8FusedLinear: {len(names)} names {names} for the "
                             f"{len(weight.sizes)} pieces {weight.sizes} of the fused weight")
        biases = [None] * len(names) if biases is None else list(biases)
        fused_bias = fuse_biases(biases, weight)
        self.names, self.sizes = names, weight.sizes
        self.has_bias = tuple(b is not None for b in biases)
        self.out_features, self.in_features = weight.shape
        self.weight = nnx.Param(weight)
        self.bias = None if fused_bias is None else nnx.Param(fused_bias)
        self.dtype = dtype
        self.param_dtype = jnp.dtype(param_dtype)
        self.preferred_element_type = preferred_element_type
        self.quantize_activations = quantize_activations

    @classmethod
    def from_layers(cls, layers: Mapping[str, Mxfp8Linear], *, shards: int = 1, backend=None,
                    where: str = "Mxfp8FusedLinear") -> "Mxfp8FusedLinear":
        """Fuses Mxfp8Linear layers {name: layer} (exact: their MXFP8 weights stacked along N).
        They must read the same input (equal in_features) and share their settings (dtype,
        param_dtype, preferred_element_type, quantize_activations). shards, backend: as in
        jax_mxfp8.fuse_weights."""
        _check_layers(layers, where)
        first = next(iter(layers.values()))
        weight = fuse_weights([get_value(m.weight) for m in layers.values()], shards=shards,
                              backend=backend)
        biases = [None if m.bias is None else get_value(m.bias) for m in layers.values()]
        return cls(weight, biases, names=tuple(layers),
                   **{k: getattr(first, k) for k in LAYER_SETTINGS})

    def unfused(self) -> dict[str, Mxfp8Linear]:
        """The pieces as separate Mxfp8Linear layers {name: layer} (exact)."""
        fused = get_value(self.weight)
        biases = ([None] * len(self.names) if self.bias is None
                  else split_outputs(get_value(self.bias), fused))
        return {name: Mxfp8Linear(w, b if has else None,
                                  **{k: getattr(self, k) for k in LAYER_SETTINGS})
                for name, w, b, has in zip(self.names, fused.unfuse(), biases, self.has_bias)}

    def __call__(self, inputs) -> tuple:
        inputs = jnp.asarray(inputs)
        compute = jnp.dtype(self.dtype or jnp.result_type(inputs.dtype, self.param_dtype))
        out = output_dtype(inputs.dtype, self.dtype, self.param_dtype, self.preferred_element_type)
        bias = None if self.bias is None else get_value(self.bias)
        return linear_split(inputs.astype(compute), get_value(self.weight), bias, out_dtype=out,
                            quantize_activations=self.quantize_activations)


def _group_names(names, where) -> tuple[str, ...]:
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{where}: a fused group is a tuple of attribute names, e.g. "
                        f"('q_proj', 'k_proj', 'v_proj'); got {names!r}")
    names = tuple(names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"{where}: a fused group needs two or more distinct linears; got {names}")
    return names


def _check_layers(layers: Mapping[str, Any], where) -> None:
    """The layers of one group can be fused: Mxfp8Linear, one input width, one set of settings."""
    for name, layer in layers.items():
        if not isinstance(layer, Mxfp8Linear):
            raise TypeError(f"{where}: {name} is {'missing' if layer is None else 'an ' + type(layer).__name__}"
                            f"; only Mxfp8Linear layers can be fused (quantize the group's linears "
                            f"first, e.g. quantize_model(model, fuse=...))")
    widths = {name: m.in_features for name, m in layers.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(f"{where}: the linears have different in_features {widths}; only linears "
                         f"that read the same input can be fused")
    for key in LAYER_SETTINGS:
        values = {name: _setting(m, key) for name, m in layers.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"{where}: the linears differ in {key} {values}; a fused GEMM has "
                             f"one: give them the same {key}, or leave them unfused")


def _setting(layer, key):
    value = getattr(layer, key)  # dtypes compared as dtypes (jnp.bfloat16 == "bfloat16")
    return value if value is None or key == "quantize_activations" else jnp.dtype(value)


def fused_name(names: Sequence[str]) -> str:
    """The attribute a fused group is stored under in its parent: the names joined by "_", a
    common "_suffix" kept once ("q_proj", "k_proj", "v_proj" -> "q_k_v_proj"; "gate_proj",
    "up_proj" -> "gate_up_proj"; "wq", "wk" -> "wq_wk")."""
    names = tuple(names)
    common = os.path.commonprefix([n[::-1] for n in names])[::-1]
    suffix = common[common.find("_"):] if "_" in common else ""
    if not suffix or any(len(n) == len(suffix) for n in names):
        return "_".join(names)
    return "_".join(n[:-len(suffix)] for n in names) + suffix


def call_fused(module: nnx.Module, names: Sequence[str], inputs) -> tuple:
    """(module.<name>(inputs) for name in names), by one GEMM where the group was fused.

    A model's __call__ uses it for linears that read the same input, so that one code path runs
    the float model, the quantized one and the fused one:
        q, k, v = call_fused(self, ("q_proj", "k_proj", "v_proj"), x)
    """
    names = tuple(names)
    fused = getattr(module, fused_name(names), None)
    if isinstance(fused, Mxfp8FusedLinear):
        if fused.names != names:
            raise ValueError(f"call_fused: {type(module).__name__}.{fused_name(names)} fuses "
                             f"{fused.names}, not {names}")
        return fused(inputs)
    missing = [n for n in names if getattr(module, n, None) is None]
    if missing:
        raise AttributeError(f"call_fused: {type(module).__name__} has neither the fused module "
                             f"{fused_name(names)!r} nor the linears {missing}")
    return tuple(getattr(module, n)(inputs) for n in names)


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
                   backend=None, quantize_activations: bool | None = None, progress=None,
                   fuse: FuseSpec | None = None):
    """Replaces every nnx.Linear in `model` (in place) with an Mxfp8Linear and returns it.

    predicate(path, module) -> bool picks layers; `path` is the dotted attribute path
    ("layers.0.mlp.up_proj"). Default: every nnx.Linear whose in_features is a multiple of
    32. Layers are converted one at a time (each bf16 kernel is released as its MXFP8 weight
    is installed). progress: True/False, or None = a bar on stderr for >= 16 layers on a
    terminal. To keep the original, convert a copy: quantize_model(nnx.clone(model)).

    fuse names groups of sibling linears that read the same input, fused after quantization
    into one Mxfp8FusedLinear each (see fuse_linears, which takes the same spec):
    {"layers.*.self_attn": ("q_proj", "k_proj", "v_proj"), "**.mlp": ("gate_proj", "up_proj")}. It is
    checked before anything is converted: every named linear must be picked by the predicate.
    The model's __call__ must call the fused module (call_fused).
    """
    check_rounding(rounding)
    backend = resolve_backend(backend)
    targets = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            name = _path_name(path) or type(node).__name__
            if predicate(name, node) if predicate is not None else default_predicate(name, node.in_features):
                targets.append((name, node))
    if fuse is not None:
        picked = {id(node) for _, node in targets}
        for path, parent, names in _fuse_groups(model, fuse):
            for n in names:
                layer = getattr(parent, n, None)
                if isinstance(layer, nnx.Linear) and id(layer) not in picked:
                    raise ValueError(f"fuse: {_dotted(path, n)} is left in float by the predicate; "
                                     f"a fused group must be quantized whole: pick all of "
                                     f"{names} or drop the group from fuse")
                if not isinstance(layer, (nnx.Linear, Mxfp8Linear)):
                    _check_layers({_dotted(path, n): layer}, "fuse")
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
    return model if fuse is None else fuse_linears(model, fuse)


def _dotted(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _path_regex(pattern: str) -> re.Pattern:
    """A parent path pattern: '*' matches within one dotted name ("model.layers.*.mlp"), '**'
    any run of names ("**.mlp"), '?' one character."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    return re.compile("".join({"**": ".*", "*": "[^.]*", "?": "[^.]"}.get(p, re.escape(p))
                              for p in parts))


def _fuse_groups(model, fuse: FuseSpec) -> list[tuple[str, nnx.Module, tuple[str, ...]]]:
    """(parent path, parent, names) of every group `fuse` names, each linear in one group."""
    modules = [(_path_name(path), node) for path, node in nnx.iter_graph(model)
               if isinstance(node, nnx.Module)]
    groups = []
    if callable(fuse):
        for path, module in modules:
            groups += [(path, module, _group_names(names, f"fuse({path!r})"))
                       for names in fuse(path, module) or ()]
    elif isinstance(fuse, Mapping):
        for pattern, names in fuse.items():
            names = _group_names(names, f"fuse[{pattern!r}]")
            regex = _path_regex(pattern)
            matched = [(path, m) for path, m in modules if regex.fullmatch(path)]
            if not matched:
                example = next((path for path, _ in modules if path), "")
                raise ValueError(f"fuse: the pattern {pattern!r} matches no module of the model "
                                 f"(paths are dotted attribute paths such as {example!r}; '*' "
                                 f"matches within one name, '**' across dots)")
            groups += [(path, m, names) for path, m in matched]
    else:
        raise TypeError(f"fuse must be a mapping {{parent path pattern: (names, ...)}} or a "
                        f"function (path, module) -> groups of names; got {type(fuse).__name__}")
    seen: dict[tuple[int, str], tuple[str, ...]] = {}
    for path, parent, names in groups:
        for n in names:
            other = seen.setdefault((id(parent), n), names)
            if other is not names:
                raise ValueError(f"fuse: {_dotted(path, n)} is in two groups, {other} and {names}")
    return groups


def fuse_linears(model, fuse: FuseSpec, *, shards: int = 1, backend=None):
    """Fuses (in place) each group of sibling Mxfp8Linear layers that `fuse` names into one
    Mxfp8FusedLinear (exact: the MXFP8 weights stacked along N) and returns the model.

    fuse: {parent path pattern: (names, ...)}, the pattern a glob over the parent's dotted path
    ('*' within one name, '**' across dots: "model.layers.*.self_attn", "**.mlp"; a pattern
    matching no module is an error), or a
    function (path, module) -> [(names, ...), ...] naming the groups of that module. The fused
    module is stored as `<parent>.<fused_name(names)>` ("q_k_v_proj") and the pieces'
    attributes are removed: the model's __call__ must reach them through call_fused(self,
    names, x). shards, backend: as in jax_mxfp8.fuse_weights. Every group is checked before
    anything is changed; then groups are fused one at a time.
    """
    groups = _fuse_groups(model, fuse)
    for path, parent, names in groups:
        _check_layers({n: getattr(parent, n, None) for n in names}, f"fuse {path or 'model'}")
        if getattr(parent, fused_name(names), None) is not None:
            raise ValueError(f"fuse: {_dotted(path, fused_name(names))} already exists; rename it "
                             f"or leave {names} unfused")
    for path, parent, names in groups:
        layers = {n: getattr(parent, n) for n in names}
        fused = Mxfp8FusedLinear.from_layers(layers, shards=shards, backend=backend,
                                             where=f"fuse {path or 'model'}")
        for n in names:
            delattr(parent, n)
        setattr(parent, fused_name(names), fused)
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
    (save_safetensors writes '<path>.weight' + '<path>.weight_scale'), an Mxfp8FusedLinear as
    its pieces under their own names ('<parent>.q_proj.weight', exact), everything else under
    its dotted path. save_safetensors(path, state_dict(model)) writes a checkpoint."""
    nodes = dict(nnx.iter_graph(model))
    fused = {path: node for path, node in nodes.items() if isinstance(node, Mxfp8FusedLinear)}
    out: dict[str, Any] = {}
    for path, node in nodes.items():
        if path in fused:
            for name, layer in node.unfused().items():
                out[_path_name((*path[:-1], name, "weight"))] = get_value(layer.weight)
                if layer.bias is not None:
                    out[_path_name((*path[:-1], name, "bias"))] = get_value(layer.bias)
            continue
        if not isinstance(node, SAVED_VARIABLES) or path[:-1] in fused:
            continue
        value = get_value(node)
        if path[-1] == "kernel" and isinstance(nodes.get(path[:-1]), nnx.Linear):
            out[_path_name((*path[:-1], "weight"))] = jnp.transpose(value)
        else:
            out[_path_name(path)] = value
    return out


def _fused_piece_names(path, module: Mxfp8FusedLinear) -> list[tuple[str, str | None]]:
    """(weight name, bias name or None) of each piece, as state_dict writes them."""
    prefixes = [_path_name((*path[:-1], name)) for name in module.names]
    return [(f"{p}.weight", f"{p}.bias" if has else None)
            for p, has in zip(prefixes, module.has_bias)]


def _load_fused(module: Mxfp8FusedLinear, names, tensors) -> Mxfp8FusedLinear | None:
    """A new Mxfp8FusedLinear from the pieces' checkpoint tensors (None: none of them given)."""
    wanted = [n for pair in names for n in pair if n is not None]
    present = [n for n in wanted if n in tensors]
    if not present:
        return None
    if len(present) < len(wanted):
        raise ValueError(f"load_state_dict: {sorted(set(wanted) - set(present))} missing; a fused "
                         f"module {module.names} is loaded from all of its pieces")
    current = get_value(module.weight)
    weights = []
    for (name, _), rows in zip(names, module.sizes):
        value = tensors[name]
        if not isinstance(value, MxWeight):
            raise ValueError(f"{name}: the model fuses {module.names} (Mxfp8FusedLinear) but the "
                             f"checkpoint holds a dense {type(value).__name__}: load an MXFP8 "
                             f"checkpoint, or load into the unfused model and quantize_model("
                             f"..., fuse=...)")
        if value.shape != (rows, module.in_features):
            raise ValueError(f"{name}: checkpoint shape {value.shape} != [out, in] = "
                             f"{(rows, module.in_features)}")
        weights.append(value)
    bias_dtype = None if module.bias is None else get_value(module.bias).dtype
    biases = [None if b is None else jnp.asarray(tensors[b], bias_dtype) for _, b in names]
    return Mxfp8FusedLinear(fuse_weights(weights, shards=current.shards), biases,
                            names=module.names, **{k: getattr(module, k) for k in LAYER_SETTINGS})


def load_state_dict(model, tensors: Mapping[str, Any], *, strict: bool = True, quantize_activations=None):
    """Loads flat tensors (e.g. load_safetensors output) into `model` in place and returns it.

    Names follow state_dict(). Where the checkpoint holds an MxWeight for an nnx.Linear, the
    layer becomes an Mxfp8Linear; arrays for an nnx.Linear are transposed into its kernel. An
    Mxfp8FusedLinear is loaded from its pieces' MXFP8 weights (fused again, exactly). Arrays
    are cast to the model's parameter dtypes. strict: missing or unexpected names raise.
    """
    nodes = dict(nnx.iter_graph(model))
    fused = {path: node for path, node in nodes.items() if isinstance(node, Mxfp8FusedLinear)}
    fused_names = {path: _fused_piece_names(path, node) for path, node in fused.items()}
    variables, linears = {}, {}
    for path, node in nodes.items():
        if isinstance(node, SAVED_VARIABLES) and path[:-1] not in fused:
            if path[-1] == "kernel" and isinstance(nodes.get(path[:-1]), nnx.Linear):
                linears[_path_name((*path[:-1], "weight"))] = nodes[path[:-1]]
            else:
                variables[_path_name(path)] = node
    expected = set(variables) | set(linears) | {
        n for names in fused_names.values() for pair in names for n in pair if n is not None}
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
    for path, module in fused.items():
        new = _load_fused(module, fused_names[path], tensors)
        if new is not None:
            swaps[id(module)] = new
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
