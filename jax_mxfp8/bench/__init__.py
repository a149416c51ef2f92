"""Benchmarks: `python -m jax_mxfp8 bench` (the op harness, harness.py + ops.py; with --model
a whole decoder, model.py; with --zoo every linear of real models, zoo.py) and
`python -m jax_mxfp8.bench.marlin` (the Marlin kernels' sweeps, tables and checks)."""
from jax_mxfp8.bench import ops  # noqa: F401  (registers the op cases)
from jax_mxfp8.bench.harness import Case, Config, main, register_op, registered_ops, run  # noqa: F401
