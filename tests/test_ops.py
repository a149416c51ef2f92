"""The public ops (jax_mxfp8.ops: quantize, dequantize, swizzle) against the numpy contract
reference, and bad-input errors."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_mxfp8 as mx

from oracles import mxfp8 as R


@pytest.mark.parametrize("rule", ["ceil", "floor", "naive"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_quantize_matches_contract(rule, dtype, rng):
    x = (rng.standard_normal((2, 131, 160)) * 10).astype(np.float32)
    x = np.asarray(jnp.asarray(x, dtype))
    codes, scales = R.quantize(x, rule)
    values, got = mx.quantize(x, rounding=rule)
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8), codes)
    np.testing.assert_array_equal(np.asarray(got), scales)
    values_sw, got_sw = mx.quantize(x, rounding=rule, swizzle=True)
    np.testing.assert_array_equal(np.asarray(values_sw).view(np.uint8), codes)
    np.testing.assert_array_equal(np.asarray(got_sw), R.swizzle(scales))


def test_dequantize_accepts_e8m0_scales(rng):
    codes = rng.integers(0, 0x7E, (4, 64)).astype(np.uint8)
    scales = rng.integers(100, 150, (4, 2)).astype(np.uint8)
    values = jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn))
    a = mx.dequantize(values, jnp.asarray(scales), dtype=jnp.float32)
    b = mx.dequantize(values, jnp.asarray(scales.view(ml_dtypes.float8_e8m0fnu)), dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), R.dequantize(codes, scales, np.float32))


def test_round_trip_error_is_small():
    x = jax.random.normal(jax.random.key(0), (64, 1024), jnp.float32)
    y = mx.dequantize(*mx.quantize(x), dtype=jnp.float32)
    rel = float(jnp.linalg.norm(y - x) / jnp.linalg.norm(x))
    assert 0.02 < rel < 0.03  # docs/numerics.md: 0.0265 on Gaussian data for "ceil"


def test_swizzle_unswizzle_round_trip_with_batch(rng):
    s = jnp.asarray(rng.integers(0, 255, (3, 200, 7)).astype(np.uint8))
    sw = mx.swizzle_scales(s)
    assert sw.shape == (3, 256 * 8)
    np.testing.assert_array_equal(np.asarray(sw), R.swizzle(np.asarray(s)))
    np.testing.assert_array_equal(np.asarray(mx.unswizzle_scales(sw, 200, 7)), np.asarray(s))


BAD_CALLS = [
    ("dtype int32", lambda: mx.quantize(jnp.ones((4, 32), jnp.int32)), TypeError, "dtype int32"),
    ("K not multiple of 32", lambda: mx.quantize(jnp.ones((4, 48))), ValueError, "multiple of the MXFP8 block"),
    ("scalar", lambda: mx.quantize(jnp.float32(1)), ValueError, "at least 1 dimension"),
    ("unknown rounding", lambda: mx.quantize(jnp.ones((4, 32)), rounding="up"), ValueError, "unknown rounding"),
    ("swizzle rank", lambda: mx.quantize(jnp.ones((32,)), swizzle=True), ValueError, "at least 2 dims"),
    ("values dtype", lambda: mx.dequantize(jnp.ones((4, 32)), jnp.ones((4, 1), jnp.uint8)), TypeError, "float8_e4m3fn"),
    ("scale shape", lambda: mx.dequantize(jnp.ones((4, 64), jnp.float8_e4m3fn), jnp.ones((4, 1), jnp.uint8)),
     ValueError, "expected (4, 2)"),
    ("scale dtype", lambda: mx.dequantize(jnp.ones((4, 32), jnp.float8_e4m3fn), jnp.ones((4, 1), jnp.float32)),
     TypeError, "e8m0"),
    ("out dtype", lambda: mx.dequantize(jnp.ones((4, 32), jnp.float8_e4m3fn), jnp.ones((4, 1), jnp.uint8),
                                        dtype=jnp.int8), TypeError, "output dtype"),
    ("swizzle rank", lambda: mx.swizzle_scales(jnp.ones((4,), jnp.uint8)), ValueError, "at least 2 dims"),
    ("unswizzle size", lambda: mx.unswizzle_scales(jnp.ones((100,), jnp.uint8), 5, 3), ValueError, "Mp*Kbp"),
    ("unknown backend", lambda: mx.Backend.parse("tpu-magic"), ValueError, "unknown backend"),
]


@pytest.mark.parametrize("name,call,exc,message", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_input_raises_clear_error(name, call, exc, message):
    with pytest.raises(exc, match=None) as info:
        call()
    assert message in str(info.value), str(info.value)


def test_errors_also_raise_under_jit():
    with pytest.raises(ValueError, match="multiple of the MXFP8 block"):
        jax.jit(mx.quantize)(jnp.ones((2, 40)))
