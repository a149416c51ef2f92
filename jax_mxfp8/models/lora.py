"""LoRA fine-tuning of a frozen MXFP8 model: a small example that trains.

A bf16 MLP "base" is quantized to MXFP8 (quantize_model), LoRA adapters go beside its MXFP8
layers (add_lora), and an optax loop trains only the adapters (nnx.LoRAParam) to fit a teacher:
the same base with a random low-rank change of its weights, i.e. a task LoRA can represent.
Gradients flow through the MXFP8 linears to x (jax_mxfp8.linear's transpose rule: dx = dy @ W,
on MARLIN by the dequantize kernel + a bf16 GEMM); the MXFP8 weights never change.

    python -m jax_mxfp8.bench.lora    # step time on this device, MXFP8 + LoRA vs bf16 + LoRA
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_mxfp8.flax.nnx import add_lora, get_value, quantize_model, set_value


class MLP(nnx.Module):
    """x -> down(silu(gate(x)) * up(x)) + x, a Llama-style block without attention."""

    def __init__(self, width: int, hidden: int, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        make = lambda a, b: nnx.Linear(a, b, use_bias=False, dtype=dtype, param_dtype=dtype,  # noqa: E731
                                       rngs=rngs)
        self.gate, self.up, self.down = make(width, hidden), make(width, hidden), make(hidden, width)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x)) + x


@dataclasses.dataclass(frozen=True)
class Task:
    width: int = 128
    hidden: int = 256
    rank: int = 8
    batch: int = 32
    seed: int = 0


def teacher_and_base(task: Task):
    """(teacher, base): bf16 MLPs; the teacher's weights are the base's plus a rank-`rank` change."""
    base = MLP(task.width, task.hidden, rngs=nnx.Rngs(task.seed))
    teacher = nnx.clone(base)
    rng = np.random.default_rng(task.seed + 1)
    for layer in (teacher.gate, teacher.up, teacher.down):
        kernel = get_value(layer.kernel)
        n_in, n_out = kernel.shape
        delta = (rng.standard_normal((n_in, task.rank)) @ rng.standard_normal((task.rank, n_out))
                 / np.sqrt(n_in * task.rank))
        set_value(layer.kernel, (kernel.astype(jnp.float32) + delta).astype(jnp.bfloat16))
    return teacher, base


def lora_student(base, task: Task, *, mxfp8: bool = True, backend=None):
    """The base (quantized to MXFP8 unless mxfp8=False) with LoRA adapters on its linears."""
    student = nnx.clone(base)
    if mxfp8:
        student = quantize_model(student, backend=backend, progress=False)
        return add_lora(student, task.rank, rngs=nnx.Rngs(task.seed + 2))
    for name in ("gate", "up", "down"):  # bf16 reference: adapters beside nnx.Linear
        layer = getattr(student, name)
        setattr(student, name, nnx.LoRA(layer.in_features, task.rank, layer.out_features,
                                        base_module=layer, rngs=nnx.Rngs(task.seed + 2)))
    return student


def make_step(student, learning_rate: float = 1e-2):
    """(optimizer, jitted step(model, optimizer, x, y) -> loss) training the LoRA params only."""
    optimizer = nnx.Optimizer(student, optax.adam(learning_rate), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((model(x).astype(jnp.float32) - y.astype(jnp.float32)) ** 2)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    return optimizer, step


def train(task: Task = Task(), steps: int = 200, *, mxfp8: bool = True, backend=None):
    """Trains the adapters; returns the losses (a fresh batch of inputs every step)."""
    teacher, base = teacher_and_base(task)
    student = lora_student(base, task, mxfp8=mxfp8, backend=backend)
    optimizer, step = make_step(student)
    key = jax.random.key(task.seed + 3)
    losses = []
    for _ in range(steps):
        key, sub = jax.random.split(key)
        x = jax.random.normal(sub, (task.batch, task.width), jnp.bfloat16)
        losses.append(float(step(student, optimizer, x, teacher(x))))
    return losses
