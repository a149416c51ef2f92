"""Sharded quantize/dequantize/swizzle/linear (jax_mxfp8.partitioning: the ops' sharding rules;
jax_mxfp8.placement: weight shardings) on 8 fake CPU devices (conftest.py asks for them).

Sharded results must equal single-device ones (bitwise for the elementwise ops, within
accumulation order for GEMMs) and compiled HLO must hold no all-gather (of weights, scales or
anything). The tensor-parallel MLP example: test_models_tp_mlp.py. The last test runs
quantize, sharded linears and that MLP in two processes under jax.distributed (gloo CPU
collectives); this file is its worker.
"""
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_mxfp8 as mx
from jax_mxfp8 import placement, weight as weight_layout
from jax_mxfp8.models import tp_mlp as tp

from helpers import bits, cpu_devices, hlo, local, mesh_2x4, mesh_8, put, random_x

if __name__ != "__main__":  # the worker script sets up its own devices (jax.distributed)
    CPUS = cpu_devices()
    pytestmark = pytest.mark.skipif(len(CPUS) < 8, reason="needs 8 CPU devices (tests/conftest.py)")
    ONE = CPUS[0]


def assert_no_all_gather(text):
    counts = tp.collectives(text)
    assert counts["all-gather"] == 0, counts


# ---- quantize / dequantize / swizzle: bitwise --------------------------------------------

QUANT_CASES = [  # (shape, mesh, spec): leading axes, K, both, and K over all 8 devices
    ((16, 512), mesh_2x4, P("data", "model")),
    ((4, 8, 256), mesh_2x4, P("data", "model", None)),
    ((4, 8, 256), mesh_2x4, P(None, "data", "model")),
    ((6, 2048), mesh_8, P(None, "model")),
    ((8, 6, 64), mesh_8, P("model", None, None)),
    ((2, 4, 1024), mesh_2x4, P(None, None, ("data", "model"))),
]


@pytest.mark.parametrize("shape,make_mesh,spec", QUANT_CASES)
@pytest.mark.parametrize("rounding", ["ceil", "floor", "naive"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_sharded_is_bitwise_single_device(shape, make_mesh, spec, rounding, dtype, rng):
    mesh = make_mesh()
    x = random_x(rng, shape, dtype)
    want_v, want_s = jax.jit(lambda a: mx.quantize(a, rounding=rounding))(local(x))
    f = lambda a: mx.quantize(a, rounding=rounding)  # noqa: E731
    xs = put(x, mesh, spec)
    values, scales = jax.jit(f)(xs)
    np.testing.assert_array_equal(bits(values), bits(want_v))
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(want_s))
    assert values.sharding.is_equivalent_to(xs.sharding, len(shape))
    assert scales.sharding.is_equivalent_to(NamedSharding(mesh, spec), len(shape))
    assert set(tp.collectives(hlo(f, xs)).values()) == {0}  # row/block-local: no communication


@pytest.mark.parametrize("shape,make_mesh,spec", QUANT_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dequantize_sharded_is_bitwise_single_device(shape, make_mesh, spec, dtype, rng):
    mesh = make_mesh()
    values, scales = mx.quantize(random_x(rng, shape))
    f = lambda v, s: mx.dequantize(v, s, dtype=dtype)  # noqa: E731
    want = jax.jit(f)(local(values), local(scales))
    vs, ss = put(values, mesh, spec), put(scales, mesh, spec)
    got = jax.jit(f)(vs, ss)
    np.testing.assert_array_equal(bits(got), bits(want))
    assert got.sharding.is_equivalent_to(vs.sharding, len(shape))
    assert set(tp.collectives(hlo(f, vs, ss)).values()) == {0}


def test_eager_call_on_sharded_array_stays_sharded(rng):
    mesh = mesh_2x4()
    x = random_x(rng, (8, 256))
    xs = put(x, mesh, P("data", "model"))
    values, scales = mx.quantize(xs)  # no jit: the primitive's own compiled call
    want_v, want_s = mx.quantize(local(x))
    np.testing.assert_array_equal(bits(values), bits(want_v))
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(want_s))
    assert scales.sharding.spec == P("data", "model")


@pytest.mark.parametrize("spec", [P("data", None, None), P("data", "model", None), P(None, "model", None)])
def test_swizzled_quantize_and_swizzle_shard_whole_row_tiles(spec, rng):
    mesh = mesh_2x4()
    x = random_x(rng, (2, 512, 96))  # 512 rows = 4 x 128-row tiles
    want_v, want_s = jax.jit(lambda a: mx.quantize(a, swizzle=True))(local(x))
    xs = put(x, mesh, spec)
    f = lambda a: mx.quantize(a, swizzle=True)  # noqa: E731
    values, scales = jax.jit(f)(xs)
    np.testing.assert_array_equal(bits(values), bits(want_v))
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(want_s))
    assert set(tp.collectives(hlo(f, xs)).values()) == {0}
    # standalone swizzle / unswizzle of row-major scales, sharded the same way
    _, rm = mx.quantize(x)
    rms = put(rm, mesh, spec)
    sw = jax.jit(mx.swizzle_scales)(rms)
    np.testing.assert_array_equal(np.asarray(sw), np.asarray(want_s))
    back = jax.jit(lambda s: mx.unswizzle_scales(s, 512, 3))(sw)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(rm))
    assert_no_all_gather(hlo(mx.swizzle_scales, rms))


