"""CUTLASS SM100 W8A8 backend: what can be proven without a Blackwell GPU, plus the GPU test
that will run on the first one.

Host-only: CUTLASS's own scale-factor layout (evaluated on the host by _jax_mxfp8_sm100_layout,
which tests/oracles/build.py compiles on first use) equals reference.swizzle_scales byte for
byte, padding included; the kernels' host checks reject the shapes they cannot run; the Python
glue hands the kernel exactly the W8A8 problem (checked by evaluating the traced program with a
jnp stand-in for the kernel); the CUDA lowering emits the custom call with the per-M tile config.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp8 as mx
from jax_mxfp8 import _ffi, reference
from jax_mxfp8.backends import Backend, cutlass, ensure_available, why_unavailable
from jax_mxfp8.weight import MxWeight

from helpers import gpu_test, has_sm100_gpu, needs_cuda_targets, rel_fro
from oracles import mxfp8 as R
from oracles.build import load_sm100_layout

cuda = _ffi.cuda_module()
needs_kernels = pytest.mark.skipif(
    cuda is None or not hasattr(cuda, "cutlass_gemm_check"),
    reason="the CUTLASS SM100 kernels were not built into _jax_mxfp8_cuda (needs nvcc >= 12.8, "
           "the nvidia-cutlass headers, and 100a targeted or JAX_MXFP8_CUTLASS=ON)")


# ---- the scale layout --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layout():
    """The host layout oracle, built on first use (tests/oracles/build.py); skips naming the
    missing piece (a C++ compiler, nanobind, the CUTLASS headers, the CUDA include directory)."""
    module, why = load_sm100_layout()
    if module is None:
        pytest.skip(why)
    return module


LAYOUT_SHAPES = [  # (rows, K, batch): rows and K/32 below, at and past the 128 x 4 atom
    (1, 32, 1), (7, 96, 1), (127, 128, 1), (128, 160, 2), (129, 256, 1), (300, 1024, 1),
    (300, 1024, 2), (513, 4128, 3), (64, 7168, 1), (1024, 7168, 2),
]


@pytest.mark.parametrize("which", ["sfa", "sfb"])
@pytest.mark.parametrize("rows,k,batch", LAYOUT_SHAPES)
def test_cutlass_scale_layout_is_swizzle_scales(layout, which, rows, k, batch):
    offsets = getattr(layout, f"{which}_offsets")(rows, k, batch)  # [batch, Mp, Kbp]
    cols = k // 32
    mp, kbp = reference.padded_scale_shape(rows, cols)
    assert offsets.shape == (batch, mp, kbp)
    # A bijection onto the whole batched buffer: every byte, padding included, is read once.
    np.testing.assert_array_equal(np.sort(offsets.ravel()), np.arange(batch * mp * kbp))
    # Swizzle unique ids (0 = padding) with the contract's swizzle; CUTLASS must find id
    # (l, r, c) at its offset for (l, r, c), and a zero where the coordinate is padding.
    ids = np.arange(1, batch * rows * cols + 1, dtype=np.int32).reshape(batch, rows, cols)
    swizzled = np.asarray(reference.swizzle_scales(jnp.asarray(ids))).reshape(-1)
    want = np.zeros((batch, mp, kbp), np.int32)
    want[:, :rows, :cols] = ids
    np.testing.assert_array_equal(swizzled[offsets], want)


def test_cutlass_reads_the_swizzled_bytes_of_the_public_op(layout, rng):
    rows, k, batch = 200, 480, 2
    scales = rng.integers(0, 255, (batch, rows, k // 32), dtype=np.uint8)
    swizzled = np.asarray(mx.swizzle_scales(jnp.asarray(scales))).reshape(-1)
    seen = swizzled[layout.sfa_offsets(rows, k, batch)]
    np.testing.assert_array_equal(seen[:, :rows, :k // 32], scales)
    assert not seen[:, rows:].any() and not seen[:, :, k // 32:].any()  # zero padding, never 0xFF
    assert layout.sfa_cosize(rows, k, batch) == swizzled.size


def test_cutlass_layout_worked_example(layout):
    # M=300, K=1024 (KT=8): the layout CUTLASS prints, and three offsets that the F8_128x4
    # formula of docs/numerics.md ("Swizzled scales") gives as well.
    assert layout.cutlass_version[:2] >= (4, 2)
    assert layout.sfa_layout_string(300, 1024, 1) == (
        "(((_32,_4),3),((_32,_4),8),(_1,1)):(((_16,_4),4096),((_0,_1),_512),(_0,12288))")
    offsets = layout.sfa_offsets(300, 1024, 1)[0]
    assert [offsets[77, 6], offsets[130, 5], offsets[299, 31]] == [730, 4641, 11959]


# ---- host checks ---------------------------------------------------------------------------------

@needs_kernels
def test_compiled_instances_match_the_python_table():
    compiled = {(g["config"], g["out_dtype"]): g for g in cuda.cutlass_gemm_instances()}
    want = {(int(c), cutlass.OUT_DTYPE_CODES[d]) for d, cs in cutlass.COMPILED.items() for c in cs}
    assert set(compiled) == want
    for (config, _), g in compiled.items():
        assert g["swap_ab"] == (config == cutlass.Config.SWAP_AB_128x64x256)
    assert cutlass.compiled_instances() == want


ACCEPTED = [(1, 8, 32), (1, 4096, 1024), (5, 1000, 160), (300, 256, 7168), (4097, 128, 96)]


@needs_kernels
@pytest.mark.parametrize("config,out", [(int(c), cutlass.OUT_DTYPE_CODES[d])
                                        for d, cs in cutlass.COMPILED.items() for c in cs])
def test_host_checks(config, out):
    for m, n, k in ACCEPTED:  # M needs no alignment: tiles past M are neither read nor written
        assert cuda.cutlass_gemm_check(config, out, m, n, k) == "", (m, n, k)
        assert cuda.cutlass_gemm_can_implement(config, out, m, n, k)
        assert cuda.cutlass_gemm_workspace_size(config, out, m, n, k) == cutlass.workspace_bytes(
            config, list(cutlass.OUT_DTYPE_CODES)[out], m, n, k)
    # CUTLASS's own can_implement: TMA needs 16-byte rows of the output (N % 8 for 2-byte D,
    # N % 4 for float32; the swapped config stores D^T column-major, the same bytes) and of
    # x / w (K % 16).
    for m, n, k in [(1, 4098, 1024), (300, 10, 256), (64, 4096, 1000), (1, 256, 40)]:
        assert not cuda.cutlass_gemm_can_implement(config, out, m, n, k), (m, n, k)
        assert cuda.cutlass_gemm_check(config, out, m, n, k) != ""
    # K % 32 is an MX rule CUTLASS does not know (K=48 passes its 16-byte check): ours rejects.
    assert cuda.cutlass_gemm_can_implement(config, out, 1, 256, 48)
    assert "multiple of 32" in cuda.cutlass_gemm_check(config, out, 1, 256, 48)
    # N % 8 is our uniform rule (also for float32 out, where CUTLASS would take N % 4).
    assert "multiple of 8" in cuda.cutlass_gemm_check(config, out, 1, 4100, 1024)
    assert "positive" in cuda.cutlass_gemm_check(config, out, 0, 256, 1024)


def test_python_checks_name_the_fix():
    with pytest.raises(ValueError, match="multiple of 8"):
        cutlass.check_problem(1, 4100, 1024)
    with pytest.raises(ValueError, match="multiple of 32"):
        cutlass.check_problem(1, 4096, 48)
    values, scales = mx.quantize(jnp.ones((12, 64), jnp.float32))
    with pytest.raises(ValueError, match="multiple of 8"):
        cutlass._prepare(values, scales)


def test_forcing_cutlass_without_sm100_raises():
    if has_sm100_gpu():
        pytest.skip("an SM100 GPU is present")
    with pytest.raises(ValueError, match="10.0"):
        ensure_available(Backend.CUTLASS)
    assert mx.select_backend() is not Backend.CUTLASS


def test_choose_config():
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    assert cutlass.choose_config(1, bf16) == cutlass.Config.SWAP_AB_128x64x256
    assert cutlass.choose_config(64, bf16) == cutlass.Config.SWAP_AB_128x64x256
    assert cutlass.choose_config(65, bf16) == cutlass.Config.ONE_SM_128x128x256
    assert cutlass.choose_config(257, bf16) == cutlass.Config.TWO_SM_256x128x256
    assert cutlass.choose_config(1, f32) == cutlass.Config.ONE_SM_128x128x256


# ---- Python glue on the host ---------------------------------------------------------------------

def _cutlass_weight(w):
    values, scales = mx.quantize(jnp.asarray(w, jnp.float32))
    arrays, meta = cutlass._prepare(values, scales)  # prepare_weight would refuse without SM100
    return MxWeight(arrays, values.shape, Backend.CUTLASS, meta), values, scales


def _eval_with_reference_kernel(fn, *args):
    """Runs fn's traced program on the host, with the kernel replaced by reference_gemm."""
    closed = jax.make_jaxpr(fn)(*args)
    env = dict(zip(closed.jaxpr.constvars, closed.consts))
    env.update(zip(closed.jaxpr.invars, jax.tree.leaves(args)))
    read = lambda v: v.val if hasattr(v, "val") else env[v]  # noqa: E731 (Literal or Var)
    kernels = 0
    for eqn in closed.jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if eqn.primitive is cutlass.cutlass_gemm_p:
            outs, kernels = [cutlass.reference_gemm(*ins, **eqn.params)], kernels + 1
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    assert kernels == 1
    return [read(v) for v in closed.jaxpr.outvars]


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("m,n,k,with_bias", [(1, 64, 32, True), (77, 200, 160, False),
                                             (300, 136, 1024, True)])
