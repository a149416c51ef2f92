"""Compares marlin._wgmma_plan with the fastest wgmma configuration of a sweep90 JSON:
python tools/check_wgmma_rule.py results/.../wgmma_sweep.json"""
import json
import sys

sys.path.insert(0, ".")
from jax_mxfp8.backends import marlin  # noqa: E402

worst = 1.0
for r in json.load(open(sys.argv[1]))["rows"]:
    ours = {k: v for k, v in r.items() if k.startswith("w") and v == v}
    if not ours or r["m"] <= marlin.WGMMA_MIN_M:
        continue
    plan = marlin._wgmma_plan(r["m"], r["n"], 132)
    name = f"w{plan.block_m}x{plan.consumers}"
    best = min(ours, key=ours.get)
    worst = max(worst, ours[name] / ours[best])
    print(f"{r['n']}x{r['k']} M={r['m']:5d} rule {name} {ours[name]:8.1f} best {best} {ours[best]:8.1f} "
          f"({ours[name] / ours[best]:.3f}x)")
print(f"worst rule / best: {worst:.3f}x")