def test_single_device_lowering_has_no_partitioning_call(rng):
    x = local(random_x(rng, (4, 64)))
    text = jax.jit(mx.quantize).lower(x).as_text()
    assert "CustomSPMDPartitioning" not in text
    w = mx.quantize_weight(random_x(rng, (32, 64)), backend="emulation")
    assert "CustomSPMDPartitioning" not in jax.jit(mx.linear).lower(x, w).as_text()


# ---- impossible shardings raise -------------------------------------------------------------

def test_quantize_k_shard_of_partial_blocks_raises(rng):
    mesh = Mesh(np.array(CPUS[:2]), ("model",))
    xs = put(random_x(rng, (8, 96)), mesh, P(None, "model"))  # 48 per device: 1.5 blocks
    with pytest.raises(Exception, match=r"whole number of 32-element units.*K/32=3 is not divisible by 2"):
        jax.jit(mx.quantize)(xs)
    with pytest.raises(Exception, match="whole number of 32-element units"):
        jax.jit(mx.dequantize)(put(jnp.zeros((8, 96), jnp.float8_e4m3fn), mesh, P(None, "model")),
                               jnp.zeros((8, 3), jnp.uint8))


def test_explicit_mode_rejects_partial_blocks_at_trace_time(rng):
    mesh = jax.make_mesh((4,), ("model",), devices=CPUS[:4], axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        xs = put(random_x(rng, (8, 64)), mesh, P(None, "model"))  # 16 elements per device
        with pytest.raises(ValueError, match=r"K/32=2 is not divisible by 4"):
            jax.jit(mx.quantize).trace(xs)


def test_swizzled_quantize_rejects_k_and_partial_row_tile_shards(rng):
    mesh = mesh_2x4()
    with pytest.raises(Exception, match="swizzle=False"):
        jax.jit(lambda a: mx.quantize(a, swizzle=True))(
            put(random_x(rng, (256, 256)), mesh, P(None, "model")))
    with pytest.raises(Exception, match="128-row tiles"):  # 256 rows over 4: 64-row shards
        jax.jit(lambda a: mx.quantize(a, swizzle=True))(
            put(random_x(rng, (256, 64)), mesh, P("model", None)))


def test_weight_sharding_must_split_whole_k_blocks(rng):
    mesh = mesh_2x4()
    w = mx.quantize_weight(random_x(rng, (64, 96)), backend="emulation")
    with pytest.raises(ValueError, match=r"K \(in_features\)=96 .* not divisible by 4"):
        placement.weight_shardings(w, mesh, k_axis="model")


def test_inconsistently_sharded_weight_arrays_raise(rng):
    mesh = mesh_2x4()
    w = mx.quantize_weight(random_x(rng, (64, 256)), backend="emulation")
    w = mx.MxWeight({"values": put(w.arrays["values"], mesh, P("model", None)),
                     "scales": put(w.arrays["scales"], mesh, P("data", None))},
                    w.shape, w.backend, w.meta)
    with pytest.raises(Exception, match="sharded inconsistently along N"):
        jax.jit(mx.linear)(put(random_x(rng, (4, 256)), mesh, P()), w)


# ---- linear -------------------------------------------------------------------------------

LINEAR_CASES = [  # (x shape, x spec, n_axis, k_axis, collectives expected)
    ((8, 256), P(None, None), "model", None, 0),                 # column-parallel
    ((4, 6, 256), P("data", None, None), "model", None, 0),      # + batch-sharded activations
    ((4, 6, 256), P(None, "data", None), "model", None, 0),      # + sequence-sharded activations
    ((8, 256), P(None, "model"), None, "model", 1),             # row-parallel
    ((4, 6, 256), P("data", None, "model"), None, "model", 1),  # row-parallel, batch-sharded
    ((8, 256), P(None, None), "model", "data", 1),              # 2-D: N and K both split
    ((8, 256), P(None, None), None, ("data", "model"), 1),      # K over all 8 devices
]


@pytest.mark.parametrize("x_shape,x_spec,n_axis,k_axis,n_reduce", LINEAR_CASES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("w8a8", [False, True])
def test_linear_sharded_matches_single_device(x_shape, x_spec, n_axis, k_axis, n_reduce, with_bias, w8a8,
                                              rng):
    mesh = mesh_2x4()
    n, k = 128, x_shape[-1]
    weight = mx.quantize_weight(random_x(rng, (n, k)), backend="emulation")
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32) if with_bias else None
    x = random_x(rng, x_shape)
    f = lambda a, w, b: mx.linear(a, w, b, out_dtype=jnp.float32, quantize_activations=w8a8)  # noqa: E731
    want = jax.jit(f)(local(x), jax.device_put(weight, ONE), None if bias is None else local(bias))

    w_sharded = placement.shard_weight(weight, mesh, n_axis=n_axis, k_axis=k_axis)
    b_sharded = None if bias is None else put(bias, mesh, P(n_axis))
    xs = put(x, mesh, x_spec)
    got = jax.jit(f)(xs, w_sharded, b_sharded)
    scale = float(np.max(np.abs(np.asarray(want))))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * scale)

    counts = tp.collectives(hlo(f, xs, w_sharded, b_sharded))
    assert counts["all-gather"] == 0, counts
    assert counts["all-reduce"] == n_reduce, counts
    # the output keeps the activations' batch sharding and the weight's N sharding
    lead = tuple(x_spec)[:-1]
    expected = NamedSharding(mesh, P(*lead, n_axis))
    assert got.sharding.is_equivalent_to(expected, len(x_shape)), (got.sharding.spec, expected.spec)


