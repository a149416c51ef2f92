"""Tensor- and expert-parallel MXFP8 inference on N devices: a decoder and an MoE layer.

    python -m jax_mxfp8.bench.multi_gpu decoder --tp 4 8 [--model llama3-70b] [--layers 80]
        [--batch 1,16,64] [--ctx 1024] [--prefill 2048] [--out DIR]
    python -m jax_mxfp8.bench.multi_gpu moe --tp 4 8 [--model qwen3-30b-a3b mixtral-8x7b]
        [--tokens 1,16,64,2048] [--out DIR]

decoder: the Llama-style decoder of jax_mxfp8.models.kv_decoder (its functions run the sharded
parameters as they are; random weights of the model's real shapes, unfused projections) on a
1-D mesh ("model",) of tp devices. q/k/v and gate/up are column-parallel (N split), o and down
row-parallel (K split): each attention and each MLP block ends in one all-reduce, no weight is
gathered. The KV cache [batch, kv_heads, ctx, head_dim] is split over its kv heads (tp must
divide kv_heads), the bf16 lm_head over the vocabulary (logits stay split), the embedding and
the norms are replicated. Weights are built layer by layer directly on the mesh (each device
generates and quantizes its own shard; the bf16 pieces of a layer are freed once quantized), so
no device ever holds the whole unsharded model. Peers: bf16 sharded the same way, and MXFP8 on
one device (tp=1, always run first: the reference of the agreement check). Cells: decode at each
--batch (a random cache of --ctx positions; the step's cost is that of the whole context), and
prefill of --prefill tokens (batch 1).

moe: one mixture-of-experts layer (router top-k, tokens sorted by expert, fused gate/up and down
as grouped GEMMs: jax_mxfp8.ragged_linear for MXFP8, jax.lax.ragged_dot for bf16) with the
experts split over the tp devices inside jax.shard_map: every device routes all tokens (the
router is replicated), runs its E/tp experts' rows, weighs and adds them into a float32 [T, H]
and one psum adds the devices' parts.

Checks (exit status 1 when one fails): sharded MXFP8 == one-device MXFP8 within --tol (relative
Frobenius error of the logits / layer outputs; TOLERANCE below says why these bounds); the
compiled HLO holds no all-gather of a weight-shaped array and exactly the expected all-reduces
(2 per decoder layer, 1 per MoE layer; 0 at tp=1). Reported: ms per step, ms per token and
tokens/s (decode: batch / step; prefill and moe: tokens / call), weight bytes per device and
device.memory_stats() (bytes in use and peak, per device; None where the platform has none,
e.g. CPU). Timing is wall clock of the compiled step (decode: cache donated, fixed tokens,
--steps per round after --warmup, median of --rounds).

Collectives are JAX's own (jit with shardings, shard_map's psum), lowered to NCCL on GPUs.
NVLink multicast (NVLS) must stay off on the lent multi-GPU machines (their device
documentation requires it), so NCCL_NVLS_ENABLE=0 is set below, before JAX starts its backends,
unless the environment already sets it.
"""
from __future__ import annotations

import os

# NCCL reads this when JAX first initialises its communicators; NVLink multicast stays off.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import jax_mxfp8 as mx  # noqa: E402
from jax_mxfp8 import placement  # noqa: E402
from jax_mxfp8.backends import Backend, select_backend  # noqa: E402
from jax_mxfp8.backends.emulation import grouped_dot_with_bias  # noqa: E402
from jax_mxfp8.bench.report import positive_ints  # noqa: E402
from jax_mxfp8.models import kv_decoder as kd  # noqa: E402
from jax_mxfp8.weight import MxWeight  # noqa: E402

MODEL = "model"
GiB = 1 << 30

# Sharded vs one-device MXFP8. Both run the same per-shard GEMMs; what differs is the order of
# float32 sums: the row-parallel all-reduces add tp partial products (o, down), the MoE psum adds
# the devices' expert contributions. Each block's output is rounded to bf16 once, so a few
# elements differ by one bf16 ulp (2^-8 relative) and, in the decoder, the residual stream
# carries that through the layers. 1e-2 is the bound bench.tp and the partitioning tests use
# for sharded GEMMs; one MoE layer has no depth to carry errors: 2e-3.
TOLERANCE = {"decoder": 1e-2, "moe": 2e-3}

# A configuration with 8 kv heads like Llama-3-70B (so tp = 2, 4, 8 split the cache), tiny sizes:
# the CPU tests and smoke runs.
TINY_DECODER = kd.ModelConfig("tiny-tp", 256, 512, 16, 8, 32, 2, 512, 10000.0, 1e-5)

COLUMN_PARALLEL = ("q", "k", "v", "gate", "up")  # N split: no communication
ROW_PARALLEL = ("o", "down")                     # K split: one all-reduce after each


