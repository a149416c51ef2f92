"""Fused projections (jax_mxfp8.fusion, the NNX Mxfp8FusedLinear / fuse_linears /
quantize_model(fuse=...), the decoder's fused q/k/v and gate/up): fused against separate
linears (bit-identical where the dot's reduction order does not depend on N, else within the
float32 summation bound), the exact round trip of the pieces, transforms, sharding, errors."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_mxfp8 as mx
from jax_mxfp8 import exporting, placement
from jax_mxfp8.backends import marlin
from jax_mxfp8.fusion import split_outputs

from helpers import (SMALL_DECODER, assert_same_bits, bits, gpu_test, has_cuda_targets, has_gpu,
                     mesh_2x4)

nnx = pytest.importorskip("flax.nnx")
from jax_mxfp8.flax.nnx import (  # noqa: E402
    Mxfp8FusedLinear, Mxfp8Linear, call_fused, fuse_linears, fused_name, load_state_dict,
    quantize_model, state_dict)
from jax_mxfp8.models import decoder  # noqa: E402

BACKENDS = ("emulation", "marlin", "cutlass")  # every layout can be prepared on a CPU host
U32 = 2.0 ** -24  # float32 unit roundoff


@pytest.fixture
def on_cpu():
    """Bit-identity is a property of XLA's CPU dot for bf16 operands (see accumulation_bound);
    run there even where a GPU is the default device."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def random_weights(rng, sizes, k, backend="emulation"):
    return [mx.quantize_weight(jnp.asarray(rng.standard_normal((n, k)) * 2.0 ** rng.integers(-3, 4),
                                           jnp.float32), backend=backend) for n in sizes]


def random_biases(rng, sizes, present):
    return [jnp.asarray(rng.standard_normal(n), jnp.float32) if has else None
            for n, has in zip(sizes, present)]


def separate(x, weights, biases, **kwargs):
    return [mx.linear(x, w, b, **kwargs) for w, b in zip(weights, biases)]


def canonical(weight):
    values, scales = weight.unpack()
    return bits(values), np.asarray(scales)


def accumulation_bound(x, weights):
    """Two float32 sums of the same K products in different orders differ by at most
    2 * gamma_K * sum |x_k w_k| (gamma_K = K u / (1 - K u)): XLA's CPU dot of float32
    operands blocks K by shape, so a wider N may group the sum differently."""
    k = x.shape[-1]
    gamma = k * U32 / (1 - k * U32)
    x64 = np.abs(np.asarray(x, np.float64))
    return [2 * gamma * x64 @ np.abs(np.asarray(mx.dequantize(*w.unpack(), dtype=jnp.float32),
                                                np.float64)).T for w in weights]


# ---- fused against separate ------------------------------------------------------------------

@pytest.mark.parametrize("sizes,k,m", [((64, 96, 1024), 256, 7), ((1024, 256, 256), 512, 33),
                                       ((96, 64), 4096, 1), ((32, 32, 32, 32), 32, 300)])
@pytest.mark.parametrize("shards", [1, 4])
@pytest.mark.parametrize("out_dtype", [None, jnp.float32])
def test_bf16_fused_linear_is_bit_identical_to_separate_linears(sizes, k, m, shards, out_dtype, rng,
                                                                on_cpu):
    weights = random_weights(rng, sizes, k)
    biases = random_biases(rng, sizes, [i % 2 == 0 for i in range(len(sizes))])
    fused = mx.fuse_weights(weights, shards=shards)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    got = jax.jit(lambda x, f, b: mx.linear_split(x, f, b, out_dtype=out_dtype))(x, fused, biases)
    want = jax.jit(lambda x, ws, bs: separate(x, ws, bs, out_dtype=out_dtype))(x, weights, biases)
    assert [y.shape for y in got] == [(m, n) for n in sizes]
    assert_same_bits(got, want)
    assert got[0].dtype == (out_dtype or jnp.bfloat16)