def test_linear_bf16_row_parallel_within_one_output_rounding(rng):
    mesh = mesh_8()
    weight = mx.quantize_weight(random_x(rng, (64, 1024)), backend="emulation")
    x = random_x(rng, (16, 1024), jnp.bfloat16)
    want = np.asarray(jax.jit(mx.linear)(local(x), jax.device_put(weight, ONE)), np.float32)
    got = np.asarray(jax.jit(mx.linear)(put(x, mesh, P(None, "model")),
                                        placement.shard_weight(weight, mesh, k_axis="model")), np.float32)
    # float32 partials + psum vs one float32 dot: differences only from the final bf16 rounding
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max())


def test_prepare_weight_sharded_equals_sharded_prepare(rng):
    mesh = mesh_2x4()
    values, scales = mx.quantize(random_x(rng, (128, 512)))
    for n_axis, k_axis in (("model", None), (None, "model"), ("data", "model")):
        per_shard = placement.prepare_weight_sharded(values, scales, mesh, n_axis=n_axis, k_axis=k_axis,
                                                    backend="emulation")
        whole = placement.shard_weight(mx.prepare_weight(values, scales, backend="emulation"), mesh,
                                      n_axis=n_axis, k_axis=k_axis)
        assert per_shard.shape == whole.shape and per_shard.meta == whole.meta
        for name in whole.arrays:
            np.testing.assert_array_equal(bits(per_shard.arrays[name]), bits(whole.arrays[name]))
            assert per_shard.arrays[name].sharding.is_equivalent_to(whole.arrays[name].sharding, 2)


