"""Benchmarks: `python -m jax_mxfp8 bench` (the op harness, harness.py + ops.py) and
`python -m jax_mxfp8.bench.marlin` (the Marlin kernels' sweeps, tables and checks)."""
from jax_mxfp8.bench import ops  # noqa: F401  (registers the op cases)
from jax_mxfp8.bench.harness import Case, Config, main, register_op, registered_ops, run  # noqa: F401
