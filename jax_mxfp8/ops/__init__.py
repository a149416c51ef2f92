"""One module per op (see base.py for the pattern)."""
from jax_mxfp8.ops.dequantize import Dequantize, dequantize  # noqa: F401
from jax_mxfp8.ops.quantize import Quantize, quantize  # noqa: F401
from jax_mxfp8.ops.swizzle import Swizzle, Unswizzle, swizzle_scales, unswizzle_scales  # noqa: F401