# ---- every backend's declared layout splits into the layouts of its shards ----------------------

def _sharded_backends():
    from jax_mxfp8.backends import get_backend_impl, registered_backends
    return [b for b in registered_backends() if get_backend_impl(b).array_axes is not None]


@pytest.mark.parametrize("backend", _sharded_backends(), ids=lambda b: b.value)
@pytest.mark.parametrize("kind", ["n", "k"])
def test_backend_array_axes_split_into_shard_layouts(backend, kind, rng):
    """Chunk i (along the dims array_axes marks `kind`) of prepare(W) == prepare(shard i of W),
    meta of the shard == shard_meta; whole-to-every-shard arrays == max over shard preparations."""
    import math
    from jax_mxfp8.backends import get_backend_impl
    impl, p = get_backend_impl(backend), 2
    n, k = 2 * math.lcm(impl.n_tile, 64), 2 * math.lcm(impl.k_tile, 128)
    values, scales = mx.quantize(random_x(rng, (n, k)))
    arrays, meta = impl.prepare(local(values), local(scales))  # jnp repacks: run on CPU
    axes = impl.array_axes(meta, (n, k))
    assert set(axes) == set(arrays) and all(len(axes[a]) == arrays[a].ndim for a in arrays)
    whole = {name: [] for name, kinds in axes.items() if "n" not in kinds and "k" not in kinds}
    for i in range(p):
        if kind == "n":
            sub_v, sub_s = values[i * n // p:(i + 1) * n // p], scales[i * n // p:(i + 1) * n // p]
        else:
            sub_v, sub_s = values[:, i * k // p:(i + 1) * k // p], scales[:, i * k // (32 * p):(i + 1) * k // (32 * p)]
        sub_arrays, sub_meta = impl.prepare(local(sub_v), local(sub_s))
        assert sub_meta == weight_layout.shard_meta(backend, meta, (n, k), sub_v.shape)
        for name, kinds in axes.items():
            chunk = np.asarray(arrays[name])
            for d, t in enumerate(kinds):
                if t == kind:
                    size = chunk.shape[d] // p
                    chunk = np.take(chunk, np.arange(i * size, (i + 1) * size), axis=d)
            if name in whole:
                whole[name].append(np.asarray(sub_arrays[name]))
            else:
                np.testing.assert_array_equal(bits(sub_arrays[name]), bits(chunk), err_msg=name)
    for name, parts in whole.items():
        np.testing.assert_array_equal(np.maximum.reduce(parts), np.asarray(arrays[name]), err_msg=name)


@pytest.mark.parametrize("backend", _sharded_backends(), ids=lambda b: b.value)
def test_every_backend_shards_on_cpu_through_its_reference_lowerings(backend, monkeypatch, rng):
    """Per-shard prepare == sharded global prepare, and sharded linear == single-device linear,
    for each backend's layout (GPU kernels fall back to their jnp lowerings on CPU)."""
    import math
    from jax_mxfp8.backends import get_backend_impl
    monkeypatch.setenv("JAX_MXFP8_KERNEL_REFERENCES", "1")  # GPU layouts run on CPU, by choice
    impl = get_backend_impl(backend)
    mesh = mesh_2x4()
    n, k = 4 * math.lcm(impl.n_tile, 64), 4 * math.lcm(impl.k_tile, 128)
    values, scales = mx.quantize(random_x(rng, (n, k)))
    x = random_x(rng, (8, k), jnp.bfloat16)
    w_one = jax.device_put(mx.prepare_weight(values, scales, backend=backend), ONE)
    try:
        want = np.asarray(jax.jit(mx.linear)(local(x), w_one), np.float32)
    except NotImplementedError:  # a GEMM with no CPU lowering (CUTLASS): check the layouts only
        want = None
    for n_axis, k_axis, x_spec in (("model", None, P("data", None)), (None, "model", P(None, "model")),
                                   ("data", "model", P(None, None))):
        per_shard = placement.prepare_weight_sharded(values, scales, mesh, n_axis=n_axis, k_axis=k_axis,
                                                    backend=backend)
        whole = placement.shard_weight(w_one, mesh, n_axis=n_axis, k_axis=k_axis)
        for name in whole.arrays:
            np.testing.assert_array_equal(bits(per_shard.arrays[name]), bits(whole.arrays[name]))
        if want is None:
            continue
        xs = put(x, mesh, x_spec)
        got = np.asarray(jax.jit(mx.linear)(xs, per_shard), np.float32)
        np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max())
        counts = tp.collectives(hlo(mx.linear, xs, per_shard))
        assert counts["all-gather"] == 0 and counts["all-reduce"] == (1 if k_axis else 0), counts


# ---- transforms: vmap in shard_map, shard_map in jit, pmap ------------------------------------

def test_vmap_inside_shard_map(rng):
    mesh = mesh_2x4()
    x = random_x(rng, (4, 8, 256))
    weight = mx.quantize_weight(random_x(rng, (64, 256)), backend="emulation")
    w_specs = jax.tree.map(lambda s: s.spec, placement.weight_shardings(weight, mesh, n_axis="model"))

    def body(xl, wl):
        v, s = jax.vmap(mx.quantize)(xl)
        y = jax.vmap(lambda r: mx.linear(r, wl, out_dtype=jnp.float32))(xl)
        return v, s, y

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), w_specs),
                              out_specs=(P("data"), P("data"), P("data", None, "model"))))
    v, s, y = f(put(x, mesh, P("data")), placement.shard_weight(weight, mesh, n_axis="model"))
    want_v, want_s = mx.quantize(local(x))
    np.testing.assert_array_equal(bits(v), bits(want_v))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(want_s))
    want_y = mx.linear(local(x), jax.device_put(weight, ONE), out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=1e-5,
                               atol=1e-5 * float(np.abs(np.asarray(want_y)).max()))