def decoder_config(name: str, layers: int | None) -> kd.ModelConfig:
    if name == TINY_DECODER.name:
        return TINY_DECODER.with_layers(layers)
    return kd.model_config(name, layers)


# ---- meshes and placement ----------------------------------------------------------------------

def make_mesh(tp: int, devices=None) -> Mesh:
    """A 1-D mesh ("model",) over the first tp devices."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < tp:
        raise ValueError(f"tp={tp} needs {tp} devices; {len(devices)} visible ({devices[0].platform}). "
                         f"On CPU pass --cpu-devices {tp} (or XLA_FLAGS=--xla_force_host_platform_"
                         f"device_count={tp})")
    return Mesh(np.array(devices[:tp]), (MODEL,))


def check_decoder_tp(config: kd.ModelConfig, tp: int) -> None:
    if config.kv_heads % tp:
        raise ValueError(f"{config.name}: tp={tp} does not divide its {config.kv_heads} kv heads; the "
                         f"KV cache and k/v are split over kv heads, so use a tp dividing {config.kv_heads}")


def projection_spec(name: str) -> P:
    if name in COLUMN_PARALLEL:
        return P(MODEL, None)
    if name in ROW_PARALLEL:
        return P(None, MODEL)
    return P()  # norms and biases: replicated


def _put(mesh, spec):
    return NamedSharding(mesh, spec)


def build_decoder(config: kd.ModelConfig, key, mesh: Mesh, weights: str | Backend,
                  progress: bool = False) -> dict:
    """kv_decoder.init_params(config, key, weights=weights) (unfused, bf16 lm_head), built on the
    mesh: the same random values (JAX's RNG is sharding-invariant), each layer's bf16 pieces
    generated split as projection_spec says, then quantized and prepared per shard."""
    if config.qkv_bias or config.qk_norm:
        raise ValueError(f"{config.name}: q/k/v biases and q/k norms are not placed by this benchmark; "
                         f"use a Llama-shaped model (llama3-8b, llama3-70b, mistral-7b)")
    dtype = jnp.bfloat16
    weights = "bf16" if weights == "bf16" else Backend.parse(weights)
    # init_params' key schedule: the same key gives the same model as kv_decoder's one-device build
    k_embed, k_head, k_norm, k_layers = jax.random.split(key, 4)
    replicated = _put(mesh, P())
    embed = jax.jit(lambda k: kd._normal(k, (config.vocab, config.hidden), 1.0, dtype),
                    out_shardings=replicated)(k_embed)
    final_norm = jax.jit(lambda k: 1.0 + kd._normal(k, (config.hidden,), 0.1, dtype),
                         out_shardings=replicated)(k_norm)
    lm_head = jax.jit(lambda k: kd._dense(k, (config.vocab, config.hidden), dtype),
                      out_shardings=_put(mesh, P(MODEL, None)))(k_head)  # logits split over vocab
    names = (*kd.PIECES, "attn_norm", "mlp_norm")
    shardings = {n: _put(mesh, projection_spec(n)) for n in names}
    make_layer = jax.jit(lambda k: kd._layer_params(config, k, "bf16", False, dtype),
                         out_shardings=shardings)
    label = f"{config.name} {weights if weights == 'bf16' else weights.value} tp={mesh.size}"
    layers = []
    for i in tqdm(range(config.layers), desc=label, unit="layer", disable=not progress, leave=False):
        layer = make_layer(jax.random.fold_in(k_layers, i))
        if weights != "bf16":
            for name in kd.PIECES:
                values, scales = mx.quantize(layer[name])
                layer[name] = placement.prepare_weight_sharded(
                    values, scales, mesh, backend=weights,
                    n_axis=MODEL if name in COLUMN_PARALLEL else None,
                    k_axis=MODEL if name in ROW_PARALLEL else None)
                del values, scales
        layers.append(jax.block_until_ready(layer))
    return {"embed": embed, "final_norm": final_norm, "lm_head": lm_head, "layers": layers}


def abstract_decoder(config: kd.ModelConfig, mesh: Mesh, weights: str | Backend) -> dict:
    """build_decoder's parameters as ShapeDtypeStructs with their shardings (nothing allocated):
    what --compile-only lowers and compiles at the real model's shapes. The placement checks
    (whole backend tiles per shard) run as for real weights."""
    dtype = jnp.bfloat16
    weights = "bf16" if weights == "bf16" else Backend.parse(weights)

    def struct(shape, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=_put(mesh, spec))

    def projection(name, shape):
        if weights == "bf16":
            return struct(shape, projection_spec(name))
        template = jax.eval_shape(lambda w: mx.quantize_weight(w, backend=weights),
                                  jax.ShapeDtypeStruct(shape, dtype))
        shardings = placement.weight_shardings(
            template, mesh, n_axis=MODEL if name in COLUMN_PARALLEL else None,
            k_axis=MODEL if name in ROW_PARALLEL else None)
        return jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                            template, shardings)

    shapes = config.linears(False)
    layer = {name: projection(name, shapes[name]) for name in kd.PIECES}
    layer["attn_norm"] = layer["mlp_norm"] = struct((config.hidden,), P())
    return {"embed": struct((config.vocab, config.hidden), P()), "final_norm": struct((config.hidden,), P()),
            "lm_head": struct((config.vocab, config.hidden), P(MODEL, None)),
            "layers": [layer] * config.layers}


def cache_sharding(mesh: Mesh) -> NamedSharding:
    return _put(mesh, P(None, MODEL, None, None))  # [batch, kv_heads, ctx, head_dim]: kv heads split


def random_cache(config: kd.ModelConfig, batch: int, ctx: int, key, mesh: Mesh):
    """kv_decoder.init_cache(..., key=key), generated split over kv heads."""
    sharding = cache_sharding(mesh)
    return jax.jit(lambda k: kd.init_cache(config, batch, ctx, key=k),
                   out_shardings=[(sharding, sharding)] * config.layers)(key)


# ---- what is on the devices, what the compiled step communicates -----------------------------

def _leaves(tree):
    return [a for a in jax.tree.leaves(tree) if hasattr(a, "addressable_shards")]


def bytes_per_device(tree) -> list[int]:
    """Bytes of tree's arrays on each device (of the devices holding any)."""
    per: dict = {}
    for a in _leaves(tree):
        for shard in a.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return [per[d] for d in sorted(per, key=lambda d: d.id)]


def weight_shapes(tree) -> set[tuple[int, ...]]:
    """Global and per-shard shapes of every weight array (norms and other vectors left out: an
    all-gather of one of these shapes gathers a weight)."""
    shapes = set()
    for a in _leaves(tree):
        if a.ndim >= 2:
            shapes.add(tuple(a.shape))
            shapes.add(tuple(a.sharding.shard_shape(a.shape)))
    return shapes


_COLLECTIVE_LINE = re.compile(
    r"=\s*(?P<result>.+?)\s+(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\((?P<operands>[^)]*)\)")
_SHAPE = re.compile(r"\b[a-z][a-z0-9]*\[([0-9,]*)\]")


def _shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(text)]