@pytest.mark.parametrize("w8a8", [False, True])
def test_float32_fused_linear_agrees_to_the_accumulation_order(w8a8, rng, on_cpu):
    sizes, k = (64, 96, 1024), 512
    weights = random_weights(rng, sizes, k)
    x = jnp.asarray(rng.standard_normal((3, 5, k)), jnp.float32)
    got = mx.linear_split(x, mx.fuse_weights(weights), quantize_activations=w8a8)
    want = separate(x, weights, [None] * 3, quantize_activations=w8a8)
    operand = mx.fake_quantize(x) if w8a8 else x  # W8A8: both quantize x the same way
    for g, w, bound in zip(got, want, accumulation_bound(operand, weights)):
        assert g.shape == w.shape and g.dtype == jnp.float32
        assert np.all(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)) <= bound)


def test_a_fused_bias_array_and_fuse_biases(rng, on_cpu):
    sizes = (64, 32, 96)
    weights = random_weights(rng, sizes, 64)
    biases = random_biases(rng, sizes, [True, False, True])
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    for shards in (1, 2, 4):
        fused = mx.fuse_weights(weights, shards=shards)
        joined = mx.fuse_biases(biases, fused)
        assert joined.shape == (sum(sizes),) and joined.dtype == jnp.float32
        pieces = split_outputs(joined, fused)  # the bias is in the fused row order
        np.testing.assert_array_equal(np.asarray(pieces[1]), np.zeros(32))
        for got, want in zip((pieces[0], pieces[2]), (biases[0], biases[2])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert_same_bits(mx.linear_split(x, fused, joined), mx.linear_split(x, fused, biases))
    assert mx.fuse_biases([None, None, None], fused) is None


# ---- the pieces come back exactly ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shards", [1, 2])
def test_unfuse_and_to_backend_are_exact(backend, shards, rng):
    sizes, k = (128, 64, 256), 256
    weights = random_weights(rng, sizes, k, backend=backend)
    fused = mx.fuse_weights(weights, shards=shards)
    assert fused.backend.value == backend and fused.shape == (sum(sizes), k)
    assert fused.nbytes == fused.weight.nbytes
    for got, want in zip(fused.unfuse(), weights):
        assert got.backend.value == backend and got.shape == want.shape
        for a, b in zip(canonical(got), canonical(want)):
            np.testing.assert_array_equal(a, b)
    other = fused.to_backend("emulation")
    assert other.sizes == fused.sizes and other.shards == shards
    for got, want in zip(other.unfuse(), weights):
        for a, b in zip(canonical(got), canonical(want)):
            np.testing.assert_array_equal(a, b)


def test_mixed_backends_fuse_with_an_explicit_backend(rng):
    a, = random_weights(rng, (64,), 128, backend="marlin")
    b, = random_weights(rng, (96,), 128, backend="emulation")
    with pytest.raises(ValueError, match=r"different backends \['emulation', 'marlin'\].*backend="):
        mx.fuse_weights([a, b])
    fused = mx.fuse_weights([a, b], backend="emulation")
    assert fused.backend is mx.Backend.EMULATION
    for got, want in zip(fused.unfuse(), (a, b)):
        for u, v in zip(canonical(got), canonical(want)):
            np.testing.assert_array_equal(u, v)


# ---- transforms ------------------------------------------------------------------------------

def test_grad_through_the_split(rng, on_cpu):
    sizes = (64, 96)
    weights = random_weights(rng, sizes, 128)
    fused = mx.fuse_weights(weights)
    x = jnp.asarray(rng.standard_normal((6, 128)), jnp.float32)
    biases = random_biases(rng, sizes, [True, True])
    cts = [jnp.asarray(rng.standard_normal((6, n)), jnp.float32) for n in sizes]

    def loss(outputs):
        return sum(jnp.sum(c * y) for c, y in zip(cts, outputs))

    dx, db = jax.jit(jax.grad(lambda x, b: loss(mx.linear_split(x, fused, b)), argnums=(0, 1)))(x, biases)
    want_dx, want_db = jax.grad(lambda x, b: loss(separate(x, weights, b)), argnums=(0, 1))(x, biases)
    # dx = sum_i ct_i @ W_i: the same products, summed over N in another grouping
    w64 = [np.asarray(mx.dequantize(*w.unpack(), dtype=jnp.float32), np.float64) for w in weights]
    bound = 4 * sum(c.shape[-1] for c in cts) * U32 * sum(np.abs(np.asarray(c, np.float64)) @ np.abs(w)
                                                        for c, w in zip(cts, w64))
    assert np.all(np.abs(np.asarray(dx, np.float64) - np.asarray(want_dx, np.float64)) <= bound)
    for got, want, ct in zip(db, want_db, cts):  # the cotangent summed over rows (jit: any order)
        ct = np.abs(np.asarray(ct, np.float64))
        assert np.all(np.abs(np.asarray(got, np.float64) - np.asarray(want)) <= 2 * 6 * U32 * ct.sum(0))


def test_vmap_over_inputs_and_over_stacked_fused_weights(rng, on_cpu):
    sizes, k = (64, 32), 64
    x = jnp.asarray(rng.standard_normal((3, 5, k)), jnp.bfloat16)
    fused = mx.fuse_weights(random_weights(rng, sizes, k))
    got = jax.vmap(lambda x: mx.linear_split(x, fused))(x)
    assert_same_bits(got, mx.linear_split(x, fused))
    stack = [mx.fuse_weights(random_weights(rng, sizes, k)) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *stack)
    assert isinstance(stacked, mx.FusedWeight) and stacked.sizes == sizes
    got = jax.vmap(mx.linear_split)(x, stacked)
    for i, f in enumerate(stack):
        want = mx.linear_split(x[i], f)
        for g, w in zip(got, want):
            assert g.shape[1:] == w.shape
            np.testing.assert_array_equal(bits(g[i]), bits(w))


def test_fused_weight_is_a_pytree_and_exports(rng, on_cpu):
    pytest.importorskip("flatbuffers")
    fused = mx.fuse_weights(random_weights(rng, (64, 96), 128), shards=2)
    leaves, treedef = jax.tree.flatten(fused)
    assert len(leaves) == 2 and all(hasattr(leaf, "dtype") for leaf in leaves)
    back = jax.tree.unflatten(treedef, leaves)
    assert back.sizes == (64, 96) and back.shards == 2
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.bfloat16)
    fn = lambda x, f: mx.linear_split(x, f)  # noqa: E731
    restored = jax.export.deserialize(exporting.export(fn, platforms=("cpu",))(x, fused).serialize())
    assert_same_bits(restored.call(x, fused), jax.jit(fn)(x, fused))


