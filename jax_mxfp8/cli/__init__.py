"""Command line: python -m jax_mxfp8 {info,demo,bench}."""
from __future__ import annotations

import argparse
import sys

import jax
import jaxlib

import jax_mxfp8
from jax_mxfp8 import _ffi, bench
from jax_mxfp8._devices import compute_capability
from jax_mxfp8.backends import registered_backends, why_unavailable
from jax_mxfp8.cli import demo


def info(args) -> int:
    """Devices, compute capability, built kernels and the selected backend."""
    print(f"jax_mxfp8 {jax_mxfp8.__version__}  jax {jax.__version__}  jaxlib "
          f"{jaxlib.__version__}")
    built = _ffi.build_info()
    print(f"compiled modules: cpu={built['cpu_module']} cuda={built['cuda_module']}")
    if not built["cuda_module"]:
        print(f"  no CUDA kernels: {built.get('cuda_problem')}")
    else:
        print(f"  CUDA architectures: {built.get('cuda_architectures')}  runtime "
              f"{built.get('cuda_runtime_version')}  CUTLASS SM100: {built.get('cutlass_sm100')}")
        print(f"  CUDA kernels: {', '.join(built.get('cuda_targets', [])) or '(none)'}")
    for device in jax.devices():
        cc = compute_capability(device)
        cc_text = f" compute capability {cc[0]}.{cc[1]}" if cc else ""
        print(f"device {device.id}: {device.platform} {device.device_kind}{cc_text}")
    device = jax.devices()[0]
    for backend in registered_backends():
        reason = why_unavailable(backend, device)
        print(f"  backend {backend.value:9s}: {'available' if reason is None else 'unavailable: ' + reason}")
    try:
        print(f"select_backend() -> {jax_mxfp8.select_backend().value}")
    except ValueError as err:
        print(f"select_backend() -> error: {err}")
        return 1
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the harness parses its own options
        return bench.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m jax_mxfp8")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="devices, compute capability, built kernels, selected backend")
    demo.add_arguments(sub.add_parser("demo", help="quantize a small model and run jitted inference"))
    sub.add_parser("bench", help="benchmarks (python -m jax_mxfp8 bench --help)")
    args = parser.parse_args(argv)
    return {"info": info, "demo": demo.main}[args.command](args)
