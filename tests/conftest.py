"""Test setup: 8 fake CPU devices (for the sharding tests) before JAX initialises, tests/ on
sys.path (helpers.py, oracles/), and seeded random inputs.

Seeds: one seed per test run, random unless JAX_MXFP8_TEST_SEED is set, printed in the header;
each test's `seed` fixture is derived from it and the test's node id, `rng` is
np.random.default_rng(seed). A failing test that used them reports both seeds; rerunning with
JAX_MXFP8_TEST_SEED=<the run's seed> gives every test the same inputs again (whichever tests
are selected: a test's seed depends on its node id only).
"""
import os
import secrets
import sys
import zlib

import jax
import numpy as np
import pytest

jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, os.path.dirname(__file__))  # helpers, oracles

SEED_ENV = "JAX_MXFP8_TEST_SEED"


def _run_seed() -> int:
    value = os.environ.get(SEED_ENV, "").strip()
    if not value:
        return secrets.randbits(32)
    try:
        seed = int(value, 0)
    except ValueError:
        seed = -1
    if seed < 0:
        raise pytest.UsageError(f"{SEED_ENV}={value!r} is not a non-negative integer")
    return seed


RUN_SEED = _run_seed()
os.environ[SEED_ENV] = str(RUN_SEED)  # pytest-xdist workers (started later) draw the same seeds


def seed_for(nodeid: str) -> int:
    """The seed of one test: the run's seed mixed with the crc32 of its node id."""
    return int(np.random.SeedSequence([RUN_SEED, zlib.crc32(nodeid.encode())]).generate_state(1)[0])


def pytest_report_header(config):
    return f"random inputs: {SEED_ENV}={RUN_SEED} (set it to rerun with the same inputs)"


@pytest.fixture
def seed(request) -> int:
    return seed_for(request.node.nodeid)


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "seed" in getattr(item, "fixturenames", ()):
        report.sections.append((
            "random seed",
            f"{SEED_ENV}={RUN_SEED} reproduces; this test's seed {seed_for(item.nodeid)}"))
