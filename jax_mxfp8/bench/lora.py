"""LoRA training step time on a frozen MXFP8 base vs the same adapters on the bf16 base.

    python -m jax_mxfp8.bench.lora [--width 4096] [--hidden 14336] [--rank 16] [--batch 16]

Wall clock per jitted step (forward, backward through the frozen linears to x, adam on the
adapters), median of the timed steps after warm-up, on one repeated batch; the loss of both
runs is printed so a broken run shows (at these widths the example's learning rate of 1e-2
oscillates for bf16 and MXFP8 alike, so the benchmark uses 1e-3).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jax_mxfp8.models import lora


def time_steps(task: lora.Task, mxfp8: bool, steps: int) -> tuple[float, float]:
    teacher, base = lora.teacher_and_base(task)
    student = lora.lora_student(base, task, mxfp8=mxfp8)
    optimizer, step = lora.make_step(student, learning_rate=1e-3)
    x = jax.random.normal(jax.random.key(0), (task.batch, task.width), jnp.bfloat16)
    y = teacher(x)
    loss = step(student, optimizer, x, y)  # compile
    jax.block_until_ready(loss)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step(student, optimizer, x, y)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return statistics.median(times), float(loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_mxfp8.bench.lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=14336)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    task = lora.Task(width=args.width, hidden=args.hidden, rank=args.rank, batch=args.batch)
    device = jax.devices()[0]
    print(f"device {device.device_kind}; MLP {args.width} -> {args.hidden} -> {args.width}, "
          f"rank {args.rank}, {args.batch} tokens per step")
    results = {name: time_steps(task, mxfp8, args.steps) for name, mxfp8 in (("bf16", False), ("mxfp8", True))}
    for name, (seconds, loss) in results.items():
        print(f"{name:6s} base + LoRA: {seconds * 1e3:8.3f} ms/step (loss {loss:.4f})")
    print(f"MXFP8 / bf16 step time: {results['mxfp8'][0] / results['bf16'][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
