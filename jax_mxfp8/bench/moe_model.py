"""The MoE layer benchmark: mixture-of-experts layers of a real model's shapes, bf16 against MXFP8.

    python -m jax_mxfp8 bench --model mixtral-8x7b|qwen3-30b-a3b|tiny-moe [--layers N]
        [--batch 1,16,64] [--prefill 2048] [--backend marlin,emulation] [--out DIR]

What is timed: N (--layers, default 1) MoE layers of jax_mxfp8.flax.moe in sequence in one
jitted step, each x + MoE(x) (the decoder's residual stream, which keeps every layer's input a
hidden state of the same scale): router, top-k, the sort of the (token, choice) rows by expert,
the fused gate/up grouped GEMM, SwiGLU, the down grouped GEMM, the unsort and the weighted
combine. No attention, norms, embedding or head. Random weights of the model's real shapes
(MoE.create: Mixtral-8x7B 8 experts top-2, hidden 4096, expert MLP 14336; Qwen3-30B-A3B 128
experts top-8, hidden 2048, expert MLP 768; tiny-moe for CPU smoke tests), the same key for
every peer: the bf16 layer (bf16 experts, jax.lax.ragged_dot: what a bf16 user runs), then
each MXFP8 backend (quantize_moe: experts through jax_mxfp8.ragged_linear; the router stays
bf16). Default backends: the device's default with a grouped GEMM (CUTLASS has none: the next
one that runs here) and EMULATION. Peers are built, timed and freed one after another.

T tokens per call: each --batch value (a decode step of that batch, one token per sequence)
and --prefill (0 skips it). Timing is model.py's decode method, wall clock: `--warmup` calls,
then `--rounds` rounds of `--steps` calls (one call per round for the prefill) that block once
at the round's end, median; every call gets other tokens (a pool of random inputs made ahead),
so the routing changes from step to step as in decode. Compilation is reported apart. GPU busy
(unless --no-busy): kernel time per call from a profiler trace (jax_mxfp8.timing.profiled_us).
The floor: the weight bytes a call can touch, N x (router + min(E, T * top_k) experts), with an
expert's bytes as stored (bf16: 2 bytes a parameter; MXFP8: e4m3 values + e8m0 scales, in the
backend's layout), over the copy bandwidth measured in the same run. It is a bound: random
routing touches fewer distinct experts than min(E, T * top_k). vs bf16 = bf16 time / this time.
Each MXFP8 peer also reports its first layer's relative error against the bf16 layer on the
exactly dequantized weights (the grouped GEMM's own error; EMULATION on CPU: 0); over
MAX_KERNEL_ERROR the command exits 1, after writing its report.

Options of the dense decoders (--ctx, --fused / --unfused, --lm-head, --layer-loop) mean nothing
here: given with a value other than their default they are an error (main), not ignored.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jax_mxfp8.backends import (PREFERENCE, Backend, ensure_available, get_backend_impl,
                                select_backend, why_unavailable)
from jax_mxfp8.bench.report import write_report
from jax_mxfp8.flax import moe
from jax_mxfp8.timing import copy_bandwidth, profiled_us

MiB, GiB = 1 << 20, 1 << 30
MAX_KERNEL_ERROR = 1e-2  # grouped GEMM vs dequantized weights, as demo --moe checks (docs/moe.md)
INPUT_POOL = 32  # distinct inputs the decode loop cycles through (a new routing per step)


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    name: str
    experts: int
    top_k: int
    hidden: int
    intermediate: int  # of one expert

    def expert_params(self) -> int:
        """Parameters of one expert: gate/up [2I, H] and down [H, I]."""
        return 3 * self.intermediate * self.hidden


# Real dimensions from the models' Hugging Face config.json files (num_local_experts /
# num_experts, num_experts_per_tok, hidden_size, intermediate_size / moe_intermediate_size).
MODELS = {
    "mixtral-8x7b": MoeConfig("mixtral-8x7b", 8, 2, 4096, 14336),
    "qwen3-30b-a3b": MoeConfig("qwen3-30b-a3b", 128, 8, 2048, 768),
    # A smoke-test configuration (CPU tests): every code path, tiny sizes.
    "tiny-moe": MoeConfig("tiny-moe", 4, 2, 128, 64),
}

# The dense decoders' options (model.py's parser dest -> flag): no meaning for an MoE layer.
DENSE_ONLY = {"ctx": "--ctx", "layouts": "--fused / --unfused", "lm_head": "--lm-head",
              "layer_loop": "--layer-loop"}


# ---- the backends ---------------------------------------------------------------------------------

def _has_grouped_gemm(backend: Backend) -> bool:
    return get_backend_impl(backend).ragged_linear is not None


def default_backends() -> list[Backend]:
    """The device's default backend, or where it has no grouped GEMM (CUTLASS) the first of
    the preference order that has one and runs here; then EMULATION, the reference peer."""
    device = jax.devices()[0]
    best = select_backend(device)
    if not _has_grouped_gemm(best):
        best = next(b for b in PREFERENCE if _has_grouped_gemm(b) and why_unavailable(b, device) is None)
    return [best] + ([Backend.EMULATION] if best != Backend.EMULATION else [])


def check_backends(backends: list[Backend]) -> None:
    """Each asked-for backend must run here and have a grouped GEMM: a clear error otherwise."""
    for backend in backends:
        try:
            ensure_available(backend)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        if not _has_grouped_gemm(backend):
            raise SystemExit(f"error: backend {backend.value} has no grouped GEMM (ragged_linear), "
                             f"which the MoE layer needs; use --backend marlin or emulation")


# ---- building the layers --------------------------------------------------------------------------

def build_layers(config: MoeConfig, layers: int, weights, key) -> list[moe.MoE]:
    """`layers` random MoE layers, layer i from fold_in(key, i), so every peer holds the same
    weights: bf16 ("bf16"), or quantized in place for a backend (only one layer's bf16 experts
    exist at a time, so the MXFP8 peer never needs the whole bf16 model)."""
    out = []
    label = weights if weights == "bf16" else weights.value
    # delay: the bar shows only where building takes a while (real shapes on a GPU)
    for i in tqdm(range(layers), desc=f"{config.name} {label} weights", unit="layer",
                  leave=False, delay=1.0):
        layer = moe.MoE.create(config.hidden, config.intermediate, config.experts, config.top_k,
                               rngs=nnx.Rngs(params=jax.random.fold_in(key, i)))
        if weights != "bf16":
            moe.quantize_moe(layer, backend=weights)
        jax.block_until_ready(nnx.state(layer))  # frees this layer's bf16 temporaries now
        out.append(layer)
    return out


def layer_bytes(layer: moe.MoE) -> dict[str, int]:
    """Bytes as stored: the router [E, H], and one expert's gate/up + down."""
    experts = sum(proj.weight.get_value().nbytes
                  for proj in (layer.experts.gate_up_proj, layer.experts.down_proj))
    return {"router": layer.gate.weight.get_value().nbytes, "expert": experts // layer.num_experts}


def check_fits(config: MoeConfig, layers: int) -> None:
    """The bf16 peer (the largest) plus one layer's float32 build temporaries must fit the
    device: a clear error otherwise (CPU clients report no limit: no check)."""
    try:
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001  (CPU clients may not report memory)
        limit = None
    layer = config.experts * config.expert_params() * 2
    need = (layers + 2) * layer
    if limit and need > 0.85 * limit:
        raise SystemExit(f"{config.name}: {layers} bf16 MoE layers need {need / GiB:.0f} GiB, over "
                         f"85% of this device's {limit / GiB:.0f} GiB: pass --layers "
                         f"{max(int(0.85 * limit // layer) - 2, 1)} or fewer")


# ---- timing -----------------------------------------------------------------------------------------

def _forward(graphdef, states, x):
    """x through the layers in sequence, each x + MoE(x)."""
    for state in states:
        x = x + nnx.merge(graphdef, state)(x)
    return x


def _inputs(config: MoeConfig, tokens: int, count: int, key) -> list[jax.Array]:
    """`count` random hidden states [tokens, H] in bf16, made ahead of the timed loop."""
    return [jax.random.normal(jax.random.fold_in(key, i), (tokens, config.hidden), jnp.bfloat16)
            for i in range(count)]


def loop_ms(compiled, states, inputs, warmup: int, steps: int, rounds: int) -> list[float]:
    """ms per call of each round: `warmup` calls, then `rounds` x `steps` calls (inputs in
    turn), blocking once per round, as model.py times its decode step."""
    out, calls = None, 0

    def call():
        nonlocal calls
        calls += 1
        return compiled(states, inputs[(calls - 1) % len(inputs)])

    for _ in range(warmup):
        out = call()
    jax.block_until_ready(out)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return times


def time_tokens(graphdef, states, inputs, args, *, decode: bool) -> dict:
    """The compiled step on [T, H] inputs: decode (model.py's loop) or prefill (one warm-up
    call, then one blocked call per round); GPU busy time per call from a trace (--no-busy
    skips it; None on CPU)."""
    forward = functools.partial(_forward, graphdef)
    start = time.perf_counter()
    compiled = jax.jit(forward).lower(states, inputs[0]).compile()
    compile_s = time.perf_counter() - start
    warmup, steps = (args.warmup, args.steps) if decode else (1, 1)
    times = loop_ms(compiled, states, inputs, warmup, steps, args.rounds)
    busy_us = profiled_us(forward, [(states, inputs[0])], runs=args.rounds) if args.busy else None
    return {"ms": statistics.median(times), "ms_rounds": times, "compile_s": compile_s,
            "busy_ms": None if busy_us is None else busy_us * 1e-3}


# ---- the check --------------------------------------------------------------------------------------

def relative_error(got, want) -> float:
    got, want = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (got, want))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def kernel_error(layer: moe.MoE, x) -> float:
    """An MXFP8 layer's output against the bf16 layer on its exactly dequantized weights: the
    same routing (the router is the same bf16 weight), so what differs is the grouped GEMM."""
    return relative_error(layer(x), moe.dequantized(layer)(x))