def test_glue_computes_the_w8a8_linear(m, n, k, with_bias, out_dtype, rng, seed):
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = rng.standard_normal((n, k)) * np.exp2(rng.integers(-4, 4, (n, 1)))
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32) if with_bias else None
    weight, values, scales = _cutlass_weight(w)
    (y,) = _eval_with_reference_kernel(
        lambda x, a, b: cutlass._linear(x, MxWeight(a, (n, k), Backend.CUTLASS), b,
                                        jnp.dtype(out_dtype), True),
        x, weight.arrays, bias)
    assert y.shape == (m, n) and y.dtype == out_dtype
    want = R.linear(np.asarray(x), np.asarray(values).view(np.uint8), np.asarray(scales),
                    None if bias is None else np.asarray(bias), quantize_activations=True)
    got = np.asarray(y).astype(np.float64)
    assert rel_fro(got, want) <= 1e-2, seed
    emulated = mx.linear(x, mx.prepare_weight(values, scales, backend="emulation"), bias,
                         out_dtype=out_dtype, quantize_activations=True)
    tol = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3, jnp.float32: 1e-5}[out_dtype]
    np.testing.assert_allclose(got, np.asarray(emulated, np.float64), rtol=tol,
                               atol=tol * np.abs(want).max(), err_msg=f"seed {seed}")


