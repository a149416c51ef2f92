"""The MXFP8 contract (docs/numerics.md) written in jnp.

This module is the EMULATION backend, the lowering of every primitive on
platforms without our kernels, and what the kernels are checked against.
It is exact: no log2/exp2 on floats; powers of two are built from bits, block
maxima are taken on bit patterns, and subnormal inputs are scaled through
their integer mantissas, so results are identical on backends that flush
subnormals (XLA:CPU does).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

BLOCK_SIZE = 32
E4M3_MAX = 448.0
SCALE_NAN = 255  # e8m0 byte meaning NaN
E4M3_NAN_BITS = 0x7F  # the value byte written for every element of a non-finite block
ROUNDING_RULES = ("ceil", "floor", "naive")


def pow2(k: jax.Array) -> jax.Array:
    """2.0**k as float32 for integer k in [-126, 127], built from the exponent bits."""
    bits = (k.astype(jnp.int32) + 127).astype(jnp.uint32) << 23
    return lax.bitcast_convert_type(bits, jnp.float32)


def _abs_bits(x32: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x32, jnp.uint32) & jnp.uint32(0x7FFFFFFF)


def scale_exponents(amax_bits: jax.Array, rounding: str) -> jax.Array:
    """Biased e8m0 exponent (int32) of each block from |amax|'s float32 bit pattern."""
    exponent = (amax_bits >> 23).astype(jnp.int32)  # biased float32 exponent; 0 for zero/subnormal
    mantissa = amax_bits & jnp.uint32(0x7FFFFF)
    if rounding == "ceil":
        # amax = m * 2^E; need amax <= 1.75 * 2^(e_b - 119): e_b = E + 119, or one more when m > 1.75.
        e_b = exponent - 8 + (mantissa > 0x600000).astype(jnp.int32)
        e_b = jnp.where(exponent == 0, 0, e_b)  # zero or subnormal amax: 448 * 2^-127 already covers it
    elif rounding == "floor":
        e_b = exponent - 8  # floor(log2 amax) - 8 + 127
    elif rounding == "naive":
        e_b = jnp.maximum(exponent, 1)  # floor(log2(max(amax, 2^-126))) + 127
    else:
        raise ValueError(f"unknown rounding {rounding!r}; use one of {ROUNDING_RULES}")
    return jnp.clip(e_b, 0, 254)


def _scale_down(x32: jax.Array, e_b: jax.Array) -> jax.Array:
    """x * 2^(127 - e_b), exact whenever the result matters for e4m3 (|result| >= 2^-126)."""
    shift = 127 - e_b  # in [-127, 127]
    hi = jnp.clip(shift, -126, 127)
    scaled = x32 * pow2(hi) * pow2(shift - hi)  # second factor is 1 or 1/2; never a subnormal factor
    # Subnormal inputs: x = mant * 2^-149 exactly. Scale the integer mantissa instead (DAZ-proof).
    bits = lax.bitcast_convert_type(x32, jnp.uint32)
    is_subnormal = ((bits >> 23) & 0xFF) == 0
    mant = (bits & jnp.uint32(0x7FFFFF)).astype(jnp.int32).astype(jnp.float32)  # exact (< 2^23)
    sub_shift = jnp.clip(shift - 149, -126, 127)  # below -126 the result is < 2^-126: e4m3 zero anyway
    sub = jnp.where(shift - 149 < -126, 0.0, mant * pow2(sub_shift))
    sub = jnp.where(jnp.signbit(x32), -sub, sub)  # keeps -0
    return jnp.where(is_subnormal, sub, scaled)


def round_to_e4m3_bits(s: jax.Array) -> jax.Array:
    """Round-to-nearest-even of float32 |s| <= 448 to e4m3fn codes (uint8), in integer arithmetic.

    XLA's own float32 -> e4m3 conversion was not correctly rounded in older releases (jax 0.7
    rounded through an intermediate type), so the one rounding of the contract is done by hand.
    """
    bits = lax.bitcast_convert_type(s, jnp.uint32)
    mag = bits & jnp.uint32(0x7FFFFFFF)
    # Normal e4m3 (|s| >= 2^-6): round the 23-bit mantissa to 3 bits at bit 20, ties to even;
    # a carry moves into the exponent naturally. Rebias the exponent from 127 to 7.
    rounded = (mag + jnp.uint32(0x7FFFF) + ((mag >> 20) & 1)) >> 20
    normal = rounded.astype(jnp.int32) - (120 << 3)
    # Subnormal e4m3 (quantum 2^-9): |s| * 512 is exact; round it to an integer, ties to even.
    scaled = lax.bitcast_convert_type(mag, jnp.float32) * jnp.float32(512.0)
    subnormal = lax.round(scaled, lax.RoundingMethod.TO_NEAREST_EVEN).astype(jnp.int32)
    code = jnp.where(mag < jnp.uint32(0x3C800000), subnormal, normal)  # 0x3C800000 = 2^-6
    return (code.astype(jnp.uint32) | ((bits >> 31) << 7)).astype(jnp.uint8)


