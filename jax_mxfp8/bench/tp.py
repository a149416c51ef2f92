#!/usr/bin/env python3
"""Tensor-parallel MXFP8 inference on N devices vs one device vs bf16 sharded the same way.

For every tp in --tp, three cases on a (1, tp) mesh with axes ("data", "model"):
  mlp  up [I, H] column-parallel, gelu, down [H, I] row-parallel (jax_mxfp8.models.tp_mlp.mlp)
  col  one linear x [M, H] @ up^T, weight split along N (no communication)
  row  one linear x [M, I] @ down^T, weight and x split along K (one all-reduce)
each run three ways: MXFP8 weights (--backend; MARLIN by default on NVIDIA GPUs) prepared per
shard and sharded over tp devices, the same MXFP8 weights on one device, and the bf16 weights
sharded the same way (plus bf16 on one device). Checks: sharded == one device within --tol
(relative error of the bf16 outputs), no all-gather and the expected all-reduce count in the
compiled HLO. Time: device time per step (jax_mxfp8.timing): R distinct argument sets (weights
and inputs) unrolled in one jit, minus the jit of one set, divided by R-1. Every row goes to
--out (JSON) and a table to stdout; exit status 1 if any check fails.

NVLink multicast stays off: NCCL_NVLS_ENABLE=0 (and the PyTorch/NVSHMEM switches) are forced
below, before JAX starts its backends (JAX reads them when it first initialises NCCL).

  one GPU (a mesh of one):  python -m jax_mxfp8.bench.tp --tp 1 --out $OUT/tp_gpu.json
  2 or 4 GPUs:              python -m jax_mxfp8.bench.tp --tp 1 2 4 --out $OUT/tp_gpu.json
  CPU, fake devices:        python -m jax_mxfp8.bench.tp --cpu-devices 8 --tp 1 2 8 --quick
"""
from __future__ import annotations

import os

