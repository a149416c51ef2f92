"""The op pattern: everything about one op in one class.

An `Op` subclass gives the op's abstract evaluation (validation lives there, so errors appear at
trace time with the fix in the message), its jnp reference (the lowering on every platform), its
CUDA kernel (an FFI target with attributes and an optional hidden workspace), its batching rule
and, optionally, its sharding rule and partition callback. `register` turns the class into
primitives: `inner`, the per-device primitive, and, for ops with a sharding rule, `outer`, which
partitions under jit (custom_partitioning + Shardy, partitioning.py) and binds `inner` per shard.

Ops whose jnp reference may also run on CUDA (the elementwise ones) set `selectable_kernel`:
they carry a static `kernel` parameter, chosen when binding by `_ffi.kernels_enabled()`, so a
lowering never decides on its own to skip the kernel.
"""
from __future__ import annotations

from typing import Callable, ClassVar

from jax_mxfp8 import _ffi, partitioning
from jax_mxfp8._compat import Primitive, ad, batching, is_symbolic_zero, mlir, primitive_impl


class Op:
    name: ClassVar[str]
    multiple_results: ClassVar[bool] = False
    cuda_target: ClassVar[str | None] = None  # None: the jnp reference on every platform
    selectable_kernel: ClassVar[bool] = False
    inner: ClassVar[Primitive]
    outer: ClassVar[Primitive | None] = None

    @staticmethod
    def abstract(*avals, **params):
        raise NotImplementedError

    @staticmethod
    def reference(*args, **params):
        """The op in jnp (the contract of docs/numerics.md, or what the kernel computes)."""
        raise NotImplementedError

    @staticmethod
    def cuda_attrs(**params) -> dict:
        return {}

    cuda_workspace: ClassVar[Callable[..., int] | None] = None  # (avals_in, avals_out, **params)
    cuda_operands: ClassVar[Callable[..., tuple[int, ...]] | None] = None  # (**params)

    @classmethod
    def batch(cls, args, dims, **params):
        """Default vmap rule: every operand batched along its leading axis, one bind."""
        size = next(a.shape[d] for a, d in zip(args, dims) if partitioning.mapped(d))
        moved = [partitioning.move_to_front(a, d, size) for a, d in zip(args, dims)]
        out = cls.inner.bind(*moved, **params)
        return out, ((0,) * len(out) if cls.multiple_results else 0)

    # A gradient through the op raises this (None: the op defines no derivative at all).
    not_differentiable: ClassVar[str | None] = None

    # Optional: an op that defines these is partitioned under jit (partitioning.define_partitioned).
    sharding_rule: ClassVar[Callable | None] = None  # (static) -> SdyShardingRule
    partition: ClassVar[Callable | None] = None  # (static, mesh, arg_shapes, result_shape, body)

    @classmethod
    def bind(cls, *args, **params):
        """What the public function calls: the partitioned primitive where there is one."""
        if cls.selectable_kernel:
            params["kernel"] = _ffi.kernels_enabled()
        out = (cls.outer or cls.inner).bind(*args, **params)
        return tuple(out) if cls.multiple_results else out


def _without_kernel(fn, selectable: bool):
    if not selectable:
        return fn
    return lambda *args, kernel=None, **params: fn(*args, **params)


def register(op: type[Op]) -> type[Op]:
    """Class decorator: defines and registers the op's primitives."""
    selectable = op.selectable_kernel
    abstract = _without_kernel(op.abstract, selectable)
    reference = _without_kernel(op.reference, selectable)
    prim = Primitive(op.name)
    prim.multiple_results = op.multiple_results
    prim.def_impl(primitive_impl(prim))
    prim.def_abstract_eval(abstract)
    jnp_rule = mlir.lower_fun(reference, multiple_results=op.multiple_results)
    mlir.register_lowering(prim, jnp_rule)
    if op.cuda_target is not None:
        kernel_rule = _ffi.kernel_lowering(op.cuda_target, attrs=op.cuda_attrs,
                                           workspace=op.cuda_workspace, operands=op.cuda_operands)
        if selectable:
            def cuda_rule(ctx, *args, kernel, **params):
                return (kernel_rule if kernel else jnp_rule)(ctx, *args, **params)
        else:
            cuda_rule = kernel_rule
        mlir.register_lowering(prim, cuda_rule, platform="cuda")
    batching.primitive_batchers[prim] = op.batch
    op.inner = prim
    if op.sharding_rule is not None:
        op.outer = partitioning.define_partitioned(
            prim, abstract_eval=abstract, rule=op.sharding_rule, partition=op.partition)
    if op.not_differentiable:
        for p in filter(None, (op.inner, op.outer)):
            ad.primitive_jvps[p] = _refuse_tangents(op.not_differentiable)
    return op


def _refuse_tangents(message: str):
    def jvp(primals, tangents, **params):
        if any(not is_symbolic_zero(t) for t in tangents):
            raise TypeError(message)
        raise AssertionError("JAX differentiates an op only when an input has a tangent")
    return jvp