def quantize(x: jax.Array, rounding: str = "ceil") -> tuple[jax.Array, jax.Array]:
    """x [..., K] (bf16/fp16/fp32) -> (values e4m3 [..., K], scales uint8 [..., K/32])."""
    *lead, k = x.shape
    blocks = x.astype(jnp.float32).reshape(*lead, k // BLOCK_SIZE, BLOCK_SIZE)
    abs_bits = _abs_bits(blocks)
    nonfinite = jnp.any(abs_bits >= jnp.uint32(0x7F800000), axis=-1)  # Inf or NaN anywhere in the block
    amax_bits = jnp.max(jnp.where(abs_bits >= 0x7F800000, 0, abs_bits), axis=-1)
    e_b = scale_exponents(amax_bits, rounding)
    scaled = _scale_down(blocks, e_b[..., None])
    if rounding == "floor":
        scaled = jnp.clip(scaled, -E4M3_MAX, E4M3_MAX)
    value_bits = round_to_e4m3_bits(scaled)
    value_bits = jnp.where(nonfinite[..., None], jnp.uint8(E4M3_NAN_BITS), value_bits)
    values = lax.bitcast_convert_type(value_bits, jnp.float8_e4m3fn).reshape(x.shape)
    scales = jnp.where(nonfinite, SCALE_NAN, e_b).astype(jnp.uint8)
    return values, scales


def scales_as_uint8(scales: jax.Array) -> jax.Array:
    if scales.dtype == jnp.uint8:
        return scales
    return lax.bitcast_convert_type(scales, jnp.uint8)


def dequantize(values: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """float32(value) * 2^(e_b - 127), one RNE cast to dtype; e_b = 255 gives NaN."""
    *lead, k = values.shape
    e_b = scales_as_uint8(scales).astype(jnp.int32)[..., None]
    shift = e_b - 127  # [-127, 128]
    hi = jnp.clip(shift, -126, 127)
    blocks = values.astype(jnp.float32).reshape(*lead, k // BLOCK_SIZE, BLOCK_SIZE)
    out = blocks * pow2(hi) * pow2(jnp.clip(shift - hi, -1, 0))
    out = jnp.where(e_b == SCALE_NAN, jnp.nan, out)
    return out.reshape(values.shape).astype(dtype)


# ---- F8_128x4 swizzled scale layout -------------------------------------------------------

def padded_scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """(Mp, Kbp): rows padded to 128, scale columns padded to 4."""
    return -(-rows // 128) * 128, -(-cols // 4) * 4


def swizzle_scales(scales: jax.Array) -> jax.Array:
    """[..., M, Kb] -> [..., Mp * Kbp] in the 128x4 atom layout, zero padding per batch index."""
    *lead, rows, cols = scales.shape
    mp, kbp = padded_scale_shape(rows, cols)
    pad = [(0, 0)] * len(lead) + [(0, mp - rows), (0, kbp - cols)]
    s = jnp.pad(scales, pad)  # zero bytes: 2^-127, never NaN
    s = s.reshape(*lead, mp // 128, 4, 32, kbp // 4, 4)
    n = len(lead)
    s = jnp.transpose(s, (*range(n), n, n + 3, n + 2, n + 1, n + 4))
    return s.reshape(*lead, mp * kbp)


def unswizzle_scales(swizzled: jax.Array, rows: int, cols: int) -> jax.Array:
    """Inverse of swizzle_scales: [..., Mp * Kbp] -> [..., rows, cols]."""
    *lead, _ = swizzled.shape
    mp, kbp = padded_scale_shape(rows, cols)
    n = len(lead)
    s = swizzled.reshape(*lead, mp // 128, kbp // 4, 32, 4, 4)
    s = jnp.transpose(s, (*range(n), n, n + 3, n + 2, n + 1, n + 4))
    return s.reshape(*lead, mp, kbp)[..., :rows, :cols]


# ---- linear ----------------------------------------------------------------------------------

def dot_dtype(x_dtype) -> jnp.dtype:
    """Operand dtype for the emulated GEMM: bf16 holds every normal-range dequantized value
    exactly, so bf16 inputs keep a bf16 GEMM; fp16 lacks the range of e8m0 scales, so fp16
    and fp32 inputs run the dot in fp32."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(x_dtype) == jnp.bfloat16 else jnp.dtype(jnp.float32)


def dot_with_bias(x, w, bias, out_dtype):
    """x [..., K] @ w [N, K].T with float32 accumulation, + bias in float32, one cast to out_dtype.
    The operands are used as given (callers pick their dtype with dot_dtype)."""
    y = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


def linear(x, values, scales, bias=None, *, out_dtype=None, quantize_activations=False):
    """y = x @ dequantize(w).T + bias with float32 accumulation (W8A16, or W8A8 with x
    quantized by the "ceil" rule first)."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    op_dtype = dot_dtype(x.dtype)
    if quantize_activations:
        xv, xs = quantize(x, "ceil")
        x = dequantize(xv, xs, op_dtype)
    return dot_with_bias(x.astype(op_dtype), dequantize(values, scales, op_dtype), bias, out_dtype)