# ---- running ----------------------------------------------------------------------------------------

def run(args) -> dict:
    """The report {"meta", "results"} of args.model (a name of MODELS), from model.py's options:
    --layers, --batch, --prefill, --backend, --steps, --rounds, --warmup, --no-busy, --copy-mib,
    --seed (the others are not read)."""
    config = MODELS[args.model]
    layers = 1 if args.layers is None else args.layers
    if layers < 1:
        raise SystemExit(f"error: --layers {layers}: an MoE benchmark runs at least one layer")
    backends = args.backend or default_backends()
    check_backends(backends)
    check_fits(config, layers)
    device = jax.devices()[0]
    notes = [f"{layers} MoE layer{'s' * (layers > 1)} (x + MoE(x) each; no attention)",
             "router bf16 in every peer"]
    print(f"MoE bench: {config.name} ({config.experts} experts, top-{config.top_k}, hidden "
          f"{config.hidden}, expert MLP {config.intermediate}; {', '.join(notes)}) on "
          f"{device.device_kind}; weights bf16 + {[b.value for b in backends]}", flush=True)
    copy_bps, rdiff_bps = measure_copy_bandwidth(args.copy_mib)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
            "model": config.name, "config": dataclasses.asdict(config), "layers": layers,
            "notes": notes, "batch": list(args.batch), "prefill": args.prefill,
            "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
            "copy_tbps": copy_bps / 1e12, "copy_tbps_rdiff": rdiff_bps / 1e12,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    k_weights, k_data, k_check = jax.random.split(jax.random.key(args.seed), 3)
    rows = []
    for weights in ["bf16", *backends]:
        rows += run_peer(config, layers, weights, args, (k_weights, k_data, k_check), copy_bps)
    annotate(rows)
    return {"meta": meta, "results": rows}


