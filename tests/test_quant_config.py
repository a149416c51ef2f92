"""read_quant_config: the quantization configs llm-compressor, ModelOpt, torchao, Quark and our own
save_pretrained write (tests/fixtures holds the real files), and every non-MXFP8 scheme refused
with its name."""
import copy
import json
from pathlib import Path

import pytest

from jax_mxfp8.checkpoint import CheckpointError
from jax_mxfp8.quant_config import QuantConfig, describe, read_quant_config

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name, want", [
    ("llmcompressor_mxfp8", QuantConfig("compressed-tensors", True, ("lm_head",), 32)),
    ("llmcompressor_mxfp8a16", QuantConfig("compressed-tensors", False, ("lm_head",), 32)),
    ("modelopt_mxfp8", QuantConfig("modelopt", True, ("lm_head", "model.embed_tokens"), 32)),
    ("torchao_mxfp8", QuantConfig("torchao", True, ("lm_head",), 32)),
    ("quark_mxfp8", QuantConfig("quark", True, ("lm_head",), 32)),
    ("bf16", None),
])
def test_fixture_configs(name, want):
    assert read_quant_config(FIXTURES / name) == want
    assert read_quant_config(FIXTURES / name / "config.json") == want  # a file means its directory


def test_no_config_at_all(tmp_path):
    assert read_quant_config(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert read_quant_config(tmp_path) is None
    assert describe(None) == "no quantization config"


def fixture_config(name) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]


def write(tmp_path, quantization_config=None, hf_quant=None) -> Path:
    config = {"model_type": "llama"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    if hf_quant is not None:
        (tmp_path / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    return tmp_path


def test_our_own_save_pretrained_layout(tmp_path):
    """What jax_mxfp8.models.decoder.save_pretrained writes."""
    excluded = ["lm_head"]
    write(tmp_path, {"quant_method": "modelopt", "quant_algo": "MXFP8", "group_size": 32, "ignore": excluded},
          {"producer": {"name": "jax_mxfp8"}, "quantization": {
              "quant_algo": "MXFP8", "kv_cache_quant_algo": None, "group_size": 32, "exclude_modules": excluded}})
    config = read_quant_config(tmp_path)
    assert config == QuantConfig("jax_mxfp8", True, ("lm_head",), 32)
    assert describe(config) == "jax_mxfp8 MXFP8 W8A8, ignore ['lm_head']"


def test_modelopt_from_either_file(tmp_path):
    hf = json.loads((FIXTURES / "modelopt_mxfp8" / "hf_quant_config.json").read_text())
    write(tmp_path, None, hf)  # hf_quant_config.json alone (older exports)
    assert read_quant_config(tmp_path) == QuantConfig("modelopt", True, ("lm_head", "model.embed_tokens"), 32)
    (tmp_path / "hf_quant_config.json").unlink()
    write(tmp_path, fixture_config("modelopt_mxfp8"))  # config.json alone
    assert read_quant_config(tmp_path) == QuantConfig("modelopt", True, ("lm_head", "model.embed_tokens"), 32)
    mixed = {"producer": {"name": "modelopt"}, "quantization": {
        "quant_algo": "MIXED_PRECISION", "exclude_modules": ["lm_head"], "quantized_layers": {
            "model.layers.0.mlp.up_proj": {"quant_algo": "MXFP8", "group_size": 32},
            "model.layers.1.mlp.up_proj": {"quant_algo": "MXFP8", "group_size": 32}}}}
    write(tmp_path, None, mixed)
    assert read_quant_config(tmp_path) == QuantConfig("modelopt", True, ("lm_head",), 32)


def test_weight_only_variants(tmp_path):
    quark = fixture_config("quark_mxfp8")
    quark["global_quant_config"]["input_tensors"] = None
    assert read_quant_config(write(tmp_path, quark)).quantize_activations is False
    old_quark = copy.deepcopy(quark)  # Quark before 0.10: dtype "mx" + mx_element_dtype
    old_quark["global_quant_config"]["weight"].update(dtype="mx", mx_element_dtype="fp8_e4m3", scale_format=None)
    assert read_quant_config(write(tmp_path, old_quark)) == QuantConfig("quark", False, ("lm_head",), 32)
    torchao = fixture_config("torchao_mxfp8")
    torchao["modules_to_not_convert"] = ["lm_head", "model.layers.0.mlp.down_proj"]
    assert read_quant_config(write(tmp_path, torchao)).ignore == ("lm_head", "model.layers.0.mlp.down_proj")
    torchao.update(modules_to_not_convert=None, include_input_output_embeddings=True)
    assert read_quant_config(write(tmp_path, torchao)).ignore == ()


# ---- refused: every variant names the scheme it found ----------------------------------------------

def ct(weights=None, inputs="same", fmt="mxfp8-quantized", **top):
    config = fixture_config("llmcompressor_mxfp8")
    group = config["config_groups"]["group_0"]
    if weights:
        group["weights"].update(weights)
    if inputs != "same":
        group["input_activations"] = inputs
    group["format"] = config["format"] = fmt
    return {**config, **top}


NVFP4_ARGS = dict(num_bits=4, strategy="tensor_group", group_size=16, scale_dtype="torch.float8_e4m3fn")
FP8_TOKEN = dict(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True, group_size=None)


def modelopt(algo, **details):
    return {"producer": {"name": "modelopt", "version": "0.47.0"},
            "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"],
                             **details}}