# ---- sharding (the 8 fake CPU devices of conftest.py) ------------------------------------------

def collectives(fn, *args) -> list[str]:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return re.findall(r"(all-gather|all-to-all|collective-permute|all-reduce)(?:-start)?\(", text)


def sharded_problem(rng, shards):
    if len(jax.devices("cpu")) < 8:
        pytest.skip("needs the 8 fake CPU devices of conftest.py")
    mesh = mesh_2x4()
    sizes, k = (256, 128, 128), 128
    weights = random_weights(rng, sizes, k)
    fused = mx.fuse_weights(weights, shards=shards)
    weight = placement.shard_weight(fused.weight, mesh, n_axis="model")
    x = jax.device_put(jnp.asarray(rng.standard_normal((8, k)), jnp.float32),
                       NamedSharding(mesh, P("data", None)))
    return mesh, weights, mx.FusedWeight(weight, sizes, shards), x


@pytest.mark.parametrize("shards", [1, 4])
def test_column_parallel_fused_linear_splits_by_global_columns(shards, rng):
    mesh, weights, fused, x = sharded_problem(rng, shards)
    got = jax.jit(mx.linear_split)(x, fused)
    for g, w, bound in zip(got, separate(x, weights, [None] * 3), accumulation_bound(x, weights)):
        assert np.all(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)) <= bound)
    if shards == 4:  # shard-major rows: every device holds a quarter of every piece
        assert collectives(mx.linear_split, x, fused) == []
        assert all(y.sharding.spec[-1] == "model" for y in got)


