"""An independent numpy reference for MXFP8, written from the contract in docs/numerics.md.

Exact float64 arithmetic and its own e4m3 decoding table (no ml_dtypes casts, no
jax), so kernels and the jnp reference are both checked against the contract.
"""
from __future__ import annotations

import numpy as np

BLOCK = 32


def _e4m3_table() -> np.ndarray:
    """float64 value of each of the 256 e4m3fn codes (NaN for 0x7F/0xFF)."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    mag = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = sign * mag
    val[(codes & 0x7F) == 0x7F] = np.nan
    return val


E4M3 = _e4m3_table()
_POS_CODES = np.arange(0x7F)  # 0x00 .. 0x7E: every finite non-negative value, increasing
_POS_VALUES = E4M3[_POS_CODES]


def round_to_e4m3_bits(v: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even of finite float64 |v| <= 448 to e4m3fn codes (uint8)."""
    mag = np.abs(v)
    assert np.all(mag <= 448.0), "reference only rounds in-range values"
    hi = np.clip(np.searchsorted(_POS_VALUES, mag, side="left"), 0, len(_POS_VALUES) - 1)
    lo = np.clip(hi - 1, 0, None)
    d_lo = mag - _POS_VALUES[lo]
    d_hi = _POS_VALUES[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (_POS_CODES[hi] % 2 == 0))
    code = np.where(pick_hi, _POS_CODES[hi], _POS_CODES[lo]).astype(np.uint8)
    return code | np.where(np.signbit(v), 0x80, 0).astype(np.uint8)


def _floor_log2(a: np.ndarray) -> np.ndarray:
    _, e = np.frexp(a)  # a = m * 2^e, m in [0.5, 1): exact
    return e.astype(np.int64) - 1


def scale_bytes(amax: np.ndarray, rounding: str) -> np.ndarray:
    amax = amax.astype(np.float64)
    if rounding == "ceil":
        # smallest e in [0, 254] with amax <= 448 * 2^(e - 127); zero block -> 0
        est = np.where(amax > 0, _floor_log2(np.where(amax > 0, amax, 1.0)) - 8 + 127, 0)
        best = np.full(amax.shape, 254, np.int64)
        for d in range(3, -4, -1):
            cand = np.clip(est + d, 0, 254)
            ok = amax <= 448.0 * np.exp2(cand.astype(np.float64) - 127)
            best = np.where(ok, np.minimum(best, cand), best)
        return np.where(amax == 0, 0, best)
    if rounding == "floor":
        e = np.where(amax > 0, _floor_log2(np.where(amax > 0, amax, 1.0)) - 8 + 127, 0)
        return np.where(amax == 0, 0, np.clip(e, 0, 254))
    if rounding == "naive":
        return np.clip(_floor_log2(np.maximum(amax, 2.0**-126)) + 127, 0, 254)
    raise ValueError(rounding)


def quantize(x: np.ndarray, rounding: str = "ceil"):
    """x (any float dtype incl. ml_dtypes bf16) [..., K] -> (value codes uint8 [..., K], scales uint8)."""
    x64 = np.asarray(x).astype(np.float64)
    *lead, k = x64.shape
    blocks = x64.reshape(*lead, k // BLOCK, BLOCK)
    bad = ~np.all(np.isfinite(blocks), axis=-1)
    amax = np.max(np.where(np.isfinite(blocks), np.abs(blocks), 0.0), axis=-1)
    e = scale_bytes(amax, rounding)
    scaled = blocks / np.exp2(e[..., None].astype(np.float64) - 127)  # exact in float64
    scaled = np.where(np.isfinite(scaled), scaled, 0.0)
    if rounding == "floor":
        scaled = np.clip(scaled, -448.0, 448.0)
    codes = round_to_e4m3_bits(scaled)
    codes = np.where(bad[..., None], np.uint8(0x7F), codes).reshape(x64.shape)
    scales = np.where(bad, 255, e).astype(np.uint8)
    return codes.astype(np.uint8), scales


def dequantize(codes: np.ndarray, scales: np.ndarray, dtype) -> np.ndarray:
    """float64 value * 2^(e - 127), one cast to dtype (exact product: <= 4 significant bits)."""
    vals = E4M3[np.asarray(codes, np.uint8)]
    *lead, k = vals.shape
    e = np.asarray(scales, np.uint8).astype(np.float64)[..., None]
    out = vals.reshape(*lead, k // BLOCK, BLOCK) * np.exp2(e - 127)
    out = np.where(e == 255, np.nan, out)
    with np.errstate(over="ignore"):
        return out.reshape(vals.shape).astype(np.float32).astype(dtype)


def swizzle_offset(r, c, kbp):
    """Byte offset of scale (row r, block-column c) in one batch's F8_128x4 buffer."""
    return ((r // 128) * (kbp // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


def swizzle(scales: np.ndarray) -> np.ndarray:
    *lead, rows, cols = scales.shape
    mp, kbp = -(-rows // 128) * 128, -(-cols // 4) * 4
    out = np.zeros((*lead, mp * kbp), np.uint8)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    out[..., swizzle_offset(r, c, kbp)] = scales
    return out


def linear(x, codes, scales, bias=None, quantize_activations=False):
    """float64 reference of y = x @ dequantize(w).T + bias (W8A16, or W8A8 with ceil-quantized x)."""
    x64 = np.asarray(x).astype(np.float64)
    if quantize_activations:
        xc, xs = quantize(x, "ceil")
        x64 = dequantize(xc, xs, np.float64)
    w = dequantize(codes, scales, np.float64)
    y = x64 @ w.T
    if bias is not None:
        y = y + np.asarray(bias).astype(np.float64)
    return y
