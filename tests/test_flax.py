"""Flax wrappers: NNX Mxfp8Linear / quantize_model / state dicts, Linen Mxfp8Dense /
quantize_params / intercept_dense. Numerics are checked against the float64 numpy reference."""
import io
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
import flax.linen as nn  # noqa: E402
from flax.core import FrozenDict  # noqa: E402

import jax_mxfp8 as mx  # noqa: E402
from jax_mxfp8.flax import (  # noqa: E402
    Mxfp8Dense, Mxfp8Linear, intercept_dense, load_state_dict, quantize_model, quantize_params,
    state_dict)

from helpers import rel_fro  # noqa: E402
from oracles import mxfp8 as ref  # noqa: E402

BACKEND = "emulation"


def new_seed(rng) -> int:
    """A seed for flax / jax.random, drawn from the test's seeded generator."""
    return int(rng.integers(1 << 30))


def cosine(got, want):
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    return float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))


def codes(values):
    return np.asarray(values).view(np.uint8)


# ---- NNX: the layer ------------------------------------------------------------------------------

def test_from_linear_quantizes_the_transposed_kernel_exactly(rng):
    layer = nnx.Linear(96, 48, rngs=nnx.Rngs(new_seed(rng)))
    layer.bias.set_value(jax.random.normal(jax.random.key(new_seed(rng)), (48,)))
    q = Mxfp8Linear.from_linear(layer, backend=BACKEND)
    values, scales = q.weight.get_value().unpack()
    want_codes, want_scales = ref.quantize(np.asarray(layer.kernel.get_value()).T)  # [out, in]
    np.testing.assert_array_equal(codes(values), want_codes)
    np.testing.assert_array_equal(np.asarray(scales), want_scales)
    x = np.asarray(jax.random.normal(jax.random.key(new_seed(rng)), (5, 96), jnp.float32))
    want = ref.linear(x, want_codes, want_scales, np.asarray(layer.bias.get_value()))
    got = q(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("kwargs, x_dtype, x_shape", [
    ({}, jnp.float32, (3, 64)),                                                  # f32 params, f32 in
    ({}, jnp.bfloat16, (2, 3, 64)),                                              # promotes to f32
    ({"dtype": jnp.bfloat16}, jnp.float32, (7, 64)),                             # computes in bf16
    ({"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16, "use_bias": False}, jnp.bfloat16, (1, 2, 4, 64)),
    ({"param_dtype": jnp.bfloat16, "preferred_element_type": jnp.float32}, jnp.bfloat16, (3, 64)),
])
def test_drop_in_call_shape_and_dtype(kwargs, x_dtype, x_shape, rng):
    layer = nnx.Linear(64, 32, rngs=nnx.Rngs(new_seed(rng)), **kwargs)
    x = jax.random.normal(jax.random.key(new_seed(rng)), x_shape, x_dtype)
    want = layer(x)
    got = Mxfp8Linear.from_linear(layer, backend=BACKEND)(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_fro(got, want) < 0.06 and cosine(got, want) > 0.998


def test_w8a8_option_matches_the_reference(rng):
    layer = nnx.Linear(64, 32, rngs=nnx.Rngs(new_seed(rng)), use_bias=False)
    q = Mxfp8Linear.from_linear(layer, backend=BACKEND, quantize_activations=True)
    x = np.asarray(jax.random.normal(jax.random.key(new_seed(rng)), (4, 64), jnp.float32))
    values, scales = q.weight.get_value().unpack()
    want = ref.linear(x, codes(values), np.asarray(scales), quantize_activations=True)
    np.testing.assert_allclose(np.asarray(q(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_out_sharding_is_applied():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch", None))
    q = Mxfp8Linear.from_linear(nnx.Linear(32, 16, rngs=nnx.Rngs(0)), backend=BACKEND)
    y = nnx.jit(lambda m, x: m(x, out_sharding=sharding))(q, jnp.ones((8, 32)))
    assert y.sharding.is_equivalent_to(sharding, 2)


def test_constructor_validates():
    with pytest.raises(TypeError, match="MxWeight"):
        Mxfp8Linear(jnp.ones((4, 32)))
    with pytest.raises(ValueError, match="bias has shape"):
        Mxfp8Linear(mx.quantize_weight(jnp.ones((8, 32))), jnp.ones(4))


# ---- NNX: converting models ----------------------------------------------------------------------

class Block(nnx.Module):
    def __init__(self, rngs, width=64, dtype=jnp.bfloat16):
        self.up = nnx.Linear(width, 4 * width, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.norm = nnx.RMSNorm(width, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class Model(nnx.Module):
    def __init__(self, rngs, width=64):
        self.blocks = nnx.List([Block(rngs, width) for _ in range(3)])
        self.heads = nnx.Dict({"out": nnx.Linear(width, 96, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=rngs)})
        self.tied = self.blocks[0].up  # the same module reachable twice
        self.odd = nnx.Linear(40, width, rngs=rngs)  # in_features % 32 != 0: skipped by default

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.heads["out"](x)


def model_and_input(rng):
    model = Model(nnx.Rngs(new_seed(rng)))
    x = jax.random.normal(jax.random.key(new_seed(rng)), (2, 8, 64), jnp.bfloat16)
    return model, x


def test_quantize_model_converts_in_place_and_stays_close(rng):
    model, x = model_and_input(rng)
    want = model(x)
    returned = quantize_model(model, backend=BACKEND)
    assert returned is model
    assert all(isinstance(b.up, Mxfp8Linear) and isinstance(b.down, Mxfp8Linear) for b in model.blocks)
    assert isinstance(model.heads["out"], Mxfp8Linear)
    assert model.tied is model.blocks[0].up  # shared module replaced everywhere
    assert isinstance(model.odd, nnx.Linear)
    got = nnx.jit(lambda m, x: m(x))(model, x)
    assert got.shape == want.shape and got.dtype == want.dtype
    # MXFP8 (e4m3: 3 mantissa bits) through 7 linears with residuals; measured ~0.03-0.04.
    assert rel_fro(got, want) < 0.08 and cosine(got, want) > 0.997


def test_quantize_model_predicate_and_errors(rng):
    model, _ = model_and_input(rng)
    seen = []

    def only_down(path, module):
        seen.append(path)
        return path.endswith("down")

    quantize_model(model, predicate=only_down, backend=BACKEND)
    assert "blocks.0.down" in seen and "heads.out" in seen and "odd" in seen
    assert all(isinstance(b.down, Mxfp8Linear) and isinstance(b.up, nnx.Linear) for b in model.blocks)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        quantize_model(model, predicate=lambda path, m: path == "odd", backend=BACKEND)
    with pytest.raises(ValueError, match="unknown rounding"):
        quantize_model(model, rounding="nearest")
    holder = nnx.Module()
    holder.pair = nnx.data((nnx.Linear(32, 32, rngs=nnx.Rngs(0)),))
    with pytest.raises(ValueError, match="tuple"):
        quantize_model(holder, backend=BACKEND)


def test_quantize_model_on_a_bare_linear_and_a_plain_list():
    bare = nnx.Linear(32, 8, rngs=nnx.Rngs(0))
    assert isinstance(quantize_model(bare, backend=BACKEND), Mxfp8Linear)
    holder = nnx.Module()
    holder.layers = nnx.data([nnx.Linear(32, 32, rngs=nnx.Rngs(i)) for i in range(2)])
    quantize_model(holder, backend=BACKEND)
    assert all(isinstance(layer, Mxfp8Linear) for layer in holder.layers)


@pytest.mark.parametrize("progress, shown", [(True, True), (False, False)])
def test_progress_bar(progress, shown, rng):
    model, _ = model_and_input(rng)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        quantize_model(model, backend=BACKEND, progress=progress)
    assert ("7/7" in err.getvalue()) == shown
    assert shown or err.getvalue() == ""


def test_split_merge_state_and_jit(rng):
    model, x = model_and_input(rng)
    quantize_model(model, backend=BACKEND)
    want = nnx.jit(lambda m, x: m(x))(model, x)  # eager and jit may round bf16 differently
    graphdef, state = nnx.split(model)
    weights = [leaf for leaf in jax.tree.leaves(state) if leaf.dtype == jnp.float8_e4m3fn]
    assert len(weights) == 7  # 3 blocks x 2 + head: the MXFP8 values are state leaves
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    np.testing.assert_array_equal(np.asarray(forward(state, x)), np.asarray(want))
    clone = nnx.merge(graphdef, jax.tree.map(jnp.copy, nnx.state(model)))
    np.testing.assert_array_equal(np.asarray(forward(nnx.state(clone), x)), np.asarray(want))


def test_orbax_saves_nnx_state(rng):
    ocp = pytest.importorskip("orbax.checkpoint")
    import tempfile
    model, x = model_and_input(rng)
    quantize_model(model, backend=BACKEND)
    graphdef, state = nnx.split(model)
    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(f"{tmp}/state", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(f"{tmp}/state", jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, restored)(x)), np.asarray(model(x)))


def test_state_dict_round_trip_through_safetensors(tmp_path, rng):
    model, x = model_and_input(rng)
    quantize_model(model, backend=BACKEND)
    tensors = state_dict(model)
    assert isinstance(tensors["blocks.0.up.weight"], mx.MxWeight)
    assert tensors["odd.weight"].shape == (64, 40)  # float Linear saved as [out, in]
    assert "tied.weight" not in tensors  # shared modules are saved once
    mx.save_safetensors(tmp_path / "ck", tensors)
    fresh = Model(nnx.Rngs(new_seed(rng)))  # float model: MXFP8 tensors turn its Linears into Mxfp8Linear
    loaded = load_state_dict(fresh, mx.load_safetensors(tmp_path / "ck", backend=BACKEND))
    assert isinstance(loaded.blocks[2].down, Mxfp8Linear) and isinstance(loaded.odd, nnx.Linear)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    np.testing.assert_array_equal(np.asarray(loaded.odd.kernel.get_value()),
                                  np.asarray(model.odd.kernel.get_value()))


def test_load_state_dict_errors(rng):
    model, _ = model_and_input(rng)
    tensors = state_dict(model)
    with pytest.raises(ValueError, match="missing"):
        load_state_dict(Model(nnx.Rngs(0)), {k: v for k, v in tensors.items() if k != "odd.bias"})
    with pytest.raises(ValueError, match="unexpected"):
        load_state_dict(Model(nnx.Rngs(0)), {**tensors, "extra": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        load_state_dict(Model(nnx.Rngs(0)), {**tensors, "odd.weight": tensors["odd.weight"].T})
    with pytest.raises(ValueError, match="shape"):
        load_state_dict(Model(nnx.Rngs(0)), {**tensors, "odd.bias": jnp.ones(3)})
    partial = load_state_dict(Model(nnx.Rngs(0)), {"odd.bias": jnp.arange(64.0)}, strict=False)
    np.testing.assert_array_equal(np.asarray(partial.odd.bias.get_value()), np.arange(64.0))


# ---- Linen -------------------------------------------------------------------------------------

class LinenMLP(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(64, (3,), name="conv")(x)
        x = x + self.dense(256, name="up")(x)[..., :64]
        x = jax.nn.gelu(self.dense(64, name="down")(jnp.tile(x, (1, 1, 4))))
        return nn.Dense(48, name="odd")(x[..., :40])  # in_features 40: stays float


def linen_setup(rng):
    x = jax.random.normal(jax.random.key(new_seed(rng)), (2, 8, 64), jnp.float32)
    params = LinenMLP().init(jax.random.key(new_seed(rng)), x)
    return params, x


def test_quantize_params_structure(rng):
    params, _ = linen_setup(rng)
    frozen = FrozenDict(params)
    q = quantize_params(frozen, backend=BACKEND)
    assert isinstance(q, FrozenDict)
    p = q["params"]
    assert set(p["up"]) == {"weight", "bias"} and isinstance(p["up"]["weight"], mx.MxWeight)
    assert p["up"]["weight"].shape == (256, 64)
    assert set(p["odd"]) == {"kernel", "bias"} and p["conv"]["kernel"].ndim == 3
    values, scales = p["down"]["weight"].unpack()
    want_codes, want_scales = ref.quantize(np.asarray(params["params"]["down"]["kernel"]).T)
    np.testing.assert_array_equal(codes(values), want_codes)
    np.testing.assert_array_equal(np.asarray(scales), want_scales)
    assert "kernel" in params["params"]["up"]  # the input tree is not modified
    only_up = quantize_params(params, predicate=lambda path, k: path.endswith("up"), backend=BACKEND)
    assert "kernel" in only_up["params"]["down"] and "weight" in only_up["params"]["up"]


def test_mxfp8_dense_and_intercept_match_and_stay_close(rng):
    params, x = linen_setup(rng)
    want = LinenMLP().apply(params, x)
    q = quantize_params(params, backend=BACKEND)
    got = jax.jit(LinenMLP(dense=Mxfp8Dense).apply)(q, x)
    with intercept_dense():
        intercepted = jax.jit(LinenMLP().apply)(q, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(intercepted))
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_fro(got, want) < 0.06 and cosine(got, want) > 0.998
    with intercept_dense():  # float params: nn.Dense runs unchanged
        np.testing.assert_array_equal(np.asarray(LinenMLP().apply(params, x)), np.asarray(want))


def test_mxfp8_dense_init_matches_quantize_params_tree(rng):
    import functools
    params, x = linen_setup(rng)
    q = quantize_params(params, backend=BACKEND)
    dense = functools.partial(Mxfp8Dense, backend=BACKEND)  # the backend is in the treedef
    init = jax.eval_shape(LinenMLP(dense=dense).init, jax.random.key(0), x)
    assert jax.tree.structure(init) == jax.tree.structure(q)
    # Both default to the automatic choice for the default device (marlin on an H100).
    auto = jax.eval_shape(LinenMLP(dense=Mxfp8Dense).init, jax.random.key(0), x)
    assert jax.tree.structure(auto) == jax.tree.structure(quantize_params(params))
    fresh = LinenMLP(dense=Mxfp8Dense).init(jax.random.key(0), x)
    assert isinstance(fresh["params"]["up"]["weight"], mx.MxWeight)
    assert fresh["params"]["up"]["weight"].backend is mx.select_backend()


def test_mxfp8_dense_rejects_mismatched_weight(rng):
    params, x = linen_setup(rng)
    q = quantize_params(params, backend=BACKEND)
    q = {"params": {**q["params"], "up": {**q["params"]["up"], "weight": q["params"]["down"]["weight"]}}}
    with pytest.raises(ValueError, match=r"expects \[out, in\]"):
        LinenMLP(dense=Mxfp8Dense).apply(q, x)


def test_mxfp8_dense_apply_does_not_rerun_init(rng):
    """apply uses the stored MxWeight as is (whatever backend prepared it): the layer's own
    init backend (here one this CPU cannot run) is never consulted."""
    import functools
    params, x = linen_setup(rng)
    q = quantize_params(params, backend=BACKEND)
    dense = functools.partial(Mxfp8Dense, backend="cutlass")
    want = LinenMLP(dense=Mxfp8Dense).apply(q, x)
    np.testing.assert_array_equal(np.asarray(LinenMLP(dense=dense).apply(q, x)), np.asarray(want))
