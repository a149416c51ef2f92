"""The grouped kernels (ffi/src/marlin.cu, MarlinGroupedGemmKernel: mma.sync; marlin_sm90.cu,
MarlinWgmmaKernel<..., kGrouped>: wgmma on sm_90a): x's rows grouped by expert against a
stacked packed weight, ragged_dot semantics, against the float64 oracle; their plan (any
machine)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_mxfp8.backends import marlin
from jax_mxfp8.backends.marlin import planner

from helpers import gpu_marks, gpu_test, has_cuda_targets, has_gpu, rel_fro
from oracles import mxfp8 as R
from test_backends_marlin import SCALE_BYTES, exhaustive_weight, poison_device_memory, random_weight

GROUPED = has_gpu() and has_cuda_targets(marlin.kernels.GROUPED_TARGET)
GROUPED_REASON = "needs an NVIDIA GPU and the grouped Marlin kernel"
needs_grouped = gpu_test(GROUPED, GROUPED_REASON)
GROUPED_WGMMA = GROUPED and has_cuda_targets(marlin.GROUPED_WGMMA_TARGET) and marlin.device_has_wgmma()
WGMMA_REASON = "needs an H100/H200 and the grouped wgmma kernel"
needs_grouped_wgmma = gpu_test(GROUPED_WGMMA, WGMMA_REASON)


def stack(weights):
    """[(codes, scales)] per expert -> the stacked packed arrays (each expert packed alone)."""
    packed = [marlin.pack_weight(jnp.asarray(c.view(ml_dtypes.float8_e4m3fn)), jnp.asarray(s))[0]
              for c, s in weights]
    return {name: jnp.stack([p[name] for p in packed]) for name in ("qweight", "scales", "flags")}


def run_grouped(x, arrays, group_sizes, bias=None, *, tile=None, splits=1, cluster=False,
                wgmma=None, out_dtype=jnp.float32):
    """The mma.sync grouped kernel at `tile` (m_blocks, warps_n), or with wgmma=(block_m,
    consumers, blocks_per_sm) the wgmma one."""
    poison_device_memory(x.shape[0] * arrays["scales"].shape[-1] * 4)
    q, s, fl = arrays["qweight"], arrays["scales"], arrays["flags"]
    if wgmma is not None:
        bm, c, bps = wgmma
        f = jax.jit(lambda x, gs, b: marlin.grouped_gemm_sm90(
            x, q, s, fl, gs, b, block_m=bm, consumers=c, blocks_per_sm=bps, out_dtype=out_dtype))
    else:
        mb, wn = tile
        f = jax.jit(lambda x, gs, b: marlin.grouped_gemm(
            x, q, s, fl, gs, b, m_blocks=mb, warps_n=wn, splits=splits, cluster=cluster,
            out_dtype=out_dtype))
    return np.asarray(f(x, jnp.asarray(group_sizes, jnp.int32), bias).astype(jnp.float32))


def grouped_reference(x, weights, group_sizes, bias=None):
    """float64: rows of group e times expert e (+ bias[e]); rows past the groups' sum zero."""
    out = np.zeros((x.shape[0], weights[0][0].shape[0]))
    start = 0
    for e, g in enumerate(group_sizes):
        end = min(start + max(int(g), 0), x.shape[0])
        if end > start:
            out[start:end] = R.linear(x[start:end], *weights[e],
                                      None if bias is None else np.asarray(bias[e], np.float64))
        start = end
    return out


# ---- the plan: any machine -------------------------------------------------------------------

