"""Test setup: 8 fake CPU devices (for sharding tests) before JAX initialises."""
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, os.path.dirname(__file__))  # mx_reference


def has_gpu() -> bool:
    return any(d.platform == "gpu" for d in jax.devices())