for _var, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_var] = _value
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_mxfp8 as mx  # noqa: E402
from jax_mxfp8.models import tp_mlp as tp  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, nargs="+", default=None,
                   help="tensor-parallel sizes (default: 1 and every power of two up to the device count)")
    p.add_argument("--backend", default=None, help="MXFP8 backend (default: marlin on GPUs, else auto)")
    p.add_argument("--hidden", type=int, default=8192, help="H (default: a Llama-3-70B MLP)")
    p.add_argument("--intermediate", type=int, default=28672, help="I")
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 128], help="M values (rows of x)")
    p.add_argument("--repeats", type=int, default=8, help="R distinct weight+input sets per timing")
    p.add_argument("--cases", nargs="+", default=["mlp", "col", "row"], choices=["mlp", "col", "row"])
    p.add_argument("--tol", type=float, default=1e-2, help="max relative error sharded vs one device")
    p.add_argument("--cpu-devices", type=int, default=0, help="ask for this many fake CPU devices")
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    p.add_argument("--out", default=None, help="JSON results file (default: $OUT/tp_gpu.json or ./tp_gpu.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.tokens, args.repeats = 256, 1024, [8], 3
    args.out = args.out or os.path.join(os.environ.get("OUT", "."), "tp_gpu.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    devices = jax.devices()
    first = devices[0]
    backend = mx.Backend.parse(args.backend) if args.backend else (
        mx.Backend.MARLIN if first.platform == "gpu" else mx.select_backend())
    sizes = args.tp or [n for n in (1, 2, 4, 8, 16) if n <= len(devices)]
    if max(sizes) > len(devices):
        print(f"--tp {max(sizes)} needs {max(sizes)} devices; {len(devices)} visible "
              f"({first.platform}); use --cpu-devices on CPU", file=sys.stderr)
        return 2
    hidden = tp.tp_width(args.hidden, max(sizes), backend)
    inter = tp.tp_width(args.intermediate, max(sizes), backend)
    env = {"jax": jax.__version__, "platform": first.platform, "device_kind": first.device_kind,
           "devices": len(devices), "backend": backend.value, "hidden": hidden, "intermediate": inter,
           "repeats": args.repeats, "nccl_nvls_enable": os.environ["NCCL_NVLS_ENABLE"]}
    print(json.dumps(env))

    def weight_sets(r):
        """bf16 params of R independent MLPs, generated on device 0."""
        return [tp.init_params(jax.random.key(1000 + i), hidden, inter) for i in range(r)]

    def single_mx(params):
        return jax.device_put(tp.quantize_params(params, backend), first)

    cases = {
        # name: (fn mxfp8, fn bf16, x width, x spec, all-reduces when tp > 1)
        "mlp": (tp.mlp, tp.mlp_bf16, hidden, P(), 1),
        "col": (lambda p, x: mx.linear(x, p["up"]),
                lambda p, x: jnp.dot(x, p["up"].T, preferred_element_type=jnp.float32).astype(x.dtype),
                hidden, P(), 0),
        "row": (lambda p, x: mx.linear(x, p["down"]),
                lambda p, x: jnp.dot(x, p["down"].T, preferred_element_type=jnp.float32).astype(x.dtype),
                inter, P(None, tp.MODEL), 1),
    }
    rows, failures = [], []
    start = time.perf_counter()
    bf16_sets = weight_sets(args.repeats)
    single_sets = [single_mx(p) for p in bf16_sets]
    baseline = {}  # (case, M) -> (y, ms mxfp8 one device, ms bf16 one device)
    for n in sizes:
        mesh = tp.make_mesh(n, 1, devices)
        mx_sets = [tp.quantize_params(p, backend, mesh) for p in bf16_sets]
        bf16_sharded = [tp.shard_bf16(p, mesh) for p in bf16_sets]
        for name in args.cases:
            fn_mx, fn_bf16, width, x_spec, reduces = cases[name]
            for m in args.tokens:
                xs = [jax.random.normal(jax.random.key(7 + i), (m, width), jnp.bfloat16)
                      for i in range(args.repeats)]
                xs_sharded = [jax.device_put(x, NamedSharding(mesh, x_spec)) for x in xs]
                if (name, m) not in baseline:
                    x_one = [jax.device_put(x, first) for x in xs]
                    y1 = np.asarray(jax.jit(fn_mx)(single_sets[0], x_one[0]), np.float32)
                    baseline[name, m] = (
                        y1, tp.device_time_ms(fn_mx, list(zip(single_sets, x_one))),
                        tp.device_time_ms(fn_bf16, [(jax.device_put(p, first), x)
                                                    for p, x in zip(bf16_sets, x_one)]))
                y1, ms_one, ms_bf16_one = baseline[name, m]
                run = jax.jit(fn_mx)
                y = np.asarray(run(mx_sets[0], xs_sharded[0]), np.float32)
                y_bf16 = np.asarray(jax.jit(fn_bf16)(bf16_sharded[0], xs_sharded[0]), np.float32)
                coll = tp.collectives(run.lower(mx_sets[0], xs_sharded[0]).compile().as_text())
                coll_bf16 = tp.collectives(jax.jit(fn_bf16).lower(bf16_sharded[0], xs_sharded[0])
                                           .compile().as_text())
                ms = tp.device_time_ms(fn_mx, list(zip(mx_sets, xs_sharded)))
                ms_bf16 = tp.device_time_ms(fn_bf16, list(zip(bf16_sharded, xs_sharded)))
                err = tp.rel_error(y, y1)
                want_reduce = reduces if n > 1 else 0
                ok = err <= args.tol and coll["all-gather"] == 0 and coll["all-reduce"] == want_reduce
                row = {"case": name, "tp": n, "tokens": m, "ms_mxfp8_tp": ms, "ms_bf16_tp": ms_bf16,
                       "ms_mxfp8_1": ms_one, "ms_bf16_1": ms_bf16_one,
                       "speedup_vs_mxfp8_1": ms_one / ms if ms else None,
                       "speedup_vs_bf16_tp": ms_bf16 / ms if ms else None,
                       "rel_err_vs_one_device": err, "rel_err_vs_bf16_tp": tp.rel_error(y, y_bf16),
                       "collectives_mxfp8": coll, "collectives_bf16": coll_bf16,
                       "expected_all_reduce": want_reduce, "ok": ok}
                rows.append(row)
                print(f"{name:3s} tp={n} M={m:4d}: MXFP8 {ms:8.4f} ms | bf16 tp {ms_bf16:8.4f} ms | "
                      f"MXFP8 1 dev {ms_one:8.4f} ms | bf16 1 dev {ms_bf16_one:8.4f} ms | err vs 1 dev "
                      f"{err:.2e} | vs bf16 {row['rel_err_vs_bf16_tp']:.3f} | all-reduce "
                      f"{coll['all-reduce']} all-gather {coll['all-gather']} | {'ok' if ok else 'FAIL'}",
                      flush=True)
                if not ok:
                    failures.append(row)
        del mx_sets, bf16_sharded
    result = {"env": env, "rows": rows, "seconds": time.perf_counter() - start,
              "failures": len(failures)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}: {len(rows)} rows, {len(failures)} failed checks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
