"""Mixture-of-experts tensors in checkpoints: per-expert names stacked into [E, ...] tensors, the
gate and up projections fused, and back (load_safetensors(experts=...) and
save_safetensors(experts=...) call these; docs/moe.md#checkpoint-layouts).

Three layouts of one MoE layer's experts (`<p>` ends in `experts`, e.g. `model.layers.0.mlp.experts`):

- Hugging Face, one tensor per expert: `<p>.{e}.gate_proj.weight` [I, H], `<p>.{e}.up_proj.weight`
  [I, H], `<p>.{e}.down_proj.weight` [H, I] (Mixtral: w1 / w3 / w2), each MXFP8 weight with its
  `weight_scale`.
- vLLM / ModelOpt fused: `<p>.w13_weight` [E, 2I, H] (gate rows first, then up) and `<p>.w2_weight`
  [E, H, I], with `_weight_scale` [E, rows, K/32] (and `w13_bias` / `w2_bias`).
- the MoE layer's (jax_mxfp8.flax.moe): `<p>.gate_up_proj.weight` [E, 2I, H] (vLLM's row order)
  and `<p>.down_proj.weight` [E, H, I].

Tensors here are numpy arrays or Mx pairs (e4m3 values, uint8 scale bytes): stacking, fusing and
splitting only move bytes, so every conversion is exact. Malformed expert sets are
CheckpointErrors naming the tensors and the fix.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import numpy as np

from jax_mxfp8._errors import CheckpointError

LOAD_LAYOUTS = (None, "stack", "fuse")
SAVE_LAYOUTS = (None, "per_expert", "vllm")
# <p>.{e}.<rest>: one expert's tensor; <p>.<rest> (rest not an index): a stacked one.
EXPERT_TENSOR = re.compile(r"(?P<prefix>(?:.*\.)?experts)\.(?P<index>[0-9]+)\.(?P<rest>.+)")
STACKED_TENSOR = re.compile(r"(?P<prefix>(?:.*\.)?experts)\.(?P<rest>(?![0-9]+(?:\.|$)).+)")
# The pieces' names: Hugging Face (Qwen / DeepSeek style) first, then Mixtral's.
GATE, UP, DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")
GATE_UP = "gate_up_proj"
VLLM_NAMES = {"w13_weight": f"{GATE_UP}.weight", "w2_weight": "down_proj.weight",
              "w13_bias": f"{GATE_UP}.bias", "w2_bias": "down_proj.bias"}
LAYER_TO_VLLM = {layer: vllm for vllm, layer in VLLM_NAMES.items()}
SUFFIXES = ("weight", "bias")


class Mx(NamedTuple):
    """An MXFP8 tensor in the checkpoint layout: e4m3 values [..., N, K], scale bytes [..., N, K/32]."""
    values: np.ndarray
    scales: np.ndarray


def _describe(value) -> str:
    if isinstance(value, Mx):
        return f"MXFP8 {list(value.values.shape)} (F8_E4M3 + scale)"
    return f"{np.dtype(value.dtype).name} {list(value.shape)}"


def _leading(value) -> int | None:
    shape = value.values.shape if isinstance(value, Mx) else np.shape(value)
    return shape[0] if len(shape) else None


def expert_of(name: str) -> tuple[str, int] | None:
    """(the experts prefix, the expert index) of a per-expert tensor name, else None."""
    m = EXPERT_TENSOR.fullmatch(name)
    return None if m is None else (m["prefix"], int(m["index"]))


def is_expert_tensor(name: str) -> bool:
    """A tensor of an experts module: per expert (`<p>.{e}.x`) or stacked (`<p>.x`)."""
    return bool(EXPERT_TENSOR.fullmatch(name) or STACKED_TENSOR.fullmatch(name))


def check_layout(layout, allowed, where: str) -> None:
    if layout not in allowed:
        raise ValueError(f"{where}: experts={layout!r}; expected one of {allowed}")


# ---- loading: per-expert tensors -> stacked, gate + up -> gate_up_proj ---------------------------

def stack_experts(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Every set `<p>.{e}.<rest>` (e = 0 .. E-1) becomes `<p>.<rest>`, stacked on a new leading
    axis; other tensors pass through. Each set must hold every expert index once, with one
    shape and dtype (an MXFP8 weight: one shape, its scales with it)."""
    sets: dict[tuple[str, str], dict[int, str]] = {}
    experts: dict[str, int] = {}
    for name in tensors:
        m = EXPERT_TENSOR.fullmatch(name)
        if m is None:
            continue
        prefix, index, rest = m["prefix"], int(m["index"]), m["rest"]
        members = sets.setdefault((prefix, rest), {})
        if index in members:
            raise CheckpointError(f"expert {index} of {prefix!r} is stored twice, as {members[index]!r} "
                                  f"and {name!r} (indices are numbers: '01' and '1' are the same "
                                  f"expert); keep one of them")
        members[index] = name
        experts[prefix] = max(experts.get(prefix, 0), index + 1)
    out = {name: value for name, value in tensors.items() if not EXPERT_TENSOR.fullmatch(name)}
    for (prefix, rest), members in sorted(sets.items()):
        count = experts[prefix]
        missing = sorted(set(range(count)) - set(members))
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            which = f"expert {shown} has" if len(missing) == 1 else f"experts {shown} have"
            raise CheckpointError(
                f"{prefix!r}: {which} no {rest!r} ({f'{prefix}.{missing[0]}.{rest}'!r} is "
                f"not in the checkpoint) while expert {count - 1} has one: the expert set is "
                f"incomplete (a shard missing from the directory?); complete it, or load with "
                f"experts=None to read the experts one by one")
        stacked = f"{prefix}.{rest}"
        if stacked in out:
            raise CheckpointError(f"{prefix!r} stores {rest!r} twice: stacked as {stacked!r} and per "
                                  f"expert as {members[0]!r} ...; keep one of the two layouts")
        values = [tensors[members[e]] for e in range(count)]
        first = _describe(values[0])
        for e, value in enumerate(values):
            if _describe(value) != first:
                raise CheckpointError(
                    f"{prefix!r}: expert {e}'s {rest!r} is {_describe(value)} but expert 0's is "
                    f"{first}: the experts of one projection need one shape and dtype (a "
                    f"checkpoint mixing quantized and float experts, or experts of different "
                    f"sizes, cannot be stacked); fix the checkpoint, or load with experts=None")
        if isinstance(values[0], Mx):
            out[stacked] = Mx(np.stack([v.values for v in values]), np.stack([v.scales for v in values]))
        else:
            out[stacked] = np.stack([np.asarray(v) for v in values])
    return out