def test_prepare_roundtrip_and_layout(rng):
    weight, values, scales = _cutlass_weight(rng.standard_normal((200, 160)))
    assert weight.arrays["scales"].shape == (2, 2, 512)  # [Np/128, Kbp/4, 512]
    np.testing.assert_array_equal(
        np.asarray(weight.arrays["scales"]).reshape(-1), np.asarray(mx.swizzle_scales(scales)))
    v, s = weight.unpack()
    np.testing.assert_array_equal(np.asarray(v).view(np.uint8), np.asarray(values).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(scales))


def test_gemm_off_cuda_is_a_clear_error():
    weight, _, _ = _cutlass_weight(np.ones((64, 64)))
    f = jax.jit(lambda x: cutlass._linear(x, weight, None, jnp.dtype(jnp.bfloat16), True))
    x = jnp.ones((4, 64), jnp.bfloat16)
    # Lowered for the host explicitly, so this holds whatever the default device is.
    with pytest.raises(NotImplementedError, match="compute capability >= 10.0"):
        f.trace(x).lower(lowering_platforms=("cpu",))


def test_gemm_on_a_default_device_without_cutlass_is_a_clear_error():
    if why_unavailable(Backend.CUTLASS, jax.devices()[0]) is None:
        pytest.skip("the default device runs CUTLASS (SM100, kernels built): nothing to refuse there")
    weight, _, _ = _cutlass_weight(np.ones((64, 64)))
    f = jax.jit(lambda x: cutlass._linear(x, weight, None, jnp.dtype(jnp.bfloat16), True))
    x = jnp.ones((4, 64), jnp.bfloat16)
    # The default device's own lowering: a CPU says which GPU it needs, a GPU without the
    # kernels which build piece is missing (the lowering helper's KernelUnavailableError).
    with pytest.raises((NotImplementedError, _ffi.KernelUnavailableError),
                       match="compute capability >= 10.0|was built without jax_mxfp8_cutlass_gemm_cuda_v1"):
        f.lower(x)


