"""The model benchmark: a Llama-style decoder of a real model's shapes, bf16 against MXFP8.

    python -m jax_mxfp8 bench --model llama3-8b [--layers N] [--batch 1,16,64] [--ctx 1024]
        [--prefill 2048] [--fused | --unfused] [--backend marlin,emulation] [--out DIR]

Random weights of the model's real shapes (jax_mxfp8.models.kv_decoder), built on the device
one layer at a time. Each peer is the same model (the same random weights, quantized for the
MXFP8 ones), timed in the same run: the bf16 model (dense projections, XLA's dot), then each
MXFP8 backend (every projection an MxWeight through jax_mxfp8.linear). The embedding is a
dense bf16 table and the lm_head a dense bf16 projection in every peer unless --lm-head says
otherwise. Models are built and timed one after another and freed in between, so only one
is on the device at a time.

Timing is wall clock: decode = the jitted step (greedy next token, cache donated) called in a
loop, `--steps` steps per round after `--warmup` steps, blocking once at the end of a round,
median over `--rounds`; prefill = one jitted call on [1, T] tokens, blocked, median over rounds.
Compilation is done ahead (lower + compile) and reported apart. The floors: the bytes of the
weights one decode step reads (projections + lm_head) over the copy bandwidth measured in the
same run (x * 2 on --copy-mib MiB, R-difference: wall clock, like the steps), and the same
with the KV cache read by attention added (at batch 64 and context 1024 it outweighs an 8B
model's weights). GPU busy time: the kernels' durations in a profiler trace of one more round,
summed over streams (work on two streams at once can make it exceed the wall clock); well under
the wall clock, the step waits on the host.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import glob
import os
import statistics
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp

from jax_mxfp8.backends import Backend, select_backend
from jax_mxfp8.bench import moe_model
from jax_mxfp8.bench.report import positive_ints, write_report
from jax_mxfp8.models import kv_decoder as kd
from jax_mxfp8.timing import copy_bandwidth

GiB = 1 << 30

# Layer subsets by default, where the bf16 model of every layer does not fit on one GPU beside
# its cache: Llama-3-70B's 80 layers are 137 GB in bf16. The subset measures the same layers.
DEFAULT_LAYERS = {"llama3-70b": 20}


_ints = positive_ints


def _backends(text: str) -> list[Backend]:
    try:
        return [Backend.parse(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jax_mxfp8 bench --model",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help=f"one of {', '.join(kd.MODELS)} ('tiny': a 2-layer smoke-test configuration); "
                        f"MoE layers (bench/moe_model.py): {', '.join(moe_model.MODELS)}")
    p.add_argument("--layers", type=int, help="the first N layers only (default: all; "
                   + ", ".join(f"{m}: {n}" for m, n in DEFAULT_LAYERS.items())
                   + "); MoE models: N stacked MoE layers (default 1)")
    p.add_argument("--batch", type=_ints, default=[1, 16, 64], help="decode batch sizes (default 1,16,64)")
    p.add_argument("--ctx", type=int, default=1024, help="KV cache length of decode (default 1024)")
    p.add_argument("--prefill", type=int, default=2048,
                   help="prompt tokens of the prefill timing, batch 1 (default 2048; 0 skips it)")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--fused", dest="layouts", action="store_const", const=["fused"],
                        help="only fused q/k/v and gate/up projections")
    layout.add_argument("--unfused", dest="layouts", action="store_const", const=["unfused"],
                        help="only separate projections (default: both layouts)")
    p.add_argument("--backend", type=_backends, default=None,
                   help="MXFP8 backends, comma-separated (default: the device's fastest, and "
                        "emulation)")
    p.add_argument("--lm-head", choices=("bf16", "mxfp8", "none"), default="bf16",
                   help="the head: bf16 in every peer (default), MXFP8 in the MXFP8 peers, or none "
                        "(the step returns the last hidden state: layers only)")
    p.add_argument("--layer-loop", choices=("unroll", "scan"), default="unroll",
                   help="layers as an unrolled loop of separate weights (default) or lax.scan "
                        "over stacked weights")
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed round (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, median (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="decode steps before timing (default 3)")
    p.add_argument("--no-busy", dest="busy", action="store_false",
                   help="skip the GPU busy time of one round of decode steps (a profiler trace)")
    p.add_argument("--copy-mib", type=int, default=512, help="size of the copy-bandwidth arrays")
    p.add_argument("--seed", type=int, default=0, help="of the random weights, tokens and cache")
    p.add_argument("--out", help="directory for model_bench.json, .md and .png")
    return p


# ---- timing -------------------------------------------------------------------------------------

def _greedy_step(config, params, cache, tokens, pos):
    out, cache = kd.decode_step(config, params, cache, tokens, pos)
    return (jnp.argmax(out, axis=-1) % config.vocab).astype(jnp.int32), cache


def time_decode(config, params, batch: int, ctx: int, args, key) -> dict:
    """ms per decode step: the compiled step in a loop, one block per round."""
    stacked = not isinstance(params["layers"], (list, tuple))
    k_cache, k_tok = jax.random.split(key)
    cache = jax.block_until_ready(kd.init_cache(config, batch, ctx, stacked=stacked, key=k_cache))
    tokens = jax.random.randint(k_tok, (batch,), 0, config.vocab, jnp.int32)
    total = args.warmup + args.rounds * args.steps
    first = max(0, ctx - total)
    positions = [jnp.int32((first + i) % ctx) for i in range(total)]  # device scalars, made ahead
    step = jax.jit(functools.partial(_greedy_step, config), donate_argnums=(1,))
    start = time.perf_counter()
    compiled = step.lower(params, cache, tokens, positions[0]).compile()
    compile_s = time.perf_counter() - start
    for i in range(args.warmup):
        tokens, cache = compiled(params, cache, tokens, positions[i])
    jax.block_until_ready((tokens, cache))
    times = []
    for r in range(args.rounds):
        base = args.warmup + r * args.steps
        start = time.perf_counter()
        for i in range(args.steps):
            tokens, cache = compiled(params, cache, tokens, positions[base + i])
        jax.block_until_ready((tokens, cache))
        times.append((time.perf_counter() - start) / args.steps)
    busy = None
    if args.busy:
        def one_round(tokens, cache):
            for i in range(args.steps):
                tokens, cache = compiled(params, cache, tokens, positions[args.warmup + i])
            return jax.block_until_ready((tokens, cache))
        busy, (tokens, cache) = gpu_busy_s(one_round, tokens, cache)
    del cache, compiled
    return {"ms": statistics.median(times) * 1e3, "compile_s": compile_s,
            "ms_rounds": [t * 1e3 for t in times],
            "busy_ms": None if busy is None else busy / args.steps * 1e3}


def gpu_busy_s(fn, *args):
    """(seconds of GPU activity while fn(*args) runs, from a profiler trace (None without GPU
    activity, e.g. on CPU), fn's result). Busy time well under the wall clock means the step
    waits on the host (dispatch, launches), not on the GPU."""
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            result = fn(*args)
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(paths[0]) if paths else None
    total_ns = 0.0
    for plane in data.planes if data else ():
        if plane.name.startswith("/device:GPU"):
            total_ns += sum(e.duration_ns for line in plane.lines if line.name.startswith("Stream")
                            for e in line.events)
    return (total_ns * 1e-9 or None), result


def time_prefill(config, params, tokens_count: int, args, key) -> dict:
    tokens = jax.random.randint(key, (1, tokens_count), 0, config.vocab, jnp.int32)
    fn = jax.jit(functools.partial(kd.prefill, config))
    start = time.perf_counter()
    compiled = fn.lower(params, tokens).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, tokens))  # warm-up
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, tokens))
        times.append(time.perf_counter() - start)
    del compiled
    return {"ms": statistics.median(times) * 1e3, "compile_s": compile_s,
            "ms_rounds": [t * 1e3 for t in times]}


# ---- running --------------------------------------------------------------------------------------

def default_backends() -> list[Backend]:
    best = select_backend()
    return [best] + ([Backend.EMULATION] if best != Backend.EMULATION else [])


def check_fits(config, batches, ctx) -> None:
    """The bf16 model and the largest cache must fit the device: a clear error otherwise."""
    stats = {}
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001  (CPU clients may not report memory)
        pass
    limit = stats.get("bytes_limit")
    if not limit:
        return
    layer = sum(n * k for n, k in config.linears(False).values()) * 2
    need = config.layers * layer + 2 * config.vocab * config.hidden * 2 + kd.kv_cache_bytes(
        config, max(batches), ctx)
    if need > 0.85 * limit:
        fit = int((0.85 * limit - 2 * config.vocab * config.hidden * 2 - kd.kv_cache_bytes(
            config, max(batches), ctx)) // layer)
        raise SystemExit(f"{config.name}: {config.layers} layers in bf16 plus the cache of batch "
                         f"{max(batches)} need {need / GiB:.0f} GiB, over 85% of this device's "
                         f"{limit / GiB:.0f} GiB: pass --layers {max(fit, 1)} (or fewer) or smaller "
                         f"--batch / --ctx")


def run(args) -> dict:
    if args.model in moe_model.MODELS:  # MoE layers, not a decoder: bench/moe_model.py
        return moe_model.run(args)
    if args.model not in kd.MODELS:
        raise SystemExit(f"unknown model {args.model!r}; known: "
                         f"{', '.join([*kd.MODELS, *moe_model.MODELS])}")
    full = kd.MODELS[args.model]
    layers = args.layers or DEFAULT_LAYERS.get(args.model)
    config = full.with_layers(min(layers, full.layers) if layers else None)
    layouts = args.layouts or ["unfused", "fused"]
    backends = args.backend or default_backends()
    device = jax.devices()[0]
    check_fits(config, args.batch, args.ctx)
    notes = []
    if config.layers != full.layers:
        notes.append(f"{config.layers} of {full.layers} layers"
                     + ("" if args.layers else f" (the default subset: all {full.layers} bf16 layers "
                        f"do not fit one GPU beside the cache; --layers N changes it)"))
    notes.append({"bf16": "embedding and lm_head: dense bf16 in every peer",
                  "mxfp8": "embedding dense bf16; lm_head MXFP8 in the MXFP8 peers",
                  "none": "embedding dense bf16; no lm_head (the step ends at the last hidden "
                          "state)"}[args.lm_head])
    print(f"model bench: {config.name} ({', '.join(notes)}) on {device.device_kind}; layouts "
          f"{layouts}; weights bf16 + {[b.value for b in backends]}; layer loop {args.layer_loop}",
          flush=True)
    copy_bandwidth(copy_mib=args.copy_mib, profile=False)  # warm-up: clocks, allocator
    rdiff_bps, busy_bps = copy_bandwidth(copy_mib=args.copy_mib, profile=True)
    # The floor is bytes over the copy's GPU busy time, as in the op benchmarks (the
    # R-difference also counts host time per call: a lower bandwidth, a floor too high).
    copy_bps = busy_bps or rdiff_bps
    print(f"copy bandwidth {copy_bps / 1e12:.3f} TB/s (x * 2 on {args.copy_mib} MiB, "
          f"{'busy time' if busy_bps else 'R-difference'}; R-difference {rdiff_bps / 1e12:.3f})",
          flush=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
            "model": config.name, "config": dataclasses.asdict(config),
            "full_layers": full.layers, "notes": notes, "lm_head": args.lm_head,
            "layer_loop": args.layer_loop, "ctx": args.ctx, "prefill": args.prefill,
            "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
            "copy_tbps": copy_bps / 1e12, "copy_tbps_rdiff": rdiff_bps / 1e12, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    key = jax.random.key(args.seed)
    k_weights, k_data = jax.random.split(key)
    rows = []
    with warnings.catch_warnings():
        # XLA:CPU cannot reuse donated buffers; on a GPU the cache is updated in place.
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        for layout in layouts:
            for weights in ["bf16", *[b.value for b in backends]]:
                rows += run_peer(config, layout, weights, args, k_weights, k_data, copy_bps)
    annotate(rows)
    return {"meta": meta, "results": rows}


def run_peer(config, layout, weights, args, k_weights, k_data, copy_bps) -> list[dict]:
    label = f"{layout} {weights}"
    start = time.perf_counter()
    params = kd.init_params(config, k_weights, weights=weights, fused=layout == "fused",
                            lm_head=args.lm_head, desc=f"{config.name} {label} weights")
    if args.layer_loop == "scan":
        params = kd.stack_layers(params)
    nbytes = kd.projection_bytes(params)
    weight_bytes = nbytes["layers"] + nbytes["lm_head"]
    print(f"[{label}] weights built in {time.perf_counter() - start:.1f} s: projections "
          f"{nbytes['layers'] / GiB:.2f} GiB, lm_head {nbytes['lm_head'] / GiB:.2f} GiB", flush=True)
    base = {"layout": layout, "weights": weights, "weight_bytes": weight_bytes,
            "projection_bytes": nbytes["layers"], "lm_head_bytes": nbytes["lm_head"]}
    rows = []
    for i, batch in enumerate(args.batch):
        t = time_decode(config, params, batch, args.ctx, args, jax.random.fold_in(k_data, i))
        kv = kd.kv_cache_bytes(config, batch, args.ctx)
        row = {**base, "phase": "decode", "batch": batch, "ctx": args.ctx, **t,
               "tokens_per_s": batch / t["ms"] * 1e3, "kv_bytes": kv,
               "floor_ms": weight_bytes / copy_bps * 1e3, "floor_kv_ms": (weight_bytes + kv) / copy_bps * 1e3}
        row["x_floor"] = row["ms"] / row["floor_ms"]
        rows.append(row)
        busy = "" if t["busy_ms"] is None else f", GPU busy {t['busy_ms']:.3f} ms"
        print(f"[{label}] decode batch {batch} ctx {args.ctx}: {row['ms']:.3f} ms/step{busy}, "
              f"{row['tokens_per_s']:.0f} tokens/s (floor {row['floor_ms']:.3f} ms, +KV "
              f"{row['floor_kv_ms']:.3f}; compile {t['compile_s']:.1f} s)", flush=True)
        gc.collect()
    if args.prefill:
        t = time_prefill(config, params, args.prefill, args, jax.random.fold_in(k_data, 1000))
        rows.append({**base, "phase": "prefill", "batch": 1, "tokens": args.prefill, **t,
                     "tokens_per_s": args.prefill / t["ms"] * 1e3})
        print(f"[{label}] prefill 1 x {args.prefill}: {t['ms']:.2f} ms, "
              f"{rows[-1]['tokens_per_s']:.0f} tokens/s (compile {t['compile_s']:.1f} s)", flush=True)
    del params
    gc.collect()
    return rows


def annotate(rows: list[dict]) -> None:
    """vs_bf16: the bf16 peer's time over this row's (same layout); vs_bf16_unfused: over the
    unfused bf16 model's (what fusing and MXFP8 give together)."""
    def key(r, layout):
        return (layout, r["phase"], r["batch"])
    bf16 = {key(r, r["layout"]): r["ms"] for r in rows if r["weights"] == "bf16"}
    for r in rows:
        if key(r, r["layout"]) in bf16:
            r["vs_bf16"] = bf16[key(r, r["layout"])] / r["ms"]
        if key(r, "unfused") in bf16:
            r["vs_bf16_unfused"] = bf16[key(r, "unfused")] / r["ms"]


# ---- reporting -----------------------------------------------------------------------------------

def _f(value, fmt):
    return "" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    meta, rows = report["meta"], report["results"]
    c = meta["config"]
    out = [f"# jax_mxfp8 model bench: {meta['model']} ({meta['date']})", "",
           f"device: {meta['device']}; jax {meta['jax']}; {c['layers']} of {meta['full_layers']} layers, "
           f"hidden {c['hidden']}, intermediate {c['intermediate']}, {c['heads']} heads ({c['kv_heads']} kv, "
           f"head_dim {c['head_dim']}), vocab {c['vocab']}; {'; '.join(meta['notes'])}; layer loop "
           f"{meta['layer_loop']}; copy bandwidth {meta['copy_tbps']:.3f} TB/s.", "",
           f"decode: wall clock per jitted step (one token per sequence; ms/step = ms per token of "
           f"each sequence), context {meta['ctx']}, {meta['steps']} steps x {meta['rounds']} rounds "
           f"(median) after {meta['warmup']}; tokens/s = batch / step time. prefill: batch 1, "
           f"median of {meta['rounds']}. floor = weight bytes read per step / copy bandwidth; "
           f"+KV adds the KV cache that attention reads. vs bf16 = bf16 time / this time, same "
           f"layout; vs bf16 unfused = against the unfused bf16 model. GPU busy = kernel time per "
           f"step from a profiler trace of one round (well under ms: the host is the limit).", "",
           "| layout | weights | phase | batch | ctx / tokens | ms | GPU busy ms | tokens/s | floor ms "
           "| floor +KV ms | x floor | vs bf16 | vs bf16 unfused | compile s |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(
            f"| {r['layout']} | {r['weights']} | {r['phase']} | {r['batch']} | "
            f"{r.get('ctx', r.get('tokens'))} | {r['ms']:.3f} | {_f(r.get('busy_ms'), '.3f')} | "
            f"{r['tokens_per_s']:.0f} | "
            f"{_f(r.get('floor_ms'), '.3f')} | {_f(r.get('floor_kv_ms'), '.3f')} | "
            f"{_f(r.get('x_floor'), '.2f')} | {_f(r.get('vs_bf16'), '.2f')} | "
            f"{_f(r.get('vs_bf16_unfused'), '.2f')} | {r['compile_s']:.1f} |")
    return "\n".join(out) + "\n"


def plot(report: dict, path: str) -> str | None:
    """Decode ms/step against batch per peer (floors dashed), and prefill times."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install 'jax_mxfp8[plot]')"
    rows, meta = report["results"], report["meta"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    peers = list(dict.fromkeys((r["layout"], r["weights"]) for r in rows))
    for layout, weights in peers:
        pts = sorted((r for r in rows if (r["layout"], r["weights"]) == (layout, weights)
                      and r["phase"] == "decode"), key=lambda r: r["batch"])
        if not pts:
            continue
        line, = ax.plot([r["batch"] for r in pts], [r["ms"] for r in pts], "o-", label=f"{layout} {weights}")
        ax.plot([r["batch"] for r in pts], [r["floor_kv_ms"] for r in pts], ":", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode batch")
    ax.set_ylabel("ms per step (dotted: floor incl. KV cache)")
    ax.set_title(f"{meta['model']} decode, ctx {meta['ctx']}, {meta['device']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    pre = [r for r in rows if r["phase"] == "prefill"]
    bx.bar([f"{r['layout']}\n{r['weights']}" for r in pre], [r["ms"] for r in pre])
    bx.set_ylabel(f"prefill ms (1 x {meta['prefill']} tokens)")
    bx.set_title("prefill")
    bx.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(report: dict, out_dir: str) -> None:
    write_report(report, out_dir, "model_bench", markdown, plot)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser().error("--steps and --rounds must be >= 1, --warmup >= 0")
    if args.prefill < 0 or args.ctx < 1:
        parser().error("--prefill must be >= 0 and --ctx >= 1")
    if args.model in moe_model.MODELS:  # its own checks, report and files
        return moe_model.main(args, parser())
    report = run(args)
    print(markdown(report))
    if args.out:
        write(report, args.out)
        print(f"wrote {os.path.join(args.out, 'model_bench.md')} (.json, .png)")
    return 0
