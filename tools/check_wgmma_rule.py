"""Compares the planner's wgmma rule (planner._wgmma_plan) with the fastest wgmma configuration
of `python -m jax_mxfp8.bench.marlin sweep90` results, its JSONs or its logs:
python -P tools/check_wgmma_rule.py OUT/wgmma_sweep.json [sweep90_*.log ...]"""
import json
import re
import sys

from jax_mxfp8.backends import marlin
from jax_mxfp8.backends.marlin import planner
from jax_mxfp8.bench.marlin import wgmma_name


def rows(path):
    """The sweep's rows: {n, k, m, name: us, ...}, from a JSON or a log's "NxK M= ..." lines."""
    if path.endswith(".json"):
        return json.load(open(path))["rows"]
    out = []
    for line in open(path):
        head = re.match(r"(\d+)x(\d+) M=\s*(\d+) ", line)
        if head:
            n, k, m = map(int, head.groups())
            times = {key: float(v) for key, v in re.findall(r" ([\w:]+)=([\d.]+)", line)}
            out.append({"n": n, "k": k, "m": m, **times})
    return out


worst = 1.0
for path in sys.argv[1:]:
    for r in rows(path):
        ours = {k: v for k, v in r.items() if k.startswith("w") and v == v}
        if not ours or r["m"] <= marlin.WGMMA_MIN_M:
            continue
        plan = planner._wgmma_plan(r["m"], r["n"], r["k"], 132)
        name = wgmma_name(marlin.wgmma_config(plan.block_m, plan.consumers, plan.blocks_per_sm),
                          plan.splits, plan.cluster)
        best = min(ours, key=ours.get)
        if name not in ours:
            print(f"{r['n']}x{r['k']} M={r['m']:5d} rule {name} not swept; best {best} {ours[best]:8.1f}")
            continue
        worst = max(worst, ours[name] / ours[best])
        print(f"{r['n']}x{r['k']} M={r['m']:5d} rule {name} {ours[name]:8.1f} best {best} "
              f"{ours[best]:8.1f} ({ours[name] / ours[best]:.3f}x)")
print(f"worst rule / best: {worst:.3f}x")