@pytest.mark.parametrize("t,experts", [(1, 8), (8, 128), (64, 8), (512, 128), (4096, 8), (32768, 128)])
@pytest.mark.parametrize("n,k", [(1536, 2048), (2048, 768), (28672, 4096), (4096, 14336), (64, 64)])
def test_ragged_plan_is_a_compiled_tile_in_bounds(t, experts, n, k):
    plan = planner.ragged_plan(t, experts, n, k, jnp.bfloat16, sms=132, clusters=True, wgmma=False)
    assert plan.kind == "kernel" and marlin.Tile(plan.m_blocks, plan.warps_n) in marlin.TILE_CONFIGS
    assert n % (64 * plan.warps_n) == 0 and 1 <= plan.splits <= max(1, k // 64 // 6)
    rows = -(-t // min(experts, t))  # rows an expert with tokens gets on average
    assert 16 * plan.m_blocks >= min(rows, 64)
    assert planner.ragged_plan(t, experts, n, k, jnp.float32).kind == "dequant_dot"


@pytest.mark.parametrize("t,experts", [(1, 8), (8, 128), (64, 8), (512, 8), (512, 128), (4096, 8),
                                       (4096, 128), (32768, 64)])
@pytest.mark.parametrize("n,k", [(1536, 2048), (2048, 768), (28672, 4096), (4096, 14336), (64, 64),
                                 (192, 512)])
def test_ragged_plan_takes_wgmma_for_many_rows_per_expert(t, experts, n, k):
    """On an sm_90a GPU: bf16 x with more than WGMMA_MIN_M rows per expert that has tokens runs
    the grouped wgmma kernel, with a compiled block that divides N and is no taller than those
    rows need; fewer rows and fp16 x the mma.sync one."""
    rows = -(-t // min(experts, t))
    plan = planner.ragged_plan(t, experts, n, k, jnp.bfloat16, sms=132, clusters=True, wgmma=True)
    if rows <= planner.WGMMA_MIN_M:
        assert plan.kind == "kernel"
    else:
        assert plan.kind == "wgmma" and plan.splits == 1
        config = marlin.wgmma_config(plan.block_m, plan.consumers, plan.blocks_per_sm)
        assert n % (64 * config.consumers) == 0 and config.block_m <= -(-rows // 64) * 64
    fp16 = planner.ragged_plan(t, experts, n, k, jnp.float16, sms=132, clusters=True, wgmma=True)
    assert fp16.kind == "kernel"


# ---- the kernel: GPU -------------------------------------------------------------------------

EXHAUSTIVE_MMA = [((1, 1), 1, False), ((4, 4), 1, False), ((2, 2), 2, True), ((1, 4), 3, False)]


def grouped_configs(mma, wgmma):
    """pytest params: mma.sync (tile, splits, cluster) and wgmma configs, each marked with the
    kernel it needs."""
    return ([pytest.param(dict(tile=t, splits=s, cluster=c), marks=gpu_marks(GROUPED, GROUPED_REASON),
                          id=f"mma{t[0]}{t[1]}s{s}{'c' if c else ''}") for t, s, c in mma]
            + [pytest.param(dict(wgmma=tuple(w)), marks=gpu_marks(GROUPED_WGMMA, WGMMA_REASON),
                            id=f"wgmma{w[0]}x{w[1]}b{w[2]}") for w in wgmma])


@pytest.mark.parametrize("config", grouped_configs(EXHAUSTIVE_MMA, marlin.WGMMA_CONFIGS))
def test_exhaustive_codes_and_scales_through_the_grouped_kernel(config):
    """x = identity rows pick every weight element alone: group 0 (expert 0, general path with
    a NaN column) and group 2 (expert 2, fast path) must give dequantize(W[e]).T bit for bit;
    the empty group 1 nothing; the 40 rows past the groups' sum zeros."""
    general, fast = exhaustive_weight(SCALE_BYTES), exhaustive_weight(SCALE_BYTES[:5])
    weights = []
    for (codes, scales), nan_column in ((general, True), (fast, False)):
        want = R.dequantize(codes, scales, np.float64)
        codes = np.where(np.isfinite(want) & (np.abs(want) < 2.0**128), codes, 0).astype(np.uint8)
        if nan_column:
            codes[:, 255] = np.where(np.arange(256) == 5, 0x7F, codes[:, 255])
        weights.append((codes, scales))
    unused = random_weight(np.random.default_rng(0), 256, 256)
    arrays = stack([weights[0], unused, weights[1]])
    assert np.asarray(arrays["flags"])[:, 0].tolist() == [1, 0, 0]
    eye = np.eye(256, dtype=ml_dtypes.bfloat16)
    x = np.concatenate([eye, eye, np.ones((40, 256), ml_dtypes.bfloat16)])
    y = run_grouped(x, arrays, [256, 0, 256], **config)
    for e, rows in ((0, slice(0, 256)), (1, slice(256, 512))):
        codes, scales = weights[e]
        want = R.dequantize(codes, scales, ml_dtypes.bfloat16).astype(np.float32).T
        nan_cols = np.isnan(want).any(axis=0)
        got = y[rows]
        assert np.all(np.isnan(got[:, nan_cols])) and nan_cols.sum() == (e == 0)
        np.testing.assert_array_equal(got[:, ~nan_cols], want[:, ~nan_cols])
    np.testing.assert_array_equal(y[512:], 0)


GROUPINGS = {
    "even": [24, 24, 24, 24],
    "skewed": [90, 3, 0, 3],
    "one expert": [0, 0, 96, 0],
    "empty": [0, 0, 0, 0],
    "past the rows": [40, 40, 40, 40],  # sum > T: the last groups are cut at T
    "short": [5, 0, 17, 1],             # sum < T: the rest is zero
    "negative": [30, -4, 30, 30],        # < 0 counts as 0, as ragged_dot reads it
}


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("config", grouped_configs(
    [((1, 1), 1, False), ((2, 4), 4, False), ((4, 2), 2, True), ((1, 2), 8, True)],
    [(64, 1, 2), (128, 2, 1), (256, 2, 1), (64, 4, 1)]))
def test_grouped_kernel_vs_float64(grouping, config, rng, seed):
    group_sizes = GROUPINGS[grouping]
    t, n, k = 96, 256, 1024
    weights = [random_weight(rng, n, k) for _ in group_sizes]
    arrays = stack(weights)
    x = rng.standard_normal((t, k)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal((len(group_sizes), n)).astype(np.float32)
    y = run_grouped(x, arrays, group_sizes, jnp.asarray(bias), **config)
    want = grouped_reference(x, weights, group_sizes, bias)
    zero = np.all(want == 0, axis=1)
    np.testing.assert_array_equal(y[zero], 0, err_msg=f"seed {seed}")
    if not zero.all():
        assert rel_fro(y[~zero], want[~zero]) <= 2e-6, f"seed {seed}"


@needs_grouped
@pytest.mark.parametrize("x_dtype,out_dtype", [(jnp.float16, jnp.float16), (jnp.bfloat16, jnp.bfloat16)])
def test_grouped_kernel_dtypes_and_many_experts(x_dtype, out_dtype, rng, seed):
    """128 experts, most empty (8 rows routed to a few), and fp16 x (split exactly in two bf16
    halves, as in the dense kernel)."""
    e, n, k = 128, 192, 512
    weights = [random_weight(rng, n, k) for _ in range(e)]
    group_sizes = np.zeros(e, np.int32)
    group_sizes[rng.choice(e, 5, replace=False)] = [1, 2, 1, 3, 1]
    x = rng.standard_normal((11, k)).astype(np.float32)
    y = run_grouped(jnp.asarray(x, x_dtype), stack(weights), group_sizes, tile=(1, 1), splits=1,
                    out_dtype=out_dtype)
    want = grouped_reference(np.asarray(jnp.asarray(x, x_dtype).astype(jnp.float32)), weights,
                             group_sizes)
    np.testing.assert_array_equal(y[8:], 0)
    assert rel_fro(y[:8], want[:8]) <= 4e-3, f"seed {seed}"


@needs_grouped_wgmma
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_grouped_wgmma_many_chunks_per_expert(out_dtype, rng, seed):
    """Experts of several 256-row chunks and a partial one, an empty expert, a one-row expert
    and a zero tail, through the planner's pick for those rows."""
    group_sizes = [300, 0, 517, 1]
    t, n, k = 900, 512, 768
    weights = [random_weight(rng, n, k) for _ in group_sizes]
    x = rng.standard_normal((t, k)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal((len(group_sizes), n)).astype(np.float32)
    plan = planner.ragged_plan(t, len(group_sizes), n, k, jnp.bfloat16)
    assert plan.kind == "wgmma"
    y = run_grouped(x, stack(weights), group_sizes, jnp.asarray(bias), out_dtype=out_dtype,
                    wgmma=(plan.block_m, plan.consumers, plan.blocks_per_sm))
    want = grouped_reference(x, weights, group_sizes, bias)
    np.testing.assert_array_equal(y[818:], 0)
    tol = 4e-3 if out_dtype == jnp.bfloat16 else 2e-6
    assert rel_fro(y[:818], want[:818]) <= tol, f"seed {seed}"


@pytest.mark.parametrize("grouping", ["skewed", "past the rows", "short"])
def test_grouped_primitive_reference_lowering_matches_float64(grouping, rng, seed):
    """The jnp lowering (CPU and non-CUDA platforms) of the same primitive: dequantize + the
    grouped float32 dot, same semantics."""
    if jax.devices()[0].platform == "gpu":
        pytest.skip("the CUDA kernel, not the reference, runs on a GPU (tested above)")
    group_sizes = GROUPINGS[grouping]
    weights = [random_weight(rng, 128, 256) for _ in group_sizes]
    x = rng.standard_normal((96, 256)).astype(ml_dtypes.bfloat16)
    y = run_grouped(x, stack(weights), group_sizes, tile=(1, 1), splits=1)
    want = grouped_reference(x, weights, group_sizes)
    zero = np.all(want == 0, axis=1)
    np.testing.assert_array_equal(y[zero], 0)
    assert rel_fro(y[~zero], want[~zero]) <= 2e-6, f"seed {seed}"


def test_grouped_primitive_checks_its_operands():
    arrays = stack([random_weight(np.random.default_rng(1), 128, 256) for _ in range(3)])
    x = jnp.zeros((8, 256), jnp.bfloat16)
    call = lambda x, gs, **kw: marlin.kernels.grouped_gemm(  # noqa: E731
        x, arrays["qweight"], arrays["scales"], arrays["flags"], gs, m_blocks=1, warps_n=1,
        splits=1, out_dtype=jnp.float32, **kw)
    with pytest.raises(ValueError, match=r"group_sizes must be int32 \[3\]"):
        jax.eval_shape(call, x, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="do not form a packed problem"):
        jax.eval_shape(call, jnp.zeros((8, 128), jnp.bfloat16), jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="bf16 or fp16"):
        jax.eval_shape(call, jnp.zeros((8, 256), jnp.float32), jnp.zeros((3,), jnp.int32))


def test_grouped_wgmma_primitive_checks_its_operands():
    arrays = stack([random_weight(np.random.default_rng(2), 128, 256) for _ in range(3)])
    call = lambda x, gs, **kw: marlin.grouped_gemm_sm90(  # noqa: E731
        x, arrays["qweight"], arrays["scales"], arrays["flags"], gs, block_m=64, consumers=1,
        out_dtype=jnp.float32, **kw)
    x = jnp.zeros((8, 256), jnp.bfloat16)
    assert jax.eval_shape(call, x, jnp.zeros((3,), jnp.int32)).shape == (8, 128)
    with pytest.raises(ValueError, match=r"group_sizes must be int32 \[3\]"):
        jax.eval_shape(call, x, jnp.zeros((2,), jnp.int32))
    with pytest.raises(TypeError, match="bf16 activations"):
        jax.eval_shape(call, jnp.zeros((8, 256), jnp.float16), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="not compiled"):
        marlin.grouped_gemm_sm90(x, arrays["qweight"], arrays["scales"], arrays["flags"],
                                 jnp.zeros((3,), jnp.int32), block_m=96, consumers=1,
                                 out_dtype=jnp.float32)