def test_shard_map_splits_each_devices_columns(rng):
    mesh, weights, fused, x = sharded_problem(rng, 4)
    weight_specs = jax.tree.map(lambda s: s.spec, mx.FusedWeight(
        placement.weight_shardings(fused.weight, mesh, n_axis="model"), fused.sizes, fused.shards))
    local = jax.jit(jax.shard_map(mx.linear_split, mesh=mesh, in_specs=(P("data", None), weight_specs),
                                  out_specs=(P("data", "model"),) * 3))
    for g, w, bound in zip(local(x, fused), separate(x, weights, [None] * 3),
                           accumulation_bound(x, weights)):
        assert np.all(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)) <= bound)
    unsharded_layout = mx.FusedWeight(fused.weight, fused.sizes, 1)  # the rows of pieces in order
    specs = mx.FusedWeight(weight_specs.weight, fused.sizes, 1)
    with pytest.raises(ValueError, match=r"shards=<devices along N>"):
        jax.shard_map(mx.linear_split, mesh=mesh, in_specs=(P("data", None), specs),
                      out_specs=(P("data", "model"),) * 3)(x, unsharded_layout)


# ---- errors ----------------------------------------------------------------------------------

def test_fuse_weights_errors(rng):
    a, b = random_weights(rng, (64, 96), 128)
    c, = random_weights(rng, (64,), 256)
    with pytest.raises(ValueError, match="no weights given"):
        mx.fuse_weights([])
    with pytest.raises(ValueError, match=r"different in_features K \[128, 256\]"):
        mx.fuse_weights([a, c])
    with pytest.raises(TypeError, match="weight 1 is a ndarray"):
        mx.fuse_weights([a, np.ones((4, 128))])
    with pytest.raises(ValueError, match=r"multiples of 64.*\[96\]"):
        mx.fuse_weights([a, b], shards=64)
    with pytest.raises(ValueError, match="shards must be >= 1"):
        mx.fuse_weights([a, b], shards=0)
    with pytest.raises(ValueError, match="add up to 150"):
        mx.FusedWeight(mx.fuse_weights([a, b]).weight, (64, 86))
    fused = mx.fuse_weights([a, b])
    with pytest.raises(ValueError, match="2 biases for 3 pieces|3 biases for 2 pieces"):
        mx.fuse_biases([None, None, jnp.ones(3)], fused)
    with pytest.raises(ValueError, match=r"bias 1 has shape \(3,\).*expected \(96,\)"):
        mx.fuse_biases([None, jnp.ones(3)], fused)
    with pytest.raises(TypeError, match="call linear for a single MxWeight"):
        mx.linear_split(jnp.ones((2, 128)), a)


# ---- NNX -------------------------------------------------------------------------------------

class Attention(nnx.Module):
    def __init__(self, rngs, dtype=jnp.bfloat16):
        make = lambda n, bias: nnx.Linear(64, n, use_bias=bias, dtype=dtype, param_dtype=dtype,  # noqa: E731
                                          rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = make(64, True), make(32, False), make(96, True)
        self.o_proj = make(64, False)

    def __call__(self, x):
        q, k, v = call_fused(self, ("q_proj", "k_proj", "v_proj"), x)
        return self.o_proj(jnp.concatenate([q, k], -1)[..., :64] * v[..., :64])


class Stack(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Attention(rngs) for _ in range(2)])

    def __call__(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


QKV = {"blocks.*": ("q_proj", "k_proj", "v_proj")}


def stack_and_input(rng):
    model = Stack(nnx.Rngs(int(rng.integers(1 << 30))))
    x = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.bfloat16)
    return model, x


def forward(model, x):
    return nnx.jit(lambda m, x: m(x))(model, x)


def test_quantize_model_fuses_and_computes_the_same(rng, on_cpu):
    model, x = stack_and_input(rng)
    unfused = quantize_model(nnx.clone(model), backend="emulation")
    fused = quantize_model(nnx.clone(model), backend="emulation", fuse=QKV)
    block = fused.blocks[1]
    assert isinstance(block.q_k_v_proj, Mxfp8FusedLinear) and isinstance(block.o_proj, Mxfp8Linear)
    assert not hasattr(block, "q_proj") and block.q_k_v_proj.names == ("q_proj", "k_proj", "v_proj")
    assert block.q_k_v_proj.has_bias == (True, False, True)
    assert_same_bits(forward(fused, x), forward(unfused, x))
    graphdef, state = nnx.split(fused)  # the fused weight's arrays are state leaves
    assert sum(leaf.dtype == jnp.float8_e4m3fn for leaf in jax.tree.leaves(state)) == 4
    assert_same_bits(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x), forward(unfused, x))


