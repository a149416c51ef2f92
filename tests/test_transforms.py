"""jit, vmap (leading and inner axes) and shard_map give the same bits as eager calls."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jax_mxfp8 as mx

from helpers import assert_same_bits


@pytest.fixture
def x():
    return jax.random.normal(jax.random.key(0), (4, 6, 96), jnp.bfloat16) * 7


@pytest.mark.parametrize("swizzle", [False, True])
def test_jit_equals_eager(x, swizzle):
    assert_same_bits(jax.jit(partial(mx.quantize, swizzle=swizzle))(x), mx.quantize(x, swizzle=swizzle))
    v, s = mx.quantize(x)
    assert_same_bits(jax.jit(mx.dequantize)(v, s), mx.dequantize(v, s))


@pytest.mark.parametrize("axis", [0, 1])
def test_vmap_quantize_leading_and_inner(x, axis):
    got = jax.vmap(mx.quantize, in_axes=axis, out_axes=axis)(x)
    assert_same_bits(got, mx.quantize(x))


def test_vmap_over_blocked_axis_treats_slices_independently(x):
    xt = jnp.swapaxes(x, 1, 2)  # [4, 96, 6]: vmap over the last axis sees [4, 96] slices
    got = jax.vmap(mx.quantize, in_axes=2, out_axes=2)(xt)
    want = mx.quantize(x)
    assert_same_bits(got, (jnp.swapaxes(want[0], 1, 2), jnp.swapaxes(want[1], 1, 2)))


def test_vmap_swizzled_quantize(x):
    got = jax.vmap(partial(mx.quantize, swizzle=True), in_axes=1, out_axes=1)(x)
    want = [mx.quantize(x[:, i], swizzle=True) for i in range(x.shape[1])]
    assert_same_bits(got, (jnp.stack([w[0] for w in want], 1), jnp.stack([w[1] for w in want], 1)))


def test_vmap_dequantize_mixed_batching(x):
    v, s = mx.quantize(x)
    assert_same_bits(jax.vmap(mx.dequantize, in_axes=(1, 1), out_axes=1)(v, s), mx.dequantize(v, s))
    got = jax.vmap(mx.dequantize, in_axes=(0, None))(v, s[0])
    assert_same_bits(got, jnp.stack([mx.dequantize(v[i], s[0]) for i in range(4)]))


def test_vmap_swizzle_and_unswizzle(x):
    _, s = mx.quantize(x)
    sw = jax.vmap(mx.swizzle_scales, in_axes=1, out_axes=1)(s)
    assert_same_bits(sw, jnp.stack([mx.swizzle_scales(s[:, i]) for i in range(6)], 1))
    back = jax.vmap(partial(mx.unswizzle_scales, rows=4, cols=3), in_axes=1, out_axes=1)(sw)
    assert_same_bits(back, s)


def test_shard_map_over_8_devices_equals_eager():
    devices = jax.devices("cpu")
    assert len(devices) == 8, "tests/conftest.py asks for 8 CPU devices"
    mesh = Mesh(np.array(devices), ("d",))
    x = jax.random.normal(jax.random.key(1), (16, 3, 128), jnp.float32)
    f = jax.jit(jax.shard_map(lambda a: mx.quantize(a, swizzle=True), mesh=mesh,
                              in_specs=P("d"), out_specs=(P("d"), P("d"))))
    assert_same_bits(f(x), mx.quantize(x, swizzle=True))
    v, s = mx.quantize(x)
    g = jax.jit(jax.shard_map(mx.dequantize, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d")))
    assert_same_bits(g(v, s), mx.dequantize(v, s))
