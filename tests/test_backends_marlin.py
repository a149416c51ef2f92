"""MARLIN backend: packing and plans (any machine), the GEMM and dequantize kernels (GPU),
against the independent float64 reference of docs/numerics.md (tests/oracles/mxfp8.py)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_mxfp8 as mx
from jax_mxfp8.backends import marlin

from helpers import gpu_test, has_cuda_targets, has_gpu, needs_cuda_targets, rel_fro
from oracles import mxfp8 as R

KERNELS = has_gpu() and has_cuda_targets(marlin.GEMM_TARGET, marlin.DEQUANT_TARGET)
needs_kernels = gpu_test(KERNELS, reason="needs an NVIDIA GPU and the Marlin CUDA kernels")
needs_wgmma = gpu_test(KERNELS and marlin.device_has_wgmma(),
                       reason="needs a compute capability 9.0 GPU (H100/H200) and a build "
                              "with sm_90a code (the wgmma kernel)")
SCALE_BYTES = (0, 1, 120, 127, 134, 254)


def random_weight(rng, n, k, spread=3):
    """Finite MX codes (as quantize() makes them) with per-row magnitudes 2^[-spread, spread]."""
    w = rng.standard_normal((n, k)) * np.exp2(rng.integers(-spread, spread + 1, (n, 1)))
    return R.quantize(w, "ceil")


def prepare(codes, scales):
    values = jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn))
    arrays, meta = marlin.pack_weight(values, jnp.asarray(scales))
    return arrays, meta


def poison_device_memory(nbytes):
    """Best effort: fill and free NaN buffers so the next outputs likely land on NaN memory."""
    if nbytes > 0:
        jnp.full((nbytes // 4 + 1,), jnp.nan, jnp.float32).block_until_ready()


# ---- packing, flags, plans: any machine ------------------------------------------------------

@pytest.mark.parametrize("n,k", [(64, 64), (192, 256), (100, 96), (64, 32), (320, 4160)])
def test_prepare_unprepare_identity(n, k, rng, seed):
    codes = rng.integers(0, 256, (n, k), dtype=np.uint8)  # every code, NaN codes included
    scales = rng.integers(0, 256, (n, k // 32), dtype=np.uint8)
    arrays, meta = prepare(codes, scales)
    assert meta[1] % 64 == 0 and meta[2] % 64 == 0
    values, back = marlin.unpack_weight(arrays, meta, (n, k))
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8), codes, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(back), scales, err_msg=f"seed {seed}")


def _codes_as_the_kernel_reads(words):
    """Dequant's bit extraction (ffi/src/marlin_common.cuh), in numpy: each uint32 word -> the
    codes of its bf16 halves r0 = (b0, b2) and r1 = (b1, b3), as [..., 4] in b order."""
    rot = (words >> 4) | (words << 28)
    r0, r1 = words & 0x87F087F0, (rot & 0x87808780) | ((words << 4) & 0x00700070)
    code = lambda half: ((half >> 8) & 0x80) | ((half >> 4) & 0x7F)  # sign, eeee.mmm
    return np.stack([code(r0 & 0xFFFF), code(r1 & 0xFFFF), code(r0 >> 16), code(r1 >> 16)],
                    axis=-1).astype(np.uint8)


def test_packed_layout_is_what_the_kernel_reads(rng, seed):
    """The layout formula of ffi/src/marlin.cu's header and the kernels' bit extraction,
    checked element by element."""
    n, k = 128, 64
    codes = rng.integers(0, 256, (n, k), dtype=np.uint8)
    scales = rng.integers(0, 256, (n, k // 32), dtype=np.uint8)
    arrays, _ = prepare(codes, scales)
    words = np.asarray(arrays["qweight"]).reshape(-1).view("<u4").astype(np.uint32)
    read = _codes_as_the_kernel_reads(words).reshape(-1)
    packed_scales = np.asarray(arrays["scales"])
    kt, nt, h, g, c, w, b = np.meshgrid(*(np.arange(s) for s in (k // 16, n // 64, 2, 8, 4, 4, 4)),
                                        indexing="ij")
    offset = ((((kt * (n // 64) + nt) * 2 + h) * 32 + 4 * g + c) * 16 + 4 * w + b)
    col = 64 * nt + 32 * h + 8 * w + g
    row_k = 16 * kt + 8 * (b & 1) + 2 * c + (b >> 1)
    np.testing.assert_array_equal(read[offset], codes[col, row_k], err_msg=f"seed {seed}")
    grp, nt, g, j = np.meshgrid(*(np.arange(s) for s in (k // 32, n // 64, 8, 8)), indexing="ij")
    np.testing.assert_array_equal(packed_scales[grp, 64 * nt + 8 * g + j], scales[64 * nt + g + 8 * j, grp])


def test_prepared_weight_bytes_per_param():
    codes, scales = random_weight(np.random.default_rng(0), 1024, 2048)
    arrays, _ = prepare(codes, scales)
    nbytes = sum(a.size * a.dtype.itemsize for a in arrays.values())
    assert nbytes / (1024 * 2048) <= 1.04


@pytest.mark.parametrize("poke,general", [(None, 0), ("nan_code", 1), ("scale_135", 1),
                                          ("scale_255", 1), ("scale_134", 0)])
def test_flags_select_the_general_dequantization(poke, general):
    codes, scales = random_weight(np.random.default_rng(1), 64, 64, spread=0)
    if poke == "nan_code":
        codes[3, 5] = 0xFF
    elif poke is not None:
        scales[7, 1] = int(poke.split("_")[1])
    arrays, _ = prepare(codes, scales)
    assert int(arrays["flags"][0]) == general


ZOO_SHAPES = [(64, 64), (192, 320), (512, 2048), (512, 3584), (1024, 4096), (1024, 8192),
              (4096, 4096), (4096, 14336), (3584, 18944), (5120, 25600), (8192, 28672),
              (6144, 4096), (10240, 8192), (28672, 4096), (14336, 4096), (37888, 3584)]


@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 31, 33, 64, 100, 128, 256, 257, 1024, 4096])
@pytest.mark.parametrize("n,k", ZOO_SHAPES)
def test_plans_use_compiled_tiles_and_stay_in_bounds(m, n, k):
    """Any shape and SM count gets a compiled tile that divides N, K splits that keep their
    stage minimum and one wave (or the tiles alone), clusters of <= 8 on GPUs that have them."""
    assert marlin.choose_plan(m, n, k, jnp.float32, sms=132, tune=False).kind == "dequant_dot"
    for sms, clusters, wgmma in ((132, True, True), (132, True, False), (108, False, False),
                                 (78, True, False)):
        for x_dtype in (jnp.bfloat16, jnp.float16):
            plan = marlin.choose_plan(m, n, k, x_dtype, sms=sms, clusters=clusters, wgmma=wgmma,
                                      tune=False)
            assert not plan.cluster or (clusters and 1 < plan.splits <= marlin.MAX_CLUSTER_SPLITS)
            if plan.kind == "dequant_dot":
                assert x_dtype == jnp.bfloat16 and m >= 257
                continue
            if plan.kind == "wgmma":
                assert wgmma and x_dtype == jnp.bfloat16 and m > marlin.WGMMA_MIN_M
                config = marlin.wgmma_config(plan.block_m, plan.consumers, plan.blocks_per_sm)
                assert n % (64 * plan.consumers) == 0 and plan.block_m <= max(64, -(-m // 64) * 64)
                tiles = n // (64 * plan.consumers) * -(-m // plan.block_m)
                assert plan.splits == 1 or tiles * plan.splits <= sms * config.blocks_per_sm
                assert plan.splits == 1 or k // 64 // plan.splits >= 8
                continue
            assert plan.kind == "kernel"
            tile = marlin.Tile(plan.m_blocks, plan.warps_n)
            assert tile in marlin.TILE_CONFIGS and n % (64 * tile.warps_n) == 0
            assert 16 * plan.m_blocks >= min(m, 64) and plan.m_blocks == 4 or 16 * plan.m_blocks >= m
            assert plan.splits == 1 or (m <= 128 and k // 64 // plan.splits >= 6)


@pytest.mark.parametrize("m,n,k,want", [
    # H200 calibration (docs/performance.md): the fastest plan of its cell, or within 5 %
    (1, 1024, 4096, "t11x8c"), (16, 4096, 14336, "t14x16"), (1, 8192, 28672, "t14x8"),
    (1, 28672, 4096, "t14x2c"), (1, 10240, 8192, "t14x8c"), (32, 4096, 14336, "t24x16"),
    (64, 8192, 28672, "w64x4s4"), (64, 28672, 4096, "w64x4"), (256, 8192, 28672, "w256x2s2c"),
    (256, 4096, 4096, "w128x2s2c"), (256, 1024, 4096, "w128x2s8"), (1024, 4096, 14336, "w256x2"),
    (1024, 1024, 4096, "dequant_dot")])
def test_rule_picks_the_h200_calibration_winners(m, n, k, want):
    plan = marlin.choose_plan(m, n, k, jnp.bfloat16, sms=132, clusters=True, wgmma=True, tune=False)
    assert marlin.plan_name(plan) == want


def test_every_rule_plan_is_a_candidate():
    """The autotuner and the calibration sweep time `candidates`: the rule never picks a plan
    outside them (powers of two and the compiled tiles), so the data covers what runs."""
    for n, k in ZOO_SHAPES:
        for m in (1, 8, 16, 32, 64, 128, 256, 512, 1024):
            plan = marlin.choose_plan(m, n, k, jnp.bfloat16, sms=132, clusters=True, wgmma=True,
                                      tune=False)
            names = {marlin.plan_name(p) for p in marlin.candidates(m, n, k, 132, True, True)}
            assert plan.kind == "wgmma" and m <= 128 or marlin.plan_name(plan) in names, (m, n, k, plan)


def test_autotune_measures_once_and_reads_its_cache(tmp_path, monkeypatch):
    """With JAX_MXFP8_AUTOTUNE=1 the first trace of a shape class times the candidates (here a
    fake timer picks the last), stores the winner, and later calls read it without timing."""
    from jax_mxfp8.backends.marlin import autotune
    monkeypatch.setenv("JAX_MXFP8_AUTOTUNE", "1")
    monkeypatch.setenv("JAX_MXFP8_AUTOTUNE_CACHE", str(tmp_path / "cache.json"))
    monkeypatch.setattr(autotune, "_MEMORY", {})
    timed = []

    def fake_fastest(key, cases):
        timed.append(key)
        return list(cases)[-1]
    monkeypatch.setattr(autotune, "fastest", fake_fastest)
    first = marlin.choose_plan(5, 256, 512, jnp.bfloat16, sms=132, clusters=True, wgmma=False)
    again = marlin.choose_plan(8, 256, 512, jnp.bfloat16, sms=132, clusters=True, wgmma=False)
    assert first == again and len(timed) == 1 and "256x512|m8" in timed[0]
    monkeypatch.setattr(autotune, "_MEMORY", {})  # a new process reads the file
    assert marlin.choose_plan(7, 256, 512, jnp.bfloat16, sms=132, clusters=True, wgmma=False) == first
    assert len(timed) == 1
    monkeypatch.setenv("JAX_MXFP8_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="JAX_MXFP8_AUTOTUNE"):
        marlin.choose_plan(7, 256, 512, jnp.bfloat16, sms=132)


def test_primitive_reference_lowering_matches_float64(rng, seed):
    """The jnp lowering (CPU and any non-CUDA platform) computes the same math."""
    codes, scales = random_weight(rng, 128, 256)
    arrays, _ = prepare(codes, scales)
    x = rng.standard_normal((5, 256)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(128).astype(np.float32)
    cpu = jax.devices("cpu")[0]
    arrays, x_cpu, b_cpu = jax.device_put((arrays, x, bias), cpu)
    f = jax.jit(lambda x, b, a: marlin.gemm(x, a["qweight"], a["scales"], a["flags"], b,
                                            m_blocks=1, warps_n=2, splits=2, out_dtype=jnp.float32))
    y = f(x_cpu, b_cpu, arrays)
    assert rel_fro(y, R.linear(x, codes, scales, bias)) <= 1e-5, f"seed {seed}"
    yb = jax.jit(jax.vmap(lambda xi, a: marlin.gemm(xi, a["qweight"], a["scales"], a["flags"],
                                                    m_blocks=1, warps_n=1, splits=1,
                                                    out_dtype=jnp.float32), in_axes=(0, None)))(
        jax.device_put(np.stack([x, x]), cpu), arrays)
    np.testing.assert_allclose(np.asarray(yb[1]), R.linear(x, codes, scales), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("x_dtype,m", [(np.float32, 5), (ml_dtypes.bfloat16, 3), (ml_dtypes.bfloat16, 300)])
def test_padded_shapes_through_backend_linear(x_dtype, m, rng, seed):
    """N and K not multiples of 64: prepare pads, linear pads x along K and slices y (both
    plans; jnp lowerings on CPU)."""
    n, k = 100, 96
    codes, scales = random_weight(rng, n, k)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        arrays, meta = prepare(codes, scales)
        weight = mx.MxWeight(arrays, (n, k), "marlin", meta)
        x = rng.standard_normal((m, k)).astype(x_dtype)
        bias = rng.standard_normal(n).astype(np.float32)
        y = jax.jit(lambda x, w, b: marlin._linear(x, w, b, jnp.float32, False))(x, weight, bias)
    assert y.shape == (m, n)
    assert rel_fro(y, R.linear(x, codes, scales, bias)) <= 1e-5, f"seed {seed}"


def test_cluster_split_limit_is_checked():
    arrays, _ = prepare(*random_weight(np.random.default_rng(4), 64, 1024))
    x = jnp.zeros((2, 1024), jnp.bfloat16)
    with pytest.raises(ValueError, match="at most 8 K splits"):
        marlin.gemm(x, arrays["qweight"], arrays["scales"], arrays["flags"], m_blocks=1, warps_n=1,
                    splits=16, cluster=True, out_dtype=jnp.bfloat16)


@pytest.mark.parametrize("n,k,slice_bytes", [(28672, 8192, 64 << 20), (8192, 8192, 64 << 20),
                                             (4096, 4096, 64 << 20), (192, 64, 8192), (64, 64, 1)])
def test_dequant_slices_tile_the_columns_within_the_budget(n, k, slice_bytes):
    sl = marlin.dequant_slices(n, k, 1024, slice_bytes, whole_bytes=0)
    assert sl[0][0] == 0 and sum(r for _, r in sl) == n
    assert all(b + r == nb for (b, r), (nb, _) in zip(sl, sl[1:]))
    assert all(r % 64 == 0 and r > 0 and (r * k * 2 <= slice_bytes or r == 64) for _, r in sl)


@pytest.mark.parametrize("x_dtype", [ml_dtypes.bfloat16, np.float32])
def test_sliced_dequant_dot_matches_float64(x_dtype, rng, seed):
    """The large-M path in four column slices (jnp lowerings on CPU), bias split with them."""
    n, k, m = 256, 128, 9
    codes, scales = random_weight(rng, n, k)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        arrays, _ = prepare(codes, scales)
        x = rng.standard_normal((m, k)).astype(x_dtype)
        bias = rng.standard_normal(n).astype(np.float32)
        slices = marlin.dequant_slices(n, k, m, 64 * k * 2, whole_bytes=0)
        assert len(slices) == 4
        y = jax.jit(lambda x, a, b: marlin.dequant_dot(x, a, b, jnp.float32, slices))(x, arrays, bias)
    assert rel_fro(y, R.linear(x, codes, scales, bias)) <= 1e-5, f"seed {seed}"


def test_only_large_weights_are_sliced():
    assert marlin.dequant_slices(14336, 4096, 1024) == [(0, 14336)]  # 112 MiB of bf16: whole
    assert marlin.dequant_slices(28672, 8192, 1024) == [(4096 * i, 4096) for i in range(7)]
    assert marlin.dequant_slices(28672, 8192, 4096) == [(0, 28672)]  # measured slower sliced


def test_dequantize_slice_bounds_are_checked():
    arrays, _ = prepare(*random_weight(np.random.default_rng(3), 128, 64))
    with pytest.raises(ValueError, match="not whole 64-column tiles"):
        marlin.dequantize_packed(arrays["qweight"], arrays["scales"], 64, 128)
    with pytest.raises(ValueError, match="not whole 64-column tiles"):
        marlin.dequantize_packed(arrays["qweight"], arrays["scales"], 32, 64)


@needs_cuda_targets(marlin.GEMM_TARGET, reason="CUDA module not built")
def test_lowers_to_custom_calls():
    arrays, _ = prepare(*random_weight(np.random.default_rng(2), 64, 64))
    x = jax.ShapeDtypeStruct((3, 64), jnp.bfloat16)
    gemm = jax.jit(lambda x: marlin.gemm(x, arrays["qweight"], arrays["scales"], arrays["flags"],
                                         m_blocks=1, warps_n=1, splits=1, out_dtype=jnp.bfloat16))
    assert "jax_mxfp8_marlin_gemm_cuda_v1" in gemm.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    dq = jax.jit(lambda: marlin.dequantize_packed(arrays["qweight"], arrays["scales"]))
    assert "jax_mxfp8_marlin_dequantize_cuda_v1" in dq.trace().lower(lowering_platforms=("cuda",)).as_text()


# ---- kernels on the GPU ----------------------------------------------------------------------

def run_gemm(x, arrays, bias, *, tile, splits, out_dtype, cluster=False):
    poison_device_memory(x.shape[0] * arrays["scales"].shape[1] * 4)
    tile = marlin.Tile(*tile)
    f = jax.jit(lambda x, b: marlin.gemm(x, arrays["qweight"], arrays["scales"], arrays["flags"], b,
                                         m_blocks=tile.m_blocks, warps_n=tile.warps_n, splits=splits,
                                         cluster=cluster, out_dtype=out_dtype))
    return np.asarray(f(x, bias).astype(jnp.float32))


LINEAR_CASES = ([(m, n, k) for m in (1, 2, 3, 7, 16, 31, 64, 100, 256, 1024, 4096)
                 for n, k in ((64, 64), (192, 320), (4096, 1024))]
                + [(m, 1024, 4096) for m in (1, 16, 64, 256)])


@needs_kernels
@pytest.mark.parametrize("case", range(len(LINEAR_CASES)))
def test_linear_marlin_vs_float64(case, rng, seed):
    m, n, k = LINEAR_CASES[case]
    with_bias = case % 2 == 1
    codes, scales = random_weight(rng, n, k)
    weight = mx.prepare_weight(jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn)), jnp.asarray(scales),
                               backend="marlin")
    x = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(n).astype(ml_dtypes.bfloat16) if with_bias else None
    poison_device_memory(m * n * 4)
    y = jax.jit(mx.linear)(x, weight, bias)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    y = np.asarray(y.astype(jnp.float32))
    assert np.all(np.isfinite(y)), f"seed {seed}"
    assert rel_fro(y, R.linear(x, codes, scales, bias)) <= 1e-2, f"seed {seed}"


def check_fp32_gemm(rng, run, n, k, ms):
    """run(x, arrays, bias) -> fp32 y on a fresh weight, x and bias per M, against float64."""
    codes, scales = random_weight(rng, n, k)
    arrays, _ = prepare(codes, scales)
    for m in ms:
        x = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
        bias = rng.standard_normal(n).astype(np.float32)
        assert rel_fro(run(x, arrays, bias), R.linear(x, codes, scales, bias)) <= 1e-4, f"m {m}"


@needs_kernels
@pytest.mark.parametrize("tile", marlin.TILE_CONFIGS)
@pytest.mark.parametrize("splits,cluster", [(1, False), (3, False), (3, True), (8, True), (12, False)])
@pytest.mark.parametrize("m", [1, 17, 100, 300])
def test_every_tile_and_split(tile, splits, cluster, m, rng):
    check_fp32_gemm(rng, lambda x, arrays, bias: run_gemm(x, arrays, bias, tile=tile, splits=splits,
                                                          cluster=cluster, out_dtype=jnp.float32),
                    512, 1536, [m])


@needs_kernels
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("tile", [(1, 1), (2, 4), (4, 4)])
def test_fp16_activations_are_exact_inputs(tile, out_dtype, rng, seed):
    """fp16 x is split into bf16 hi + lo in the kernel: the result matches the fp32 math."""
    n, k, m = 256, 512, 40
    # wide weight range for fp32 outputs; narrower where the output itself is fp16/bf16
    codes, scales = random_weight(rng, n, k, spread=8 if out_dtype == jnp.float32 else 2)
    arrays, _ = prepare(codes, scales)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float16)
    bias = rng.standard_normal(n).astype(np.float16)
    y = run_gemm(x, arrays, bias, tile=tile, splits=2, out_dtype=out_dtype)
    tol = 1e-4 if out_dtype == jnp.float32 else 1e-2
    assert rel_fro(y, R.linear(x, codes, scales, bias)) <= tol, f"seed {seed}"


def exhaustive_weight(scale_bytes):
    """K = 256: every row holds all 256 codes (rolled per row) with one scale byte per row."""
    n = 256
    codes = np.stack([np.roll(np.arange(256, dtype=np.uint8), 37 * r) for r in range(n)])
    scales = np.array([[scale_bytes[r % len(scale_bytes)]] * 8 for r in range(n)], np.uint8)
    return codes, scales


@needs_kernels
@pytest.mark.parametrize("scale_bytes,general", [(SCALE_BYTES, 1), (SCALE_BYTES[:5], 0)])
def test_exhaustive_dequantize_kernel(scale_bytes, general):
    codes, scales = exhaustive_weight(scale_bytes)
    if not general:
        codes = np.where((codes & 0x7F) == 0x7F, 0, codes).astype(np.uint8)
    arrays, _ = prepare(codes, scales)
    assert int(arrays["flags"][0]) == general
    got = np.asarray(marlin.dequantize_packed(arrays["qweight"], arrays["scales"]))
    want = R.dequantize(codes, scales, ml_dtypes.bfloat16)
    # bit for bit, subnormal bf16 results included; NaN where the reference is NaN
    np.testing.assert_array_equal(got.view(np.uint16)[~np.isnan(want)], want.view(np.uint16)[~np.isnan(want)])
    assert np.array_equal(np.isnan(got), np.isnan(want))


@needs_kernels
def test_sliced_dequant_dot_on_the_gpu_matches_float64(rng, seed):
    """The large-M path in column slices (CUDA dequantize per slice + cuBLAS), bias with it."""
    n, k, m = 448, 256, 300
    codes, scales = random_weight(rng, n, k)
    arrays, _ = prepare(codes, scales)
    x = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(n).astype(ml_dtypes.bfloat16)
    slices = marlin.dequant_slices(n, k, m, 128 * k * 2, whole_bytes=0)
    assert len(slices) == 4 and {r for _, r in slices} == {64, 128}  # uneven slices too
    poison_device_memory(m * n * 4)
    y = jax.jit(lambda x, a, b: marlin.dequant_dot(x, a, b, jnp.bfloat16, slices))(x, arrays, bias)
    assert rel_fro(np.asarray(y.astype(jnp.float32)), R.linear(x, codes, scales, bias)) <= 1e-2, f"seed {seed}"


@needs_kernels
def test_dequantize_kernel_column_slices_are_exact():
    codes, scales = exhaustive_weight(SCALE_BYTES)
    arrays, _ = prepare(codes, scales)
    want_all = R.dequantize(codes, scales, ml_dtypes.bfloat16)
    for n_begin, rows in ((0, 64), (64, 128), (192, 64)):
        poison_device_memory(rows * 256 * 2)
        got = np.asarray(marlin.dequantize_packed(arrays["qweight"], arrays["scales"], n_begin, rows))
        want = want_all[n_begin:n_begin + rows]
        nan = np.isnan(want)  # NaN where the reference is NaN (payloads may differ)
        assert np.array_equal(np.isnan(got), nan)
        np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


def check_exhaustive_through(run, scale_bytes, general, kernel):
    """x = identity picks every weight element alone: run(x, arrays)[m, n] must equal
    dequantize(W)[n, m] bit for bit, for all 256 codes x the scale bytes (bf16-subnormal
    weights included); one NaN weight column on the general path."""
    codes, scales = exhaustive_weight(scale_bytes)
    want_w = R.dequantize(codes, scales, np.float64)
    # Non-finite weights would turn whole output columns into NaN (0 * Inf): checked below.
    codes = np.where(np.isfinite(want_w) & (np.abs(want_w) < 2.0**128), codes, 0).astype(np.uint8)
    if general:
        codes[:, 255] = np.where(np.arange(256) == 5, 0x7F, codes[:, 255])  # one NaN column
    arrays, _ = prepare(codes, scales)
    assert int(arrays["flags"][0]) == general
    y = run(np.eye(256, dtype=ml_dtypes.bfloat16), arrays)
    want = R.dequantize(codes, scales, ml_dtypes.bfloat16).astype(np.float32).T
    nan_cols = np.isnan(want).any(axis=0)
    assert np.all(np.isnan(y[:, nan_cols])) and nan_cols.sum() == general
    got, want = y[:, ~nan_cols], want[:, ~nan_cols]
    normal = np.abs(want) >= 2.0**-126
    np.testing.assert_array_equal(got[normal], want[normal])
    np.testing.assert_array_equal(got[~normal], want[~normal],
                                  err_msg=f"bf16-subnormal weights are not exact through {kernel}")


@needs_kernels
@pytest.mark.parametrize("scale_bytes,general", [(SCALE_BYTES, 1), (SCALE_BYTES[:5], 0)])
@pytest.mark.parametrize("tile", [(1, 1), (4, 4)])
def test_exhaustive_through_the_gemm(scale_bytes, general, tile):
    check_exhaustive_through(
        lambda x, arrays: run_gemm(x, arrays, None, tile=tile, splits=1, out_dtype=jnp.bfloat16),
        scale_bytes, general, "mma.sync")


@needs_kernels
@pytest.mark.parametrize("tile", [(1, 1), (1, 4)])
def test_deterministic_run_to_run(tile, rng):
    codes, scales = random_weight(rng, 1024, 4096)
    arrays, _ = prepare(codes, scales)
    x = rng.standard_normal((16, 4096)).astype(ml_dtypes.bfloat16)
    results = {}
    for splits, cluster in ((8, False), (8, True), (2, True), (16, False)):
        runs = [run_gemm(x, arrays, None, tile=tile, splits=splits, cluster=cluster,
                         out_dtype=jnp.float32) for _ in range(3)]
        assert all(np.array_equal(runs[0], r) for r in runs[1:]), f"splits={splits}, cluster={cluster}"
        results[splits, cluster] = runs[0]
    # the two reductions add the same partials in the same order
    assert np.array_equal(results[8, False], results[8, True])


@needs_kernels
@pytest.mark.skipif(not (KERNELS and marlin.device_has_clusters()), reason="needs an SM90+ GPU")
def test_cluster_and_plain_launches_of_one_tile_interleave(rng, seed):
    """One tile launched with a cluster (larger shared memory), then plainly, then with a
    cluster again: the plain launch must not lower the kernel's shared-memory limit under the
    cluster launch's (seen on an H200: 'invalid argument' on the third launch)."""
    codes, scales = random_weight(rng, 256, 1024)
    arrays, _ = prepare(codes, scales)
    x = rng.standard_normal((100, 1024)).astype(ml_dtypes.bfloat16)
    want = R.linear(x, codes, scales)
    for cluster in (True, False, True):
        y = run_gemm(x, arrays, None, tile=(4, 2), splits=2, cluster=cluster, out_dtype=jnp.float32)
        assert rel_fro(y, want) <= 1e-4, f"cluster={cluster}, seed {seed}"