def test_fused_state_dict_is_the_unfused_one_and_loads_back(rng, tmp_path, on_cpu):
    model, x = stack_and_input(rng)
    unfused = quantize_model(nnx.clone(model), backend="emulation")
    fused = quantize_model(nnx.clone(model), backend="emulation", fuse=QKV)
    tensors, want = state_dict(fused), state_dict(unfused)
    assert sorted(tensors) == sorted(want) and "blocks.0.k_proj.bias" not in tensors
    for name in want:
        assert isinstance(tensors[name], mx.MxWeight) == isinstance(want[name], mx.MxWeight), name
        if isinstance(want[name], mx.MxWeight):
            for a, b in zip(canonical(tensors[name]), canonical(want[name])):
                np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_array_equal(bits(tensors[name]), bits(want[name]))
    mx.save_safetensors(tmp_path / "ck", tensors)
    loaded = mx.load_safetensors(tmp_path / "ck", backend="emulation")
    into_unfused = load_state_dict(Stack(nnx.Rngs(0)), loaded)
    into_fused = load_state_dict(quantize_model(Stack(nnx.Rngs(1)), backend="emulation", fuse=QKV),
                                 loaded)
    assert isinstance(into_fused.blocks[0].q_k_v_proj, Mxfp8FusedLinear)
    assert_same_bits(forward(into_unfused, x), forward(unfused, x))
    assert_same_bits(forward(into_fused, x), forward(unfused, x))
    with pytest.raises(ValueError, match="dense .*load an MXFP8 checkpoint"):
        load_state_dict(quantize_model(Stack(nnx.Rngs(1)), backend="emulation", fuse=QKV),
                        {k: v for k, v in state_dict(model).items() if "o_proj" not in k},
                        strict=False)
    partial = {k: v for k, v in loaded.items() if k != "blocks.0.v_proj.weight"}
    with pytest.raises(ValueError, match="missing"):
        load_state_dict(quantize_model(Stack(nnx.Rngs(1)), backend="emulation", fuse=QKV), partial)


def test_fuse_linears_on_a_quantized_model_and_a_callable_spec(rng, on_cpu):
    model, x = stack_and_input(rng)
    quantized = quantize_model(nnx.clone(model), backend="emulation")
    want = forward(quantized, x)
    seen = []

    def groups(path, module):
        seen.append(path)
        return [("q_proj", "k_proj", "v_proj")] if isinstance(module, Attention) else []

    fuse_linears(quantized, groups, shards=2)
    assert "blocks.0" in seen and quantized.blocks[0].q_k_v_proj.weight.get_value().shards == 2
    assert_same_bits(forward(quantized, x), want)


def test_fuse_spec_errors(rng):
    model, _ = stack_and_input(rng)
    with pytest.raises(ValueError, match="matches no module.*'blocks"):
        quantize_model(nnx.clone(model), backend="emulation", fuse={"layers.*": ("q_proj", "k_proj")})
    with pytest.raises(ValueError, match="blocks.0.k_proj is left in float by the predicate"):
        quantize_model(nnx.clone(model), backend="emulation", fuse=QKV,
                       predicate=lambda path, m: not path.endswith("k_proj"))
    with pytest.raises(TypeError, match="tuple of attribute names"):
        quantize_model(nnx.clone(model), backend="emulation", fuse={"blocks.*": "q_proj"})
    with pytest.raises(TypeError, match="blocks.0.w_proj is missing"):
        quantize_model(nnx.clone(model), backend="emulation", fuse={"blocks.*": ("q_proj", "w_proj")})
    with pytest.raises(ValueError, match="in two groups"):
        quantize_model(nnx.clone(model), backend="emulation",
                       fuse={"blocks.*": ("q_proj", "k_proj"), "blocks.?": ("k_proj", "v_proj")})
    with pytest.raises(TypeError, match="only Mxfp8Linear layers can be fused"):
        fuse_linears(nnx.clone(model), QKV)  # float linears: quantize first
    quantized = quantize_model(nnx.clone(model), backend="emulation")
    quantized.blocks[0].o_proj = Mxfp8Linear(random_weights(rng, (64,), 96)[0])
    with pytest.raises(ValueError, match=r"different in_features \{'q_proj': 64, 'o_proj': 96\}"):
        fuse_linears(quantized, {"blocks.*": ("q_proj", "o_proj")})
    quantized = quantize_model(nnx.clone(model), backend="emulation")
    quantized.blocks[1].k_proj.quantize_activations = True
    with pytest.raises(ValueError, match="differ in quantize_activations"):
        fuse_linears(quantized, QKV)
    assert isinstance(quantized.blocks[0].q_proj, Mxfp8Linear)  # checked before anything changed