def measure_copy_bandwidth(copy_mib: int) -> tuple[float, float]:
    """(bytes/s of the floor, by the R-difference): the copy's GPU busy time where there is a
    profiler trace (the R-difference also counts host time per call: a floor too high)."""
    copy_bandwidth(copy_mib=copy_mib, profile=False)  # warm-up: clocks, allocator
    rdiff_bps, busy_bps = copy_bandwidth(copy_mib=copy_mib, profile=True)
    copy_bps = busy_bps or rdiff_bps
    print(f"copy bandwidth {copy_bps / 1e12:.3f} TB/s (x * 2 on {copy_mib} MiB, "
          f"{'busy time' if busy_bps else 'R-difference'}; R-difference {rdiff_bps / 1e12:.3f})",
          flush=True)
    return copy_bps, rdiff_bps


def _cells(args) -> list[tuple[str, int]]:
    return [("decode", b) for b in args.batch] + ([("prefill", args.prefill)] if args.prefill else [])


def run_peer(config: MoeConfig, layers: int, weights, args, keys, copy_bps) -> list[dict]:
    k_weights, k_data, k_check = keys
    label = weights if weights == "bf16" else weights.value
    start = time.perf_counter()
    model = build_layers(config, layers, weights, k_weights)
    nbytes = layer_bytes(model[0])
    print(f"[{label}] {layers} layer{'s' * (layers > 1)} built in {time.perf_counter() - start:.1f} s:"
          f" {layers * config.experts * nbytes['expert'] / MiB:.1f} MiB of experts", flush=True)
    base = {"weights": label, "weight_bytes": layers * (nbytes["router"] + config.experts * nbytes["expert"])}
    if weights != "bf16":
        x = _inputs(config, max(args.batch), 1, k_check)[0]
        base["check_rel_err"] = kernel_error(model[0], x)
        base["check_ok"] = base["check_rel_err"] <= MAX_KERNEL_ERROR  # NaN fails too
        print(f"[{label}] layer 0 vs the bf16 layer on its dequantized weights ({max(args.batch)} "
              f"tokens): relative error {base['check_rel_err']:.2e}", flush=True)
    graphdef = nnx.graphdef(model[0])
    states = [nnx.state(layer) for layer in model]
    del model
    rows = []
    for i, (phase, tokens) in enumerate(_cells(args)):
        count = min(INPUT_POOL, args.warmup + args.rounds * args.steps) if phase == "decode" else 1
        inputs = _inputs(config, tokens, count, jax.random.fold_in(k_data, i))
        rows.append(cell_row(config, layers, nbytes, base, phase, tokens,
                             time_tokens(graphdef, states, inputs, args, decode=phase == "decode"),
                             copy_bps))
        del inputs
        gc.collect()
    del states
    gc.collect()
    return rows


