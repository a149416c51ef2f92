"""CUDA quantize / dequantize / swizzle kernels (ffi/src/quantize.cu) against the numpy contract.

GPU tests (marker `gpu`) skip without a GPU. On a GPU they fail (rather than silently testing
the jnp fallback) when the CUDA targets are missing and JAX_MXFP8_REQUIRE_CUDA=1 (`tools/gpu.sh
test` sets it). JAX_MXFP8_SMALL_ONLY=1 keeps only small shapes (the compute-sanitizer run).
The CUDA-lowering test at the end runs on any machine that built the CUDA module.
"""
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_mxfp8 as mx
from jax_mxfp8 import _ffi

from helpers import assert_same_bits_any_nan, gpu_test, has_cuda_targets, has_gpu, hlo, needs_cuda_targets
from oracles import mxfp8 as R
from oracles.edge_cases import edge_case_blocks

TARGETS = {
    "quantize": "jax_mxfp8_quantize_cuda_v1",
    "dequantize": "jax_mxfp8_dequantize_cuda_v1",
    "swizzle": "jax_mxfp8_swizzle_scales_cuda_v1",
    "unswizzle": "jax_mxfp8_unswizzle_scales_cuda_v1",
}
HAS_GPU = has_gpu()
HAS_TARGETS = has_cuda_targets(*TARGETS.values())
SMALL_ONLY = os.environ.get("JAX_MXFP8_SMALL_ONLY", "") not in ("", "0")

if HAS_GPU and not HAS_TARGETS and os.environ.get("JAX_MXFP8_REQUIRE_CUDA", "") not in ("", "0"):
    raise RuntimeError(f"JAX_MXFP8_REQUIRE_CUDA=1 but the CUDA module lacks {TARGETS}: "
                       f"build info {_ffi.build_info()}")
gpu = gpu_test(HAS_TARGETS, reason="needs an NVIDIA GPU and the CUDA module (tools/gpu.sh build)")

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]
RULES = ["ceil", "floor", "naive"]
# Tails: a partial warp of units (3x64), odd block count and Kb % 4 != 0 (5x96), leading dims,
# M % 128 != 0 with a batch (2x3x160, 130x224), K = 65536, decode sizes; the large shapes also
# run several grid-stride iterations (more units than resident threads).
SMALL_SHAPES = [(1, 32), (3, 64), (5, 96), (2, 3, 160), (130, 224), (2, 65536), (16, 16384)]
SHAPES = SMALL_SHAPES[1:5] if SMALL_ONLY else SMALL_SHAPES
LARGE_SHAPE = (2, 1111, 2048)  # 284K units: more than the resident threads, M % 128 != 0, batch


def run_kernel(op: str, fn, *args):
    """fn(*args) after checking that it lowered to our kernel (not the jnp fallback), run right
    after buffers of its outputs' sizes were filled with 0xFF and freed: the device allocator
    hands them back, so bytes a kernel fails to write (e.g. swizzle padding) show up as 0xFF
    instead of a lucky 0 (best effort; XLA never zeroes outputs)."""
    compiled = jax.jit(fn).lower(*args).compile()
    assert TARGETS[op] in compiled.as_text(), f"{op} did not lower to {TARGETS[op]}"
    sizes = [o.size * o.dtype.itemsize for o in jax.tree.leaves(jax.eval_shape(fn, *args))]
    stale = [jnp.full((n,), 0xFF, jnp.uint8) for n in sizes]
    jax.block_until_ready(stale)
    del stale
    return jax.block_until_ready(compiled(*args))


