"""jax.export of functions using jax_mxfp8: MxWeight arguments serialize, the FFI targets carry
their version, and exporting.export allows exactly our custom calls."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp8 as mx
from jax_mxfp8 import _ffi, exporting
from jax_mxfp8.backends import marlin
from jax_mxfp8.weight import MxWeight

pytest.importorskip("flatbuffers")  # jax.export's serializer


def here() -> tuple[str]:
    """The jax.export platform of the default device (the artifact is called there)."""
    return ({"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend()),)


def emulation_problem(rng, n=64, k=128):
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    return mx.quantize_weight(w, backend="emulation"), jnp.asarray(rng.standard_normal((4, k)),
                                                                   jnp.bfloat16)


def test_export_serialize_deserialize_call(rng):
    weight, x = emulation_problem(rng)
    fn = lambda x, w: mx.linear(x, w)  # noqa: E731
    blob = exporting.export(fn, platforms=here())(x, weight).serialize()
    restored = jax.export.deserialize(blob)
    np.testing.assert_array_equal(np.asarray(restored.call(x, weight)), np.asarray(jax.jit(fn)(x, weight)))
    weight2, _ = emulation_problem(rng)  # same structure, other values: the artifact is a function
    np.testing.assert_array_equal(np.asarray(restored.call(x, weight2)), np.asarray(fn(x, weight2)))


def test_exported_gradient_and_fake_quantize(rng):
    weight, x = emulation_problem(rng)
    fn = jax.grad(lambda x: jnp.sum(mx.linear(mx.fake_quantize(x), weight).astype(jnp.float32)))
    restored = jax.export.deserialize(exporting.export(fn, platforms=here())(x).serialize())
    np.testing.assert_array_equal(np.asarray(restored.call(x)), np.asarray(jax.jit(fn)(x)))


def test_a_wrongly_shaped_weight_is_refused(rng):
    weight, x = emulation_problem(rng)
    restored = jax.export.deserialize(
        exporting.export(lambda x, w: mx.linear(x, w), platforms=here())(x, weight).serialize())
    other = mx.quantize_weight(jnp.ones((32, 128), jnp.float32), backend="emulation")
    with pytest.raises(ValueError, match="pytree structure|shape"):
        restored.call(x, other)


def test_mxweight_treedef_round_trips_with_marlin_meta():
    arrays, meta = marlin.pack_weight(*mx.quantize(jnp.ones((64, 128), jnp.float32)))
    weight = MxWeight(arrays, (64, 128), mx.Backend.MARLIN, meta)
    treedef = jax.tree.structure(weight)
    back = jax.export.deserialize(
        exporting.export(lambda w: w.arrays["scales"], platforms=("cpu",))(weight).serialize())
    assert back.in_tree.children()[0].children()[0] == treedef


def test_cuda_lowering_from_the_cpu_host_names_versioned_targets(rng):
    weight, x = emulation_problem(rng)
    exported = exporting.export(lambda x, w: mx.linear(mx.fake_quantize(x), w),
                                platforms=("cuda",))(x, weight)
    text = exported.mlir_module()
    calls = set(re.findall(r"custom_call @(jax_mxfp8_\w+)", text))
    assert all(c.endswith("_" + _ffi.FFI_VERSION) for c in calls)
    if _ffi.kernels_enabled():  # a build with the CUDA module lowers to its kernels
        assert f"jax_mxfp8_quantize_cuda_{_ffi.FFI_VERSION}" in calls
        with pytest.raises(ValueError, match="custom call"):  # plain jax.export refuses them
            jax.export.export(jax.jit(lambda x, w: mx.linear(mx.fake_quantize(x), w)),
                              platforms=("cuda",))(x, weight)
    else:
        assert not calls
    assert len(exported.serialize()) > 0


def test_every_target_is_versioned():
    names = _ffi.target_names()
    # quantize, dequantize, swizzle, unswizzle, the four Marlin GEMMs (mma.sync, wgmma and the
    # grouped form of each), the Marlin dequantize, the CUTLASS GEMM
    assert len(names) == 10 and all(n.endswith("_" + _ffi.FFI_VERSION) for n in names)
    assert {"jax_mxfp8_marlin_grouped_gemm_cuda_v1", "jax_mxfp8_marlin_grouped_wgmma_cuda_v1"} <= set(names)
    assert len(exporting.disabled_checks()) == len(names)