def test_vmap_shapes():
    weight, _, _ = _cutlass_weight(np.ones((64, 64)))
    f = jax.vmap(lambda x: cutlass._linear(x, weight, None, jnp.dtype(jnp.bfloat16), True))
    out = jax.eval_shape(f, jax.ShapeDtypeStruct((3, 5, 64), jnp.bfloat16))
    assert out.shape == (3, 5, 64) and out.dtype == jnp.bfloat16


@needs_cuda_targets(cutlass.GEMM_TARGET,
                    reason="jax_mxfp8_cutlass_gemm_cuda_v1 not built into this installation")
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("m,config", [(1, 0), (64, 0), (100, 1), (1000, 2)])
def test_cuda_lowering_emits_the_custom_call(m, config, with_bias):
    weight, _, _ = _cutlass_weight(np.ones((256, 128)))
    bias = jnp.ones((256,), jnp.bfloat16) if with_bias else None
    f = jax.jit(lambda x, b: cutlass._linear(x, weight, b, jnp.dtype(jnp.bfloat16), True))
    text = f.trace(jnp.ones((m, 128), jnp.bfloat16), bias).lower(
        lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if f"custom_call @{cutlass.GEMM_TARGET}" in line]
    assert len(calls) == 1 and f"config = {config} : i32" in calls[0]
    # x, x_scales, w, w_scales (+ bias: the handler's optional argument)
    operands = re.search(rf"@{cutlass.GEMM_TARGET}\(([^)]*)\)", calls[0]).group(1).split(",")
    assert len(operands) == (5 if with_bias else 4)
    if _ffi.has_cuda_target("jax_mxfp8_quantize_cuda_v1"):
        assert "custom_call @jax_mxfp8_quantize_cuda_v1" in text


# ---- on a Blackwell GPU ----------------------------------------------------------------------------

@gpu_test(has_sm100_gpu(), reason="needs an NVIDIA GPU with compute capability >= 10.0 "
                                  "(the CUTLASS path has not yet run on hardware)")
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("m,n,k", [(1, 256, 1024), (5, 1000, 160), (64, 4096, 32), (65, 128, 4096),
                                   (300, 8, 256), (1000, 1000, 1024), (4097, 512, 7168)])
def test_cutlass_linear_on_sm100(m, n, k, out_dtype, rng, seed):
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = rng.standard_normal((n, k)) * np.exp2(rng.integers(-4, 4, (n, 1)))
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    values, scales = mx.quantize(jnp.asarray(w, jnp.float32))
    weight = mx.prepare_weight(values, scales, backend="cutlass")
    emulation = mx.prepare_weight(values, scales, backend="emulation")
    for b in (bias, None):
        y = jax.jit(lambda x, w, b: mx.linear(x, w, b, out_dtype=out_dtype))(x, weight, b)
        want = jax.jit(lambda x, w, b: mx.linear(x, w, b, out_dtype=out_dtype,
                                                 quantize_activations=True))(x, emulation, b)
        got = np.asarray(y).astype(np.float64)
        assert y.shape == (m, n) and y.dtype == out_dtype
        assert not np.isnan(got).any(), seed
        exact = R.linear(np.asarray(x), np.asarray(values).view(np.uint8), np.asarray(scales),
                         None if b is None else np.asarray(b), quantize_activations=True)
        assert rel_fro(got, exact) <= 1e-2, seed
        tol = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3, jnp.float32: 1e-5}[out_dtype]
        np.testing.assert_allclose(got, np.asarray(want, np.float64), rtol=tol,
                                   atol=tol * np.abs(exact).max(), err_msg=f"seed {seed}")
