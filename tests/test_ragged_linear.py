"""Stacked expert weights and ragged_linear (docs/moe.md) against the float64 oracle
(tests/oracles/mxfp8.py): groupings, shapes, bias, dtypes, transforms, errors, every backend's
stacked layout, export, sharding on 8 fake CPU devices, and MARLIN on a GPU."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_mxfp8 as mx
from jax_mxfp8 import placement
from jax_mxfp8.backends import Backend, get_backend_impl, marlin, registered_backends
from jax_mxfp8.models import tp_mlp as tp
from jax_mxfp8.ops import ragged_linear as ragged_module
from jax_mxfp8.weight import local_shape

from helpers import (
    bits, cpu_devices, gpu_test, has_cuda_targets, has_gpu, hlo, local, mesh_2x4, mesh_8, put,
    rel_fro)
from oracles import mxfp8 as R

EMULATION, MARLIN = Backend.EMULATION, Backend.MARLIN


@pytest.fixture
def kernel_references(monkeypatch):
    """GPU layouts (MARLIN) run on CPU through their kernels' jnp references."""
    monkeypatch.setenv("JAX_MXFP8_KERNEL_REFERENCES", "1")


# ---- problems and the float64 reference -------------------------------------------------------

def expert_codes(rng, e, n, k, spread=3):
    """Finite MX codes and scales of E experts, per-row magnitudes 2^[-spread, spread]."""
    w = rng.standard_normal((e, n, k)) * np.exp2(rng.integers(-spread, spread + 1, (e, n, 1)))
    return R.quantize(w, "ceil")


def stacked(codes, scales, backend):
    return mx.prepare_weight(jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn)), jnp.asarray(scales),
                             backend=backend)


def reference(x, codes, scales, group_sizes, bias=None):
    """float64 y: row block e times expert e (+ bias[e]); rows past the groups zero."""
    x64 = np.asarray(x).astype(np.float64)
    w = R.dequantize(codes, scales, np.float64)
    y = np.zeros((x64.shape[0], w.shape[1]))
    start = 0
    for e, g in enumerate(np.asarray(group_sizes)):
        y[start:start + g] = x64[start:start + g] @ w[e].T
        if bias is not None:
            y[start:start + g] += np.asarray(bias[e]).astype(np.float64)
        start += g
    return y