def torchao(kind="MXDynamicActivationMXWeightConfig", **data):
    config = fixture_config("torchao_mxfp8")
    spec = config["quant_type"]["default"]
    spec["_type"] = kind
    for key, value in data.items():
        spec["_data"][key] = {"_type": "torch.dtype", "_data": value} if key.endswith("dtype") else value
    return config


def quark(weight=None, inputs="same"):
    config = fixture_config("quark_mxfp8")
    if weight:
        config["global_quant_config"]["weight"].update(weight)
    if inputs != "same":
        config["global_quant_config"]["input_tensors"] = inputs
    return config


@pytest.mark.parametrize("quantization_config, hf_quant, message", [
    # compressed-tensors (llm-compressor presets)
    (ct(dict(num_bits=4)), None, r"weights MXFP4 \(4-bit float, strategy group, group_size 32, uint8 scales\)"),
    (ct(NVFP4_ARGS, fmt="nvfp4-pack-quantized"), None, "weights NVFP4"),
    (ct(dict(strategy="channel", group_size=None, scale_dtype=None), FP8_TOKEN, fmt="float-quantized"), None,
     "weights FP8 per-channel"),
    (ct(dict(strategy="tensor", group_size=None, scale_dtype=None), fmt="float-quantized"), None, "FP8 per-tensor"),
    (ct(dict(strategy="block", group_size=None, scale_dtype=None, block_structure=[128, 128])), None,
     r"FP8 per-block .*block \[128, 128\]"),
    (ct(dict(group_size=16)), None, "group_size 16, MXFP8 needs 32"),
    (ct(dict(scale_dtype=None)), None, "FP8 per-group with non-e8m0 scales"),
    (ct(dict(type="int", strategy="channel", group_size=None, scale_dtype=None)), None, "INT8 per-channel"),
    (ct(dict(type="int", num_bits=4, group_size=128, scale_dtype=None), None), None, "INT4 per-group"),
    (ct(fmt="float-quantized"), None, "format 'float-quantized'"),
    (ct(inputs=FP8_TOKEN), None, "input activations FP8 per-token"),
    (ct(sparsity_config={"format": "sparse-24-bitmask"}), None, "sparse-24-bitmask"),
    (ct(transform_config={"config_groups": {"r": {"type": "hadamard"}}}), None, "transform_config"),
    # NVIDIA ModelOpt
    (None, modelopt("NVFP4", group_size=16), "ModelOpt quant_algo 'NVFP4'"),
    (None, modelopt("FP8"), "ModelOpt quant_algo 'FP8'"),
    (None, modelopt("FP8_PER_CHANNEL_PER_TOKEN"), "FP8_PER_CHANNEL_PER_TOKEN"),
    (None, modelopt("MXFP4", group_size=32), "ModelOpt quant_algo 'MXFP4'"),
    (None, modelopt("W4A8_MXFP4_FP8", group_size=32), "W4A8_MXFP4_FP8"),
    (None, modelopt("W4A16_AWQ", group_size=128), "W4A16_AWQ"),
    (None, modelopt("MXFP8", group_size=16), "ModelOpt MXFP8 with group_size 16"),
    (None, modelopt("MIXED_PRECISION", quantized_layers={"a": {"quant_algo": "MXFP8"}, "b": {"quant_algo": "NVFP4"}}),
     r"MIXED_PRECISION with layers in \['NVFP4'\]"),
    (None, {"quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8"}}, "KV-cache-only"),
    ({"quant_method": "modelopt", "quant_algo": "FP8"}, modelopt("MXFP8"), "says quant_algo 'FP8'"),
    # torchao
    (torchao("Float8DynamicActivationFloat8WeightConfig"), None, "torchao 'Float8DynamicActivationFloat8WeightConfig'"),
    (torchao("NVFP4DynamicActivationNVFP4WeightConfig"), None, "NVFP4DynamicActivationNVFP4WeightConfig"),
    (torchao("Int4WeightOnlyConfig"), None, "Int4WeightOnlyConfig"),
    (torchao(weight_dtype="float4_e2m1fn_x2", activation_dtype="float4_e2m1fn_x2"), None,
     r"weight_dtype float4_e2m1fn_x2 \(MXFP4\)"),
    (torchao(weight_dtype="float8_e5m2", activation_dtype="float8_e5m2"), None, "E5M2"),
    (torchao(block_size=16), None, "group_size 16"),
    ({"quant_method": "torchao", "quant_type": "int4_weight_only"}, None, "torchao quant_type 'int4_weight_only'"),
    ({"quant_method": "torchao", "quant_type": {"default": {}, "model.layers.0": {}}}, None, "per-module"),
    # AMD Quark
    (quark(dict(dtype="fp4")), None, r"weights MXFP4 \(dtype fp4, per_group, group_size 32, e8m0 scales\)"),
    (quark(dict(dtype="fp8_e4m3", qscheme="per_tensor", group_size=None, scale_format=None)), None,
     "weights FP8 per-tensor"),
    (quark(dict(qscheme="per_channel", group_size=None, scale_format=None)), None, "weights FP8 per-channel"),
    (quark(dict(group_size=16)), None, "group_size 16, MXFP8 needs 32"),
    (quark(dict(dtype="fp8_e5m2")), None, r"FP8 E5M2 \(MX\)"),
    (quark(dict(dtype="int8", qscheme="per_channel", group_size=None, scale_format=None)), None, "INT8 per-channel"),
    (quark(dict(dtype="mx", mx_element_dtype="fp4", scale_format=None)), None, "MXFP4"),
    (quark(inputs={"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": False}), None,
     "input tensors FP8 per-tensor"),
    # other tools and malformed configs
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, None, "quant_method 'fp8'"),
    ({"quant_method": "gptq", "bits": 4}, None, "quant_method 'gptq'"),
    ({"quant_method": "mxfp4"}, None, "quant_method 'mxfp4'"),
    ({"bits": 4}, None, "no 'quant_method'"),
    ("MXFP8", None, "must be a JSON object"),
    ({"quant_method": "compressed-tensors"}, None, "without 'config_groups'"),
])
def test_non_mxfp8_configs_are_refused(tmp_path, quantization_config, hf_quant, message):
    write(tmp_path, quantization_config, hf_quant)
    with pytest.raises(CheckpointError, match=message):
        read_quant_config(tmp_path)


def test_malformed_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_quant_config(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="JSON object"):
        read_quant_config(tmp_path)
    config = fixture_config("llmcompressor_mxfp8")
    config["ignore"] = "lm_head"
    write(tmp_path, config)
    with pytest.raises(CheckpointError, match="ignore must be a list"):
        read_quant_config(tmp_path)


def test_decoder_reads_these_configs():
    """models.decoder.load_pretrained goes through read_quant_config and checks the tensors
    against it: every fixture loads, with the config's activation mode."""
    decoder = pytest.importorskip("jax_mxfp8.models.decoder")
    if not hasattr(decoder, "read_quant_config"):
        pytest.skip("this decoder does not read quantization configs")
    for name in ("llmcompressor_mxfp8", "llmcompressor_mxfp8a16", "modelopt_mxfp8", "torchao_mxfp8",
                 "quark_mxfp8"):
        model, config, n_mxfp8 = decoder.load_pretrained(FIXTURES / name, backend="emulation")
        assert n_mxfp8 == 14, name


def test_a_missing_directory_is_an_error_not_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        read_quant_config(tmp_path / "absent")
