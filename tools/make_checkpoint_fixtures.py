"""Builds tests/fixtures/: one tiny random Llama, saved in bf16 and quantized to MXFP8 by each
producer's own code, so the loader is tested against files those tools really write.

Needs its own environment (torch, transformers and the producers; not jax_mxfp8's):

    python3.11 -m venv /tmp/prod_venv
    /tmp/prod_venv/bin/pip install torch==2.13.0+cpu transformers==5.17.0 accelerate==1.16.0 \
        llmcompressor==0.14.0.1 compressed-tensors==0.19.0 nvidia-modelopt==0.47.0 \
        torchao==0.18.0 amd-quark==0.13 safetensors==0.8.0
    /tmp/prod_venv/bin/python tools/make_checkpoint_fixtures.py            # every fixture
    /tmp/prod_venv/bin/python tools/make_checkpoint_fixtures.py modelopt   # one (bf16 first)

(torch 2.13.0+cpu is the CPU-only wheel, from https://download.pytorch.org/whl/cpu or a local
wheel directory; a plain `pip install torch` works too but pulls the CUDA libraries.) Each producer runs in its own subprocess, since some patch torch or
transformers on import. Fixtures (each a Hugging Face style directory):

    bf16/                     the base model (plain checkpoint, no quantization config)
    llmcompressor_mxfp8/      llm-compressor oneshot, preset scheme "MXFP8" (W8A8), save_compressed
    llmcompressor_mxfp8a16/   llm-compressor oneshot, preset scheme "MXFP8A16" (weight-only)
    modelopt_mxfp8/           ModelOpt mtq.quantize(MXFP8_DEFAULT_CFG) + export_hf_checkpoint
    torchao_mxfp8/            transformers TorchAoConfig(MXDynamicActivationMXWeightConfig()) +
                              save_pretrained (safetensors with torchao's per-tensor metadata)
    quark_mxfp8/              AMD Quark OCP_MXFP8E4M3Spec weights + dynamic inputs,
                              export_safetensors(weight_format="fake_quantized")

Each holds config.json, the safetensors, the producer's own quantization files, README.txt and
expected.npz: the producer's OWN dequantized weights (float32, "<module>.weight", taken from its
model objects) of EXPECTED_LINEARS, the token ids ("tokens") and the producer's logits for them
("logits", float32, computed by the producer's quantized torch model; a W8A8 scheme quantizes
activations there too). Tokenizer and generation files are dropped.

ModelOpt's MXFP8 fake quantization (its forward, and so its logits) needs its CUDA extension
(modelopt_cuda_ext_mx, JIT-built with nvcc). Without a GPU the modelopt fixture's weights come
from ModelOpt's own MXFP8QTensor quantize/dequantize (the code its export and mtq.compress use)
and expected.npz has no logits; on a CUDA machine (`modelopt --device cuda --out DIR` with
DIR/bf16 copied from tests/fixtures) they come from the quantized model's weight_quantizer and
forward. The committed modelopt fixture was made on an H200 (torch 2.11.0+cu130; the wheels of
nvidia-modelopt and of omegaconf, pulp, pydantic, pydantic-core, annotated-types and
typing-inspection carried there); the CPU run writes a byte-identical model.safetensors and
equal weights. The README.txt says which was used.

Quark's export copies the source directory's extra files (README.txt, expected.npz of bf16/)
into its output; they are replaced by this tool's own. Re-running reproduces every fixture
byte for byte, except torchao's safetensors metadata, whose JSON keys transformers writes in
set order (same content).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures"

SEED = 0
# hidden 96 / intermediate 192: weights [96, 96], [48, 96], [192, 96], [96, 192] give K/32 of 3
# and 6 (column padding in the 128x4 swizzled layout) and 48..192 rows (row padding, and two
# row tiles for gate/up): the torchao fixture exercises every case of unswizzling.
MODEL_CONFIG = dict(
    vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2)
TOKENS = [[1, 17, 42, 99, 128, 200, 255, 3, 64, 77, 150, 11]]
EXPECTED_LINEARS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                    "model.layers.1.mlp.gate_proj")
KEEP = ("config.json", "hf_quant_config.json", "recipe.yaml", "model.safetensors",
        "model.safetensors.index.json")
PRODUCERS = ("bf16", "llmcompressor_mxfp8", "llmcompressor_mxfp8a16", "modelopt", "torchao", "quark")
DIRS = {"modelopt": "modelopt_mxfp8", "torchao": "torchao_mxfp8", "quark": "quark_mxfp8"}


# ---- helpers (run inside the producer environment) ----------------------------------------------

def _versions(*names) -> dict[str, str]:
    from importlib.metadata import version
    return {n: version(n) for n in ("torch", "transformers", *names)}


def _tokens():
    import torch
    return torch.tensor(TOKENS, dtype=torch.long)


def _logits(model):
    import torch
    with torch.no_grad():
        return model(_tokens()).logits.float().cpu().numpy()


def _load_base(out: Path, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(out / "bf16", dtype=torch.bfloat16, **kwargs)


def _finish(out: Path, name: str, saved: Path, weights: dict, logits, readme: str, versions: dict):
    """Copies the producer's files into out/name and writes expected.npz and README.txt."""
    import numpy as np
    target = out / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    written = sorted(p.name for p in saved.iterdir())
    for file in written:
        if file in KEEP or (file.endswith(".safetensors") and file.startswith("model-")):
            shutil.copyfile(saved / file, target / file)
    arrays = {f"{module}.weight": np.asarray(w, np.float32) for module, w in weights.items()}
    arrays["tokens"] = np.asarray(TOKENS, np.int32)
    if logits is not None:
        arrays["logits"] = np.asarray(logits, np.float32)
    np.savez_compressed(target / "expected.npz", **arrays)
    kept = sorted(p.name for p in target.iterdir())
    dropped = sorted(set(written) - set(kept))
    (target / "README.txt").write_text(
        f"{readme.strip()}\n\nWritten by tools/make_checkpoint_fixtures.py with "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f".\nBase model: tests/fixtures/bf16 (seed {SEED}). Files the producer wrote and this "
        f"fixture drops: {dropped or 'none'}.\nexpected.npz: {sorted(arrays)} (float32 weights are "
        f"the producer's own dequantization; logits are its quantized model's forward of 'tokens')."
        + ("" if logits is not None else " No logits: see above.") + "\n")
    print(f"wrote {target}: {kept}")