def cell_row(config: MoeConfig, layers, nbytes, base, phase, tokens, t, copy_bps) -> dict:
    touched = min(config.experts, tokens * config.top_k)
    floor_bytes = layers * (nbytes["router"] + touched * nbytes["expert"])
    row = {**base, "phase": phase, "tokens": tokens, "batch": tokens if phase == "decode" else 1,
           **t, "tokens_per_s": tokens / t["ms"] * 1e3, "experts_touched": touched,
           "floor_bytes": floor_bytes, "floor_ms": floor_bytes / copy_bps * 1e3}
    row["x_floor"] = row["ms"] / row["floor_ms"]
    busy = "" if t["busy_ms"] is None else f", GPU busy {t['busy_ms']:.3f} ms"
    print(f"[{row['weights']}] {phase} {tokens} tokens: {row['ms']:.3f} ms{busy}, "
          f"{row['tokens_per_s']:.0f} tokens/s (floor {row['floor_ms']:.3f} ms, {touched} of "
          f"{config.experts} experts; compile {t['compile_s']:.1f} s)", flush=True)
    return row


def annotate(rows: list[dict]) -> None:
    """vs_bf16: the bf16 peer's time over this row's, same phase and tokens."""
    bf16 = {(r["phase"], r["tokens"]): r["ms"] for r in rows if r["weights"] == "bf16"}
    for r in rows:
        if (r["phase"], r["tokens"]) in bf16:
            r["vs_bf16"] = bf16[r["phase"], r["tokens"]] / r["ms"]


# ---- reporting ---------------------------------------------------------------------------------------