def test_shard_map_inside_jit_row_parallel_by_hand(rng):
    mesh = mesh_8()
    x = random_x(rng, (8, 512))
    weight = mx.quantize_weight(random_x(rng, (96, 512)), backend="emulation")
    w_specs = jax.tree.map(lambda s: s.spec, placement.weight_shardings(weight, mesh, k_axis="model"))

    @jax.jit
    def f(a, w):
        def shard(al, wl):  # each device holds K/8 of x and of the weight: a shard-local linear
            assert weight_layout.local_weight_shape(wl) == (96, 64)
            return jax.lax.psum(mx.linear(al, wl, out_dtype=jnp.float32), "model")
        y = jax.shard_map(shard, mesh=mesh, in_specs=(P(None, "model"), w_specs), out_specs=P())(a, w)
        return jnp.tanh(y)

    ws = placement.shard_weight(weight, mesh, k_axis="model")
    got = np.asarray(f(put(x, mesh, P(None, "model")), ws))
    want = np.asarray(jnp.tanh(mx.linear(local(x), jax.device_put(weight, ONE), out_dtype=jnp.float32)))
    # psum of eight 64-long fp32 dots vs one 512-long dot: another summation order. Either is
    # within 513 u sum|x w| of the exact value (u = 2^-24), and tanh is 1-Lipschitz; x's 2^+-20
    # block spreads make cancellation (and so that bound) large on some outputs.
    values, scales = weight.unpack()
    w = np.asarray(mx.dequantize(values, scales, dtype=jnp.float32), np.float64)
    magnitude = np.abs(np.asarray(local(x), np.float64)) @ np.abs(w).T
    bound = np.maximum(2 * 513 * 2.0 ** -24 * magnitude, 1e-5 + 1e-5 * np.abs(want))
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


def test_pmap_over_eight_devices(rng):
    x = random_x(rng, (8, 4, 128))
    weight = mx.quantize_weight(random_x(rng, (32, 128)), backend="emulation")
    v, s = jax.pmap(mx.quantize, devices=CPUS[:8])(x)
    want_v, want_s = mx.quantize(local(x))
    np.testing.assert_array_equal(bits(v), bits(want_v))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(want_s))
    d = jax.pmap(lambda a, b: mx.dequantize(a, b, dtype=jnp.float32), devices=CPUS[:8])(v, s)
    np.testing.assert_array_equal(bits(d), bits(mx.dequantize(want_v, want_s, dtype=jnp.float32)))
    y = jax.pmap(lambda a, w: mx.linear(a, w, out_dtype=jnp.float32), in_axes=(0, None),
                 devices=CPUS[:8])(x, weight)
    want_y = mx.linear(local(x), jax.device_put(weight, ONE), out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=1e-5, atol=1e-5)


