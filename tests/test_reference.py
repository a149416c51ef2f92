"""The jnp reference (EMULATION + CPU lowering) against the numpy contract reference, bit for bit."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_mxfp8 import reference

from oracles import mxfp8 as R
from oracles.edge_cases import edge_case_blocks

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]
RULES = ["ceil", "floor", "naive"]


def check_quantize(x, rule):
    codes, scales = R.quantize(x, rule)
    values, got_scales = jax.jit(lambda a: reference.quantize(a, rule))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got_scales), scales)
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8), codes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (3, 130, 96), (2, 2, 5, 1024)])
def test_quantize_random(dtype, rule, shape, rng):
    spread = np.exp2(rng.integers(-30, 30, (*shape[:-1], shape[-1] // 32, 1)))
    x = (rng.standard_normal((*shape[:-1], shape[-1] // 32, 32)) * spread).reshape(shape)
    with np.errstate(over="ignore"):
        x = x.astype(dtype)
    check_quantize(x, rule)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
def test_quantize_edge_cases(dtype, rule, rng):
    with np.errstate(over="ignore"):
        x = edge_case_blocks(rng).astype(dtype)
    check_quantize(x.reshape(-1, 64) if x.shape[0] % 2 == 0 else x, rule)


def test_nonfinite_block_is_all_nan():
    x = np.ones((1, 64), np.float32)
    x[0, 3] = np.inf
    values, scales = reference.quantize(jnp.asarray(x))
    assert np.asarray(scales).tolist() == [[255, 119]]  # amax 1.0: smallest 2^(e-127) >= 1/448 is 2^-8
    assert np.all(np.isnan(np.asarray(values[0, :32]).astype(np.float32)))


def test_ceil_never_clips_and_floor_saturates():
    x = np.full((1, 32), 460.0, np.float32)  # 460 > 448: ceil doubles the scale, floor saturates
    _, s_ceil = reference.quantize(jnp.asarray(x), "ceil")
    v_floor, s_floor = reference.quantize(jnp.asarray(x), "floor")
    assert int(s_ceil[0, 0]) == 128 and int(s_floor[0, 0]) == 127
    assert float(v_floor[0, 0].astype(jnp.float32)) == 448.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dequantize_normal_range(dtype, rng):
    codes = rng.integers(0, 256, (9, 128)).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    # scales keep every result in the normal range of the output dtype
    lo, hi = (127 - 14 + 9, 127 + 15 - 9) if dtype == jnp.float16 else (20, 230)
    scales = rng.integers(lo, hi, (9, 4)).astype(np.uint8)
    scales[0, 0] = 255  # NaN scale
    want = R.dequantize(codes, scales, np.dtype(dtype))
    got = jax.jit(lambda v, s: reference.dequantize(v, s, dtype))(
        jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn)), jnp.asarray(scales))
    np.testing.assert_array_equal(np.asarray(got).astype(np.float32), want.astype(np.float32))
    assert np.all(np.isnan(np.asarray(got)[0, :32].astype(np.float32)))


def test_swizzle_matches_offset_formula(rng):
    for shape in [(1, 1), (130, 3), (2, 300, 33), (128, 4), (256, 8)]:
        s = rng.integers(1, 255, shape).astype(np.uint8)
        got = np.asarray(reference.swizzle_scales(jnp.asarray(s)))
        np.testing.assert_array_equal(got, R.swizzle(s))
        back = np.asarray(reference.unswizzle_scales(jnp.asarray(got), shape[-2], shape[-1]))
        np.testing.assert_array_equal(back, s)


def test_swizzle_padding_is_zero_per_batch():
    s = np.full((2, 5, 3), 7, np.uint8)
    got = np.asarray(reference.swizzle_scales(jnp.asarray(s)))
    assert got.shape == (2, 128 * 4)
    assert np.count_nonzero(got) == 2 * 5 * 3  # everything else is padding, zero, in each batch
