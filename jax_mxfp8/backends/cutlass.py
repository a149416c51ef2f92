"""CUTLASS: native MXFP8 x MXFP8 (W8A8) GEMM on Blackwell (SM100, tcgen05 block-scaled MMA).

Compiled and layout-verified, NOT yet run on hardware: no SM100 GPU has been available. The
kernels are CUTLASS 4.2's block-scaled collectives (ffi/src/sm100/); the scale layout they read
is proven equal to reference.swizzle_scales on the host (tests/test_backends_cutlass.py, through a
host-only oracle the tests build from tests/oracles/).

prepare: values [N, K] e4m3 stay as they are; scales are swizzled once into the F8_128x4
    layout, stored as [Np/128, Kbp/4, 512] (N-tile-major, then K-tile-major, so shards along
    N or K of whole 128-tiles are contiguous chunks; see weight.py).
linear: x is quantized with the "ceil" rule straight into swizzled scales (the quantize
    primitive with swizzle=True), then one GEMM launch computes
    out = dequant(x) . dequant(w)^T + bias in float32 and rounds once to out_dtype.
The tile configuration is chosen from the static M at trace time (choose_config).
Stacked experts (E, N, K) are prepared expert by expert like any backend's; there is no grouped
kernel (no BackendImpl.ragged_linear): ragged_linear refuses CUTLASS weights with the fix, and
vmap(linear) over them runs one GEMM per expert.
"""
from __future__ import annotations

import enum
import functools

import jax.numpy as jnp
from jax import lax

from jax_mxfp8 import _checks, _ffi, reference
from jax_mxfp8._compat import ShapedArray
from jax_mxfp8.backends.base import Backend, BackendImpl, register_backend
from jax_mxfp8.ops.base import Op, register
from jax_mxfp8.ops.quantize import quantize_local
from jax_mxfp8.ops.swizzle import swizzle_scales, unswizzle_scales
from jax_mxfp8.partitioning import move_to_front

GEMM_TARGET = "jax_mxfp8_cutlass_gemm_cuda_v1"
ROW_TILE = 128   # rows of one swizzle atom, and the N/K sharding granularity
ATOM_BYTES = 512  # 128 rows x 4 scale columns


class Config(enum.IntEnum):
    """Tile configurations compiled into ffi/src/sm100 (GemmConfig in cutlass_gemm_api.h)."""
    SWAP_AB_128x64x256 = 0  # small M: D^T = W . X^T, tokens on the 64-wide MMA N side
    ONE_SM_128x128x256 = 1  # medium M
    TWO_SM_256x128x256 = 2  # large M: a 2-CTA cluster per 256x128 tile


# Output dtype codes (OutDtype in cutlass_gemm_api.h) and the configs compiled for each.
OUT_DTYPE_CODES = {jnp.dtype(jnp.bfloat16): 0, jnp.dtype(jnp.float16): 1, jnp.dtype(jnp.float32): 2}
COMPILED = {
    jnp.dtype(jnp.bfloat16): tuple(Config),
    jnp.dtype(jnp.float16): tuple(Config),
    # float32 (row-parallel partial products, float32 activations): one general config.
    jnp.dtype(jnp.float32): (Config.ONE_SM_128x128x256,),
}

# Per-M choice. Unmeasured guesses (no SM100 GPU yet): swap operands while the tokens fit
# the 64-wide MMA N side, one CTA per 128x128 tile up to a few M-tiles, 2SM tiles beyond.
SWAP_AB_MAX_M = 64
ONE_SM_MAX_M = 256


def choose_config(m: int, out_dtype) -> Config:
    if COMPILED[jnp.dtype(out_dtype)] == (Config.ONE_SM_128x128x256,):
        return Config.ONE_SM_128x128x256
    if m <= SWAP_AB_MAX_M:
        return Config.SWAP_AB_128x64x256
    if m <= ONE_SM_MAX_M:
        return Config.ONE_SM_128x128x256
    return Config.TWO_SM_256x128x256