def _pick(tensors, prefix: str, pieces: tuple[str, ...], suffix: str) -> str | None:
    """The one name under which the piece (any of its aliases) is stored, or None."""
    found = [f"{prefix}.{p}.{suffix}" for p in pieces if f"{prefix}.{p}.{suffix}" in tensors]
    if len(found) > 1:
        raise CheckpointError(f"{prefix!r} stores one projection under two names, {found}; keep one")
    return found[0] if found else None


def _put(out: dict, name: str, value, source: str) -> None:
    if name in out:
        raise CheckpointError(f"{source!r} would become {name!r}, which the checkpoint already "
                              f"holds: the experts are stored in two layouts; keep one")
    out[name] = value


def _concat_rows(a, b):
    if isinstance(a, Mx):
        return Mx(np.concatenate([a.values, b.values], axis=1), np.concatenate([a.scales, b.scales], axis=1))
    return np.concatenate([np.asarray(a), np.asarray(b)], axis=1)


def fuse_experts(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Stacked experts under the MoE layer's names: vLLM's w13 / w2 renamed, gate_proj (w1) and
    up_proj (w3) concatenated along the rows into gate_up_proj (gate first, vLLM's order),
    down_proj (w2) kept. Every tensor must be stacked already (stack_experts)."""
    out: dict[str, Any] = {}
    for name, value in tensors.items():
        m = STACKED_TENSOR.fullmatch(name)
        rest = None if m is None else VLLM_NAMES.get(m["rest"])
        if rest is None:
            out[name] = value
        else:
            _put(out, f"{m['prefix']}.{rest}", value, name)
    prefixes = sorted({m["prefix"] for m in map(STACKED_TENSOR.fullmatch, out) if m})
    for prefix in prefixes:
        for suffix in SUFFIXES:
            gate, up = _pick(out, prefix, GATE, suffix), _pick(out, prefix, UP, suffix)
            down = _pick(out, prefix, DOWN, suffix)
            if gate is not None or up is not None:
                if gate is None or up is None:
                    have, lack = (gate, "up_proj (w3)") if up is None else (up, "gate_proj (w1)")
                    raise CheckpointError(f"{have!r} has no {lack} partner in {prefix!r}: "
                                          f"experts='fuse' concatenates gate and up; load with "
                                          f"experts='stack' to keep the projections apart")
                g, u = out.pop(gate), out.pop(up)
                if _describe(g) != _describe(u):
                    raise CheckpointError(f"{gate!r} is {_describe(g)} but {up!r} is {_describe(u)}: "
                                          f"a fused gate/up needs both the same; load with "
                                          f"experts='stack' to keep them apart")
                _put(out, f"{prefix}.{GATE_UP}.{suffix}", _concat_rows(g, u), gate)
            if down is not None and down != f"{prefix}.down_proj.{suffix}":
                _put(out, f"{prefix}.down_proj.{suffix}", out.pop(down), down)
    return out


def load_layout(tensors: Mapping[str, Any], layout) -> dict[str, Any]:
    """load_safetensors' experts= option: None as stored, "stack", or "fuse" (stack, then fuse)."""
    check_layout(layout, LOAD_LAYOUTS, "load_safetensors")
    if layout is None:
        return dict(tensors)
    stacked = stack_experts(tensors)
    return fuse_experts(stacked) if layout == "fuse" else stacked


def by_experts_module(tensors: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The tensors of each experts module (one dict per prefix), then all the others: a
    module's stacked names stay under its prefix, so modules convert one at a time (the host
    holds one layer's stacked copies, not the model's)."""
    groups: dict[str | None, dict[str, Any]] = {}
    for name, value in tensors.items():
        m = EXPERT_TENSOR.fullmatch(name) or STACKED_TENSOR.fullmatch(name)
        groups.setdefault(None if m is None else m["prefix"], {})[name] = value
    return [groups[key] for key in sorted(groups, key=lambda k: (k is None, k or ""))]


# ---- saving: stacked tensors -> per expert, or the vLLM names ------------------------------------

def _stacked_entries(tensors: Mapping[str, Any]) -> dict[str, str]:
    """name -> experts prefix of every stacked experts tensor, each checked to be stacked, with
    one expert count per prefix."""
    found, counts = {}, {}
    for name, value in tensors.items():
        m = STACKED_TENSOR.fullmatch(name)
        if m is None:
            continue
        count = _leading(value)
        if isinstance(value, Mx) and value.values.ndim != 3:
            raise CheckpointError(f"{name!r} is one MXFP8 weight {list(value.values.shape)} under an "
                                  f"experts module; stacked experts are [E, N, K] (quantize_weight / "
                                  f"prepare_weight of [E, N, K]), or save with experts=None")
        if count is None:
            raise CheckpointError(f"{name!r} is a scalar under an experts module; a stacked experts "
                                  f"tensor has a leading expert axis (rename it, or save with "
                                  f"experts=None)")
        counts.setdefault(m["prefix"], (count, name))
        if counts[m["prefix"]][0] != count:
            other, other_name = counts[m["prefix"]]
            raise CheckpointError(f"{name!r} stacks {count} experts but {other_name!r} {other}: the "
                                  f"tensors of one experts module need one expert count")
        found[name] = m["prefix"]
    return found


def per_expert(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Stacked `<p>.<rest>` [E, ...] -> `<p>.{e}.<rest>` per expert (Hugging Face names): the
    fused gate_up_proj (or vLLM's w13) split in half into gate_proj and up_proj, w2 named
    down_proj."""
    stacked = _stacked_entries(tensors)
    out = {name: value for name, value in tensors.items() if name not in stacked}
    for name, prefix in stacked.items():
        value, rest = tensors[name], name[len(prefix) + 1:]
        rest = VLLM_NAMES.get(rest, rest)
        pieces = {rest: value}
        piece, _, suffix = rest.partition(".")
        if piece == GATE_UP:
            rows = _leading_rows(value)
            if rows % 2:
                raise CheckpointError(f"{name!r} has {rows} rows; a fused gate/up has 2I (gate "
                                      f"rows, then up rows) to split in half")
            half = rows // 2
            pieces = {f"{GATE[0]}.{suffix}": _rows(value, 0, half),
                      f"{UP[0]}.{suffix}": _rows(value, half, rows)}
        for piece_name, piece_value in pieces.items():
            for e in range(_leading(piece_value)):
                _put(out, f"{prefix}.{e}.{piece_name}", _expert(piece_value, e), name)
    return out


def _leading_rows(value) -> int:
    shape = value.values.shape if isinstance(value, Mx) else np.shape(value)
    if len(shape) < 2:
        raise CheckpointError(f"a fused gate/up tensor of shape {list(shape)} has no row axis to "
                              f"split (expected [E, 2I, ...])")
    return shape[1]


def _rows(value, start: int, stop: int):
    if isinstance(value, Mx):
        return Mx(value.values[:, start:stop], value.scales[:, start:stop])
    return np.asarray(value)[:, start:stop]


def _expert(value, e: int):
    return Mx(value.values[e], value.scales[e]) if isinstance(value, Mx) else np.asarray(value)[e]


def vllm_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Stacked experts under vLLM's fused names: gate_up_proj (or gate_proj + up_proj, w1 + w3,
    concatenated) -> w13_weight, down_proj (w2) -> w2_weight, biases -> w13_bias / w2_bias."""
    _stacked_entries(tensors)
    fused = fuse_experts(tensors)
    out: dict[str, Any] = {}
    for name, value in fused.items():
        m = STACKED_TENSOR.fullmatch(name)
        target = None if m is None else LAYER_TO_VLLM.get(m["rest"])
        _put(out, name if target is None else f"{m['prefix']}.{target}", value, name)
    return out


def save_layout(tensors: Mapping[str, Any], layout) -> dict[str, Any]:
    """save_safetensors' experts= option: None as given, "per_expert" or "vllm"."""
    check_layout(layout, SAVE_LAYOUTS, "save_safetensors")
    if layout is None:
        return dict(tensors)
    return per_expert(tensors) if layout == "per_expert" else vllm_names(tensors)
