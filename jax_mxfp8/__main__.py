"""Command line: python -m jax_mxfp8 {info,demo,bench}."""
from __future__ import annotations

import argparse
import sys


def cmd_info(args) -> int:
    import jax
    import jax_mxfp8
    from jax_mxfp8 import _ffi
    from jax_mxfp8.backends import compute_capability, registered_backends, why_unavailable

    print(f"jax_mxfp8 {jax_mxfp8.__version__}  jax {jax.__version__}  jaxlib "
          f"{getattr(__import__('jaxlib'), '__version__', '?')}")
    info = _ffi.build_info()
    print(f"compiled modules: cpu={info['cpu_module']} cuda={info['cuda_module']}")
    if info["cuda_module"]:
        print(f"  CUDA architectures: {info.get('cuda_architectures')}  runtime "
              f"{info.get('cuda_runtime_version')}  CUTLASS SM100: {info.get('cutlass_sm100')}")
        print(f"  CUDA kernels: {', '.join(info.get('cuda_targets', [])) or '(none)'}")
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


def cmd_demo(args) -> int:
    from jax_mxfp8 import demo
    return demo.main(args)


def cmd_bench(argv) -> int:
    from jax_mxfp8 import bench
    return bench.main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the harness parses its own options
        return cmd_bench(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m jax_mxfp8")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="devices, compute capability, built kernels, selected backend")
    demo = sub.add_parser("demo", help="quantize a small model and run jitted inference")
    from jax_mxfp8 import demo as demo_module
    demo_module.add_arguments(demo)
    sub.add_parser("bench", help="benchmarks (python -m jax_mxfp8 bench --help)")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