@needs_kernels
def test_fp32_activations_take_the_dequantize_path(rng, seed):
    codes, scales = random_weight(rng, 128, 256)
    weight = mx.prepare_weight(jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn)), jnp.asarray(scales),
                               backend="marlin")
    x = rng.standard_normal((3, 4, 256)).astype(np.float32)
    y = jax.jit(mx.linear)(x, weight)
    assert y.shape == (3, 4, 128) and y.dtype == jnp.float32
    assert rel_fro(y.reshape(12, 128), R.linear(x.reshape(12, 256), codes, scales)) <= 1e-5, f"seed {seed}"


@needs_kernels
def test_unprepare_on_device_round_trip(rng):
    codes = rng.integers(0, 256, (192, 640), dtype=np.uint8)
    scales = rng.integers(0, 256, (192, 20), dtype=np.uint8)
    weight = mx.prepare_weight(jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn)), jnp.asarray(scales),
                               backend="marlin")
    values, back = weight.unpack()
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8), codes)
    np.testing.assert_array_equal(np.asarray(back), scales)


# ---- the sm_90a wgmma kernel (ffi/src/marlin_sm90.cu) ----------------------------------------

@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (8192, 8192), (28672, 8192), (192, 320),
                                 (64, 64)])
def test_wgmma_runs_bf16_above_32_rows_only(n, k):
    for m in (33, 64, 65, 100, 128, 129, 256, 1024, 4096, 16384):
        plan = marlin.choose_plan(m, n, k, jnp.bfloat16, sms=132, wgmma=True, tune=False)
        assert plan.kind in ("wgmma", "dequant_dot"), (m, plan)
        assert plan.kind == "wgmma" or m >= 1024  # dequant_dot only for large M on small weights
    for m in (1, 16, marlin.WGMMA_MIN_M):  # small M stays on the mma.sync kernel
        assert marlin.choose_plan(m, n, k, jnp.bfloat16, sms=132, wgmma=True, tune=False).kind == "kernel"
    for dtype in (jnp.float16, jnp.float32):  # wgmma takes bf16 x only
        assert marlin.choose_plan(512, n, k, dtype, sms=132, wgmma=True, tune=False).kind != "wgmma"
    assert marlin.choose_plan(512, n, k, jnp.bfloat16, sms=132, wgmma=False, tune=False).kind != "wgmma"


