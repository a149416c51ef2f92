"""Tensor-parallel MXFP8 MLP under jit with a Mesh (Megatron-style).

The up projection's weight [I, H] is split along N (its I output features) over the mesh
axis "model": every device computes its slice of the hidden activations with no
communication (column-parallel). The down projection's weight [H, I] is split along K (its
I input features) the same way, so it consumes those slices where they are and ends with
one all-reduce (row-parallel). Activations may also be split along batch over "data".
`python -m jax_mxfp8 demo --tp N` runs main() below.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_mxfp8 as mx
from jax_mxfp8 import placement, timing
from jax_mxfp8.backends import get_backend_impl

DATA, MODEL = "data", "model"


def make_mesh(tp: int, dp: int = 1, devices=None) -> Mesh:
    """A (dp, tp) mesh with axes ("data", "model") over the first dp*tp devices."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < dp * tp:
        raise ValueError(f"a {dp}x{tp} mesh needs {dp * tp} devices; only {len(devices)} are visible "
                         f"(on CPU set jax.config.update('jax_num_cpu_devices', {dp * tp}) first)")
    return Mesh(np.array(devices[:dp * tp]).reshape(dp, tp), (DATA, MODEL))


def tp_width(width: int, tp: int, backend) -> int:
    """`width` rounded up so that it splits into tp shards of whole blocks and backend tiles
    (the up projection's N and the down projection's K)."""
    impl = get_backend_impl(mx.Backend.parse(backend))
    unit = math.lcm(32, impl.n_tile, impl.k_tile) * tp
    return -(-width // unit) * unit


def init_params(key, hidden: int, intermediate: int, dtype=jnp.bfloat16) -> dict:
    k_up, k_down = jax.random.split(key)
    return {"up": (jax.random.normal(k_up, (intermediate, hidden), jnp.float32)
                   / np.sqrt(hidden)).astype(dtype),
            "down": (jax.random.normal(k_down, (hidden, intermediate), jnp.float32)
                     / np.sqrt(intermediate)).astype(dtype)}


def quantize_params(params: dict, backend=None, mesh: Mesh | None = None) -> dict:
    """MXFP8 weights for the MLP; with `mesh`, prepared per shard and laid out tensor-parallel."""
    out = {}
    for name, n_axis, k_axis in (("up", MODEL, None), ("down", None, MODEL)):
        values, scales = mx.quantize(params[name])
        if mesh is None:
            out[name] = mx.prepare_weight(values, scales, backend=backend)
        else:
            out[name] = placement.prepare_weight_sharded(values, scales, mesh, n_axis=n_axis,
                                                         k_axis=k_axis, backend=backend)
    return out


def shard_bf16(params: dict, mesh: Mesh) -> dict:
    """The bf16 model split the same way (up along its outputs, down along its inputs)."""
    return {"up": jax.device_put(params["up"], NamedSharding(mesh, P(MODEL, None))),
            "down": jax.device_put(params["down"], NamedSharding(mesh, P(None, MODEL)))}


def mlp(params: dict, x, quantize_activations=None):
    h = jax.nn.gelu(mx.linear(x, params["up"], quantize_activations=quantize_activations))
    return mx.linear(h, params["down"], quantize_activations=quantize_activations)


def mlp_bf16(params: dict, x):
    h = jax.nn.gelu(jnp.dot(x, params["up"].T, preferred_element_type=jnp.float32).astype(x.dtype))
    return jnp.dot(h, params["down"].T, preferred_element_type=jnp.float32).astype(x.dtype)


def collectives(compiled_text: str) -> dict[str, int]:
    """Counts of each collective op in compiled HLO text (async -start forms included)."""
    names = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    return {n: len(re.findall(rf"\b{n}(?:-start)?\(", compiled_text)) for n in names}


def device_time_ms(fn, arg_sets, reps: int = 5) -> float:
    """Device time per call of fn(*args) (jax_mxfp8.timing.device_time_us); arrays keep their
    shardings, so this times sharded steps."""
    return max(timing.device_time_us(fn, list(arg_sets), reps), 0.0) / 1e3


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def request_cpu_devices(n: int) -> None:
    """Asks for n fake CPU devices (only possible before JAX starts its backends)."""
    try:
        jax.config.update("jax_num_cpu_devices", max(n, 1))
    except Exception:  # backends already initialised: keep what there is
        pass


def main(args) -> int:
    tp = int(args.tp)
    dp = int(getattr(args, "dp", 1) or 1)
    request_cpu_devices(tp * dp)
    backend = mx.Backend.parse(args.backend) if getattr(args, "backend", None) else mx.select_backend()
    hidden = tp_width(getattr(args, "hidden", 512), 1, backend)
    inter = tp_width(getattr(args, "intermediate", 1408), tp, backend)
    batch, seq = getattr(args, "batch", 4) * dp, getattr(args, "seq", 32)
    repeats = max(int(getattr(args, "repeats", 4)), 2)
    qa = True if getattr(args, "w8a8", False) else None
    mesh = make_mesh(tp, dp)
    device = mesh.devices.flat[0]
    print(f"jax_mxfp8 {mx.__version__} | jax {jax.__version__} | {dp}x{tp} mesh {mesh.axis_names} "
          f"of {device.platform} {device.device_kind} | backend {backend.value}")
    if inter != getattr(args, "intermediate", inter):
        print(f"intermediate width rounded up to {inter} so it splits into {tp} whole shards")

    key = jax.random.key(getattr(args, "seed", 0))
    params = init_params(key, hidden, inter)
    xs = [jax.random.normal(k, (batch, seq, hidden), jnp.bfloat16)
          for k in jax.random.split(jax.random.fold_in(key, 1), repeats)]
    x_sharding = NamedSharding(mesh, P(DATA, None, None))
    xs_sharded = [jax.device_put(x, x_sharding) for x in xs]

    one = jax.devices()[0]
    single = jax.device_put(quantize_params(params, backend), one)
    sharded = quantize_params(params, backend, mesh)
    bf16_sharded = shard_bf16(params, mesh)

    run = jax.jit(lambda p, x: mlp(p, x, qa))
    y_single = run(single, jax.device_put(xs[0], one))
    y_sharded = run(sharded, xs_sharded[0])
    y_bf16 = jax.jit(mlp_bf16)(bf16_sharded, xs_sharded[0])
    out_spec = y_sharded.sharding.spec
    counts = collectives(run.lower(sharded, xs_sharded[0]).compile().as_text())

    y_sharded, y_single, y_bf16 = (np.asarray(y, np.float32) for y in (y_sharded, y_single, y_bf16))
    diff = float(np.max(np.abs(y_sharded - y_single)))
    err_single, err_bf16 = rel_error(y_sharded, y_single), rel_error(y_sharded, y_bf16)
    print(f"MLP {hidden}->{inter}->{hidden}, x [{batch}, {seq}, {hidden}] bf16, "
          f"output sharding {out_spec}")
    print(f"sharded vs single-device MXFP8: max |diff| {diff:.3g}, relative error {err_single:.2e}")
    print(f"sharded MXFP8 vs bf16 model: relative error {err_bf16:.4f}")
    print(f"collectives in the compiled sharded step: {counts}")
    per_device = sum(a.addressable_shards[0].data.nbytes for w in sharded.values()
                     for a in w.arrays.values())
    print(f"weights per device: MXFP8 {per_device / 2**20:.2f} MiB, bf16 "
          f"{sum(a.addressable_shards[0].data.nbytes for a in bf16_sharded.values()) / 2**20:.2f} MiB")

    step = lambda p, x: mlp(p, x, qa)  # noqa: E731  (weights shared by the R inputs: a demo)
    t_sharded = device_time_ms(step, [(sharded, x) for x in xs_sharded])
    t_bf16 = device_time_ms(mlp_bf16, [(bf16_sharded, x) for x in xs_sharded])
    t_single = device_time_ms(step, [(single, jax.device_put(x, one)) for x in xs])
    print(f"device time per step: MXFP8 tp={tp} {t_sharded:.3f} ms | bf16 tp={tp} {t_bf16:.3f} ms | "
          f"MXFP8 one device {t_single:.3f} ms")

    ok = (counts["all-reduce"] == (1 if tp > 1 else 0) and counts["all-gather"] == 0
          and err_single < 1e-2 and err_bf16 < getattr(args, "max_rel_error", 0.10))
    print("OK" if ok else "FAILED: see the numbers above")
    return 0 if ok else 1
