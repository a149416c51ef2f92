"""jax_mxfp8: MXFP8 quantization and GEMMs for JAX (work in progress)."""
from jax_mxfp8.reference import BLOCK_SIZE  # noqa: F401
