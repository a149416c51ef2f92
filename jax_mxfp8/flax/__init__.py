"""Flax wrappers (flax is a dependency of jax_mxfp8).

NNX: `Mxfp8Linear` (drop-in for nnx.Linear with a frozen MXFP8 weight; differentiable in its
input and bias), `quantize_model(model)`, `add_lora(model, rank)` (trainable adapters beside the
MXFP8 layers), and torch-style `state_dict` / `load_state_dict` for MXFP8 safetensors checkpoints;
`MoE` (a mixture-of-experts layer on stacked expert weights, grouped GEMMs) and `quantize_moe`.
Linen: `Mxfp8Dense` (drop-in for nn.Dense), `quantize_params(params)`, `intercept_dense()`.
MXFP8 weights are always called `weight` and laid out [out, in] (the checkpoint layout);
`kernel` always means Flax's float (in, out) layout.
"""
from jax_mxfp8.flax.linen import Mxfp8Dense, intercept_dense, quantize_params
from jax_mxfp8.flax.moe import MoE, Mxfp8RaggedLinear, RaggedLinear, quantize_moe
from jax_mxfp8.flax.nnx import Mxfp8Linear, add_lora, load_state_dict, quantize_model, state_dict

__all__ = ["MoE", "Mxfp8Dense", "Mxfp8Linear", "Mxfp8RaggedLinear", "RaggedLinear", "add_lora",
           "intercept_dense", "load_state_dict", "quantize_moe", "quantize_model",
           "quantize_params", "state_dict"]