def random_blocks(rng, shape, dtype):
    """Gaussian blocks with a per-block power-of-two spread, some all-zero / NaN / Inf blocks."""
    *lead, k = shape
    spread = np.exp2(rng.integers(-40, 40, (*lead, k // 32, 1)).astype(np.float64))
    x = rng.standard_normal((*lead, k // 32, 32)) * spread
    special = rng.random((*lead, k // 32))
    x[special < 0.02] = 0.0
    x[(special >= 0.02) & (special < 0.03), 5] = np.nan
    x[(special >= 0.03) & (special < 0.04), 7] = -np.inf
    with np.errstate(over="ignore"):
        return np.asarray(jnp.asarray(x.reshape(shape).astype(np.float32), dtype))


def check_quantize(x, rule, swizzle):
    codes, scales = R.quantize(x, rule)
    if swizzle:
        scales = R.swizzle(scales)
    values, got = run_kernel("quantize", lambda a: mx.quantize(a, rounding=rule, swizzle=swizzle), x)
    np.testing.assert_array_equal(np.asarray(got), scales)
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8), codes)


@gpu
@pytest.mark.parametrize("swizzle", [False, True], ids=["rowmajor", "swizzled"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_random(shape, dtype, rule, swizzle, rng):
    check_quantize(random_blocks(rng, shape, dtype), rule, swizzle)


@gpu
@pytest.mark.skipif(SMALL_ONLY, reason="JAX_MXFP8_SMALL_ONLY")
@pytest.mark.parametrize("dtype,rule,swizzle", [
    (jnp.bfloat16, "ceil", True), (jnp.bfloat16, "floor", False),
    (jnp.float16, "naive", True), (jnp.float32, "ceil", False)], ids=str)
def test_quantize_large_grid_stride(dtype, rule, swizzle, rng):
    check_quantize(random_blocks(rng, LARGE_SHAPE, dtype), rule, swizzle)


@gpu
@pytest.mark.parametrize("swizzle", [False, True], ids=["rowmajor", "swizzled"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_quantize_edge_cases(dtype, rule, swizzle, rng):
    # zeros, -0, NaN/Inf blocks, amax 448*2^k and neighbours, e4m3 rounding ties, tiny,
    # subnormal, huge; in the input dtype (bf16/fp16 round the float32 constructions).
    with np.errstate(over="ignore"):
        x = np.asarray(jnp.asarray(edge_case_blocks(rng), dtype))
    check_quantize(x, rule, swizzle)                      # [blocks, 32]: Kb = 1, swizzle pads
    check_quantize(x[: x.shape[0] // 4 * 4].reshape(-1, 128), rule, swizzle)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_quantize_dtype_boundaries(dtype):
    """Largest finite, smallest normal/subnormal of each input dtype, and their negatives."""
    info = ml_dtypes.finfo(jnp.dtype(dtype))
    specials = [float(info.max), float(info.smallest_normal), float(info.smallest_subnormal)]
    x = np.zeros((6, 64), np.float32)
    for i, v in enumerate(specials):
        x[2 * i, :3] = [v, -v, v / 2]
        x[2 * i + 1, 32:35] = [-v, 1.0, -0.0]
    x = np.asarray(jnp.asarray(x, dtype))
    for rule in RULES:
        check_quantize(x, rule, False)
        check_quantize(x, rule, True)


def check_dequantize(codes, scales, dtype):
    want = R.dequantize(codes, scales, jnp.dtype(dtype))
    values = np.asarray(codes, np.uint8).view(ml_dtypes.float8_e4m3fn)
    got = run_kernel("dequantize", lambda v, s: mx.dequantize(v, s, dtype=dtype), values, scales)
    assert_same_bits_any_nan(got, want)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES + ([] if SMALL_ONLY else [LARGE_SHAPE]), ids=str)
def test_dequantize_random(shape, dtype, rng):
    """Every e4m3 code (NaN codes included) with scales that keep results normal in dtype."""
    codes = rng.integers(0, 256, shape).astype(np.uint8)
    lo, hi = (122, 135) if dtype == jnp.float16 else (50, 200)
    scales = rng.integers(lo, hi, (*shape[:-1], shape[-1] // 32)).astype(np.uint8)
    scales.reshape(-1)[:: 17] = 255  # NaN scales
    check_dequantize(codes, scales, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_dequantize_every_code_and_scale(dtype):
    """All 256 codes x all 256 scale bytes: overflow to Inf, and results in the output dtype's
    subnormal range (exact in the kernel: float32 math without flush-to-zero, one RNE cast)."""
    codes = np.tile(np.arange(256, dtype=np.uint8), (256, 1))            # row e: every code
    codes = np.concatenate([codes, codes[:, :32] ^ 0x80], axis=1)        # 288 = 9 blocks
    scales = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 9, axis=1)
    check_dequantize(codes, scales, dtype)


SCALE_SHAPES = [(1, 1), (5, 3), (130, 7), (2, 3, 129, 5), (256, 8), (3, 1, 4)]


@gpu
@pytest.mark.parametrize("shape", SCALE_SHAPES, ids=str)
def test_swizzle_and_unswizzle(shape, rng):
    scales = rng.integers(0, 256, shape).astype(np.uint8)
    want = R.swizzle(scales)
    got = run_kernel("swizzle", mx.swizzle_scales, scales)
    np.testing.assert_array_equal(np.asarray(got), want)
    rows, cols = shape[-2:]
    back = run_kernel("unswizzle", lambda s: mx.unswizzle_scales(s, rows, cols), want)
    np.testing.assert_array_equal(np.asarray(back), scales)


@gpu
def test_vmap_and_batch_dims_use_the_kernel(rng):
    """vmap folds into leading dims; swizzled scales are padded per batch index."""
    x = random_blocks(rng, (3, 70, 96), jnp.bfloat16)
    values, scales = run_kernel("quantize", jax.vmap(lambda a: mx.quantize(a, swizzle=True)), x)
    codes, want = R.quantize(x, "ceil")
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8), codes)
    np.testing.assert_array_equal(np.asarray(scales), R.swizzle(want))


@gpu
@pytest.mark.parametrize("shape", [(1, 4096), (16, 16384)], ids=str)
def test_decode_quantize_is_one_launch(shape):
    """Swizzled quantize at decode sizes: one custom call and nothing else that launches."""
    x = jnp.zeros(shape, jnp.bfloat16)
    text = hlo(lambda a: mx.quantize(a, swizzle=True), x)
    assert text.count("custom-call(") == 1 and TARGETS["quantize"] in text, text
    assert "fusion(" not in text and " copy(" not in text, text


@needs_cuda_targets(*TARGETS.values(), reason="CUDA module not built (no nvcc at build time)")
def test_every_op_lowers_to_its_custom_call_for_cuda():
    """Runs without a GPU: lowering for the "cuda" platform emits each FFI target."""
    x = jax.ShapeDtypeStruct((4, 64), jnp.bfloat16)
    values = jax.ShapeDtypeStruct((4, 64), jnp.float8_e4m3fn)
    scales = jax.ShapeDtypeStruct((4, 2), jnp.uint8)
    swizzled = jax.ShapeDtypeStruct((128 * 4,), jnp.uint8)
    cases = {
        "quantize": (lambda a: mx.quantize(a, rounding="floor", swizzle=True), (x,)),
        "dequantize": (lambda v, s: mx.dequantize(v, s, dtype=jnp.float32), (values, scales)),
        "swizzle": (mx.swizzle_scales, (scales,)),
        "unswizzle": (lambda s: mx.unswizzle_scales(s, 4, 2), (swizzled,)),
    }
    for op, (fn, args) in cases.items():
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert f"@{TARGETS[op]}" in text, f"{op}: no custom call {TARGETS[op]} in\n{text}"
    text = jax.jit(cases["quantize"][0]).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "rounding = 1 : i32" in text and "swizzle = true" in text, text
