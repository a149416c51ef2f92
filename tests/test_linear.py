"""linear (EMULATION, W8A16 and W8A8) against float64 references; backends and MxWeight."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp8 as mx

from helpers import rel_fro
from oracles import mxfp8 as R


@pytest.mark.parametrize("quantize_activations", [False, True])
@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("lead,n,k", [((1,), 64, 32), ((3, 5), 96, 256), ((17,), 160, 512)])
def test_linear_emulation_vs_float64(quantize_activations, x_dtype, lead, n, k, rng):
    x = jnp.asarray(rng.standard_normal((*lead, k)), x_dtype)
    w = rng.standard_normal((n, k)) * np.exp2(rng.integers(-4, 4, (n, 1)))
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    values, scales = mx.quantize(jnp.asarray(w, jnp.float32))
    weight = mx.prepare_weight(values, scales, backend="emulation")
    y = jax.jit(lambda x, w, b: mx.linear(x, w, b, quantize_activations=quantize_activations))(x, weight, bias)
    assert y.shape == (*lead, n) and y.dtype == x_dtype
    want = R.linear(np.asarray(x), np.asarray(values).view(np.uint8), np.asarray(scales),
                    np.asarray(bias), quantize_activations=quantize_activations)
    assert rel_fro(y, want) <= 1e-2
    assert not np.any(np.isnan(np.asarray(y, np.float32)))


def test_linear_out_dtype_and_no_bias():
    x = jnp.ones((2, 64), jnp.bfloat16)
    weight = mx.quantize_weight(jnp.ones((32, 64)), backend="emulation")
    y = mx.linear(x, weight, out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), 64.0)


def test_nan_only_from_nan_blocks():
    w = np.ones((8, 64), np.float32)
    w[2, 40] = np.nan
    weight = mx.quantize_weight(jnp.asarray(w), backend="emulation")
    y = np.asarray(mx.linear(jnp.ones((3, 64), jnp.float32), weight))
    assert np.all(np.isnan(y[:, 2])) and not np.any(np.isnan(np.delete(y, 2, axis=1)))


def test_mxweight_is_a_pytree_through_jit_and_vmap():
    weights = jnp.stack([jax.random.normal(jax.random.key(i), (32, 64)) for i in range(3)])
    stacked = jax.vmap(lambda w: mx.quantize_weight(w, backend="emulation"))(weights)
    assert isinstance(stacked, mx.MxWeight) and stacked.shape == (32, 64)
    assert stacked.arrays["values"].shape == (3, 32, 64)
    x = jnp.ones((5, 64), jnp.float32)
    ys = jax.jit(jax.vmap(lambda w: mx.linear(x, w)))(stacked)
    for i in range(3):
        single = mx.quantize_weight(weights[i], backend="emulation")
        np.testing.assert_array_equal(np.asarray(ys[i]), np.asarray(mx.linear(x, single)))
    leaves, treedef = jax.tree.flatten(stacked)
    assert len(leaves) == 2 and jax.tree.unflatten(treedef, leaves).backend is mx.Backend.EMULATION
    values, scales = stacked.unpack()
    assert values.dtype == jnp.float8_e4m3fn and scales.dtype == jnp.uint8


def test_select_backend_on_cpu_and_env_override(monkeypatch):
    cpu = jax.devices("cpu")[0]
    monkeypatch.delenv("JAX_MXFP8_BACKEND", raising=False)
    assert mx.select_backend(cpu) is mx.Backend.EMULATION
    monkeypatch.setenv("JAX_MXFP8_BACKEND", "emulation")
    assert mx.select_backend(cpu) is mx.Backend.EMULATION
    for forced in ("marlin", "cutlass"):
        monkeypatch.setenv("JAX_MXFP8_BACKEND", forced)
        with pytest.raises(ValueError, match="cannot run here"):
            mx.select_backend(cpu)
    monkeypatch.setenv("JAX_MXFP8_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        mx.select_backend(cpu)


@pytest.mark.parametrize("backend", ["marlin", "cutlass"])
def test_prepare_anywhere_run_where_the_backend_runs(rng, backend, monkeypatch):
    """An explicit backend prepares on any host (offline conversion); compiling linear for a
    platform that cannot run that backend is a clear error naming the exact conversion."""
    monkeypatch.delenv("JAX_MXFP8_KERNEL_REFERENCES", raising=False)
    w = jnp.asarray(rng.standard_normal((128, 128)), jnp.float32)
    values, scales = mx.quantize(w)
    weight = mx.prepare_weight(values, scales, backend=backend)
    assert weight.backend.value == backend
    for got, want in zip(weight.unpack(), (values, scales)):
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
    x = jnp.ones((2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=f"prepared for {backend}.*compiled for cpu.*to_backend"):
        jax.jit(mx.linear).trace(x, weight).lower(lowering_platforms=("cpu",))
    converted = weight.to_backend("emulation")
    np.testing.assert_array_equal(np.asarray(jax.jit(mx.linear)(x, converted)),
                                  np.asarray(mx.linear(x, mx.prepare_weight(values, scales,
                                                                            backend="emulation"))))


BAD = [
    ("weight not MxWeight", lambda w: mx.linear(jnp.ones((2, 64)), jnp.ones((32, 64))), TypeError, "MxWeight"),
    ("x dtype", lambda w: mx.linear(jnp.ones((2, 64), jnp.int32), w), TypeError, "linear input x"),
    ("K mismatch", lambda w: mx.linear(jnp.ones((2, 96)), w), ValueError, "in_features K=64"),
    ("bias shape", lambda w: mx.linear(jnp.ones((2, 64)), w, jnp.ones(31)), ValueError, "expected (32,)"),
    ("values 1-D", lambda w: mx.prepare_weight(jnp.ones(64, jnp.float8_e4m3fn), jnp.ones(2, jnp.uint8)),
     ValueError, "2-D [N, K]"),
    ("scale mismatch", lambda w: mx.prepare_weight(jnp.ones((32, 64), jnp.float8_e4m3fn), jnp.ones((32, 3), jnp.uint8)),
     ValueError, "expected (32, 2)"),
    ("unknown backend", lambda w: mx.prepare_weight(*w.unpack(), backend="nope"), ValueError, "unknown backend"),
]


@pytest.mark.parametrize("name,call,exc,message", BAD, ids=[b[0] for b in BAD])
def test_linear_bad_input(name, call, exc, message):
    weight = mx.quantize_weight(jnp.ones((32, 64)), backend="emulation")
    with pytest.raises(exc) as info:
        call(weight)
    assert message in str(info.value), str(info.value)
