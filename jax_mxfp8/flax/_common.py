"""Shared by the NNX and Linen wrappers: kernel conversion, output dtype, a progress bar."""
from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp

from jax_mxfp8.backends import Backend, select_backend
from jax_mxfp8.weight import prepare_weight
from jax_mxfp8.ops.quantize import check_rounding, quantize


def resolve_backend(backend) -> Backend:
    """None: the fastest backend of the default device; explicit: that backend's layout, made
    on any host like prepare_weight (where it runs, linear checks the device)."""
    return select_backend() if backend is None else Backend.parse(backend)


@functools.partial(jax.jit, static_argnames="rounding")
def _quantize_transposed(kernel, rounding):
    return quantize(kernel.T, rounding=rounding)  # one compiled program per kernel shape


def kernel_to_weight(kernel, *, rounding: str, backend: Backend, where: str):
    """A Flax kernel (in_features, out_features) -> MxWeight [N, K] = [out, in]."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"{where}: kernel has shape {kernel.shape}; only 2-D (in, out) kernels "
                         f"can be quantized")
    if kernel.shape[0] % 32:
        raise ValueError(f"{where}: in_features={kernel.shape[0]} is not a multiple of 32, the "
                         f"MXFP8 block size; leave this layer out with `predicate`")
    values, scales = _quantize_transposed(kernel, check_rounding(rounding))
    return prepare_weight(values, scales, backend=backend)


def output_dtype(inputs_dtype, dtype, param_dtype, preferred_element_type=None):
    """What nnx.Linear / nn.Dense would return: `preferred_element_type`, else `dtype`, else
    the promotion of the inputs with the original parameter dtype."""
    if preferred_element_type is not None:
        return jnp.dtype(preferred_element_type)
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.result_type(inputs_dtype, param_dtype)


def default_predicate(path: str, in_features: int) -> bool:
    return in_features % 32 == 0


class Progress:
    """A progress bar on stderr: tqdm when installed, else one self-redrawing line."""

    def __init__(self, total: int, description: str, enabled: bool):
        self.total, self.done, self.description = total, 0, description
        self.enabled = enabled and total > 0
        self.start = self.last_draw = time.perf_counter()
        self.tqdm = None
        if self.enabled:
            try:
                from tqdm.auto import tqdm
                self.tqdm = tqdm(total=total, desc=description, unit="layer", file=sys.stderr)
            except ImportError:
                pass

    def update(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.tqdm is not None:
            self.tqdm.update(1)
            return
        now = time.perf_counter()
        if now - self.last_draw > 0.1 or self.done == self.total:
            self.last_draw = now
            filled = 30 * self.done // self.total
            sys.stderr.write(f"\r{self.description} [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{self.done}/{self.total} layers {now - self.start:.1f}s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def show_progress(progress, count: int) -> bool:
    """progress=None: show for large models (>= 16 layers) on an interactive terminal."""
    if progress is None:
        return count >= 16 and sys.stderr.isatty()
    return bool(progress)
