"""The opt-in autotune cache of the Marlin planner (JAX_MXFP8_AUTOTUNE=1).

The first trace of a shape class (GPU, x dtype, N x K, M rounded up to a power of two) times
the planner's candidate plans on random data of that shape, GPU busy time from one profiler
trace, and keeps the fastest in a JSON file (JAX_MXFP8_AUTOTUNE_CACHE, default
$XDG_CACHE_HOME/jax_mxfp8/marlin_autotune.json); later traces, in this process or another,
read it. Every candidate is one of the exact kernels, so a tuned plan changes results only by
the order fp32 partial sums are added (docs/numerics.md). Off by default: measuring takes
seconds per shape class, at trace time.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import threading
from typing import Callable

from jax_mxfp8 import timing

_LOCK = threading.Lock()
_MEMORY: dict[str, dict] = {}


def enabled() -> bool:
    value = os.environ.get("JAX_MXFP8_AUTOTUNE", "").strip().lower()
    if value not in ("", "0", "false", "off", "1", "true", "on"):
        raise ValueError(f"JAX_MXFP8_AUTOTUNE={value!r}: use 1 (measure and cache plans) or 0")
    return value in ("1", "true", "on")


def cache_path() -> pathlib.Path:
    explicit = os.environ.get("JAX_MXFP8_AUTOTUNE_CACHE")
    if explicit:
        return pathlib.Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jax_mxfp8" / "marlin_autotune.json"


def m_bucket(m: int) -> int:
    """The shape class of M: the next power of two."""
    return 1 << max(0, (int(m) - 1).bit_length())


def _read(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ValueError(f"autotune cache {path} is unreadable ({err}); delete it or point "
                         f"JAX_MXFP8_AUTOTUNE_CACHE elsewhere") from None
    if data.get("format") != 1:
        raise ValueError(f"autotune cache {path} has format {data.get('format')!r}, not 1; delete it")
    return data.get("plans", {})


def lookup(key: str) -> dict | None:
    with _LOCK:
        if key not in _MEMORY:
            _MEMORY.update(_read(cache_path()))
        return _MEMORY.get(key)


def store(key: str, entry: dict) -> None:
    """Adds one winner to the cache file (read, merge, write to a temporary, rename)."""
    path = cache_path()
    with _LOCK:
        _MEMORY[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        plans = {**_read(path), key: entry}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": 1, "plans": plans}, indent=1, sort_keys=True))
        os.replace(tmp, path)


def fastest(key: str, cases: dict[str, tuple[Callable, list[tuple]]]) -> str:
    """The name of the case with the least GPU busy time (one profiler trace for all)."""
    print(f"jax_mxfp8 autotune: {key}: timing {len(cases)} plans", file=sys.stderr, flush=True)
    times = {name: t for name, t in timing.profiled_many(cases).items() if t}
    if not times:
        raise RuntimeError(f"autotune {key}: no candidate ran on the GPU (no profiler activity); "
                           f"unset JAX_MXFP8_AUTOTUNE")
    return min(times, key=times.get)