# ---- two processes under jax.distributed --------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_jax_distributed(tmp_path):
    """Quantize, a sharded linear and the TP MLP on a 2x4 mesh spanning two processes (4 CPU
    devices each, gloo collectives), checked in each process against a local single device."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=str(tmp_path))
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("jax.distributed workers timed out")
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"worker {i} OK" in out, out[-3000:]


def _worker(pid: int, port: int) -> None:
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    from jax.experimental import multihost_utils
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))  # data axis = process
    one = jax.local_devices()[0]
    rng = np.random.default_rng(1234)  # same data in both processes
    x_host = rng.standard_normal((8, 6, 256)).astype(np.float32)

    def global_array(a, spec):
        return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda idx: a[idx])

    def gather(a):
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    # quantize: bitwise
    xs = global_array(x_host, P("data", None, "model"))
    values, scales = jax.jit(mx.quantize)(xs)
    want_v, want_s = jax.jit(mx.quantize)(jax.device_put(x_host, one))
    np.testing.assert_array_equal(gather(values).view(np.uint8), np.asarray(want_v).view(np.uint8))
    np.testing.assert_array_equal(gather(scales), np.asarray(want_s))

    # row-parallel linear and the TP MLP, weights prepared per shard from global arrays
    w_host = (rng.standard_normal((128, 256)) / 16).astype(np.float32)
    wv, wsc = (np.asarray(a) for a in jax.jit(mx.quantize)(jax.device_put(w_host, one)))
    weight = placement.prepare_weight_sharded(global_array(wv, P()), global_array(wsc, P()), mesh,
                                             k_axis="model", backend="emulation")
    f = lambda a, w: mx.linear(a, w, out_dtype=jnp.float32)  # noqa: E731
    y = jax.jit(f)(xs, weight)
    want_y = f(jax.device_put(x_host, one), mx.prepare_weight(wv, wsc, backend="emulation"))
    np.testing.assert_allclose(gather(y), np.asarray(want_y), rtol=1e-5, atol=1e-5)
    counts = tp.collectives(jax.jit(f).lower(xs, weight).compile().as_text())
    assert counts["all-gather"] == 0 and counts["all-reduce"] == 1, counts
    # column-parallel, the weight placed from a process-local prepared copy
    col = placement.shard_weight(mx.prepare_weight(wv, wsc, backend="emulation"), mesh, n_axis="model")
    xr = global_array(x_host, P("data", None, None))
    y = jax.jit(f)(xr, col)
    np.testing.assert_allclose(gather(y), np.asarray(want_y), rtol=1e-5, atol=1e-5)
    assert set(tp.collectives(jax.jit(f).lower(xr, col).compile().as_text()).values()) == {0}

    params = {k: np.asarray(v) for k, v in tp.init_params(jax.random.key(0), 256, 512, jnp.float32).items()}
    sharded = {}
    for name, n_axis, k_axis in (("up", "model", None), ("down", None, "model")):
        v, s = (np.asarray(a) for a in jax.jit(mx.quantize)(jax.device_put(params[name], one)))
        sharded[name] = placement.prepare_weight_sharded(global_array(v, P()), global_array(s, P()), mesh,
                                                        n_axis=n_axis, k_axis=k_axis, backend="emulation")
    xd = global_array(x_host, P("data", None, None))
    got = jax.jit(tp.mlp)(sharded, xd)
    want = jax.jit(tp.mlp)(jax.device_put(tp.quantize_params(params, "emulation"), one),
                           jax.device_put(x_host, one))
    np.testing.assert_allclose(gather(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5 * float(np.abs(np.asarray(want)).max()))
    counts = tp.collectives(jax.jit(tp.mlp).lower(sharded, xd).compile().as_text())
    assert counts["all-gather"] == 0 and counts["all-reduce"] == 1, counts
    print(f"worker {pid} OK", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]))