def hlo_collectives(text: str) -> list[dict]:
    """Every collective of compiled HLO text: op, result shapes, operand shapes."""
    found = []
    for line in text.splitlines():
        m = _COLLECTIVE_LINE.search(line)
        if m:
            found.append({"op": m["op"], "result": _shapes(m["result"]), "operands": _shapes(m["operands"])})
    return found


def check_hlo(text: str, shapes: set, expected_all_reduce: int) -> dict:
    """Counts of each collective, the all-gathers of weight-shaped arrays, and whether the
    all-reduce count is the expected one and no weight is gathered."""
    found = hlo_collectives(text)
    counts = {op: sum(c["op"] == op for c in found) for op in
              ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")}
    gathers = [c for c in found if c["op"] == "all-gather"
               and any(s in shapes for s in c["result"] + c["operands"])]
    return {"collectives": counts, "weight_gathers": [str(c["result"]) for c in gathers],
            "expected_all_reduce": expected_all_reduce,
            "ok": not gathers and counts["all-reduce"] == expected_all_reduce}


def memory_stats(mesh: Mesh) -> dict:
    """Max over the mesh's devices of device.memory_stats()' bytes in use and peak (GiB), with
    the per-device lists; None where the platform reports none (CPU)."""
    in_use, peak = [], []
    for d in mesh.devices.flat:
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001  (clients without memory statistics)
            stats = {}
        in_use.append(stats.get("bytes_in_use"))
        peak.append(stats.get("peak_bytes_in_use"))
    if any(v is None for v in in_use):
        return {"in_use_gib": None, "peak_gib": None}
    return {"in_use_gib": max(in_use) / GiB, "peak_gib": max(p or 0 for p in peak) / GiB,
            "in_use_gib_per_device": [v / GiB for v in in_use]}


def bytes_limit(mesh: Mesh) -> int | None:
    try:
        return (mesh.devices.flat[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001
        return None


def rel_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _gather_host(a) -> np.ndarray:
    return np.asarray(jax.device_get(a), np.float32)


def _median_ms(run, rounds: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


# ---- decoder ---------------------------------------------------------------------------------------

def decoder_bytes_per_device(config: kd.ModelConfig, weights: str, tp: int) -> int:
    """Estimate before building: projections / tp (MXFP8: 1 + 1/32 bytes a weight), the bf16
    head / tp, the replicated embedding."""
    per_weight = 2.0 if weights == "bf16" else 1.0 + 1.0 / 32
    proj = sum(n * k for n, k in config.linears(False).values()) * config.layers * per_weight
    return int(proj / tp + 2 * config.vocab * config.hidden * (1 + 1 / tp))


def decode_cell(config, params, mesh, batch, ctx, key, args, shapes) -> dict:
    k_cache, k_tok = jax.random.split(key)
    cache = random_cache(config, batch, ctx, k_cache, mesh)
    tokens = jax.device_put(jax.random.randint(k_tok, (batch,), 0, config.vocab, jnp.int32),
                            _put(mesh, P()))
    total = args.warmup + args.rounds * args.steps + 1
    positions = [jnp.int32((ctx - total + i) % ctx) for i in range(total)]  # made ahead
    step = jax.jit(functools.partial(kd.decode_step, config), donate_argnums=(1,))
    start = time.perf_counter()
    compiled = step.lower(params, cache, tokens, positions[0]).compile()
    compile_s = time.perf_counter() - start
    hlo = check_hlo(compiled.as_text(), shapes, 2 * config.layers if mesh.size > 1 else 0)
    logits, cache = compiled(params, cache, tokens, positions[0])  # the agreement check's step
    logits = _gather_host(logits)
    for i in range(args.warmup):
        _, cache = compiled(params, cache, tokens, positions[1 + i])
    jax.block_until_ready(cache)
    times = []
    for r in range(args.rounds):
        base = 1 + args.warmup + r * args.steps
        start = time.perf_counter()
        for i in range(args.steps):
            out, cache = compiled(params, cache, tokens, positions[base + i])
        jax.block_until_ready((out, cache))
        times.append((time.perf_counter() - start) / args.steps * 1e3)
    memory = memory_stats(mesh)  # with this cell's cache on the devices
    del cache, compiled
    ms = statistics.median(times)
    return {"cell": f"decode b={batch}", "phase": "decode", "batch": batch, "ctx": ctx, "tokens": batch,
            "ms_per_step": ms, "ms_per_token": ms, "tokens_per_s": batch / ms * 1e3,
            "ms_rounds": times, "compile_s": compile_s, "memory": memory, "hlo": hlo,
            "_logits": logits}


def prefill_cell(config, params, mesh, tokens_count, key, args, shapes) -> dict:
    tokens = jax.device_put(jax.random.randint(key, (1, tokens_count), 0, config.vocab, jnp.int32),
                            _put(mesh, P()))
    fn = jax.jit(functools.partial(kd.prefill, config),
                 out_shardings=(None, [(cache_sharding(mesh),) * 2] * config.layers))
    start = time.perf_counter()
    compiled = fn.lower(params, tokens).compile()
    compile_s = time.perf_counter() - start
    hlo = check_hlo(compiled.as_text(), shapes, 2 * config.layers if mesh.size > 1 else 0)
    logits, cache = compiled(params, tokens)
    logits = _gather_host(logits)
    del cache
    ms, times = _median_ms(lambda: compiled(params, tokens), args.rounds)
    memory = memory_stats(mesh)
    del compiled
    return {"cell": f"prefill {tokens_count}", "phase": "prefill", "batch": 1, "ctx": tokens_count,
            "tokens": tokens_count, "ms_per_step": ms, "ms_per_token": ms / tokens_count,
            "tokens_per_s": tokens_count / ms * 1e3, "ms_rounds": times, "compile_s": compile_s,
            "memory": memory, "hlo": hlo, "_logits": logits}


def compile_cells(config, mesh, weights, args) -> list[dict]:
    """--compile-only: the decode and prefill steps lowered and compiled on abstract parameters,
    their HLO checked; nothing runs."""
    params = abstract_decoder(config, mesh, weights)
    shapes = weight_shapes(params["layers"]) | weight_shapes(params["lm_head"])
    expected = 2 * config.layers if mesh.size > 1 else 0
    replicated = _put(mesh, P())
    rows = []
    for phase, size in [("decode", b) for b in args.batch] + [("prefill", t) for t in args.prefill]:
        start = time.perf_counter()
        if phase == "decode":
            kv = jax.ShapeDtypeStruct((size, config.kv_heads, args.ctx, config.head_dim), jnp.bfloat16,
                                      sharding=cache_sharding(mesh))
            lowered = jax.jit(functools.partial(kd.decode_step, config), donate_argnums=(1,)).lower(
                params, [(kv, kv)] * config.layers, jax.ShapeDtypeStruct((size,), jnp.int32, sharding=replicated),
                jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
        else:
            lowered = jax.jit(functools.partial(kd.prefill, config),
                              out_shardings=(None, [(cache_sharding(mesh),) * 2] * config.layers)).lower(
                params, jax.ShapeDtypeStruct((1, size), jnp.int32, sharding=replicated))
        hlo = check_hlo(lowered.compile().as_text(), shapes, expected)
        rows.append({"cell": f"{phase} {size}" if phase == "prefill" else f"decode b={size}", "phase": phase,
                     "compile_s": time.perf_counter() - start, "hlo": hlo, "ok": hlo["ok"]})
    return rows


def run_decoder(args, devices) -> dict:
    config = decoder_config(args.model, args.layers)
    backend = _backend(args, devices)
    sizes = _tp_sizes(args.tp)
    for tp in sizes:
        check_decoder_tp(config, tp)
    key = jax.random.key(args.seed)
    k_weights, k_data = jax.random.split(key)
    peers = [("mxfp8", backend.value, 1)] + [(kind, w, tp) for tp in sizes for kind, w in
                                              (("mxfp8", backend.value), ("bf16", "bf16")) if (kind, tp) != ("mxfp8", 1)]
    rows, reference = [], {}
    for kind, weights, tp in peers:
        mesh = make_mesh(tp, devices)
        label = f"{kind} tp={tp}"
        if args.compile_only:
            for row in compile_cells(config, mesh, weights, args):
                row.update(peer=kind, weights=weights, tp=tp)
                rows.append(row)
                print(_row_line(row), flush=True)
            continue
        need, limit = decoder_bytes_per_device(config, weights, tp), bytes_limit(mesh)
        if limit and need > 0.92 * limit:
            rows.append({"peer": kind, "tp": tp, "skipped": f"needs ~{need / GiB:.1f} GiB per device "
                                                            f"of {limit / GiB:.1f}"})
            print(f"{label}: skipped, weights need ~{need / GiB:.1f} GiB per device of {limit / GiB:.1f}")
            continue
        start = time.perf_counter()
        params = build_decoder(config, k_weights, mesh, weights, progress=args.progress)
        build_s = time.perf_counter() - start
        shapes = weight_shapes(params["layers"]) | weight_shapes(params["lm_head"])
        weight_bytes = max(bytes_per_device(params))
        print(f"{label}: built in {build_s:.1f} s, {weight_bytes / GiB:.2f} GiB of parameters per device",
              flush=True)
        cells = [("decode", b) for b in args.batch] + [("prefill", t) for t in args.prefill]
        for phase, size in cells:
            cell_key = jax.random.fold_in(k_data, size if phase == "decode" else 10**6 + size)
            cache_bytes = kd.kv_cache_bytes(config, size if phase == "decode" else 1,
                                            args.ctx if phase == "decode" else size) / tp
            if limit and weight_bytes + cache_bytes > 0.92 * limit:
                print(f"{label} {phase} {size}: skipped (cache {cache_bytes / GiB:.1f} GiB does not fit)")
                rows.append({"peer": kind, "tp": tp, "cell": f"{phase} {size}", "skipped": "cache does not fit"})
                continue
            if phase == "decode":
                row = decode_cell(config, params, mesh, size, args.ctx, cell_key, args, shapes)
            else:
                row = prefill_cell(config, params, mesh, size, cell_key, args, shapes)
            logits = row.pop("_logits")
            if kind == "mxfp8" and tp == 1:
                reference[row["cell"]] = logits
            want = reference.get(row["cell"])
            err = None if want is None else rel_error(logits, want)
            row.update(peer=kind, weights=weights, tp=tp, weight_gib_per_device=weight_bytes / GiB,
                       build_s=build_s, rel_err_vs_mxfp8_1=err)
            # bf16 logits differ from MXFP8 ones by the quantization: only its collectives are checked
            row["ok"] = row["hlo"]["ok"] and (kind == "bf16" or (err is not None and err <= args.tol))
            rows.append(row)
            print(_row_line(row), flush=True)
        del params
    return {"what": "decoder", "model": dataclasses.asdict(config), "backend": backend.value,
            "ctx": args.ctx, "tol": args.tol, "rows": rows}


# ---- MoE ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MoeConfig:
    name: str
    experts: int
    hidden: int
    intermediate: int
    topk: int


# Real dimensions (Hugging Face config.json): one MoE layer of each.
MOE_MODELS = {
    "qwen3-30b-a3b": MoeConfig("qwen3-30b-a3b", 128, 2048, 768, 8),
    "mixtral-8x7b": MoeConfig("mixtral-8x7b", 8, 4096, 14336, 2),
    "tiny": MoeConfig("tiny", 16, 128, 64, 4),  # CPU tests
}


def moe_config(name: str) -> MoeConfig:
    if name not in MOE_MODELS:
        raise ValueError(f"unknown MoE model {name!r}; known: {', '.join(MOE_MODELS)}")
    return MOE_MODELS[name]


def check_moe_tp(config: MoeConfig, tp: int) -> None:
    if config.experts % tp:
        raise ValueError(f"{config.name}: tp={tp} does not divide its {config.experts} experts; each "
                         f"device holds whole experts, so use a tp dividing {config.experts}")


def build_moe(config: MoeConfig, key, mesh: Mesh, weights: str | Backend) -> dict:
    """Router [E, H] (bf16, replicated), fused gate/up [E, 2I, H] and down [E, H, I] split over
    the experts: bf16 arrays, or MxWeights quantized and prepared per shard."""
    e, h, i = config.experts, config.hidden, config.intermediate
    k_router, k_gate_up, k_down = jax.random.split(key, 3)
    split = _put(mesh, P(MODEL, None, None))
    make = lambda k, shape: jax.jit(lambda k: kd._dense(k, shape, jnp.bfloat16),  # noqa: E731
                                    out_shardings=split)(k)
    params = {"router": jax.jit(lambda k: kd._dense(k, (e, h), jnp.bfloat16),
                                out_shardings=_put(mesh, P()))(k_router),
              "gate_up": make(k_gate_up, (e, 2 * i, h)), "down": make(k_down, (e, h, i))}
    if weights != "bf16":
        for name in ("gate_up", "down"):
            values, scales = mx.quantize(params[name])
            params[name] = placement.prepare_weight_sharded(values, scales, mesh, expert_axis=MODEL,
                                                            backend=weights)
    return jax.block_until_ready(params)


def route(config: MoeConfig, router, x):
    """Top-k experts of each token and their weights (softmax over the k chosen logits: Mixtral's
    routing, and Qwen3's with norm_topk_prob)."""
    logits = jnp.dot(x, router.T, preferred_element_type=jnp.float32)
    top, experts = lax.top_k(logits, config.topk)
    return experts.astype(jnp.int32), jax.nn.softmax(top, axis=-1)


def _grouped(x, w, group_sizes):
    if isinstance(w, MxWeight):
        return mx.ragged_linear(x, w, group_sizes)
    return grouped_dot_with_bias(x, w, group_sizes, None, x.dtype)  # bf16 lax.ragged_dot peer


def moe_local(config: MoeConfig, local: int, reduce: bool, x, router, gate_up, down):
    """One device's part of the layer (inside shard_map): its `local` experts' rows, weighed and
    added into a float32 [T, H] that a psum completes (reduce: more than one device)."""
    t, k = x.shape[0], config.topk
    experts, probs = route(config, router, x)
    flat = experts.reshape(-1)                         # [T*k] row r: token r // k, slot r % k
    order = jnp.argsort(flat, stable=True)             # rows sorted by expert
    counts = jnp.bincount(flat, length=config.experts).astype(jnp.int32)
    first_expert = lax.axis_index(MODEL) * local
    starts = jnp.cumsum(counts) - counts
    group_sizes = lax.dynamic_slice_in_dim(counts, first_expert, local)
    # this device's rows first (the grouped GEMMs compute rows 0 .. sum(group_sizes) - 1)
    rows = order[(starts[first_expert] + jnp.arange(t * k)) % (t * k)]
    token = rows // k
    h = _grouped(x[token], gate_up, group_sizes)
    gate, up = jnp.split(h, 2, axis=-1)
    act = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)
    y = _grouped(act, down, group_sizes).astype(jnp.float32)
    mine = jnp.arange(t * k) < jnp.sum(group_sizes)
    weighted = jnp.where(mine[:, None], y * probs.reshape(-1)[rows][:, None], 0.0)
    out = jnp.zeros((t, x.shape[1]), jnp.float32).at[token].add(weighted)
    return (lax.psum(out, MODEL) if reduce else out).astype(x.dtype)


def moe_layer(config: MoeConfig, mesh: Mesh, params, x):
    """x [T, H] (replicated) -> [T, H]: the experts split over the mesh (shard_map, one psum)."""
    def spec(w):
        if isinstance(w, MxWeight):
            return jax.tree.map(lambda s: s.spec, placement.weight_shardings(w, mesh, expert_axis=MODEL))
        return P(MODEL, None, None)
    body = functools.partial(moe_local, config, config.experts // mesh.size, mesh.size > 1)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), spec(params["gate_up"]), spec(params["down"])),
                         out_specs=P(), check_vma=False)(x, params["router"], params["gate_up"], params["down"])


def moe_cell(config, params, mesh, tokens, key, args) -> dict:
    x = jax.device_put(jax.random.normal(key, (tokens, config.hidden), jnp.bfloat16), _put(mesh, P()))
    fn = jax.jit(functools.partial(moe_layer, config, mesh))
    start = time.perf_counter()
    compiled = fn.lower(params, x).compile()
    compile_s = time.perf_counter() - start
    shapes = weight_shapes({k: v for k, v in params.items() if k != "router"})
    hlo = check_hlo(compiled.as_text(), shapes, 1 if mesh.size > 1 else 0)
    y = _gather_host(compiled(params, x))
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(params, x))
    ms, times = _median_ms(lambda: compiled(params, x), args.rounds)
    return {"cell": f"T={tokens}", "tokens": tokens, "ms_per_step": ms, "ms_per_token": ms / tokens,
            "tokens_per_s": tokens / ms * 1e3, "ms_rounds": times, "compile_s": compile_s,
            "memory": memory_stats(mesh), "hlo": hlo, "_y": y}


def run_moe(args, devices) -> dict:
    backend = _backend(args, devices)
    sizes = _tp_sizes(args.tp)
    configs = [moe_config(name) for name in args.model]
    for config in configs:
        for tp in sizes:
            check_moe_tp(config, tp)
    rows = []
    for config in configs:
        key = jax.random.key(args.seed)
        k_weights, k_data = jax.random.split(key)
        reference = {}
        for tp in sizes:
            mesh = make_mesh(tp, devices)
            for kind, weights in (("mxfp8", backend), ("bf16", "bf16")):
                params = build_moe(config, k_weights, mesh, weights)
                weight_bytes = max(bytes_per_device(params))
                for t in args.tokens:
                    row = moe_cell(config, params, mesh, t, jax.random.fold_in(k_data, t), args)
                    y = row.pop("_y")
                    if tp == 1:
                        reference[kind, t] = y
                    err = rel_error(y, reference[kind, t]) if (kind, t) in reference else None
                    row.update(model=config.name, peer=kind, tp=tp,
                               weights=weights if weights == "bf16" else weights.value,
                               weight_gib_per_device=weight_bytes / GiB, rel_err_vs_one_device=err,
                               rel_err_vs_mxfp8_1=(rel_error(y, reference["mxfp8", t])
                                                   if ("mxfp8", t) in reference else None),
                               tol=args.tol)
                    row["ok"] = row["hlo"]["ok"] and err is not None and err <= args.tol
                    rows.append(row)
                    print(_row_line(row), flush=True)
                del params
    return {"what": "moe", "models": [dataclasses.asdict(c) for c in configs], "backend": backend.value,
            "tol": args.tol, "rows": rows}


# ---- output ----------------------------------------------------------------------------------------

def _f(value, fmt):
    return "-" if value is None else format(value, fmt)


def _row_line(row: dict) -> str:
    hlo = row["hlo"]
    err = row.get("rel_err_vs_one_device", row.get("rel_err_vs_mxfp8_1"))
    timed = "ms_per_step" in row
    return (f"{row.get('model', '')} {row['peer']:5s} tp={row['tp']} {row['cell']:14s} "
            + (f"{row['ms_per_step']:9.3f} ms/step {row['ms_per_token']:9.4f} ms/token "
               f"{row['tokens_per_s']:10.1f} tok/s | params {row['weight_gib_per_device']:.3f} GiB/device, "
               f"in use {_f(row['memory']['in_use_gib'], '.2f')} GiB | err {_f(err, '.2e')} | "
               if timed else f"compiled in {row['compile_s']:.1f} s | ")
            + f"all-reduce {hlo['collectives']['all-reduce']}/{hlo['expected_all_reduce']} all-gather "
            f"{hlo['collectives']['all-gather']} (of weights {len(hlo['weight_gathers'])}) | "
            f"{'ok' if row['ok'] else 'FAIL'}")


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# Multi-device {report['what']}: {env['devices']} x {env['device_kind']} ({env['platform']})",
             "", f"jax {env['jax']}, backend {report['backend']}, NCCL_NVLS_ENABLE={env['nccl_nvls_enable']}, "
                 f"tolerance {report['tol']:g} (relative, sharded MXFP8 vs one device)", ""]
    if report["what"] == "decoder":
        m = report["model"]
        lines += [f"{m['name']}: {m['layers']} layers, hidden {m['hidden']}, intermediate {m['intermediate']}, "
                  f"{m['heads']} heads / {m['kv_heads']} kv heads; decode context {report['ctx']}", ""]
        head = "| peer | tp | cell | ms/step | ms/token | tokens/s | params GiB/dev | in use GiB/dev | " \
               "peak GiB/dev | rel. err vs MXFP8 1 dev | all-reduce (expected) | weight gathers | ok |"
    else:
        head = "| model | peer | tp | cell | ms/step | ms/token | tokens/s | params GiB/dev | in use GiB/dev | " \
               "peak GiB/dev | rel. err vs 1 dev (same peer) | all-reduce (expected) | weight gathers | ok |"
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['peer']} | {r['tp']} | {r.get('cell', '')} | skipped: {r['skipped']} |")
            continue
        hlo, mem = r["hlo"], r.get("memory", {})
        err = r.get("rel_err_vs_one_device", r.get("rel_err_vs_mxfp8_1"))
        cells = ([r["model"]] if report["what"] == "moe" else []) + [
            r["peer"], r["tp"], r["cell"], _f(r.get("ms_per_step"), ".3f"), _f(r.get("ms_per_token"), ".4f"),
            _f(r.get("tokens_per_s"), ".1f"), _f(r.get("weight_gib_per_device"), ".3f"),
            _f(mem.get("in_use_gib"), ".2f"), _f(mem.get("peak_gib"), ".2f"), _f(err, ".2e"),
            f"{hlo['collectives']['all-reduce']} ({hlo['expected_all_reduce']})", len(hlo["weight_gathers"]),
            "yes" if r["ok"] else "**no**"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"multi_gpu_{report['what']}")
    with open(base + ".json", "w") as fh:
        json.dump(report, fh, indent=1)
    with open(base + ".md", "w") as fh:
        fh.write(markdown(report))
    return [base + ".json", base + ".md"]


# ---- command line ------------------------------------------------------------------------------------

_ints = positive_ints


def _tp_sizes(tp: list[int]) -> list[int]:
    return sorted(set([1, *tp]))  # one device first: the reference of the agreement checks


def _backend(args, devices) -> Backend:
    if args.backend:
        return Backend.parse(args.backend)
    return Backend.MARLIN if devices[0].platform == "gpu" else select_backend(devices[0])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jax_mxfp8.bench.multi_gpu", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tp", type=int, nargs="+", required=True,
                        help="device counts (one device is always run too: the reference)")
    common.add_argument("--backend", default=None, help="MXFP8 backend (default: marlin on GPUs, else the fastest)")
    common.add_argument("--warmup", type=int, default=3)
    common.add_argument("--rounds", type=int, default=5)
    common.add_argument("--seed", type=int, default=0, help="of the random weights, tokens and cache")
    common.add_argument("--cpu-devices", type=int, default=0, help="ask for this many fake CPU devices")
    common.add_argument("--out", default=None, help="directory for multi_gpu_{decoder,moe}.json and .md")
    d = sub.add_parser("decoder", parents=[common], help="tensor-parallel Llama-style decoder")
    d.add_argument("--model", default="llama3-70b",
                   help=f"a kv_decoder model ({', '.join(kd.MODELS)}) or {TINY_DECODER.name}")
    d.add_argument("--layers", type=int, default=None, help="a subset of the model's layers (default: all)")
    d.add_argument("--batch", type=_ints, default=[1, 16, 64], help="decode batch sizes")
    d.add_argument("--ctx", type=int, default=1024, help="KV cache positions of the decode cells")
    d.add_argument("--prefill", type=_ints, default=[2048], help="prefill lengths (batch 1)")
    d.add_argument("--steps", type=int, default=10, help="decode steps per round")
    d.add_argument("--tol", type=float, default=TOLERANCE["decoder"])
    d.add_argument("--progress", action="store_true", help="a progress bar while building")
    d.add_argument("--compile-only", action="store_true",
                   help="compile the steps on abstract parameters and check their HLO; build and run nothing "
                        "(the real model's collectives on any host)")
    m = sub.add_parser("moe", parents=[common], help="expert-parallel MoE layer")
    m.add_argument("--model", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"], choices=list(MOE_MODELS))
    m.add_argument("--tokens", type=_ints, default=[1, 16, 64, 2048], help="tokens per call")
    m.add_argument("--tol", type=float, default=TOLERANCE["moe"])
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    devices = jax.devices()
    if max(args.tp) > len(devices):
        print(f"--tp {max(args.tp)} needs {max(args.tp)} devices; {len(devices)} visible "
              f"({devices[0].platform}). On CPU add --cpu-devices {max(args.tp)}", file=sys.stderr)
        return 2
    if os.environ.get("NCCL_NVLS_ENABLE") != "0":
        print(f"warning: NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')!r}; NVLink multicast must "
              f"stay off on the lent machines (unset it or set it to 0)", file=sys.stderr)
    first = devices[0]
    env = {"jax": jax.__version__, "platform": first.platform, "device_kind": first.device_kind,
           "devices": len(devices), "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}
    print(json.dumps(env), flush=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        try:
            report = (run_decoder if args.what == "decoder" else run_moe)(args, devices)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    report["env"] = env
    failures = [r for r in report["rows"] if "skipped" not in r and not r["ok"]]
    report["failures"] = len(failures)
    print()
    print(markdown(report))
    if args.out:
        print("wrote " + ", ".join(write(report, args.out)))
    print(f"{len(report['rows'])} rows, {len(failures)} failed checks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