# ---- producers ------------------------------------------------------------------------------------

def make_bf16(out: Path, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG)).to(torch.bfloat16).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        weights = {m: model.get_submodule(m).weight.float() for m in EXPECTED_LINEARS}
        _finish(out, "bf16", Path(tmp), {m: w.detach().numpy() for m, w in weights.items()},
                _logits(model), "Plain bf16 checkpoint of the random base model (no quantization "
                "config): transformers LlamaForCausalLM(LlamaConfig(...)).save_pretrained.",
                _versions())


def make_llmcompressor(out: Path, device: str, scheme: str):
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    model = _load_base(out).eval()
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    weights = {}
    for name in EXPECTED_LINEARS:
        module = model.get_submodule(name)
        # What the quantized module's forward multiplies by (fake quantization of its weight with
        # its weight_scale / weight_zero_point).
        weights[name] = forward_quantize(module, module.weight.data, "weight",
                                         module.quantization_scheme.weights).float().numpy()
    logits = _logits(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        _finish(out, f"llmcompressor_{scheme.lower()}", Path(tmp), weights, logits,
                f"llm-compressor oneshot(model, QuantizationModifier(targets='Linear', "
                f"scheme='{scheme}', ignore=['lm_head'])) (data-free), then "
                f"model.save_pretrained(dir, save_compressed=True): compressed-tensors format "
                f"'mxfp8-quantized'. Weights: compressed_tensors forward_quantize of each "
                f"module's weight (its forward's fake quantization).",
                _versions("llmcompressor", "compressed-tensors"))


def make_modelopt(out: Path, device: str):
    import torch
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.quantization.qtensor import MXFP8QTensor
    model = _load_base(out).to(device).eval()
    cuda = device.startswith("cuda")

    def forward_loop(m):  # MXFP8 is dynamic (no calibration); quantize() still wants a loop
        if cuda:
            with torch.no_grad():
                m(_tokens().to(device))

    model = mtq.quantize(model, mtq.MXFP8_DEFAULT_CFG, forward_loop)
    weights = {}
    for name in EXPECTED_LINEARS:
        module = model.get_submodule(name)
        with torch.no_grad():
            if cuda:  # the quantized forward's own fake quantization (CUDA extension)
                weights[name] = module.weight_quantizer(module.weight).float().cpu().numpy()
            else:  # ModelOpt's real quantization (export / mtq.compress) and its dequantize
                qtensor, scale = MXFP8QTensor.quantize(module.weight)
                weights[name] = qtensor.dequantize(dtype=torch.float32, scale=scale).numpy()
    logits = None
    if cuda:
        with torch.no_grad():
            logits = model(_tokens().to(device)).logits.float().cpu().numpy()
    how = ("the quantized model's weight_quantizer(weight) and forward on CUDA" if cuda else
           "MXFP8QTensor.quantize(weight) -> .dequantize(float32, scale) on CPU (ModelOpt's MX fake "
           "quantization, and so its forward and logits, needs its CUDA extension modelopt_cuda_ext_mx; "
           "run `modelopt --device cuda` on a GPU machine for logits)")
    with tempfile.TemporaryDirectory() as tmp:
        export_hf_checkpoint(model, export_dir=tmp)
        _finish(out, DIRS["modelopt"], Path(tmp), weights, logits,
                f"NVIDIA ModelOpt mtq.quantize(model, MXFP8_DEFAULT_CFG, forward_loop) then "
                f"export_hf_checkpoint(model, export_dir=dir), device {device}. Weights: {how}.",
                _versions("nvidia-modelopt"))


def make_torchao(out: Path, device: str):
    import torch
    from transformers import TorchAoConfig
    from torchao.prototype.mx_formats.inference_workflow import MXDynamicActivationMXWeightConfig
    from torchao.quantization.quantize_.common import KernelPreference
    model = _load_base(out, quantization_config=TorchAoConfig(
        quant_type=MXDynamicActivationMXWeightConfig())).eval()
    # The default kernel_preference AUTO runs torch._scaled_mm (SM100+ GPUs only); an EMULATED
    # twin computes the logits here. Its quantized tensors are the same, checked below.
    emulated = _load_base(out, quantization_config=TorchAoConfig(
        quant_type=MXDynamicActivationMXWeightConfig(kernel_preference=KernelPreference.EMULATED))).eval()
    weights = {}
    for name, param in model.named_parameters():
        twin = emulated.get_parameter(name)
        if hasattr(param, "qdata"):
            assert torch.equal(param.qdata.view(torch.uint8), twin.qdata.view(torch.uint8)), name
            assert torch.equal(param.scale.view(torch.uint8), twin.scale.view(torch.uint8)), name
    for name in EXPECTED_LINEARS:
        weights[name] = model.get_submodule(name).weight.dequantize(torch.float32).numpy()
    logits = _logits(emulated)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _finish(out, DIRS["torchao"], Path(tmp), weights, logits,
                "torchao: AutoModelForCausalLM.from_pretrained(bf16, quantization_config="
                "TorchAoConfig(quant_type=MXDynamicActivationMXWeightConfig())) then "
                "save_pretrained(dir, safe_serialization=True). Weights: MXTensor.dequantize("
                "float32) of each module's weight. Logits: the same quantization with "
                "kernel_preference=EMULATED (AUTO needs an SM100 GPU's torch._scaled_mm; the "
                "quantized tensors are identical, checked).", _versions("torchao"))


def make_quark(out: Path, device: str):
    import torch
    from quark.torch import ModelQuantizer, export_safetensors
    from quark.torch.quantization.config.config import OCP_MXFP8E4M3Spec, QConfig, QLayerConfig
    model = _load_base(out).eval()
    weight = OCP_MXFP8E4M3Spec(ch_axis=-1, is_dynamic=False).to_quantization_spec()
    inputs = OCP_MXFP8E4M3Spec(ch_axis=-1, is_dynamic=True).to_quantization_spec()
    config = QConfig(global_quant_config=QLayerConfig(weight=weight, input_tensors=inputs),
                     exclude=["lm_head"])
    quantizer = ModelQuantizer(config)
    model = quantizer.quantize_model(model, [_tokens()])
    model = quantizer.freeze(model)
    weights = {}
    for name in EXPECTED_LINEARS:
        module = model.get_submodule(name)
        with torch.no_grad():  # what the QuantLinear's forward multiplies by
            weights[name] = module.get_quant_weight(module.weight).float().numpy()
    logits = _logits(model)
    with tempfile.TemporaryDirectory() as tmp:
        export_safetensors(model, tmp, custom_mode="quark", weight_format="fake_quantized")
        _finish(out, DIRS["quark"], Path(tmp), weights, logits,
                "AMD Quark: QConfig(global_quant_config=QLayerConfig(weight=OCP_MXFP8E4M3Spec("
                "ch_axis=-1, is_dynamic=False), input_tensors=OCP_MXFP8E4M3Spec(ch_axis=-1, "
                "is_dynamic=True)), exclude=['lm_head']); ModelQuantizer.quantize_model + freeze; "
                "export_safetensors(model, dir, weight_format='fake_quantized'). (Quark has no "
                "MXFP8 LLMTemplate scheme; weight_format='real_quantized' fails inside Quark 0.13: "
                "'ValueError: Unsupported QuantSchema: per_group for quant_dtype: fp8_e4m3' in "
                "real_quantize_fp8_e4m3.) Weights: QuantLinear.get_quant_weight(weight).",
                _versions("amd-quark"))


def run_one(producer: str, out: Path, device: str):
    if producer == "bf16":
        make_bf16(out, device)
    elif producer == "llmcompressor_mxfp8":
        make_llmcompressor(out, device, "MXFP8")
    elif producer == "llmcompressor_mxfp8a16":
        make_llmcompressor(out, device, "MXFP8A16")
    elif producer == "modelopt":
        make_modelopt(out, device)
    elif producer == "torchao":
        make_torchao(out, device)
    elif producer == "quark":
        make_quark(out, device)
    else:
        raise SystemExit(f"unknown producer {producer!r} (choose from {', '.join(PRODUCERS)})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("producers", nargs="*", default=list(PRODUCERS), help=", ".join(PRODUCERS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--device", default="cpu", help="torch device (cuda for ModelOpt's logits)")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process:
        (producer,) = args.producers
        run_one(producer, args.out, args.device)
        return
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
    failed = []
    for producer in args.producers:
        if producer != "bf16" and not (args.out / "bf16" / "config.json").is_file():
            raise SystemExit(f"{args.out / 'bf16'} is missing: make the bf16 fixture first")
        print(f"== {producer}", flush=True)
        rc = subprocess.call([sys.executable, __file__, producer, "--out", str(args.out),
                              "--device", args.device, "--in-process"], env=env)
        if rc:
            failed.append(producer)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
