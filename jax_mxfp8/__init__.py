"""jax_mxfp8: MXFP8 (float8_e4m3fn values + one e8m0 scale per 32 elements) for JAX.

Exact quantize/dequantize/swizzle on every platform, CUDA kernels behind XLA FFI
on NVIDIA GPUs, and an MXFP8 `linear` with per-device backends.
"""
from jax_mxfp8.backends import Backend, select_backend
from jax_mxfp8.checkpoint import load_safetensors, save_safetensors
from jax_mxfp8.ops import dequantize, quantize, swizzle_scales, unswizzle_scales
from jax_mxfp8.ops.fake_quantize import fake_quantize
from jax_mxfp8.ops.linear import linear
from jax_mxfp8.quant_config import QuantConfig, read_quant_config
from jax_mxfp8.reference import BLOCK_SIZE
from jax_mxfp8.weight import MxWeight, prepare_weight, quantize_weight

__version__ = "0.1.0"

__all__ = [
    "BLOCK_SIZE", "Backend", "MxWeight", "dequantize", "fake_quantize", "linear",
    "QuantConfig", "load_safetensors", "prepare_weight", "quantize", "quantize_weight",
    "read_quant_config", "save_safetensors",
    "select_backend", "swizzle_scales", "unswizzle_scales",
]

from jax_mxfp8.ops.ragged_linear import ragged_linear  # noqa: E402

__all__ += ["ragged_linear"]

from jax_mxfp8.fusion import FusedWeight, fuse_biases, fuse_weights, linear_split  # noqa: E402

__all__ += ["FusedWeight", "fuse_biases", "fuse_weights", "linear_split"]