def _f(value, fmt):
    return "" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    meta, rows = report["meta"], report["results"]
    c = meta["config"]
    out = [f"# jax_mxfp8 MoE layer bench: {meta['model']} ({meta['date']})", "",
           f"device: {meta['device']}; jax {meta['jax']}; {c['experts']} experts, top-{c['top_k']}, "
           f"hidden {c['hidden']}, expert MLP {c['intermediate']}; {'; '.join(meta['notes'])}; copy "
           f"bandwidth {meta['copy_tbps']:.3f} TB/s.", "",
           f"ms: wall clock per jitted call on T tokens (decode: a step of batch T, {meta['steps']} "
           f"steps x {meta['rounds']} rounds (median) after {meta['warmup']}; prefill: median of "
           f"{meta['rounds']} calls). floor = bytes of the router and of min(E, T * top_k) experts, "
           f"as stored, per layer / copy bandwidth. vs bf16 = bf16 time / this time. GPU busy = "
           f"kernel time per call from a profiler trace. check = relative error of layer 0 against "
           f"the bf16 layer on its dequantized weights.", "",
           "| weights | phase | tokens | ms | GPU busy ms | tokens/s | experts touched | floor ms "
           "| x floor | vs bf16 | check | compile s |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['weights']} | {r['phase']} | {r['tokens']} | {r['ms']:.3f} | "
                   f"{_f(r['busy_ms'], '.3f')} | {r['tokens_per_s']:.0f} | {r['experts_touched']} | "
                   f"{r['floor_ms']:.3f} | {r['x_floor']:.2f} | {_f(r.get('vs_bf16'), '.2f')} | "
                   f"{_f(r.get('check_rel_err'), '.1e')} | {r['compile_s']:.1f} |")
    return "\n".join(out) + "\n"


def plot(report: dict, path: str) -> str | None:
    """ms per call against tokens per peer (decode and prefill on one axis), floors dotted."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install 'jax_mxfp8[plot]')"
    rows, meta = report["results"], report["meta"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for weights in dict.fromkeys(r["weights"] for r in rows):
        pts = sorted((r for r in rows if r["weights"] == weights), key=lambda r: r["tokens"])
        line, = ax.plot([r["tokens"] for r in pts], [r["ms"] for r in pts], "o-", label=weights)
        ax.plot([r["tokens"] for r in pts], [r["floor_ms"] for r in pts], ":", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per call (decode batch; the largest: prefill)")
    ax.set_ylabel("ms per call (dotted: weight-read floor)")
    ax.set_title(f"{meta['model']} x {meta['layers']} MoE layer(s), {meta['device']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(report: dict, out_dir: str) -> None:
    write_report(report, out_dir, "moe_model_bench", markdown, plot)


def check_options(args, parser) -> None:
    """The dense decoders' options given with a value other than their default: a usage error
    naming them (silently ignoring them would report something other than what was asked)."""
    given = [flag for dest, flag in DENSE_ONLY.items() if getattr(args, dest) != parser.get_default(dest)]
    if given:
        parser.error(f"{', '.join(given)}: options of the dense decoders; {args.model} times MoE "
                     f"layers without attention or head ({', '.join(MODELS)} take --layers, --batch, "
                     f"--prefill, --backend, --steps, --rounds, --warmup, --no-busy, --copy-mib, "
                     f"--seed, --out)")


def main(args, parser) -> int:
    """`bench --model` for an MoE name: args parsed (and --steps / --rounds / --warmup /
    --prefill checked) by model.py's parser. Exit 1 where an MXFP8 peer's check is over
    MAX_KERNEL_ERROR (the report is written first)."""
    check_options(args, parser)
    report = run(args)
    print(markdown(report))
    if args.out:
        write(report, args.out)
        print(f"wrote {os.path.join(args.out, 'moe_model_bench.md')} (.json, .png)")
    wrong = sorted({r["weights"] for r in report["results"] if r.get("check_ok") is False})
    if wrong:  # a fast wrong kernel is no result: exit 1 (after the report is written)
        print(f"FAIL: {', '.join(wrong)}: layer 0 differs from the bf16 layer on its dequantized "
              f"weights by more than {MAX_KERNEL_ERROR}")
    return 1 if wrong else 0