def test_fused_module_constructor_and_call_fused_errors(rng):
    fused = mx.fuse_weights(random_weights(rng, (64, 32), 64))
    with pytest.raises(TypeError, match="FusedWeight"):
        Mxfp8FusedLinear(fused.weight, names=("a", "b"))
    with pytest.raises(ValueError, match="3 names"):
        Mxfp8FusedLinear(fused, names=("a", "b", "c"))
    with pytest.raises(ValueError, match="distinct"):
        Mxfp8FusedLinear(fused, names=("a", "a"))
    holder = nnx.Module()
    with pytest.raises(AttributeError, match="neither the fused module 'a_b'"):
        call_fused(holder, ("a", "b"), jnp.ones((1, 64)))
    assert fused_name(("q_proj", "k_proj", "v_proj")) == "q_k_v_proj"
    assert fused_name(("gate_proj", "up_proj")) == "gate_up_proj"
    assert fused_name(("wq", "wk")) == "wq_wk" and fused_name(("proj", "o_proj")) == "proj_o_proj"


def test_linen_fused_dense_matches_separate_dense(rng, on_cpu):
    from jax_mxfp8.flax import Mxfp8Dense
    from jax_mxfp8.flax.linen import Mxfp8FusedDense
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
    sizes = (64, 32)
    dense = [Mxfp8Dense(n, dtype=jnp.bfloat16, backend="emulation") for n in sizes]
    params = [d.init(jax.random.key(int(rng.integers(1 << 30))), x)["params"] for d in dense]
    params = [{**p, "bias": jnp.asarray(rng.standard_normal(p["bias"].shape), jnp.float32)}
              for p in params]
    fused = mx.fuse_weights([p["weight"] for p in params])
    variables = {"params": {"weight": fused, "bias": mx.fuse_biases([p["bias"] for p in params], fused)}}
    module = Mxfp8FusedDense(sizes, dtype=jnp.bfloat16, backend="emulation")
    got = jax.jit(module.apply)(variables, x)
    assert_same_bits(got, [d.apply({"params": p}, x) for d, p in zip(dense, params)])
    init = module.init(jax.random.key(0), x)["params"]
    assert init["weight"].sizes == sizes and init["bias"].shape == (96,)
    with pytest.raises(ValueError, match=r"FusedWeight of pieces \(32, 64\)"):
        Mxfp8FusedDense((32, 64), backend="emulation").apply(variables, x)


# ---- the decoder ------------------------------------------------------------------------------

DECODER = decoder.DecoderConfig(**{**SMALL_DECODER, "attention_bias": True, "model_type": "qwen2"})


