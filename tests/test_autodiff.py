"""Gradients: linear with respect to x and bias on every backend against a float64 reference,
the frozen weight and the non-differentiable ops as clear errors, fake_quantize's
straight-through gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp8 as mx
from jax_mxfp8.backends import Backend, cutlass, marlin
from jax_mxfp8.ops.linear import WEIGHT_GRADIENT_ERROR, linear
from jax_mxfp8.weight import MxWeight
from helpers import rel_fro


def weight_for(backend, values, scales):
    """An MxWeight of `backend` made on this host (the layout transform; no device check)."""
    n, k = values.shape
    if backend is Backend.EMULATION:
        return mx.prepare_weight(values, scales, backend="emulation")
    if backend is Backend.MARLIN:
        arrays, meta = marlin.pack_weight(values, scales)
    else:
        arrays, meta = cutlass._prepare(values, scales)
    return MxWeight(arrays, (n, k), backend, meta)


def problem(rng, n=96, k=128, m=5, dtype=jnp.float32):
    w = rng.standard_normal((n, k)) * np.exp2(rng.integers(-3, 4, (n, 1)))
    values, scales = mx.quantize(jnp.asarray(w, jnp.float32))
    w64 = np.asarray(mx.dequantize(values, scales, dtype=jnp.float32), np.float64)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    bias = jnp.asarray(rng.standard_normal(n), dtype)
    ct = rng.standard_normal((m, n))
    return values, scales, w64, x, bias, ct


@pytest.mark.parametrize("backend,dtype", [
    (Backend.EMULATION, jnp.float32), (Backend.EMULATION, jnp.bfloat16),
    (Backend.MARLIN, jnp.bfloat16), (Backend.MARLIN, jnp.float16), (Backend.MARLIN, jnp.float32),
], ids=lambda v: getattr(v, "value", None) or jnp.dtype(v).name)
def test_grad_x_and_bias_match_float64(rng, backend, dtype, monkeypatch):
    """On CPU the MARLIN kernels lower to their jnp references (by choice: the switch below);
    the backward is the same code on the GPU."""
    monkeypatch.setenv("JAX_MXFP8_KERNEL_REFERENCES", "1")
    values, scales, w64, x, bias, ct = problem(rng, dtype=dtype)
    weight = weight_for(backend, values, scales)
    loss = lambda x, b: jnp.sum(linear(x, weight, b, out_dtype=jnp.float32) * ct)  # noqa: E731
    gx, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, bias)
    assert gx.dtype == x.dtype and gb.dtype == bias.dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16/fp16: dx is rounded once to x's dtype
    assert rel_fro(gx, ct @ w64) <= tol
    assert rel_fro(gb, ct.sum(0)) <= tol


def test_jvp_is_the_linear_map(rng):
    values, scales, w64, x, bias, _ = problem(rng)
    weight = weight_for(Backend.EMULATION, values, scales)
    dx = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    db = jnp.asarray(rng.standard_normal(bias.shape), jnp.float32)
    y, dy = jax.jvp(lambda x, b: mx.linear(x, weight, b), (x, bias), (dx, db))
    assert rel_fro(y, np.asarray(x, np.float64) @ w64.T + np.asarray(bias)) <= 1e-5
    assert rel_fro(dy, np.asarray(dx, np.float64) @ w64.T + np.asarray(db)) <= 1e-5


def test_grad_under_vmap_and_leading_axes(rng):
    values, scales, w64, _, _, _ = problem(rng)
    weight = weight_for(Backend.EMULATION, values, scales)
    x = jnp.asarray(rng.standard_normal((3, 2, 4, 128)), jnp.float32)
    g = jax.vmap(jax.grad(lambda x: jnp.sum(mx.linear(x, weight) ** 2)))(x)
    y = np.asarray(x, np.float64) @ w64.T
    assert rel_fro(g, 2 * y @ w64) <= 1e-5


def test_w8a8_backward_is_straight_through(rng):
    values, scales, w64, x, _, ct = problem(rng)
    weight = weight_for(Backend.EMULATION, values, scales)
    gx = jax.grad(lambda x: jnp.sum(mx.linear(x, weight, quantize_activations=True) * ct))(x)
    assert rel_fro(gx, ct @ w64) <= 1e-5


def test_weight_gradient_is_a_clear_error(rng):
    values, scales, _, x, _, _ = problem(rng)
    loss = lambda v: jnp.sum(mx.linear(x, MxWeight(  # noqa: E731
        {"values": v, "scales": scales}, v.shape, Backend.EMULATION)))
    with pytest.raises(TypeError, match="frozen.*LoRA"):
        jax.grad(loss)(values)
    assert "fake_quantize" in WEIGHT_GRADIENT_ERROR


def test_quantize_and_dequantize_gradients_are_clear_errors(rng):
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    with pytest.raises(TypeError, match="quantize has no useful derivative.*fake_quantize"):
        jax.grad(lambda x: jnp.sum(mx.quantize(x)[0].astype(jnp.float32)))(x)
    values, scales = mx.quantize(x)
    with pytest.raises(TypeError, match="dequantize is not differentiable"):
        jax.grad(lambda v: jnp.sum(mx.dequantize(v, scales)))(values.astype(jnp.float32)
                                                                .astype(jnp.float8_e4m3fn))


@pytest.mark.parametrize("rounding", ["ceil", "floor", "naive"])
def test_fake_quantize_forward_is_exact_and_gradient_straight_through(rng, rounding):
    x = jnp.asarray(rng.standard_normal((3, 4, 96)) * 10, jnp.bfloat16)
    want = mx.dequantize(*mx.quantize(x, rounding=rounding), dtype=jnp.bfloat16)
    got = jax.jit(lambda x: mx.fake_quantize(x, rounding=rounding))(x)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
    ct = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
    _, vjp = jax.vjp(lambda x: mx.fake_quantize(x, rounding=rounding), x)
    np.testing.assert_array_equal(np.asarray(vjp(ct)[0]), np.asarray(ct))


def test_fake_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown rounding"):
        mx.fake_quantize(jnp.ones((2, 32)), rounding="up")
    with pytest.raises(ValueError, match="multiple of the MXFP8 block size 32"):
        mx.fake_quantize(jnp.ones((2, 33)))


@pytest.mark.parametrize("n_axis,k_axis,x_spec", [("model", None, ("data", None)),
                                                  (None, "model", (None, "model"))],
                         ids=["column-parallel", "row-parallel"])
def test_grad_of_a_sharded_linear_gathers_no_weight(rng, n_axis, k_axis, x_spec):
    import re
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from jax_mxfp8 import placement
    cpus = jax.devices("cpu")
    if len(cpus) < 8:
        pytest.skip("needs the 8 fake CPU devices of conftest.py")
    mesh = Mesh(np.array(cpus[:8]).reshape(2, 4), ("data", "model"))
    values, scales, w64, _, _, _ = problem(rng, n=256, k=512)
    x = jnp.asarray(rng.standard_normal((8, 512)), jnp.float32)
    weight = placement.prepare_weight_sharded(values, scales, mesh, n_axis=n_axis, k_axis=k_axis,
                                              backend="emulation")
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec(*x_spec)))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(mx.linear(x, w) ** 2)))
    y = np.asarray(x, np.float64) @ w64.T
    assert rel_fro(grad(xs, weight), 2 * y @ w64) <= 1e-5
    text = grad.lower(xs, weight).compile().as_text()
    assert not re.findall(r"all-gather(-start)?\(", text)