def test_wgmma_plans_at_m64_and_m128_match_the_h200_sweep():
    """The plans the H200 sweeps (2026-11-30, docs/performance.md) found fastest or within 5 %: the
    largest block, K splits up to one wave, cluster sums for pairs and small grids, the
    workspace otherwise."""
    want = {64: {(28672, 8192): (1, False), (14336, 4096): (2, True), (8192, 8192): (4, False),
                 (4096, 4096): (8, False)},
            128: {(28672, 8192): (1, False), (14336, 4096): (1, False), (8192, 8192): (2, True),
                  (4096, 4096): (4, False)}}
    for m, block in ((64, (64, 4, 1)), (128, (128, 2, 1))):
        for (n, k), (splits, cluster) in want[m].items():
            plan = marlin.choose_plan(m, n, k, jnp.bfloat16, sms=132, wgmma=True)
            assert (plan.block_m, plan.consumers, plan.blocks_per_sm) == block, (m, n, k, plan)
            assert (plan.splits, plan.cluster) == (splits, cluster), (m, n, k, plan)


def test_wgmma_reference_lowering_and_vmap_match_float64(rng, seed):
    """The jnp lowering of the wgmma primitive (CPU), and vmap folding the batch into M."""
    codes, scales = random_weight(rng, 128, 192)
    cpu = jax.devices("cpu")[0]
    arrays, _ = prepare(codes, scales)
    x = rng.standard_normal((2, 5, 192)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(128).astype(np.float32)
    arrays, x_cpu, b_cpu = jax.device_put((arrays, x, bias), cpu)
    f = jax.jit(jax.vmap(lambda xi, a, b: marlin.gemm_sm90(
        xi, a["qweight"], a["scales"], a["flags"], b, block_m=64, consumers=2,
        out_dtype=jnp.float32), in_axes=(0, None, None)))
    y = f(x_cpu, arrays, b_cpu)
    assert y.shape == (2, 5, 128)
    assert rel_fro(y.reshape(10, 128), R.linear(x.reshape(10, 192), codes, scales, bias)) <= 1e-5, f"seed {seed}"


def test_wgmma_rejects_bad_inputs():
    arrays, _ = prepare(*random_weight(np.random.default_rng(5), 64, 128))
    a = (arrays["qweight"], arrays["scales"], arrays["flags"])
    deep, _ = prepare(*random_weight(np.random.default_rng(5), 64, 1024))
    wide = (deep["qweight"], deep["scales"], deep["flags"])
    with pytest.raises(TypeError, match="bf16 activations"):
        marlin.gemm_sm90(jnp.zeros((2, 128), jnp.float16), *a, block_m=64, consumers=1,
                         out_dtype=jnp.float16)
    with pytest.raises(ValueError, match="N % 128 == 0"):  # 64 weight rows, two consumers
        marlin.gemm_sm90(jnp.zeros((2, 128), jnp.bfloat16), *a, block_m=64, consumers=2,
                         out_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="not compiled"):
        marlin.gemm_sm90(jnp.zeros((2, 128), jnp.bfloat16), *a, block_m=96, consumers=1,
                         out_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="not compiled"):
        marlin.gemm_sm90(jnp.zeros((2, 128), jnp.bfloat16), *a, block_m=64, consumers=1,
                         blocks_per_sm=3, out_dtype=jnp.bfloat16)
    for splits in (0, 3):  # K = 128: two 64-deep stages to split at most
        with pytest.raises(ValueError, match=f"splits={splits} must be in"):
            marlin.gemm_sm90(jnp.zeros((2, 128), jnp.bfloat16), *a, block_m=64, consumers=1,
                             splits=splits, out_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="splits=9 must be in .* with cluster=True"):  # cluster size
        marlin.gemm_sm90(jnp.zeros((2, 1024), jnp.bfloat16), *wide, block_m=64, consumers=1,
                         splits=9, cluster=True, out_dtype=jnp.bfloat16)


@needs_cuda_targets(marlin.WGMMA_TARGET, reason="CUDA module not built")
def test_wgmma_lowers_to_its_custom_call():
    arrays, _ = prepare(*random_weight(np.random.default_rng(6), 128, 64))
    x = jax.ShapeDtypeStruct((3, 64), jnp.bfloat16)
    f = jax.jit(lambda x: marlin.gemm_sm90(x, arrays["qweight"], arrays["scales"], arrays["flags"],
                                           block_m=128, consumers=2, out_dtype=jnp.bfloat16))
    assert "jax_mxfp8_marlin_wgmma_cuda_v1" in f.trace(x).lower(lowering_platforms=("cuda",)).as_text()


def run_wgmma(x, arrays, bias, *, config, out_dtype, splits=1, cluster=False):
    poison_device_memory(x.shape[0] * arrays["scales"].shape[1] * 4)
    config = marlin.wgmma_config(*config)
    f = jax.jit(lambda x, b: marlin.gemm_sm90(x, arrays["qweight"], arrays["scales"], arrays["flags"],
                                              b, block_m=config.block_m, consumers=config.consumers,
                                              blocks_per_sm=config.blocks_per_sm, splits=splits,
                                              cluster=cluster, out_dtype=out_dtype))
    return np.asarray(f(x, bias).astype(jnp.float32))


@needs_wgmma
@pytest.mark.parametrize("config", marlin.WGMMA_CONFIGS)
@pytest.mark.parametrize("m", [1, 5, 64, 100, 129, 256, 300, 1000])
def test_wgmma_every_config_vs_float64(config, m, rng, seed):
    """K = 1536 cycles every stage ring several times; M tails inside a block and across blocks."""
    n, k = 768, 1536  # a multiple of every config's block width (256 at most)
    codes, scales = random_weight(rng, n, k)
    arrays, _ = prepare(codes, scales)
    x = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(n).astype(np.float32)
    y = run_wgmma(x, arrays, bias, config=config, out_dtype=jnp.float32)
    assert rel_fro(y, R.linear(x, codes, scales, bias)) <= 1e-4, f"seed {seed}"


@needs_wgmma
@pytest.mark.parametrize("config", marlin.WGMMA_CONFIGS)
@pytest.mark.parametrize("splits,cluster", [(2, True), (3, True), (8, True), (2, False), (5, False),
                                            (24, False)])
def test_wgmma_k_splits_vs_float64(config, splits, cluster, rng):
    """K split among blocks (24 stages: 12 each; 8 each; 3 each; 5 uneven; 1 each), summed in
    a cluster through distributed shared memory or through the workspace - shared by the
    tile's blocks where the grid fits at once, by its last block where it does not (24 splits
    at M = 300); M tails inside a block and across blocks."""
    check_fp32_gemm(rng, lambda x, arrays, bias: run_wgmma(x, arrays, bias, config=config, splits=splits,
                                                           cluster=cluster, out_dtype=jnp.float32),
                    768, 1536, (1, 100, 300))  # N: a multiple of every config's block width


@needs_wgmma
@pytest.mark.parametrize("n,k,config", [(64, 64, (64, 1)), (256, 128, (64, 4)), (128, 64, (256, 2)),
                                        (128, 128, (128, 2)),
                                        (192, 320, (128, 1)), (4096, 1024, (256, 2))])
@pytest.mark.parametrize("out_dtype,bias_dtype", [(jnp.bfloat16, ml_dtypes.bfloat16),
                                                  (jnp.float16, np.float16),
                                                  (jnp.bfloat16, None)])
def test_wgmma_shapes_and_output_dtypes(n, k, config, out_dtype, bias_dtype, rng, seed):
    codes, scales = random_weight(rng, n, k, spread=2)
    arrays, _ = prepare(codes, scales)
    m = 77
    x = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    bias = None if bias_dtype is None else rng.standard_normal(n).astype(bias_dtype)
    y = run_wgmma(x, arrays, bias, config=config, out_dtype=out_dtype)
    assert np.all(np.isfinite(y)), f"seed {seed}"
    assert rel_fro(y, R.linear(x, codes, scales, bias)) <= 1e-2, f"seed {seed}"


@needs_wgmma
@pytest.mark.parametrize("scale_bytes,general", [(SCALE_BYTES, 1), (SCALE_BYTES[:5], 0)])
@pytest.mark.parametrize("config,splits,cluster", [((64, 1), 1, False), ((256, 2), 1, False),
                                                  ((64, 2, 2), 2, True), ((128, 1), 3, False)])
def test_wgmma_exhaustive_through_the_gemm(scale_bytes, general, config, splits, cluster):
    check_exhaustive_through(
        lambda x, arrays: run_wgmma(x, arrays, None, config=config, splits=splits,
                                    cluster=cluster, out_dtype=jnp.float32),
        scale_bytes, general, "wgmma")


@needs_wgmma
def test_wgmma_deterministic_and_equal_to_the_mma_sync_kernel(rng, seed):
    """Run to run bitwise; K splits summed in a cluster and through the workspace bitwise equal
    (the same partials added in the same order); against the mma.sync kernel (same fp32
    products, summed in another order) within fp32 rounding."""
    codes, scales = random_weight(rng, 1024, 4096)
    arrays, _ = prepare(codes, scales)
    x = rng.standard_normal((200, 4096)).astype(ml_dtypes.bfloat16)
    runs = [run_wgmma(x, arrays, None, config=(256, 2), out_dtype=jnp.float32) for _ in range(3)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    summed = {}
    for cluster in (True, False):  # partials summed in split order, in the cluster or the workspace
        split = [run_wgmma(x, arrays, None, config=(64, 2, 2), splits=4, cluster=cluster,
                           out_dtype=jnp.float32) for _ in range(3)]
        assert all(np.array_equal(split[0], r) for r in split[1:])
        assert rel_fro(split[0], runs[0].astype(np.float64)) <= 1e-5, f"seed {seed}"
        summed[cluster] = split[0]
    assert np.array_equal(summed[True], summed[False])
    mma = run_gemm(x, arrays, None, tile=(4, 2), splits=1, out_dtype=jnp.float32)
    assert rel_fro(runs[0], mma.astype(np.float64)) <= 1e-5, f"seed {seed}"


@needs_wgmma
def test_linear_takes_the_wgmma_kernel_above_the_threshold(rng, seed):
    n, k = 1024, 2048
    codes, scales = random_weight(rng, n, k)
    weight = mx.prepare_weight(jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn)), jnp.asarray(scales),
                               backend="marlin")
    m = 50
    x = rng.standard_normal((3, m, k)).astype(ml_dtypes.bfloat16)  # leading dims fold into M
    assert marlin.choose_plan(3 * m, n, k, jnp.bfloat16).kind == "wgmma"
    text = jax.jit(mx.linear).lower(x, weight).as_text()
    assert marlin.WGMMA_TARGET in text
    y = np.asarray(jax.jit(mx.linear)(x, weight).astype(jnp.float32)).reshape(3 * m, n)
    assert rel_fro(y, R.linear(x.reshape(3 * m, k), codes, scales)) <= 1e-2, f"seed {seed}"
