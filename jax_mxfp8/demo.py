"""The main job: quantize a small model's weights to MXFP8 and run jitted inference.

This is the interim demo of the core issue (a two-layer MLP); the Flax decoder demo
replaces it when the Flax wrappers land.
"""
from __future__ import annotations

import time


def add_arguments(parser) -> None:
    parser.add_argument("--hidden", type=int, default=1024, help="model width (multiple of 32)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per step (M)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--backend", default=None, help="emulation|marlin|cutlass (default: auto)")


def main(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_mxfp8 as mx
    from jax_mxfp8.__main__ import cmd_info

    cmd_info(args)
    d, f = args.hidden, 4 * args.hidden
    keys = jax.random.split(jax.random.key(0), 4)
    w_up = (jax.random.normal(keys[0], (f, d), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
    w_down = (jax.random.normal(keys[1], (d, f), jnp.float32) / np.sqrt(f)).astype(jnp.bfloat16)
    x = jax.random.normal(keys[2], (args.tokens, d), jnp.bfloat16)

    backend = mx.Backend.parse(args.backend) if args.backend else mx.select_backend()
    up, down = (mx.quantize_weight(w, backend=backend) for w in (w_up, w_down))

    @jax.jit
    def mlp_bf16(x):
        return jax.nn.gelu(x @ w_up.T) @ w_down.T

    @jax.jit
    def mlp_mx(x, up, down):
        return mx.linear(jax.nn.gelu(mx.linear(x, up)), down)

    ref = mlp_bf16(x).astype(jnp.float32)
    out = mlp_mx(x, up, down).astype(jnp.float32)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    cos = float(jnp.vdot(out.ravel(), ref.ravel()) / (jnp.linalg.norm(out) * jnp.linalg.norm(ref)))
    out.block_until_ready()
    start = time.perf_counter()
    for _ in range(args.steps):
        y = mlp_mx(x, up, down)
    y.block_until_ready()
    step_ms = (time.perf_counter() - start) / args.steps * 1e3
    bf16_bytes = (w_up.size + w_down.size) * 2
    print(f"\nMLP {d}->{f}->{d}, {args.tokens} tokens, backend {backend.value}")
    print(f"output vs bf16 model: relative error {rel:.4f}, cosine similarity {cos:.6f}")
    print(f"weight memory: bf16 {bf16_bytes / 2**20:.2f} MiB, MXFP8 {(up.nbytes + down.nbytes) / 2**20:.2f} MiB")
    print(f"time per step (wall clock, includes dispatch): {step_ms:.3f} ms")
    return 0 if rel < 0.05 and cos > 0.999 else 1
