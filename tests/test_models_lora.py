"""The LoRA example: adapters beside frozen MXFP8 linears train on CPU, the MXFP8 weights stay
bit for bit the same, and add_lora's errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("optax")

from jax_mxfp8 import MxWeight  # noqa: E402
from jax_mxfp8.flax import Mxfp8Linear, add_lora, quantize_model  # noqa: E402
from jax_mxfp8.models import lora  # noqa: E402


def weights_of(model):
    return {path: leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
        nnx.state(model, nnx.Param)) if leaf.dtype in (jnp.uint8, jnp.float8_e4m3fn)}


@pytest.mark.slow
def test_lora_on_a_frozen_mxfp8_base_trains():
    task = lora.Task()
    teacher, base = lora.teacher_and_base(task)
    student = lora.lora_student(base, task)
    frozen = {k: np.asarray(v) for k, v in weights_of(student).items()}
    assert frozen, "the student should hold MXFP8 weights"
    optimizer, step = lora.make_step(student)
    key, losses = jax.random.key(7), []
    for _ in range(200):
        key, sub = jax.random.split(key)
        x = jax.random.normal(sub, (task.batch, task.width), jnp.bfloat16)
        losses.append(float(step(student, optimizer, x, teacher(x))))
    first, last = np.mean(losses[:10]), np.mean(losses[-20:])
    assert last < 0.3 * first, (first, last)
    for k, v in weights_of(student).items():
        np.testing.assert_array_equal(np.asarray(v), frozen[k], err_msg=str(k))


def test_add_lora_starts_as_the_base_and_names_its_errors():
    task = lora.Task(width=64, hidden=128, rank=4)
    _, base = lora.teacher_and_base(task)
    quantized = quantize_model(nnx.clone(base), backend="emulation", progress=False)
    x = jax.random.normal(jax.random.key(0), (3, 64), jnp.bfloat16)
    want = np.asarray(quantized(x))
    adapted = add_lora(quantized, 4, rngs=nnx.Rngs(0))
    assert isinstance(adapted.up, nnx.LoRA) and isinstance(adapted.up.base_module, Mxfp8Linear)
    assert isinstance(adapted.up.base_module.weight.get_value(), MxWeight)
    np.testing.assert_array_equal(np.asarray(adapted(x)), want)  # B starts at zero
    with pytest.raises(ValueError, match="no Mxfp8Linear"):
        add_lora(nnx.clone(base), 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(quantized, 0, rngs=nnx.Rngs(0))