def decoder_pair(rng):
    bf16 = decoder.CausalLM(DECODER, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    unfused = quantize_model(nnx.clone(bf16), backend="emulation")
    fused = quantize_model(nnx.clone(bf16), backend="emulation", fuse=decoder.PROJECTIONS)
    tokens = jnp.asarray(rng.integers(0, DECODER.vocab_size, (2, 16)))
    return unfused, fused, tokens


def test_decoder_fused_state_dict_round_trip_equals_the_unfused_one(rng, tmp_path, on_cpu):
    unfused, fused, tokens = decoder_pair(rng)
    layer = fused.model.layers[1]
    assert isinstance(layer.self_attn.q_k_v_proj, Mxfp8FusedLinear)
    assert isinstance(layer.mlp.gate_up_proj, Mxfp8FusedLinear)
    tensors, want = state_dict(fused), state_dict(unfused)
    assert sorted(tensors) == sorted(want)
    assert "model.layers.0.self_attn.k_proj.bias" in tensors  # qwen2: q/k/v biases
    for name, value in want.items():
        got = tensors[name]
        pairs = zip(canonical(got), canonical(value)) if isinstance(value, mx.MxWeight) else [
            (bits(got), bits(value))]
        for a, b in pairs:
            np.testing.assert_array_equal(a, b, err_msg=name)
    logits = jax.jit(lambda s, t: nnx.merge(*s)(t))
    assert_same_bits(logits(nnx.split(fused), tokens), logits(nnx.split(unfused), tokens))

    decoder.save_pretrained(fused, tmp_path / "mx")
    again, _, n_mxfp8 = decoder.load_pretrained(tmp_path / "mx", backend="emulation", fuse=True)
    assert n_mxfp8 == 7 * DECODER.num_hidden_layers + 1
    assert isinstance(again.model.layers[0].mlp.gate_up_proj, Mxfp8FusedLinear)
    plain, _, _ = decoder.load_pretrained(tmp_path / "mx", backend="emulation")
    assert isinstance(plain.model.layers[0].self_attn.q_proj, Mxfp8Linear)
    assert_same_bits(logits(nnx.split(again), tokens), logits(nnx.split(unfused), tokens))
    assert_same_bits(logits(nnx.split(plain), tokens), logits(nnx.split(unfused), tokens))


def test_decoder_fuses_only_groups_that_are_all_mxfp8(rng, tmp_path, on_cpu):
    bf16 = decoder.CausalLM(DECODER, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    partly = quantize_model(bf16, backend="emulation", predicate=lambda path, m: "k_proj" not in path)
    decoder.save_pretrained(partly, tmp_path / "mx")
    model, _, _ = decoder.load_pretrained(tmp_path / "mx", backend="emulation", fuse=True)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.k_proj, nnx.Linear) and isinstance(layer.self_attn.q_proj, Mxfp8Linear)
    assert isinstance(layer.mlp.gate_up_proj, Mxfp8FusedLinear)
    tokens = jnp.asarray(rng.integers(0, DECODER.vocab_size, (2, 8)))
    logits = jax.jit(lambda s, t: nnx.merge(*s)(t))
    assert_same_bits(logits(nnx.split(model), tokens), logits(nnx.split(partly), tokens))
    with pytest.raises(ValueError, match="k_proj is left in float"):
        quantize_model(decoder.CausalLM(DECODER, rngs=nnx.Rngs(0)), backend="emulation",
                       fuse=decoder.PROJECTIONS, predicate=lambda path, m: "k_proj" not in path)


# ---- MARLIN on a GPU -------------------------------------------------------------------------

MARLIN_KERNELS = has_gpu() and has_cuda_targets(marlin.GEMM_TARGET)


@gpu_test(MARLIN_KERNELS, reason="needs an NVIDIA GPU and the Marlin CUDA kernels")
@pytest.mark.parametrize("sizes,k,m", [((4096, 1024, 1024), 4096, 1), ((1024, 1024), 4096, 256),
                                       ((512, 64), 1024, 16)])
def test_marlin_fused_linear_agrees_to_the_accumulation_order(sizes, k, m, rng):
    """The planner picks tiles and K splits by (N, K, M), so the fused GEMM may sum K in another
    order than the separate ones: float32 outputs agree within the summation bound."""
    weights = random_weights(rng, sizes, k, backend="marlin")
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    got = jax.jit(lambda x, f: mx.linear_split(x, f, out_dtype=jnp.float32))(x, mx.fuse_weights(weights))
    want = [jax.jit(lambda x, w: mx.linear(x, w, out_dtype=jnp.float32))(x, w) for w in weights]
    for g, w, bound in zip(got, want, accumulation_bound(x, weights)):
        assert np.all(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)) <= bound)