def swizzled_scale_size(rows: int, k: int) -> int:
    mp, kbp = reference.padded_scale_shape(rows, k // 32)
    return mp * kbp


@functools.lru_cache(maxsize=1024)
def workspace_bytes(config: int, out_dtype, m: int, n: int, k: int) -> int:
    """Gemm::get_workspace_size from the compiled kernel (0 for these configs); 0 without it."""
    module = _ffi.cuda_module()
    if module is None or not hasattr(module, "cutlass_gemm_workspace_size") or m == 0:
        return 0
    return int(module.cutlass_gemm_workspace_size(int(config), OUT_DTYPE_CODES[jnp.dtype(out_dtype)],
                                                  m, n, k))


def compiled_instances() -> set[tuple[int, int]] | None:
    """{(config, out dtype code)} compiled into the CUDA module, or None without CUTLASS."""
    module = _ffi.cuda_module()
    if module is None or not hasattr(module, "cutlass_gemm_instances"):
        return None
    return {(g["config"], g["out_dtype"]) for g in module.cutlass_gemm_instances()}


def check_problem(m: int, n: int, k: int) -> None:
    """The kernel's shape rules, as errors that say the fix (mirrors MxGemm::Check)."""
    if k < 32 or k % 32:
        raise ValueError(f"cutlass: K={k} must be a positive multiple of 32 (one e8m0 scale per 32 "
                         f"values); pad K with zeros")
    if n < 8 or n % 8:
        raise ValueError(f"cutlass: N={n} (out_features) must be a positive multiple of 8: output rows "
                         f"are written by TMA in 16-byte units. Pad the weight's N to a multiple of 8 "
                         f"(zero rows) and slice the output, or use backend='emulation'")
    if max(m, n, k) >= 2**31:
        raise ValueError(f"cutlass: M={m}, N={n}, K={k} must each be < 2^31")


# ---- the GEMM primitive ----------------------------------------------------------------------
# Operands: x [M, K] e4m3, x_scales [Mp*Kbp] u8 (swizzled), w [N, K] e4m3, w_scales [Np*Kbp] u8
# (swizzled), bias [N] f32 (or [0] when has_bias=False, left out of the custom call). Result:
# out [M, N]; the kernel's workspace is hidden by the lowering.

def reference_gemm(x, x_scales, w, w_scales, bias, *, out_dtype, has_bias=True, **_):
    """What the kernel computes, in jnp (docs/numerics.md): unswizzle, dequantize exactly,
    float32 dot, + bias in float32, one rounding to out_dtype. Used by tests; never a lowering."""
    (m, k), n = x.shape, w.shape[0]
    xs = unswizzle_scales(x_scales, m, k // 32)
    ws = unswizzle_scales(w_scales, n, k // 32)
    use_bias = has_bias and bias is not None and bias.size
    return reference.dot_with_bias(reference.dequantize(x, xs, jnp.float32),
                                   reference.dequantize(w, ws, jnp.float32),
                                   bias if use_bias else None, out_dtype)


def _check_compiled(config, out_dtype) -> None:
    compiled = compiled_instances()
    if compiled is not None and (int(config), OUT_DTYPE_CODES[out_dtype]) not in compiled:
        raise _ffi.KernelUnavailableError(
            f"the CUTLASS GEMM for config {Config(config).name} and out_dtype {out_dtype.name} "
            f"was not compiled into this installation")


@register
class CutlassGemm(Op):
    name = "mxfp8_cutlass_gemm"
    cuda_target = GEMM_TARGET

    @staticmethod
    def abstract(x, x_scales, w, w_scales, bias, *, config, out_dtype, has_bias):
        for what, a, dtype in (("x", x, jnp.float8_e4m3fn), ("w", w, jnp.float8_e4m3fn),
                               ("x_scales", x_scales, jnp.uint8), ("w_scales", w_scales, jnp.uint8),
                               ("bias", bias, jnp.float32)):
            _checks.check_dtype(f"cutlass gemm {what}", a.dtype, (dtype,), "Use linear() or gemm().")
        if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
            raise ValueError(f"cutlass gemm: x {x.shape} and w {w.shape} must be [M, K] and [N, K]")
        (m, k), n = x.shape, w.shape[0]
        check_problem(max(m, 1), n, k)
        for what, a, rows in (("x_scales", x_scales, m), ("w_scales", w_scales, n)):
            if a.shape != (swizzled_scale_size(rows, k),):
                raise ValueError(f"cutlass gemm: {what} has shape {a.shape}; expected the swizzled "
                                 f"({swizzled_scale_size(rows, k)},) buffer of a [{rows}, {k // 32}] "
                                 f"scale matrix (quantize(..., swizzle=True) / swizzle_scales)")
        if bias.shape != ((n,) if has_bias else (0,)):
            raise ValueError(f"cutlass gemm: bias has shape {bias.shape}; expected ({n},)")
        out_dtype = jnp.dtype(out_dtype)
        if out_dtype not in OUT_DTYPE_CODES or Config(config) not in COMPILED[out_dtype]:
            raise ValueError(f"cutlass gemm: no kernel for out_dtype={out_dtype.name} with config "
                             f"{Config(config).name}; compiled: "
                             f"{ {d.name: [c.name for c in cs] for d, cs in COMPILED.items()} }")
        return ShapedArray((m, n), out_dtype)

    @staticmethod
    def reference(*args, **params):
        raise NotImplementedError(
            "the CUTLASS MXFP8 GEMM runs only on NVIDIA GPUs with compute capability >= 10.0 "
            "(Blackwell, sm_100a), through the CUDA lowering. Prepare the weight for "
            "backend='emulation' (or 'marlin' on SM80-SM90) to run elsewhere")

    @staticmethod
    def cuda_attrs(*, config, out_dtype, has_bias):
        _check_compiled(config, jnp.dtype(out_dtype))
        return {"config": int(config)}

    @staticmethod
    def cuda_workspace(avals_in, avals_out, *, config, out_dtype, has_bias):
        (m, k), n = avals_in[0].shape, avals_in[2].shape[0]
        return workspace_bytes(int(config), jnp.dtype(out_dtype), m, n, k)

    @staticmethod
    def cuda_operands(*, config, out_dtype, has_bias):
        return (0, 1, 2, 3, 4) if has_bias else (0, 1, 2, 3)  # bias is the handler's OptionalArg

    @classmethod
    def batch(cls, args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        moved = tuple(move_to_front(a, d, size) for a, d in zip(args, dims))
        # Swizzled x scales are padded per matrix, so a batch cannot fold into M: one launch each.
        return lax.map(lambda ops: cls.inner.bind(*ops, **params), moved), 0


cutlass_gemm_p = CutlassGemm.inner


def gemm(x_values, x_scales, w_values, w_scales, bias=None, *, out_dtype=jnp.bfloat16,
         config: Config | int | None = None):
    """One CUTLASS launch: out [M, N] = dequant(x) . dequant(w)^T (+ bias).

    x_values [M, K] / w_values [N, K] float8_e4m3fn; x_scales / w_scales the swizzled
    [Mp*Kbp] / [Np*Kbp] uint8 buffers; bias [N] (added in float32). config defaults to
    choose_config(M, out_dtype).
    """
    m = x_values.shape[0]
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in OUT_DTYPE_CODES:
        raise ValueError(f"cutlass: out_dtype {out_dtype.name} is not supported; use bfloat16, "
                         f"float16 or float32")
    config = choose_config(m, out_dtype) if config is None else Config(config)
    has_bias = bias is not None
    bias = jnp.zeros((0,), jnp.float32) if bias is None else jnp.asarray(bias).astype(jnp.float32)
    return CutlassGemm.inner.bind(x_values, x_scales, w_values, w_scales, bias, config=int(config),
                                  out_dtype=out_dtype, has_bias=has_bias)


# ---- the backend -----------------------------------------------------------------------------

def _prepare(values, scales):
    n, k = values.shape
    check_problem(1, n, k)
    mp, kbp = reference.padded_scale_shape(n, k // 32)
    swizzled = swizzle_scales(scales).reshape(mp // ROW_TILE, kbp // 4, ATOM_BYTES)
    return {"values": values, "scales": swizzled}, None


def _unprepare(arrays, meta, shape):
    n, k = shape
    return arrays["values"], unswizzle_scales(arrays["scales"].reshape(-1), n, k // 32)


def _array_axes(meta, shape):
    n, k = shape
    if n % ROW_TILE or k % ROW_TILE:  # padded swizzle atoms: only whole weights
        return {"values": (None, None), "scales": (None, None, None)}
    return {"values": ("n", "k"), "scales": ("n", "k", None)}


def _linear(x, weight, bias, out_dtype, quantize_activations):
    if not quantize_activations:
        raise ValueError("cutlass computes W8A8 only: activations are quantized to MXFP8 "
                         "(quantize_activations=True/None), or use backend='emulation' for W8A16")
    n, k = weight.shape
    m = x.shape[0]
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    # linear() calls this per device (ops/linear.py's body), so x is a local shard: the
    # per-device quantize, not the partitioned one (a K-sharded x is whole here).
    x_values, x_scales = quantize_local(x, rounding="ceil", swizzle=True)
    return gemm(x_values, x_scales, weight.arrays["values"], weight.arrays["scales"].reshape(-1),
                bias, out_dtype=out_dtype)


register_backend(BackendImpl(
    backend=Backend.CUTLASS, min_compute_capability=(10, 0), required_targets=(GEMM_TARGET,),
    default_quantize_activations=True, supports_w8a16=False, supports_w8a8=True,
    prepare=_prepare, unprepare=_unprepare, linear=_linear, array_axes=_array_axes,
    n_tile=ROW_TILE, k_tile=ROW_TILE))
