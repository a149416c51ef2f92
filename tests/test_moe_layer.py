"""The NNX mixture-of-experts layer (jax_mxfp8/flax/moe.py): routing, sorting by expert, the
grouped GEMMs, against the unsorted einsum reference and against the float layer on the
dequantized weights; routing edge cases (one expert takes every token, experts with none),
jit, batch x sequence shapes, gradients, conversion and checkpoints of the layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import jax_mxfp8 as mx  # noqa: E402
from jax_mxfp8.flax import load_state_dict, quantize_model, state_dict  # noqa: E402
from jax_mxfp8.flax.moe import (  # noqa: E402
    MoE, Mxfp8RaggedLinear, RaggedLinear, dequantized, moe_reference, quantize_moe, route,
    sort_by_expert)

from helpers import rel_fro  # noqa: E402

H, I, E = 64, 96, 8


def make_moe(seed, top_k=2, dtype=jnp.bfloat16, **kwargs):
    return MoE.create(H, I, E, top_k, rngs=nnx.Rngs(seed), param_dtype=dtype, **kwargs)


def weights_of(moe):
    """(router, gate_up, down) float arrays of a float MoE."""
    return (moe.gate.weight.get_value(), moe.experts.gate_up_proj.weight.get_value(),
            moe.experts.down_proj.weight.get_value())


def reference_of(moe, x):
    router, gate_up, down = weights_of(moe)
    return moe_reference(x, router, gate_up, down, top_k=moe.top_k, renormalize=moe.renormalize)


def inputs(rng, *shape, dtype=jnp.bfloat16):
    return jnp.asarray(rng.standard_normal((*shape, H)), dtype)


# ---- routing and sorting -------------------------------------------------------------------------

def test_route_is_top_k_of_softmax_renormalized(rng):
    logits = jnp.asarray(rng.standard_normal((9, E)), jnp.float32)
    weights, ids = route(logits, 3)
    logits = np.asarray(logits, np.float64)
    want_ids = np.argsort(-logits, axis=1)[:, :3]
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    chosen = np.take_along_axis(logits, want_ids, 1)
    softmax_of_chosen = np.exp(chosen - chosen.max(1, keepdims=True))
    softmax_of_chosen /= softmax_of_chosen.sum(1, keepdims=True)  # Mixtral's formulation
    np.testing.assert_allclose(np.asarray(weights), softmax_of_chosen, rtol=1e-6)
    raw, _ = route(jnp.asarray(logits, jnp.float32), 3, renormalize=False)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(raw), np.take_along_axis(probs, want_ids, 1), rtol=1e-6)


def test_sort_by_expert_is_stable_and_counts_on_device(rng):
    ids = jnp.asarray(rng.integers(0, E, size=(11, 2)), jnp.int32)
    order, group_sizes = jax.jit(sort_by_expert, static_argnums=1)(ids, E)
    flat = np.asarray(ids).reshape(-1)
    np.testing.assert_array_equal(np.asarray(order), np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(np.asarray(group_sizes), np.bincount(flat, minlength=E))
    assert group_sizes.dtype == jnp.int32


# ---- the float layer and the MXFP8 layer --------------------------------------------------------------

@pytest.mark.parametrize("lead", [(7,), (2, 5), (3, 1, 4)])
def test_float_layer_matches_the_unsorted_reference(rng, seed, lead):
    moe = make_moe(seed)
    x = inputs(rng, *lead)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    assert rel_fro(y, reference_of(moe, x)) < 4e-3  # bf16 roundings of the same math


def test_float32_layer_matches_the_reference_tightly(rng, seed):
    moe = make_moe(seed, top_k=3, dtype=jnp.float32)
    x = inputs(rng, 4, 6, dtype=jnp.float32)
    assert rel_fro(moe(x), reference_of(moe, x)) < 1e-5


@pytest.mark.parametrize("lead", [(13,), (2, 8)])
def test_mxfp8_layer_is_the_float_layer_on_dequantized_weights(rng, seed, lead):
    bf16 = make_moe(seed)
    mxfp8 = quantize_moe(nnx.clone(bf16), backend="emulation")
    assert mxfp8.is_mxfp8 and not bf16.is_mxfp8
    assert isinstance(mxfp8.experts.down_proj, Mxfp8RaggedLinear)
    assert mxfp8.experts.gate_up_proj.weight.get_value().num_experts == E
    x = inputs(rng, *lead)
    y = mxfp8(x)
    twin = dequantized(mxfp8)
    assert isinstance(twin.experts.gate_up_proj, RaggedLinear) and not twin.is_mxfp8
    # W8A16 is the float layer on the exactly dequantized weights: the same operands, bit for bit
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(twin(x), np.float32))
    assert rel_fro(y, reference_of(twin, x)) < 4e-3
    # against the unquantized layer: MXFP8's rounding of the weights (e4m3, ~3 % per weight)
    error = rel_fro(y, bf16(x))
    assert 5e-3 < error < 0.1, error


def steer(moe, favourites):
    """Router weights that send every positive token to `favourites` in that order of weight."""
    router = np.zeros((E, H), np.float32)
    for rank, expert in enumerate(favourites):
        router[expert] = 1.0 / (rank + 1)
    moe.gate.weight.set_value(jnp.asarray(router, moe.gate.weight.get_value().dtype))
    return moe


@pytest.mark.parametrize("top_k, favourites", [(1, [5]), (2, [0, 7]), (2, [3, 2])])
def test_routing_edge_cases(rng, seed, top_k, favourites):
    """Every token to the same experts: those experts take all rows, the others none."""
    bf16 = steer(make_moe(seed, top_k=top_k), favourites)
    mxfp8 = quantize_moe(nnx.clone(bf16), backend="emulation")
    x = jnp.abs(inputs(rng, 3, 5)) + 0.125  # positive: the steered logits win
    _, ids = route(bf16.gate(x.reshape(-1, H)), top_k)
    _, group_sizes = sort_by_expert(ids, E)
    want = np.zeros(E, int)
    want[favourites] = 15
    np.testing.assert_array_equal(np.asarray(group_sizes), want)
    y = mxfp8(x)
    assert np.isfinite(np.asarray(y, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(dequantized(mxfp8)(x), np.float32))
    assert rel_fro(y, reference_of(dequantized(mxfp8), x)) < 4e-3
    assert rel_fro(bf16(x), reference_of(bf16, x)) < 4e-3


def test_one_token_and_experts_left_empty(rng, seed):
    moe = quantize_moe(make_moe(seed), backend="emulation")
    x = inputs(rng, 1)
    _, ids = route(moe.gate(x), 2)
    assert len(set(np.asarray(ids).ravel())) == 2  # six of the eight experts get no row
    assert rel_fro(moe(x), reference_of(dequantized(moe), x)) < 4e-3


def test_jit_and_split_merge(rng, seed):
    moe = quantize_moe(make_moe(seed), backend="emulation")
    x = inputs(rng, 2, 8)
    eager = moe(x)
    jitted = nnx.jit(lambda m, x: m(x))(moe, x)
    graphdef, state = nnx.split(moe)
    merged = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_array_equal(np.asarray(jitted, np.float32), np.asarray(merged, np.float32))
    # one program against op-by-op dispatch: XLA's fusions and a GPU's GEMM algorithms may sum
    # in another order and move bf16 roundings by an ulp, so only the tolerance is a contract
    want = reference_of(dequantized(moe), x)
    assert rel_fro(jitted, want) < 1e-2 and rel_fro(eager, want) < 1e-2  # numerics.md's bound
    assert "mxfp8_ragged_linear" in str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def test_gradient_with_respect_to_x(rng, seed):
    mxfp8 = quantize_moe(make_moe(seed, dtype=jnp.float32), backend="emulation")
    twin = dequantized(mxfp8, jnp.float32)
    x = inputs(rng, 6, dtype=jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(mxfp8(x) ** 2))(x)
    want = jax.grad(lambda x: jnp.sum(twin(x) ** 2))(x)
    assert rel_fro(grad, want) < 1e-5


def test_biases(rng, seed):
    bf16 = make_moe(seed, dtype=jnp.float32)
    router, gate_up, down = weights_of(bf16)
    biases = dict(gate_up_bias=jnp.asarray(rng.standard_normal((E, 2 * I)), jnp.float32),
                  down_bias=jnp.asarray(rng.standard_normal((E, H)), jnp.float32))
    moe = MoE(router, gate_up, down, top_k=2, **biases)
    x = inputs(rng, 5, dtype=jnp.float32)
    want = moe_reference(x, router, gate_up, down, top_k=2, **biases)
    assert rel_fro(moe(x), want) < 1e-5
    mxfp8 = quantize_moe(nnx.clone(moe), backend="emulation")
    assert rel_fro(mxfp8(x), dequantized(mxfp8, jnp.float32)(x)) < 1e-6


class TwoLayers(nnx.Module):
    def __init__(self, seed):
        self.up = nnx.Linear(H, H, rngs=nnx.Rngs(seed))
        self.moes = nnx.List([make_moe(seed + 1), make_moe(seed + 2)])

    def __call__(self, x):
        x = self.up(x)
        for moe in self.moes:
            x = x + moe(x)
        return x


def test_quantize_moe_and_quantize_model_in_one_model(rng, seed):
    model = quantize_moe(TwoLayers(seed), backend="emulation")
    assert all(m.is_mxfp8 for m in model.moes)
    assert all(m.gate.weight.get_value().dtype == jnp.bfloat16 for m in model.moes)  # routers float
    model = quantize_model(model, backend="emulation")
    assert isinstance(model.up, mx.flax.Mxfp8Linear)
    assert model(inputs(rng, 3).astype(jnp.float32)).shape == (3, H)
    # quantize_model alone leaves the MoE layers (no nnx.Linear in them) as they are
    assert not any(m.is_mxfp8 for m in quantize_model(TwoLayers(seed), backend="emulation").moes)


@pytest.mark.parametrize("layout", [None, "vllm", "per_expert"])
def test_layer_checkpoint_round_trip(tmp_path, rng, seed, layout):
    moe = quantize_moe(make_moe(seed), backend="emulation")
    prefix = "model.layers.0.mlp"
    tensors = {f"{prefix}.{name}": value for name, value in state_dict(moe).items()}
    assert set(tensors) == {f"{prefix}.gate.weight", f"{prefix}.experts.gate_up_proj.weight",
                            f"{prefix}.experts.down_proj.weight"}
    mx.save_safetensors(tmp_path / "ck", tensors, experts=layout)
    names = set(mx.checkpoint.read_safetensors(tmp_path / "ck"))
    expected = {None: f"{prefix}.experts.gate_up_proj.weight_scale",
                "vllm": f"{prefix}.experts.w13_weight_scale",
                "per_expert": f"{prefix}.experts.7.up_proj.weight_scale"}[layout]
    assert expected in names
    loaded = mx.load_safetensors(tmp_path / "ck", backend="emulation", experts="fuse")
    fresh = quantize_moe(make_moe(seed + 1), backend="emulation")
    fresh = load_state_dict(fresh, {k[len(prefix) + 1:]: v for k, v in loaded.items()})
    x = inputs(rng, 2, 3)
    np.testing.assert_array_equal(np.asarray(fresh(x), np.float32), np.asarray(moe(x), np.float32))
    # or straight from the loaded weights
    direct = MoE(loaded[f"{prefix}.gate.weight"], loaded[f"{prefix}.experts.gate_up_proj.weight"],
                 loaded[f"{prefix}.experts.down_proj.weight"], top_k=2)
    assert direct.is_mxfp8
    np.testing.assert_array_equal(np.asarray(direct(x), np.float32), np.asarray(moe(x), np.float32))


@pytest.mark.parametrize("make, message", [
    (lambda: MoE(jnp.zeros((E, H)), jnp.zeros((E, 2 * I, H + 1)), jnp.zeros((E, H, I)), top_k=2),
     r"expected \[E, 2I, H\]"),
    (lambda: MoE(jnp.zeros((E, H)), jnp.zeros((E, 2 * I, H)), jnp.zeros((E, H, I + 32)), top_k=2),
     r"expected \[E, H, I\]"),
    (lambda: MoE(jnp.zeros((E, H)), jnp.zeros((E, 2 * I, H)), jnp.zeros((E, H, I)), top_k=9),
     "1 <= top_k <= 8"),
    (lambda: MoE(jnp.zeros((E, H)), jnp.zeros((E, 2 * I, H)), jnp.zeros((E, H, I)), top_k=2,
                 down_bias=jnp.zeros((E, I))), r"bias has shape \(8, 96\); expected .* \(8, 64\)"),
    (lambda: quantize_moe(MoE(jnp.zeros((E, H)), jnp.zeros((E, 96, H)), jnp.zeros((E, H, 48)),
                              top_k=2), backend="emulation"), "K=48 is not a multiple of 32"),
    (lambda: Mxfp8RaggedLinear(mx.quantize_weight(jnp.ones((I, H)), backend="emulation")),
     "must be a stacked MxWeight"),
    (lambda: make_moe(0)(jnp.zeros((2, H + 32))), r"expected \[\.\.\., 64\]"),
])
def test_errors(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()
