"""The MoE GEMM benchmark: one expert projection of a mixture-of-experts layer, MXFP8 against bf16.

    python -m jax_mxfp8.bench.moe [--shapes ExNxK ...] [--tokens 1,8,64,512,4096] [--topk 2]
        [--routing even,skewed] [--out DIR]

Per (experts x N x K, tokens T, routing): T tokens routed to top-k of E experts (even: the
T*k rows spread round-robin; skewed: half the rows to one expert, the rest even), rows sorted by
expert. Peers, timed from one profiler trace per cell (GPU busy time, jax_mxfp8.timing):
- `ragged_linear`: jax_mxfp8.ragged_linear on the MXFP8 weight, default backend (MARLIN's
  grouped kernel on a GPU), and on the EMULATION backend;
- bf16 `ragged_dot`: jax.lax.ragged_dot on the bf16 weights, same grouping;
- bf16 einsum: every expert's rows padded to the largest group ([E, C, K] x [E, N, K]), the
  dense batched form a capacity-based MoE layer runs.
Floor: the fp8 values + scales of the experts that got rows, plus x and y, over the copy
bandwidth of the run (busy time).
"""
from __future__ import annotations

import argparse
import gc
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import jax_mxfp8 as mx
from jax_mxfp8 import timing
from jax_mxfp8.backends import Backend

# Mixtral-8x7B gate/up and down, Qwen3-30B-A3B gate/up and down (top-8), DeepSeek-V2-Lite-like.
SHAPES = ["8x28672x4096", "8x4096x14336", "128x1536x2048", "128x2048x768", "64x2816x2048"]
TOPK = {8: 2, 128: 8, 64: 6}


def group_sizes_for(rows: int, experts: int, routing: str) -> np.ndarray:
    """Rows per expert: even (round-robin) or skewed (half to expert 0, the rest even)."""
    sizes = np.zeros(experts, np.int64)
    if routing == "skewed":
        sizes[0] = rows // 2
        rows -= rows // 2
    np.add.at(sizes, np.arange(rows) % experts, 1)
    return sizes.astype(np.int32)


def cell(e, n, k, t, routing, weight_sets, copy_bps, topk) -> dict:
    """weight_sets: distinct (bf16 [E, N, K], bf16 [E, K, N], MXFP8, EMULATION) per argument
    set, so no call finds another's experts in L2."""
    rows = t * topk
    gs = group_sizes_for(rows, e, routing)
    key = jax.random.key(t)
    cap = max(int(gs.max()), 1)
    starts = np.cumsum(gs) - gs
    # each expert's rows in a [E, C, K] block (the capacity layout of a dense MoE), built ahead
    idx = jnp.asarray(np.clip(starts[:, None] + np.arange(cap)[None, :], 0, max(rows - 1, 0)))
    sets = []
    for i, ws in enumerate(weight_sets):
        x = jax.random.normal(jax.random.fold_in(key, i), (rows, k), jnp.bfloat16)
        sets.append((x, jnp.asarray(gs), x[idx], *ws))
    cases = {
        "mxfp8": (lambda x, g, xe, w, wt, wm, we: mx.ragged_linear(x, wm, g), sets),
        "emulation": (lambda x, g, xe, w, wt, wm, we: mx.ragged_linear(x, we, g), sets),
        "bf16_ragged_dot": (lambda x, g, xe, w, wt, wm, we: jax.lax.ragged_dot(
            x, wt, g, preferred_element_type=jnp.bfloat16), sets),
        "bf16_einsum": (lambda x, g, xe, w, wt, wm, we: jnp.einsum(
            "eck,enk->ecn", xe, w, preferred_element_type=jnp.bfloat16), sets),
    }
    times = timing.profiled_many(cases)
    active = int((gs > 0).sum())
    floor = (active * n * k * (1 + 1 / 32) + rows * k * 2 + rows * n * 2) / copy_bps * 1e6
    bf16_best = min((v for key_, v in times.items() if key_.startswith("bf16") and v), default=None)
    row = {"experts": e, "n": n, "k": k, "tokens": t, "topk": topk, "rows": rows,
           "routing": routing, "active_experts": active, "floor_us": floor, "times_us": times,
           "vs_best_bf16": bf16_best / times["mxfp8"] if times["mxfp8"] and bf16_best else None,
           "vs_floor": times["mxfp8"] / floor if times["mxfp8"] else None}
    print(f"{e}x{n}x{k} T={t:5d} (top-{topk}, {routing:6s}, {active:3d} experts with rows) "
          f"floor {floor:7.1f} " + " ".join(f"{name} {v or float('nan'):8.1f}" for name, v in times.items())
          + f"  vs best bf16 {row['vs_best_bf16'] or float('nan'):.2f}x, "
            f"{row['vs_floor'] or float('nan'):.2f}x floor", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jax_mxfp8.bench.moe")
    ap.add_argument("--shapes", nargs="*", default=SHAPES, help="ExNxK expert weights")
    ap.add_argument("--tokens", default="1,8,64,512,4096")
    ap.add_argument("--topk", type=int, default=None, help="default: 2 for 8 experts, 8 for 128, 6 for 64")
    ap.add_argument("--routing", default="even,skewed")
    ap.add_argument("--backend", default=None, help="the MXFP8 backend (default: the fastest here)")
    ap.add_argument("--copy-mib", type=int, default=512, help="size of the copy-bandwidth probe")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    backend = Backend.parse(args.backend) if args.backend else mx.select_backend()
    copy = timing.copy_bandwidth(copy_mib=args.copy_mib, profile=True)
    copy_bps = copy[1] or copy[0]
    print(f"MoE bench on {jax.devices()[0].device_kind}: MXFP8 backend {backend.value}; copy "
          f"bandwidth {copy_bps / 1e12:.3f} TB/s", flush=True)
    rows = []
    for shape in args.shapes:
        e, n, k = map(int, shape.split("x"))
        topk = args.topk or TOPK.get(e, 2)
        weight_sets = []
        for i in range(3):
            w = jax.random.normal(jax.random.key(i), (e, n, k), jnp.bfloat16) * (k ** -0.5)
            weight_sets.append((w, jnp.swapaxes(w, 1, 2), mx.quantize_weight(w, backend=backend),
                                mx.quantize_weight(w, backend=Backend.EMULATION)))
        for t in map(int, args.tokens.split(",")):
            for routing in args.routing.split(","):
                rows.append(cell(e, n, k, t, routing, weight_sets, copy_bps, topk))
        del weight_sets
        gc.collect()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "moe.json"), "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "backend": backend.value,
                       "copy_bps": copy_bps, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
