"""The packed weight layout both Marlin kernels read (tag "marlin-v2"), and its exact inverse.

  qweight uint8 [Kp/16, 16*Np]: word (((kt*Np/64 + nt)*2 + h)*32 + 4g + c)*4 + w holds the
      codes W[64nt + 32h + 8w + g, 16kt + 8*(b & 1) + 2c + (b >> 1)], b = 0..3, their bits
      interleaved (interleave_bits) so that the kernels' dequantization is a few integer ops
  scales  uint8 [Kp/32, Np]: byte [grp, 64nt + 8g + j] holds S[64nt + g + 8j, grp]
  flags   int32 [1]: 1 when the weight needs the general dequantization (NaN value codes, or a
      scale byte > FAST_MAX_SCALE); the fast path is exact otherwise.

N and K are zero-padded to multiples of TILE (the layout's metadata records the padded sizes;
padding scales are 127, i.e. 1.0, padding codes 0). The kernels' side of the format is the
header of ffi/src/marlin.cu and Dequant in ffi/src/marlin_common.cuh.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

TILE = 64            # N and K granularity of the packed layout and of a pipeline stage
FAST_MAX_SCALE = 134  # largest e8m0 byte whose folded scale 2^(e-7) is a normal bf16
META_TAG = "marlin-v2"  # v2: bit-interleaved value words


def round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def interleave_bits(b):
    """Codes b[..., 0:4] (rows 2c, 2c+8, 2c+1, 2c+9) -> the bytes of the little-endian word
    Dequant (ffi/src/marlin_common.cuh) reads: code 0 at bits 15 (sign) and 10..4, code 2 at 31
    and 26..20 (already bf16-shaped), code 1 at 19, 14..11 and 2..0, code 3 at 3, 30..27 and
    18..16 (bf16-shaped after a rotation right by 4 and a shift left by 4)."""
    b0, b1, b2, b3 = (b[..., j].astype(jnp.uint32) for j in range(4))
    w = (((b0 & 0x80) << 8) | ((b0 & 0x7F) << 4) | ((b2 & 0x80) << 24) | ((b2 & 0x7F) << 20)
         | ((b1 & 0x80) << 12) | ((b1 & 0x78) << 8) | (b1 & 0x07)
         | ((b3 & 0x80) >> 4) | ((b3 & 0x78) << 24) | ((b3 & 0x07) << 16))
    return jnp.stack([(w >> (8 * j)) & 0xFF for j in range(4)], axis=-1).astype(jnp.uint8)


def deinterleave_bits(b):
    w = sum(b[..., j].astype(jnp.uint32) << (8 * j) for j in range(4))
    b0 = ((w >> 8) & 0x80) | ((w >> 4) & 0x7F)
    b2 = ((w >> 24) & 0x80) | ((w >> 20) & 0x7F)
    b1 = ((w >> 12) & 0x80) | ((w >> 8) & 0x78) | (w & 0x07)
    b3 = ((w << 4) & 0x80) | ((w >> 24) & 0x78) | ((w >> 16) & 0x07)
    return jnp.stack([b0, b1, b2, b3], axis=-1).astype(jnp.uint8)


def pack_values(vbytes: jax.Array) -> jax.Array:
    """uint8 [N, K] (N, K multiples of 64) -> qweight uint8 [K/16, 16N]."""
    n, k = vbytes.shape
    v = vbytes.reshape(n // 64, 2, 4, 8, k // 16, 2, 4, 2)  # (nt, h, w, g, kt, b_lo, c, b_hi)
    words = v.transpose(4, 0, 1, 3, 6, 2, 7, 5).reshape(k // 16, 4 * n, 4)
    return interleave_bits(words).reshape(k // 16, 16 * n)


def unpack_values(qweight: jax.Array) -> jax.Array:
    kt, n16 = qweight.shape
    n, k = n16 // 16, kt * 16
    codes = deinterleave_bits(qweight.reshape(kt, 4 * n, 4))
    p = codes.reshape(kt, n // 64, 2, 8, 4, 4, 2, 2)  # (kt, nt, h, g, c, w, b_hi, b_lo)
    return p.transpose(1, 2, 5, 3, 0, 7, 4, 6).reshape(n, k)


def pack_scales(scales: jax.Array) -> jax.Array:
    """uint8 [N, K/32] -> [K/32, N] with each 64 columns ordered (g, j) for column g + 8j."""
    n, groups = scales.shape
    return scales.T.reshape(groups, n // 64, 8, 8).transpose(0, 1, 3, 2).reshape(groups, n)


def unpack_scales(packed: jax.Array) -> jax.Array:
    groups, n = packed.shape
    return packed.reshape(groups, n // 64, 8, 8).transpose(0, 1, 3, 2).reshape(groups, n).T


def weight_flags(vbytes: jax.Array, scales: jax.Array) -> jax.Array:
    nan_code = jnp.any((vbytes & 0x7F) == 0x7F)
    big_scale = jnp.any(scales > FAST_MAX_SCALE)
    return (nan_code | big_scale).astype(jnp.int32).reshape(1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _pack(values, scales, n_pad, k_pad):
    n, k = values.shape
    vbytes = lax.bitcast_convert_type(values, jnp.uint8)
    vbytes = jnp.pad(vbytes, ((0, n_pad - n), (0, k_pad - k)))
    scales = jnp.pad(scales, ((0, n_pad - n), (0, (k_pad - k) // 32)), constant_values=127)
    return {"qweight": pack_values(vbytes), "scales": pack_scales(scales),
            "flags": weight_flags(vbytes, scales)}


def layout_meta(n: int, k: int) -> tuple[str, int, int]:
    """The static metadata of a packed (n, k) weight: (tag, padded N, padded K)."""
    return META_TAG, round_up(n, TILE), round_up(k, TILE)


def pack_weight(values, scales):
    """values [N, K] e4m3 + scales [N, K/32] uint8 -> (packed arrays, layout_meta(N, K))."""
    meta = layout_meta(*values.shape)
    return _pack(values, scales, meta[1], meta[2]), meta


@functools.partial(jax.jit, static_argnums=(2, 3))
def _unpack(qweight, scales, n, k):
    vbytes = unpack_values(qweight)[:n, :k]
    return lax.bitcast_convert_type(vbytes, jnp.float8_e4m3fn), unpack_scales(scales)[:n, : k // 32]


def unpack_weight(arrays, meta, shape):
    """The exact inverse of pack_weight: (values [N, K] e4m3, scales [N, K/32] uint8)."""
    return _unpack(arrays["qweight"], arrays["scales"], *shape)


def unpack_padded(qweight, scales):
    """All Np x Kp of a packed weight, padding included: (values e4m3, scales uint8)."""
    return lax.bitcast_convert_type(unpack_values(qweight), jnp.float8_e4m3fn), unpack_scales(scales)
