"""The quantization config of a Hugging Face style checkpoint directory, for MXFP8 checkpoints.

`read_quant_config(directory)` reads config.json's `quantization_config` (and ModelOpt's
hf_quant_config.json) as the MXFP8 producers write them, and returns a QuantConfig, or None
for a plain (unquantized) checkpoint. Anything that is not MXFP8 (E4M3 values, one e8m0 scale
per 32 weights) raises CheckpointError naming the scheme it found (MXFP4, NVFP4, per-tensor or
per-channel FP8, INT8/INT4, e5m2, other group sizes, ...).

What each producer writes (the fields read here; everything else is left alone):

- llm-compressor / compressed-tensors: {"quant_method": "compressed-tensors", "format":
  "mxfp8-quantized", "config_groups": {name: {"weights": {"num_bits": 8, "type": "float",
  "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8", ...},
  "input_activations": {... same, "dynamic": true} or null, "output_activations": null,
  "format": ...}}, "ignore": [...], "sparsity_config", "transform_config"}. Presets MXFP8 (W8A8)
  and MXFP8A16 (weight-only).
- NVIDIA ModelOpt: hf_quant_config.json {"producer": {"name": "modelopt"}, "quantization":
  {"quant_algo": "MXFP8", "group_size": 32, "exclude_modules": [...]}} and config.json
  {"quant_method": "modelopt", "quant_algo": "MXFP8", "ignore": [...]}. MXFP8 is W8A8 (dynamic
  MXFP8 activations). "MIXED_PRECISION" is accepted when every quantized layer is MXFP8.
  jax_mxfp8's own save_pretrained writes this layout too (producer "jax_mxfp8").
- torchao (transformers TorchAoConfig): {"quant_method": "torchao", "quant_type": {"default":
  {"_type": "MXDynamicActivationMXWeightConfig", "_data": {"activation_dtype": {"_type":
  "torch.dtype", "_data": "float8_e4m3fn"}, "weight_dtype": ..., "block_size": 32, ...}}},
  "modules_to_not_convert": null or [...], "include_input_output_embeddings": false}. Always
  W8A8. With modules_to_not_convert null transformers leaves the output embedding ("lm_head")
  unquantized, so ignore is ("lm_head",) then.
- AMD Quark: {"quant_method": "quark", "global_quant_config": {"weight": {"dtype": "fp8_e4m3",
  "qscheme": "per_group", "group_size": 32, "scale_format": "e8m0", ...}, "input_tensors": {...}
  or null, "output_tensors": null}, "layer_quant_config": {...}, "layer_type_quant_config":
  {...}, "exclude": [...], "export": {"weight_format": "fake_quantized" | "real_quantized"}}
  (older Quark: "dtype": "mx" with "mx_element_dtype": "fp8_e4m3").

KV-cache quantization settings are not read (the decoder computes attention unquantized).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from jax_mxfp8._errors import CheckpointError

CONFIG_NAME = "config.json"
MODELOPT_NAME = "hf_quant_config.json"
GROUP_SIZE = 32
MXFP8 = "MXFP8 (E4M3 values, one e8m0 scale per 32)"

PRODUCERS = ("compressed-tensors", "modelopt", "jax_mxfp8", "torchao", "quark")


@dataclass(frozen=True)
class QuantConfig:
    """An MXFP8 checkpoint's quantization config.

    producer: "compressed-tensors" (llm-compressor), "modelopt", "jax_mxfp8" (our own
        save_pretrained, ModelOpt layout), "torchao" or "quark".
    quantize_activations: True for W8A8 (activations quantized to MXFP8 on the fly), False for
        weight-only W8A16.
    ignore: module names / patterns left in high precision, as the producer wrote them
        (compressed-tensors: names, class names or "re:" regular expressions; ModelOpt and
        Quark: fnmatch globs; torchao: names).
    group_size: elements per scale (always 32: anything else is rejected).
    """
    producer: str
    quantize_activations: bool
    ignore: tuple[str, ...]
    group_size: int


def read_quant_config(directory: str | os.PathLike) -> QuantConfig | None:
    """The MXFP8 QuantConfig of a checkpoint directory (a file path means its directory), or None
    when it has no quantization config. Raises CheckpointError for a quantization config that is
    malformed or not MXFP8, naming the scheme it found."""
    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory (pass the directory "
                              f"holding config.json and the safetensors, or one of its files)")
    config = _read_json(directory / CONFIG_NAME)
    hf_quant = _read_json(directory / MODELOPT_NAME)
    qc = config.get("quantization_config") if config is not None else None
    if qc is None:
        if hf_quant is None:
            return None
        return _modelopt(None, hf_quant, directory)
    where = f"{directory / CONFIG_NAME}: quantization_config"
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where} must be a JSON object, not {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    if method == "modelopt":
        return _modelopt(qc, hf_quant, directory)
    if method == "torchao":
        return _torchao(qc, where)
    if method == "quark":
        return _quark(qc, where)
    if method is None:
        raise CheckpointError(f"{where} has no 'quant_method'; cannot tell which tool wrote it")
    raise CheckpointError(f"{where}: quant_method {method!r} is not an MXFP8 format jax_mxfp8 "
                          f"reads (supported: compressed-tensors, modelopt, torchao, quark with "
                          f"{MXFP8})")


# ---- helpers -------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    return data


def _names(value, where: str, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{where}: {what} must be a list of module names, got {value!r}")
    return tuple(value)


def _not_mxfp8(where: str, found: str) -> CheckpointError:
    return CheckpointError(f"{where}: {found} is not MXFP8; jax_mxfp8 reads {MXFP8} checkpoints only")


def _group_size(value, where: str, scheme: str) -> int:
    if value is None:
        return GROUP_SIZE
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{where}: group_size {value!r} is not an integer")
    if value != GROUP_SIZE:
        raise _not_mxfp8(where, f"{scheme} with group_size {value}")
    return value


# ---- compressed-tensors (llm-compressor) ---------------------------------------------------------

def _ct_scheme(args: Mapping) -> str:
    """A readable name for compressed-tensors QuantizationArgs."""
    bits, kind = args.get("num_bits"), args.get("type")
    strategy, group = args.get("strategy"), args.get("group_size")
    scale = str(args.get("scale_dtype") or "float").replace("torch.", "")
    raw = (f"{bits}-bit {kind}, strategy {strategy}"
           + (f", group_size {group}" if group is not None else "")
           + (f", block {args.get('block_structure')}" if args.get("block_structure") else "")
           + f", {scale} scales")
    name = None
    if kind == "float" and bits == 4 and strategy == "tensor_group" and group == 16:
        name = "NVFP4"
    elif kind == "float" and bits == 4 and strategy == "group" and scale == "uint8":
        name = "MXFP4"
    elif kind == "float" and bits == 8 and strategy in ("tensor", "channel", "token", "block"):
        name = f"FP8 per-{strategy}"
    elif kind == "float" and bits == 8 and strategy == "group":
        name = ("FP8 per-group with non-e8m0 scales" if scale != "uint8"
                else f"FP8 in groups of {group} with e8m0 scales")
    elif kind == "int":
        name = f"INT{bits} per-{strategy}"
    return f"{name} ({raw})" if name else raw


def _ct_is_mxfp8(args: Mapping) -> bool:
    return (args.get("num_bits") == 8 and args.get("type") == "float"
            and args.get("strategy") == "group" and args.get("group_size") == GROUP_SIZE
            and str(args.get("scale_dtype")).replace("torch.", "") in ("uint8", "float8_e8m0fnu"))


def _compressed_tensors(qc: dict, where: str) -> QuantConfig:
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}: compressed-tensors config without 'config_groups'")
    activations = set()
    for name, group in groups.items():
        here = f"{where}: config_groups.{name}"
        if not isinstance(group, dict):
            raise CheckpointError(f"{here} must be an object")
        weights = group.get("weights")
        if not isinstance(weights, dict):
            raise _not_mxfp8(here, "a group without weight quantization (activation-only)")
        if not _ct_is_mxfp8(weights):
            if (weights.get("num_bits") == 8 and weights.get("type") == "float"
                    and weights.get("strategy") == "group" and weights.get("group_size") != GROUP_SIZE):
                raise _not_mxfp8(here, f"weights {_ct_scheme(weights)} (group_size "
                                       f"{weights.get('group_size')}, MXFP8 needs 32)")
            raise _not_mxfp8(here, f"weights {_ct_scheme(weights)}")
        if weights.get("dynamic"):
            raise _not_mxfp8(here, "dynamically quantized weights")
        group_fmt = group.get("format") or fmt
        if group_fmt != "mxfp8-quantized":
            raise CheckpointError(f"{here}: format {group_fmt!r}; jax_mxfp8 reads compressed-tensors "
                                  f"MXFP8 in the 'mxfp8-quantized' format (E4M3 weights + uint8 "
                                  f"e8m0 scales), not {group_fmt!r}")
        inputs = group.get("input_activations")
        if inputs is None:
            activations.add(False)
        elif isinstance(inputs, dict) and _ct_is_mxfp8(inputs):
            if inputs.get("dynamic") not in (True, "local"):
                raise CheckpointError(f"{here}: static (calibrated) MXFP8 input activations are not "
                                      f"supported; MXFP8 W8A8 quantizes activations on the fly")
            activations.add(True)
        else:
            found = _ct_scheme(inputs) if isinstance(inputs, dict) else repr(inputs)
            raise _not_mxfp8(here, f"input activations {found} with MXFP8 weights")
        if group.get("output_activations") is not None:
            raise CheckpointError(f"{here}: output activation quantization is not supported")
    if len(activations) > 1:
        raise CheckpointError(f"{where}: config groups mix W8A8 and weight-only MXFP8; jax_mxfp8 "
                              f"uses one activation mode per model")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise CheckpointError(f"{where}: sparsity_config format {sparsity.get('format')!r} "
                              f"(sparse-compressed weights) is not supported")
    if qc.get("transform_config"):
        raise CheckpointError(f"{where}: transform_config (online rotations / Hadamard transforms) "
                              f"is not supported")
    return QuantConfig("compressed-tensors", activations.pop(),
                       _names(qc.get("ignore"), where, "ignore"), GROUP_SIZE)


# ---- NVIDIA ModelOpt (and jax_mxfp8's save_pretrained) ---------------------------------------------

def _modelopt(qc: dict | None, hf_quant: dict | None, directory: Path) -> QuantConfig:
    if hf_quant is not None:
        where = str(directory / MODELOPT_NAME)
        details = hf_quant.get("quantization")
        if not isinstance(details, dict):
            raise CheckpointError(f"{where}: needs a 'quantization' object")
        producer = hf_quant.get("producer") or {}
        name = producer.get("name") if isinstance(producer, dict) else None
        ignore = details.get("exclude_modules")
        if qc is not None:
            config_algo = qc.get("quant_algo")
            if config_algo is not None and config_algo != details.get("quant_algo"):
                raise CheckpointError(f"{directory / CONFIG_NAME} says quant_algo {config_algo!r} but "
                                      f"{where} says {details.get('quant_algo')!r}")
            if ignore is None:
                ignore = qc.get("ignore")
    else:
        where = f"{directory / CONFIG_NAME}: quantization_config"
        producer = qc.get("producer")
        details, ignore = qc, qc.get("ignore")
        name = producer.get("name") if isinstance(producer, dict) else None
        if ignore is None:
            ignore = qc.get("exclude_modules")
    algo = details.get("quant_algo")
    if algo == "MIXED_PRECISION":
        layers = details.get("quantized_layers") or (qc or {}).get("quantized_layers")
        if not isinstance(layers, dict) or not layers:
            raise CheckpointError(f"{where}: quant_algo MIXED_PRECISION without 'quantized_layers'")
        others = sorted({str(v.get("quant_algo")) for v in layers.values() if isinstance(v, dict)}
                        - {"MXFP8"})
        if others or not all(isinstance(v, dict) for v in layers.values()):
            raise _not_mxfp8(where, f"ModelOpt MIXED_PRECISION with layers in {others}")
        for layer, spec in layers.items():
            _group_size(spec.get("group_size"), f"{where}: quantized_layers.{layer}", "MXFP8")
    elif algo != "MXFP8":
        if algo is None:
            if details.get("kv_cache_quant_algo") is not None:
                raise _not_mxfp8(where, "a KV-cache-only ModelOpt quantization "
                                        f"({details['kv_cache_quant_algo']}) with no weight scheme")
            raise CheckpointError(f"{where}: no 'quant_algo'")
        raise _not_mxfp8(where, f"ModelOpt quant_algo {algo!r}")
    group = _group_size(details.get("group_size"), where, "ModelOpt MXFP8")
    if qc is not None and hf_quant is not None:
        _group_size(qc.get("group_size"), f"{directory / CONFIG_NAME}: quantization_config",
                    "ModelOpt MXFP8")
    producer = "jax_mxfp8" if name == "jax_mxfp8" else "modelopt"
    return QuantConfig(producer, True, _names(ignore, where, "exclude_modules / ignore"), group)


# ---- torchao ---------------------------------------------------------------------------------------

TORCHAO_MX_CONFIGS = ("MXDynamicActivationMXWeightConfig", "MXFPInferenceConfig")
_TORCHAO_ELEMENTS = {"float8_e4m3fn": "MXFP8", "float8_e5m2": "MXFP8 with E5M2 values",
                     "float4_e2m1fn_x2": "MXFP4", "fp6_e2m3": "MXFP6 (e2m3)",
                     "fp6_e3m2": "MXFP6 (e3m2)"}


def _torch_dtype(value) -> str | None:
    """torchao serializes a dtype as {"_type": "torch.dtype", "_data": "float8_e4m3fn"}."""
    if isinstance(value, dict):
        value = value.get("_data")
    return value.replace("torch.", "") if isinstance(value, str) else None


def _torchao(qc: dict, where: str) -> QuantConfig:
    quant_type = qc.get("quant_type")
    if isinstance(quant_type, str):
        raise _not_mxfp8(where, f"torchao quant_type {quant_type!r}")
    if not isinstance(quant_type, dict):
        raise CheckpointError(f"{where}: torchao config without a 'quant_type' object")
    if "_type" in quant_type:
        spec = quant_type
    elif set(quant_type) == {"default"} and isinstance(quant_type["default"], dict):
        spec = quant_type["default"]
    else:
        raise CheckpointError(f"{where}: torchao quant_type with keys {sorted(quant_type)} (per-module "
                              f"configs) is not supported; expected one 'default' config")
    kind = spec.get("_type")
    if kind not in TORCHAO_MX_CONFIGS:
        raise _not_mxfp8(where, f"torchao {kind!r}")
    data = spec.get("_data") or {}
    weights = _torch_dtype(data.get("weight_dtype", "float8_e4m3fn"))
    acts = _torch_dtype(data.get("activation_dtype", "float8_e4m3fn"))
    for what, dtype in (("weight_dtype", weights), ("activation_dtype", acts)):
        if dtype != "float8_e4m3fn":
            raise _not_mxfp8(where, f"torchao {kind} with {what} {dtype} "
                                    f"({_TORCHAO_ELEMENTS.get(dtype, 'unknown element type')})")
    group = _group_size(data.get("block_size"), where, f"torchao {kind}")
    ignore = qc.get("modules_to_not_convert")
    if ignore is None:
        # transformers' TorchAoHfQuantizer then skips its default keys: the output embedding.
        ignore = [] if qc.get("include_input_output_embeddings") else ["lm_head"]
    return QuantConfig("torchao", True, _names(ignore, where, "modules_to_not_convert"), group)


# ---- AMD Quark -------------------------------------------------------------------------------------

def _quark_scheme(spec: Mapping) -> str:
    dtype, element = spec.get("dtype"), spec.get("mx_element_dtype")
    qscheme, group = spec.get("qscheme"), spec.get("group_size")
    scale = "e8m0" if dtype == "mx" else spec.get("scale_format") or spec.get("scale_type")
    name = None
    if dtype == "fp4" or element == "fp4":
        name = "MXFP4" if scale == "e8m0" and group == 32 else "FP4"
    elif dtype == "fp8_e5m2" or element == "fp8_e5m2":
        name = "FP8 E5M2" + (" (MX)" if scale == "e8m0" else "")
    elif dtype == "fp8_e4m3" and qscheme in ("per_tensor", "per_channel"):
        name = f"FP8 {qscheme.replace('_', '-')}"
    elif (dtype == "fp8_e4m3" or element == "fp8_e4m3") and qscheme == "per_group":
        name = f"FP8 in groups of {group}" + (" with e8m0 scales" if scale == "e8m0" else "")
    elif isinstance(dtype, str) and dtype.startswith(("int", "uint")):
        name = f"{dtype.upper()} {str(qscheme).replace('_', '-')}"
    raw = (f"dtype {dtype}" + (f" ({element})" if element else "") + f", {qscheme}"
           + (f", group_size {group}" if group is not None else "")
           + (f", {scale} scales" if scale else ""))
    return f"{name} ({raw})" if name else raw


def _quark_is_mxfp8(spec: Mapping) -> bool:
    element = spec.get("mx_element_dtype") if spec.get("dtype") == "mx" else spec.get("dtype")
    return (element == "fp8_e4m3" and spec.get("qscheme") == "per_group"
            and spec.get("group_size") == GROUP_SIZE
            and (spec.get("scale_format") == "e8m0" or spec.get("dtype") == "mx"))


def _quark_layer(layer: Any, where: str) -> bool:
    """Validates one Quark QLayerConfig; returns whether it quantizes activations."""
    if not isinstance(layer, dict):
        raise CheckpointError(f"{where} must be an object")
    weight = layer.get("weight")
    if isinstance(weight, list):  # a list of specs: two-stage / double quantization
        stages = [_quark_scheme(w) for w in weight if isinstance(w, dict)]
        raise _not_mxfp8(where, f"multi-stage weight quantization {stages}")
    if not isinstance(weight, dict):
        raise _not_mxfp8(where, "a layer config without weight quantization")
    if not _quark_is_mxfp8(weight):
        if (weight.get("dtype") == "fp8_e4m3" and weight.get("qscheme") == "per_group"
                and weight.get("group_size") != GROUP_SIZE):
            raise _not_mxfp8(where, f"weights {_quark_scheme(weight)} (group_size "
                                    f"{weight.get('group_size')}, MXFP8 needs 32)")
        raise _not_mxfp8(where, f"weights {_quark_scheme(weight)}")
    inputs = layer.get("input_tensors")
    if inputs is not None and (not isinstance(inputs, dict) or not _quark_is_mxfp8(inputs)):
        found = _quark_scheme(inputs) if isinstance(inputs, dict) else repr(inputs)
        raise _not_mxfp8(where, f"input tensors {found} with MXFP8 weights")
    if layer.get("output_tensors") is not None:
        raise CheckpointError(f"{where}: output tensor quantization is not supported")
    if layer.get("bias") is not None:
        raise CheckpointError(f"{where}: bias quantization is not supported")
    return inputs is not None


def _quark(qc: dict, where: str) -> QuantConfig:
    acts = {_quark_layer(qc.get("global_quant_config"), f"{where}: global_quant_config")}
    for key in ("layer_type_quant_config", "layer_quant_config"):
        overrides = qc.get(key) or {}
        if not isinstance(overrides, dict):
            raise CheckpointError(f"{where}: {key} must be an object")
        for name, layer in overrides.items():
            acts.add(_quark_layer(layer, f"{where}: {key}.{name}"))
    if len(acts) > 1:
        raise CheckpointError(f"{where}: layers mix W8A8 and weight-only MXFP8; jax_mxfp8 uses one "
                              f"activation mode per model")
    weight_format = (qc.get("export") or {}).get("weight_format", "real_quantized")
    if weight_format not in ("fake_quantized", "real_quantized"):
        raise CheckpointError(f"{where}: export.weight_format {weight_format!r} is unknown")
    return QuantConfig("quark", acts.pop(), _names(qc.get("exclude"), where, "exclude"), GROUP_SIZE)


def describe(config: QuantConfig | None) -> str:
    """One line for logs: 'torchao MXFP8 W8A8, ignore [lm_head]'."""
    if config is None:
        return "no quantization config"
    mode = "W8A8" if config.quantize_activations else "W8A16 (weight-only)"
    return f"{config.producer} MXFP8 {mode}, ignore {list(config.ignore)}"

