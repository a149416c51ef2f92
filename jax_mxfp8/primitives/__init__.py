"""One primitive per op; see base.py for the pattern."""
from jax_mxfp8.primitives.dequantize import dequantize, dequantize_p  # noqa: F401
from jax_mxfp8.primitives.quantize import quantize, quantize_p  # noqa: F401
from jax_mxfp8.primitives.swizzle import (  # noqa: F401
    swizzle_p, swizzle_scales, unswizzle_p, unswizzle_scales)