def grouping(kind, e, t, rng):
    if kind == "even":
        return np.full(e, t // e, np.int32)
    if kind == "skewed":  # most rows to one expert, a few elsewhere
        g = np.zeros(e, np.int32)
        g[rng.integers(e)] = t - (e - 1)
        g[g == 0] = 1
        return g
    if kind == "empty":  # every other expert gets nothing
        g = np.zeros(e, np.int32)
        g[::2] = t // ((e + 1) // 2)
        return g
    if kind == "single":
        g = np.zeros(e, np.int32)
        g[e - 1] = t
        return g
    if kind == "short":  # sum < T: the rest of the rows are zero
        return rng.multinomial(t - 5, np.ones(e) / e).astype(np.int32)
    if kind == "none":
        return np.zeros(e, np.int32)
    raise ValueError(kind)


GROUPINGS = ["even", "skewed", "empty", "single", "short", "none"]


def assert_close(got, want, tol=1e-2):
    got = np.asarray(got, np.float64)
    if not np.any(want):
        np.testing.assert_array_equal(got, 0.0)
        return
    assert rel_fro(got, want) <= tol, rel_fro(got, want)


def assert_zero_past_groups(y, group_sizes):
    np.testing.assert_array_equal(np.asarray(y, np.float32)[int(np.sum(group_sizes)):], 0.0)


# ---- MxWeight of stacked experts ---------------------------------------------------------------

def test_stacked_weight_api_and_dense_unchanged(rng):
    codes, scales = expert_codes(rng, 3, 64, 96)
    w = stacked(codes, scales, EMULATION)
    assert w.shape == (3, 64, 96) and w.num_experts == 3 and w.expert_shape == (64, 96)
    assert (w.out_features, w.in_features) == (64, 96)
    assert w.arrays["values"].shape == (3, 64, 96) and w.arrays["scales"].shape == (3, 64, 3)
    dense = stacked(codes[0], scales[0], EMULATION)
    assert dense.shape == (64, 96) and dense.num_experts is None and dense.expert_shape == (64, 96)
    assert "shape=(3, 64, 96)" in repr(w)


@pytest.mark.parametrize("backend", registered_backends(), ids=lambda b: b.value)
def test_stacked_prepare_is_per_expert_prepare_and_unpacks_exactly(backend, rng):
    """Every code and scale byte (NaN codes included): the stacked arrays are each expert's
    2-D preparation, and unpack / to_backend give the bytes back."""
    e, n, k = 3, 128, 256  # whole tiles of every backend
    codes = rng.integers(0, 256, (e, n, k), dtype=np.uint8)
    scales = rng.integers(0, 256, (e, n, k // 32), dtype=np.uint8)
    w = stacked(codes, scales, backend)  # an explicit backend prepares on this CPU host
    assert w.num_experts == e
    for i in range(e):
        one = stacked(codes[i], scales[i], backend)
        assert one.meta == w.meta and set(one.arrays) == set(w.arrays)
        for name, a in one.arrays.items():
            np.testing.assert_array_equal(bits(w.arrays[name][i]), bits(a), err_msg=name)
    values, back = w.unpack()
    assert values.shape == (e, n, k) and back.shape == (e, n, k // 32)
    np.testing.assert_array_equal(bits(values), codes)
    np.testing.assert_array_equal(np.asarray(back), scales)
    values2, back2 = w.to_backend("emulation").unpack()
    np.testing.assert_array_equal(bits(values2), codes)
    np.testing.assert_array_equal(np.asarray(back2), scales)


def test_marlin_stacked_layout_pads_every_expert(rng):
    codes, scales = expert_codes(rng, 2, 100, 96)  # N, K not multiples of 64: padded per expert
    w = stacked(codes, scales, MARLIN)
    assert w.meta == (marlin.META_TAG, 128, 128)
    assert w.arrays["qweight"].shape == (2, 128 // 16, 16 * 128)
    assert w.arrays["scales"].shape == (2, 128 // 32, 128) and w.arrays["flags"].shape == (2, 1)
    values, back = w.unpack()
    np.testing.assert_array_equal(bits(values), codes)
    np.testing.assert_array_equal(np.asarray(back), scales)


def test_marlin_flags_are_per_expert(rng):
    codes, scales = expert_codes(rng, 3, 64, 64)
    scales[1, 0, 0] = 200  # > FAST_MAX_SCALE: expert 1 needs the general dequantization
    w = stacked(codes, scales, MARLIN)
    np.testing.assert_array_equal(np.asarray(w.arrays["flags"]).ravel(), [0, 1, 0])


def test_quantize_weight_of_stacked_experts(rng):
    w = rng.standard_normal((2, 64, 128)).astype(np.float32)
    weight = mx.quantize_weight(jnp.asarray(w), backend="emulation")
    codes, scales = R.quantize(w, "ceil")
    values, back = weight.unpack()
    np.testing.assert_array_equal(bits(values), codes)
    np.testing.assert_array_equal(np.asarray(back), scales)


# ---- ragged_linear against float64 ---------------------------------------------------------------

@pytest.mark.parametrize("backend", [EMULATION, MARLIN], ids=lambda b: b.value)
@pytest.mark.parametrize("kind", GROUPINGS)
def test_groupings_match_float64(backend, kind, rng, kernel_references):
    e, n, k, t = 4, 64, 128, 24
    codes, scales = expert_codes(rng, e, n, k)
    w = stacked(codes, scales, backend)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    gs = grouping(kind, e, t, rng)
    y = jax.jit(lambda a, w, g: mx.ragged_linear(a, w, g, out_dtype=jnp.float32))(x, w, jnp.asarray(gs))
    assert y.shape == (t, n) and y.dtype == jnp.float32
    assert_close(y, reference(x, codes, scales, gs))
    assert_zero_past_groups(y, gs)


@pytest.mark.parametrize("backend", [EMULATION, MARLIN], ids=lambda b: b.value)
@pytest.mark.parametrize("e,n,k", [(3, 72, 96), (5, 100, 160), (1, 8, 32), (2, 200, 32 * 9)])
def test_odd_shapes_with_bias(backend, e, n, k, rng, kernel_references):
    codes, scales = expert_codes(rng, e, n, k)
    w = stacked(codes, scales, backend)
    t = 17
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((e, n)), jnp.float32)
    gs = rng.multinomial(t - 2, np.ones(e) / e).astype(np.int32)
    y = mx.ragged_linear(x, w, jnp.asarray(gs), bias)
    assert y.dtype == jnp.float32
    assert_close(y, reference(x, codes, scales, gs, bias), tol=1e-5)  # fp32 x: an fp32 dot
    assert_zero_past_groups(y, gs)  # no bias on rows past the groups


@pytest.mark.parametrize("x_dtype,out_dtype", [
    (jnp.bfloat16, None), (jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float16),
    (jnp.float32, jnp.bfloat16), (jnp.float16, jnp.float32)])
def test_dtypes(x_dtype, out_dtype, rng):
    codes, scales = expert_codes(rng, 3, 64, 64)
    w = stacked(codes, scales, EMULATION)
    x = jnp.asarray(rng.standard_normal((12, 64)), x_dtype)
    bias = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
    gs = np.array([4, 2, 5], np.int32)
    y = mx.ragged_linear(x, w, gs, bias, out_dtype=out_dtype)
    assert y.dtype == jnp.dtype(out_dtype or x_dtype)
    assert_close(y, reference(x, codes, scales, gs, bias))


def test_same_numerics_as_linear_per_expert(rng):
    """Each group's rows equal linear() of that expert on them (the same math, W8A16)."""
    codes, scales = expert_codes(rng, 3, 64, 128)
    w = stacked(codes, scales, EMULATION)
    x = jnp.asarray(rng.standard_normal((10, 128)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    gs = [3, 0, 7]
    y = np.asarray(mx.ragged_linear(x, w, jnp.asarray(gs, jnp.int32), bias), np.float32)
    start = 0
    for i, g in enumerate(gs):
        one = stacked(codes[i], scales[i], EMULATION)
        want = np.asarray(mx.linear(x[start:start + g], one, bias[i]), np.float32)
        np.testing.assert_allclose(y[start:start + g], want, rtol=2 ** -7, atol=1e-6 * np.abs(want).max(initial=1))
        start += g


def test_no_rows(rng):
    codes, scales = expert_codes(rng, 2, 64, 64)
    w = stacked(codes, scales, EMULATION)
    y = mx.ragged_linear(jnp.zeros((0, 64), jnp.bfloat16), w, jnp.zeros(2, jnp.int32))
    assert y.shape == (0, 64)
    assert jax.vmap(mx.linear)(jnp.zeros((2, 0, 64), jnp.bfloat16), w).shape == (2, 0, 64)


# ---- transforms ----------------------------------------------------------------------------------

def test_jit_takes_group_sizes_as_data(rng):
    """One compilation for every grouping: group_sizes is traced, never read on the host."""
    codes, scales = expert_codes(rng, 4, 64, 64)
    w = stacked(codes, scales, EMULATION)
    x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    f = jax.jit(lambda a, w, g: mx.ragged_linear(a, w, g))
    for kind in GROUPINGS:
        gs = grouping(kind, 4, 16, rng)
        assert_close(f(x, w, jnp.asarray(gs)), reference(x, codes, scales, gs), tol=1e-5)
    assert f._cache_size() == 1


@pytest.mark.parametrize("batched_weight", [False, True])
def test_vmap_of_ragged_linear(batched_weight, rng):
    b, e, n, k, t = 3, 4, 64, 64, 10
    codes, scales = expert_codes(rng, b * e if batched_weight else e, n, k)
    w = stacked(codes, scales, EMULATION)
    if batched_weight:  # [B, E, ...] arrays: each batch entry its own experts
        w = mx.MxWeight({name: a.reshape(b, e, *a.shape[1:]) for name, a in w.arrays.items()},
                        (e, n, k), w.backend, w.meta)
    x = jnp.asarray(rng.standard_normal((b, t, k)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((e, n)), jnp.float32)
    gs = np.stack([grouping(kind, e, t, rng) for kind in ("skewed", "none", "short")])
    f = lambda a, g, w: mx.ragged_linear(a, w, g, bias)  # noqa: E731
    y = jax.jit(jax.vmap(f, in_axes=(0, 0, 0 if batched_weight else None)))(x, jnp.asarray(gs), w)
    for i in range(b):
        c, s = (codes[i * e:(i + 1) * e], scales[i * e:(i + 1) * e]) if batched_weight else (codes, scales)
        want = reference(x[i], c, s, gs[i], bias)
        if np.any(want):
            assert rel_fro(y[i], want) <= 1e-5
        assert_zero_past_groups(y[i], gs[i])


@pytest.mark.parametrize("backend", [EMULATION, MARLIN], ids=lambda b: b.value)
def test_vmap_linear_over_stacked_experts_is_one_grouped_call(backend, rng, kernel_references):
    e, n, k, m = 4, 64, 128, 6
    codes, scales = expert_codes(rng, e, n, k)
    w = stacked(codes, scales, backend)
    x = jnp.asarray(rng.standard_normal((e, 2, m // 2, k)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((e, n)), jnp.float32)
    f = jax.vmap(lambda xi, wi, bi: mx.linear(xi, wi, bi, out_dtype=jnp.float32))
    text = str(jax.make_jaxpr(f)(x, w, bias))
    assert text.count("mxfp8_ragged_linear") == 1 and "mxfp8_linear" not in text
    y = jax.jit(f)(x, w, bias)
    assert y.shape == (e, 2, m // 2, n)
    wd = R.dequantize(codes, scales, np.float64)
    want = np.einsum("eabk,enk->eabn", np.asarray(x, np.float64), wd) + np.asarray(bias, np.float64)[:, None, None]
    assert rel_fro(y, want) <= 1e-2
    # x shared by every expert (not batched) broadcasts
    y1 = jax.vmap(lambda wi: mx.linear(x[0], wi, out_dtype=jnp.float32))(w)
    assert rel_fro(y1, np.einsum("abk,enk->eabn", np.asarray(x[0], np.float64), wd)) <= 1e-2


def test_vmap_linear_w8a8_keeps_one_gemm_per_expert(rng):
    codes, scales = expert_codes(rng, 2, 64, 64)
    w = stacked(codes, scales, EMULATION)
    x = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
    f = jax.vmap(lambda xi, wi: mx.linear(xi, wi, quantize_activations=True))
    assert "mxfp8_ragged_linear" not in str(jax.make_jaxpr(f)(x, w))
    want = np.stack([R.linear(np.asarray(x[i]), codes[i], scales[i], quantize_activations=True)
                     for i in range(2)])
    assert rel_fro(f(x, w), want) <= 1e-2


def grad_reference(ct, codes, scales, group_sizes):
    w = R.dequantize(codes, scales, np.float64)
    dx = np.zeros((ct.shape[0], w.shape[2]))
    db = np.zeros(w.shape[:2])
    start = 0
    for e, g in enumerate(group_sizes):
        dx[start:start + g] = ct[start:start + g] @ w[e]
        db[e] = ct[start:start + g].sum(axis=0)
        start += g
    return dx, db


@pytest.mark.parametrize("backend", [EMULATION, MARLIN], ids=lambda b: b.value)
def test_grad_wrt_x_and_bias(backend, rng, kernel_references):
    e, n, k, t = 3, 64, 128, 14
    codes, scales = expert_codes(rng, e, n, k)
    w = stacked(codes, scales, backend)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((e, n)), jnp.float32)
    ct = rng.standard_normal((t, n))
    gs = np.array([5, 0, 6], np.int32)  # 3 rows past the groups: zero gradient there
    loss = lambda a, b: jnp.sum(mx.ragged_linear(a, w, jnp.asarray(gs), b) * ct)  # noqa: E731
    dx, db = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, bias)
    want_dx, want_db = grad_reference(ct, codes, scales, gs)
    assert rel_fro(dx, want_dx) <= 1e-5 and rel_fro(db, want_db) <= 1e-5
    np.testing.assert_array_equal(np.asarray(dx)[11:], 0.0)
    # forward-mode agrees
    _, tangent = jax.jvp(lambda a: mx.ragged_linear(a, w, jnp.asarray(gs)), (x,), (x,))
    assert rel_fro(tangent, reference(x, codes, scales, gs)) <= 1e-5


def test_grad_through_vmap_linear_over_experts(rng):
    codes, scales = expert_codes(rng, 3, 64, 64)
    w = stacked(codes, scales, EMULATION)
    x = jnp.asarray(rng.standard_normal((3, 4, 64)), jnp.float32)
    ct = rng.standard_normal((3, 4, 64))
    dx = jax.grad(lambda a: jnp.sum(jax.vmap(mx.linear)(a, w) * ct))(x)
    want = np.einsum("emn,enk->emk", ct, R.dequantize(codes, scales, np.float64))
    assert rel_fro(dx, want) <= 1e-5


def test_weight_gradient_is_an_error(rng):
    codes, scales = expert_codes(rng, 2, 64, 64)
    w = stacked(codes, scales, EMULATION)
    x = jnp.ones((4, 64), jnp.float32)
    as_float = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float8_e4m3fn else a, w)
    with pytest.raises(TypeError, match="ragged_linear: the MXFP8 weight is frozen"):
        jax.jvp(lambda v: mx.ragged_linear(x, mx.MxWeight({"values": v.astype(jnp.float8_e4m3fn),
                                                           "scales": w.arrays["scales"]},
                                                          w.shape, w.backend), jnp.array([2, 2])),
                (as_float.arrays["values"],), (as_float.arrays["values"],))


def test_export_round_trip(rng):
    pytest.importorskip("flatbuffers")
    from jax_mxfp8 import exporting
    codes, scales = expert_codes(rng, 3, 64, 64)
    w = stacked(codes, scales, EMULATION)
    x = jnp.asarray(rng.standard_normal((9, 64)), jnp.bfloat16)
    gs = jnp.array([2, 3, 1], jnp.int32)
    fn = lambda a, w, g: mx.ragged_linear(a, w, g)  # noqa: E731
    platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    restored = jax.export.deserialize(exporting.export(fn, platforms=(platform,))(x, w, gs).serialize())
    np.testing.assert_array_equal(bits(restored.call(x, w, gs)), bits(jax.jit(fn)(x, w, gs)))
    assert restored.in_tree == jax.tree.structure(((x, w, gs), {}))  # the (E, N, K) treedef survives


# ---- errors --------------------------------------------------------------------------------------

@pytest.fixture
def problem(rng):
    codes, scales = expert_codes(rng, 3, 64, 64)
    return stacked(codes, scales, EMULATION), jnp.ones((8, 64), jnp.bfloat16), jnp.array([2, 3, 1], jnp.int32)


def test_argument_errors(problem):
    w, x, gs = problem
    dense = mx.quantize_weight(jnp.ones((64, 64)), backend="emulation")
    cases = [
        (lambda: mx.ragged_linear(x, dense, gs), ValueError, "one dense .* needs stacked experts"),
        (lambda: mx.ragged_linear(x, {"values": 1}, gs), TypeError, "must be an MxWeight"),
        (lambda: mx.ragged_linear(x[None], w, gs), ValueError, r"expected \[T, K\] rows with K=64"),
        (lambda: mx.ragged_linear(x[:, :32], w, gs), ValueError, r"expected \[T, K\]"),
        (lambda: mx.ragged_linear(x.astype(jnp.int32), w, gs), TypeError, "input x has dtype int32"),
        (lambda: mx.ragged_linear(x, w, gs[:2]), ValueError, r"group_sizes has shape \(2,\); expected \(3,\)"),
        (lambda: mx.ragged_linear(x, w, gs.astype(jnp.float32)), TypeError, "group_sizes has dtype float32"),
        (lambda: mx.ragged_linear(x, w, gs, jnp.ones((64,))), ValueError, r"bias has shape \(64,\); expected \(3, 64\)"),
        (lambda: mx.ragged_linear(x, w, gs, out_dtype=jnp.int8), TypeError, "out_dtype"),
        (lambda: mx.linear(x, w), ValueError, "holds 3 stacked experts.*ragged_linear"),
        (lambda: mx.ragged_linear(x, w.to_backend("cutlass"), gs), ValueError, "cutlass has no grouped GEMM"),
        (lambda: jax.vmap(lambda wi: mx.ragged_linear(x, wi, gs))(w), ValueError, "hold one expert"),
        (lambda: mx.prepare_weight(jnp.zeros((0, 64, 64), jnp.float8_e4m3fn), jnp.zeros((0, 64, 2), jnp.uint8)),
         ValueError, "no experts"),
        (lambda: mx.prepare_weight(jnp.zeros((2, 2, 64, 64), jnp.float8_e4m3fn), jnp.zeros((2, 2, 64, 2), jnp.uint8)),
         ValueError, r"2-D \[N, K\] .* or 3-D \[E, N, K\]"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_a_vmap_prepared_weight_outside_vmap_names_the_fix(rng):
    values, scales = mx.quantize(jnp.asarray(rng.standard_normal((2, 64, 64)), jnp.float32))
    legacy = jax.vmap(lambda v, s: mx.prepare_weight(v, s, backend="emulation"))(values, scales)
    assert legacy.shape == (64, 64)  # each expert's shape in the treedef, arrays stacked
    with pytest.raises(ValueError, match=r"vmap\(prepare_weight\).*prepare_weight\(values \[E, N, K\]"):
        mx.linear(jnp.ones((4, 64)), legacy)
    y = jax.vmap(lambda w: mx.linear(jnp.ones((4, 64)), w))(legacy)  # under vmap it still works
    assert y.shape == (2, 4, 64)


def test_stacked_export_aux_is_format_2_and_dense_format_1(problem):
    from jax_mxfp8.weight import _deserialize_aux, _serialize_aux
    import json
    w, _, _ = problem
    aux = jax.tree.structure(w).node_data()[1]
    assert json.loads(_serialize_aux(aux))["format"] == 2
    assert _deserialize_aux(_serialize_aux(aux)) == aux
    dense = mx.quantize_weight(jnp.ones((64, 64)), backend="emulation")
    assert json.loads(_serialize_aux(jax.tree.structure(dense).node_data()[1]))["format"] == 1


# ---- sharding on 8 fake CPU devices -----------------------------------------------------------

needs_8 = pytest.mark.skipif(len(cpu_devices()) < 8, reason="needs 8 CPU devices (tests/conftest.py)")


def weight_sized_all_gathers(text, min_elements):
    """all-gathers in compiled HLO text whose result holds >= min_elements elements."""
    found = []
    for line in text.splitlines():
        if "all-gather(" not in line and "all-gather-start(" not in line:
            continue
        shape = line.split("=", 1)[1].split("{", 1)[0]
        dims = shape[shape.index("[") + 1:shape.index("]")] if "[" in shape else ""
        size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        if size >= min_elements:
            found.append(line.strip()[:120])
    return found


SHARDED_CASES = [  # (expert_axis, n_axis, k_axis, x spec, all-reduces)
    ("model", None, None, P(), 1),                  # expert-parallel
    (None, "model", None, P(), 0),                  # column-parallel within experts
    (None, None, "model", P(None, "model"), 1),     # row-parallel within experts
    ("model", "data", None, P(), 1),                # experts x N
    ("data", None, "model", P(None, "model"), 1),   # experts x K: one psum over both
    ("model", None, None, P("data"), 1),            # tokens data-parallel, experts over model
    (None, "model", None, P("data"), 0),            # tokens data-parallel, N over model
    (("data", "model"), None, None, P(), 1),        # experts over all 8 devices
]


@needs_8
@pytest.mark.parametrize("backend", [EMULATION, MARLIN], ids=lambda b: b.value)
@pytest.mark.parametrize("e_axis,n_axis,k_axis,x_spec,n_reduce", SHARDED_CASES)
def test_sharded_matches_single_device_without_weight_gathers(backend, e_axis, n_axis, k_axis, x_spec,
                                                              n_reduce, rng, kernel_references):
    mesh = mesh_2x4()
    e, n, k, t = 8, 256, 256, 40  # MARLIN shards whole 64-tiles: 4 N shards need N >= 256
    codes, scales = expert_codes(rng, e, n, k)
    w = stacked(codes, scales, backend)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((e, n)), jnp.float32)
    gs = jnp.asarray(grouping("short", e, t, rng))
    f = lambda a, w, g, b: mx.ragged_linear(a, w, g, b, out_dtype=jnp.float32)  # noqa: E731
    want = np.asarray(jax.jit(f)(local(x), jax.device_put(w, cpu_devices()[0]), local(gs), local(bias)))
    assert rel_fro(want, reference(x, codes, scales, gs, bias)) <= 1e-2
    ws = placement.shard_weight(w, mesh, expert_axis=e_axis, n_axis=n_axis, k_axis=k_axis)
    args = (put(x, mesh, x_spec), ws, put(gs, mesh, P()), put(bias, mesh, P(e_axis, n_axis)))
    got = jax.jit(f)(*args)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert_zero_past_groups(got, gs)
    text = hlo(f, *args)
    counts = tp.collectives(text)
    assert counts["all-gather"] == 0 and counts["all-reduce"] == n_reduce, counts
    lead = tuple(x_spec)[:1] or (None,)
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P(*lead, n_axis)), 2), got.sharding.spec


@needs_8
def test_sharded_group_sizes_gather_only_themselves(rng):
    mesh = mesh_8()
    codes, scales = expert_codes(rng, 8, 64, 64)
    w = placement.shard_weight(stacked(codes, scales, EMULATION), mesh, expert_axis="model")
    x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    gs = grouping("skewed", 8, 16, rng)
    f = lambda a, w, g: mx.ragged_linear(a, w, g)  # noqa: E731
    args = (put(x, mesh, P()), w, put(jnp.asarray(gs), mesh, P("model")))
    assert rel_fro(jax.jit(f)(*args), reference(x, codes, scales, gs)) <= 1e-5
    assert weight_sized_all_gathers(hlo(f, *args), 9) == []  # at most the 8 group sizes


@needs_8
@pytest.mark.parametrize("e_axis,n_axis,x_spec", [
    ("model", None, P("model")), (("data", "model"), None, P(("data", "model"))),
    ("model", "data", P("model")), (None, "model", P("data"))])
def test_vmap_linear_over_sharded_experts_keeps_rows_with_their_experts(e_axis, n_axis, x_spec, rng):
    mesh = mesh_2x4()
    codes, scales = expert_codes(rng, 8, 128, 128)
    w = stacked(codes, scales, EMULATION)
    x = jnp.asarray(rng.standard_normal((8, 6, 128)), jnp.float32)
    f = jax.vmap(lambda xi, wi: mx.linear(xi, wi, out_dtype=jnp.float32))
    want = np.asarray(jax.jit(f)(local(x), jax.device_put(w, cpu_devices()[0])))
    ws = placement.shard_weight(w, mesh, expert_axis=e_axis, n_axis=n_axis)
    xs = put(x, mesh, x_spec)
    got = jax.jit(f)(xs, ws)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert set(tp.collectives(hlo(f, xs, ws)).values()) == {0}  # nothing exchanged


@needs_8
@pytest.mark.parametrize("e_axis,n_axis,k_axis", [("model", None, None), (None, "model", None),
                                                  (None, None, "model")])
def test_grad_sharded_matches_and_gathers_no_weight(e_axis, n_axis, k_axis, rng):
    mesh = mesh_2x4()
    e, n, k, t = 8, 128, 256, 24
    codes, scales = expert_codes(rng, e, n, k)
    w = placement.shard_weight(stacked(codes, scales, EMULATION), mesh, expert_axis=e_axis,
                               n_axis=n_axis, k_axis=k_axis)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.float32)
    ct = rng.standard_normal((t, n))
    gs = grouping("short", e, t, rng)
    loss = lambda a, w, g: jnp.sum(mx.ragged_linear(a, w, g) * ct)  # noqa: E731
    args = (put(x, mesh, P(None, k_axis)), w, put(jnp.asarray(gs), mesh, P()))
    dx = jax.jit(jax.grad(loss))(*args)
    assert rel_fro(dx, grad_reference(ct, codes, scales, gs)[0]) <= 1e-5
    assert weight_sized_all_gathers(hlo(jax.grad(loss), *args), n * k // 8) == []


@needs_8
@pytest.mark.parametrize("e_axis,n_axis,k_axis,x_spec", [("model", None, None, P("data")),
                                                         (None, "model", None, P("data")),
                                                         (None, None, "model", P(None, "model"))])
def test_explicit_axes_mesh_forward_and_grad(e_axis, n_axis, k_axis, x_spec, rng):
    mesh = jax.make_mesh((2, 4), ("data", "model"), devices=cpu_devices()[:8],
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    e, n, k, t = 8, 128, 256, 24
    codes, scales = expert_codes(rng, e, n, k)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.float32)
    ct = rng.standard_normal((t, n))
    gs = grouping("skewed", e, t, rng)
    with jax.set_mesh(mesh):
        w = placement.shard_weight(stacked(codes, scales, EMULATION), mesh, expert_axis=e_axis,
                                   n_axis=n_axis, k_axis=k_axis)
        xs, g = put(x, mesh, x_spec), put(jnp.asarray(gs), mesh, P())
        y = jax.jit(mx.ragged_linear)(xs, w, g)
        dx = jax.jit(jax.grad(lambda a: jnp.sum(mx.ragged_linear(a, w, g) * ct)))(xs)
    assert rel_fro(y, reference(x, codes, scales, gs)) <= 1e-5
    assert rel_fro(dx, grad_reference(ct, codes, scales, gs)[0]) <= 1e-5
    assert dx.sharding.is_equivalent_to(xs.sharding, 2)


@needs_8
def test_tokens_routed_to_their_experts_inside_shard_map(rng):
    """The documented alternative to exchanging outputs: each device holds E/p experts, the
    tokens routed to them (sorted by local expert) and the local group sizes."""
    mesh = mesh_8()
    e, n, k, rows = 16, 64, 128, 6  # 2 experts and 6 token slots per device
    codes, scales = expert_codes(rng, e, n, k)
    w = placement.shard_weight(stacked(codes, scales, EMULATION), mesh, expert_axis="model")
    specs = jax.tree.map(lambda s: s.spec, placement.weight_shardings(w, mesh, expert_axis="model"))
    x = jnp.asarray(rng.standard_normal((8 * rows, k)), jnp.float32)
    gs = np.concatenate([rng.multinomial(int(rng.integers(0, rows + 1)), [0.5, 0.5]) for _ in range(8)]).astype(np.int32)

    def body(xl, wl, gl):
        assert local_shape(wl) == (2, n, k)
        return mx.ragged_linear(xl, wl, gl)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("model"), specs, P("model")), out_specs=P("model")))
    args = (put(x, mesh, P("model")), w, put(jnp.asarray(gs), mesh, P("model")))
    got = np.asarray(f(*args))
    for d in range(8):
        want = reference(x[d * rows:(d + 1) * rows], codes[2 * d:2 * d + 2], scales[2 * d:2 * d + 2], gs[2 * d:2 * d + 2])
        np.testing.assert_allclose(got[d * rows:(d + 1) * rows], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(initial=1))
    assert set(tp.collectives(f.lower(*args).compile().as_text()).values()) == {0}


@needs_8
@pytest.mark.parametrize("backend", [EMULATION, MARLIN], ids=lambda b: b.value)
def test_prepare_weight_sharded_of_stacked_experts(backend, rng):
    mesh = mesh_2x4()
    codes, scales = expert_codes(rng, 4, 256, 256)
    values, sc = jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn)), jnp.asarray(scales)
    scales_big = sc.at[1, 0, 0].set(200)  # one expert's flag set: not spread to the others
    for e_axis, n_axis, k_axis in (("model", None, None), ("data", "model", None), (None, None, "model"),
                                   ("model", None, "data")):
        per_shard = placement.prepare_weight_sharded(values, scales_big, mesh, expert_axis=e_axis, n_axis=n_axis,
                                                    k_axis=k_axis, backend=backend)
        whole = placement.shard_weight(mx.prepare_weight(values, scales_big, backend=backend), mesh,
                                      expert_axis=e_axis, n_axis=n_axis, k_axis=k_axis)
        assert per_shard.shape == whole.shape == (4, 256, 256) and per_shard.meta == whole.meta
        for name in whole.arrays:
            np.testing.assert_array_equal(bits(per_shard.arrays[name]), bits(whole.arrays[name]), err_msg=name)
            assert per_shard.arrays[name].sharding.is_equivalent_to(whole.arrays[name].sharding,
                                                                     whole.arrays[name].ndim)


@needs_8
def test_impossible_expert_placements_raise(rng):
    mesh = mesh_2x4()
    codes, scales = expert_codes(rng, 6, 64, 64)
    w = stacked(codes, scales, EMULATION)
    with pytest.raises(ValueError, match=r"6 experts .*\(4 shards\).*whole experts"):
        placement.weight_shardings(w, mesh, expert_axis="model")
    dense = stacked(codes[0], scales[0], EMULATION)
    with pytest.raises(ValueError, match="expert_axis='model' splits the experts of a stacked"):
        placement.weight_shardings(dense, mesh, expert_axis="model")
    # arrays split along N differently: the ragged partitioner refuses instead of gathering
    w8 = stacked(*expert_codes(rng, 8, 64, 64), EMULATION)
    bad = mx.MxWeight({"values": put(w8.arrays["values"], mesh, P(None, "model")),
                       "scales": put(w8.arrays["scales"], mesh, P(None, "data"))}, w8.shape, w8.backend)
    with pytest.raises(Exception, match="ragged_linear: the weight arrays are sharded inconsistently along N"):
        jax.jit(mx.ragged_linear)(put(jnp.ones((8, 64)), mesh, P()), bad, jnp.full(8, 1, jnp.int32))


# ---- MARLIN on a GPU: the grouped path the lead's kernel replaces ---------------------------

MARLIN_KERNELS = has_gpu() and has_cuda_targets(marlin.GEMM_TARGET, marlin.DEQUANT_TARGET)


@gpu_test(MARLIN_KERNELS, reason="needs an NVIDIA GPU and the Marlin CUDA kernels")
@pytest.mark.parametrize("e,n,k", [(8, 256, 512), (16, 192, 320), (4, 100, 96)])
@pytest.mark.parametrize("kind", GROUPINGS)
@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float16])
def test_marlin_ragged_linear_on_gpu_matches_float64(e, n, k, kind, x_dtype, rng):
    codes, scales = expert_codes(rng, e, n, k)
    scales[0, :, 0] = 200  # one expert on the general dequantization path (flags set)
    w = stacked(codes, scales, MARLIN)
    t = 64
    x = jnp.asarray(rng.standard_normal((t, k)), x_dtype)
    bias = jnp.asarray(rng.standard_normal((e, n)), jnp.float32)
    gs = grouping(kind, e, t, rng)
    f = jax.jit(lambda a, w, g, b: mx.ragged_linear(a, w, g, b, out_dtype=jnp.float32))
    y = f(x, w, jnp.asarray(gs), bias)
    want = reference(x, codes, scales, gs, bias)
    assert_close(y, want)
    assert_zero_past_groups(y, gs)
    yv = jax.jit(jax.vmap(lambda xi, wi: mx.linear(xi, wi, out_dtype=jnp.float32)))(
        jnp.broadcast_to(x[:8], (e, 8, k)), w)
    assert rel_fro(yv, np.einsum("mk,enk->emn", np.asarray(x[:8], np.float64),
                                 R.dequantize(codes, scales, np.float64))) <= 1e-2


def test_every_backend_with_a_grouped_gemm_is_tested():
    grouped = {b for b in registered_backends() if get_backend_impl(b).ragged_linear is not None}
    assert grouped == {EMULATION, MARLIN}, "add the backend to this file's parametrizations"
    assert ragged_module.ragged_linear is mx.ragged_linear
