"""MXFP8 safetensors checkpoints: a validating, memory-mapped reader and a writer.

Layout (what NVIDIA ModelOpt "MXFP8" and compressed-tensors "mxfp8-quantized" ship):
`<name>` F8_E4M3 [out, in] + `<name>_scale` U8 (or F8_E8M0) [out, in/32] biased e8m0
exponents. Every other tensor is an ordinary array.

safetensors' own numpy/flax loaders cannot read F8 tensors, so the header is parsed here and
tensors are numpy views of a read-only memory map (no torch).
File format (huggingface/safetensors): 8-byte little-endian header length N, N bytes of UTF-8
JSON starting with '{' (may be padded with spaces), then the data buffer, which the tensors'
`data_offsets` must cover exactly (no holes, no overlaps, nothing after the last tensor).
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_mxfp8.weight import MxWeight, prepare_weight

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale"
DEFAULT_METADATA = {"format": "pt"}  # what HF loaders check; the [out, in] layout is torch's

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
SCALE_DTYPE_NAMES = ("U8", "F8_E8M0")


class CheckpointError(ValueError):
    """A safetensors file or directory that cannot be read as asked (the message says why)."""


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise CheckpointError("safetensors data is little-endian; this reader needs a little-endian host")


# ---- reading -------------------------------------------------------------------------------------

def _no_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"duplicate key {key!r} in the header")
        out[key] = value
    return out


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_header(raw: bytes, where: str) -> tuple[dict[str, dict], dict[str, str]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{where}: header is not valid UTF-8 ({err})") from None
    if not text.startswith("{"):
        raise CheckpointError(f"{where}: header does not start with '{{' (not a safetensors file?)")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None
    except ValueError as err:
        raise CheckpointError(f"{where}: header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    for name, info in header.items():
        what = f"{where}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{what}: entry needs 'dtype', 'shape' and 'data_offsets'")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{what}: unknown or unsupported dtype {dtype!r} (supported: "
                                  f"{', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise CheckpointError(f"{what}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_uint, offsets))
                or offsets[0] > offsets[1]):
            raise CheckpointError(f"{what}: data_offsets {offsets!r} must be [begin, end] with "
                                  f"0 <= begin <= end")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{what}: shape {shape} of {dtype} needs {nbytes} bytes but "
                                  f"data_offsets {offsets} span {offsets[1] - offsets[0]}")
    return header, metadata


def _check_layout(header: Mapping[str, dict], data_bytes: int, where: str) -> None:
    """Offsets must tile the data buffer exactly, as the safetensors format requires."""
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if end > data_bytes:
            raise CheckpointError(
                f"{where}: tensor {name!r} data_offsets [{begin}, {end}] are out of range: the data "
                f"buffer has {data_bytes} bytes (file truncated, or corrupt offsets)")
    position, previous = 0, None
    for name, info in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = info["data_offsets"]
        if begin < position:
            raise CheckpointError(f"{where}: tensors {previous!r} and {name!r} overlap (bytes "
                                  f"{begin}..{position} are claimed twice)")
        if begin > position:
            raise CheckpointError(f"{where}: bytes {position}..{begin} of the data buffer belong to "
                                  f"no tensor (a hole before {name!r}); the file is corrupt")
        position, previous = end, name
    if position != data_bytes:
        raise CheckpointError(f"{where}: {data_bytes - position} bytes follow the last tensor; the "
                              f"header does not describe the whole file")


def _read_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    where = str(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{where}: {size} bytes is too short for a safetensors file "
                                  f"(needs an 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{where}: header length {header_len} exceeds the "
                                  f"{MAX_HEADER_BYTES}-byte limit (corrupt or not a safetensors file)")
        if header_len > size - 8:
            raise CheckpointError(f"{where}: header length {header_len} runs past the end of the "
                                  f"{size}-byte file (truncated)")
        header, metadata = _parse_header(f.read(header_len), where)
    data_start = 8 + header_len
    _check_layout(header, size - data_start, where)
    tensors = {}
    if size > data_start:
        buffer = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)
    for name, info in header.items():
        dtype, (begin, end) = DTYPES[info["dtype"]], info["data_offsets"]
        flat = buffer[begin:end] if end > begin else np.zeros(0, np.uint8)
        tensors[name] = flat.view(dtype).reshape(info["shape"])
    return tensors, metadata


def _files_of(path: Path) -> list[tuple[Path, set[str] | None]]:
    """The shard files to read and, from an index, the names each must hold."""
    if path.is_file():
        return [(path, None)]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object): "
                                  f"{err}") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
        files: dict[str, set[str]] = {}
        for name, file_name in weight_map.items():
            if Path(file_name).name != file_name:
                raise CheckpointError(f"{index}: shard {file_name!r} is not a plain file name")
            files.setdefault(file_name, set()).add(name)
        return [(path / f, names) for f, names in sorted(files.items())]
    if (path / SINGLE_NAME).is_file():
        return [(path / SINGLE_NAME, None)]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return [(path / found[0], None)]
    raise CheckpointError(f"{path}: expected {SINGLE_NAME} or {INDEX_NAME}; found "
                          f"{found or 'no .safetensors files'}")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, or of a directory (with model.safetensors.index.json,
    or a single model.safetensors), as read-only numpy views of a memory map. F8 tensors come
    as ml_dtypes arrays. Raises CheckpointError for anything malformed."""
    _require_little_endian()
    tensors: dict[str, np.ndarray] = {}
    for file, expected in _files_of(Path(path)):
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in the index but missing")
        found, _ = _read_file(file)
        if expected is not None and set(found) != expected:
            missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
            raise CheckpointError(f"{file} does not match {INDEX_NAME}: missing {missing[:5]}, not "
                                  f"listed {extra[:5]}")
        duplicates = sorted(set(found) & set(tensors))
        if duplicates:
            raise CheckpointError(f"{file}: tensors {duplicates[:5]} also appear in another shard")
        tensors.update(found)
    return tensors


def _mx_pair(name: str, values: np.ndarray, raw: Mapping[str, np.ndarray], dtype_names) -> np.ndarray:
    """Validates an MXFP8 (values, scales) pair and returns the scales as uint8."""
    scale_name = name + SCALE_SUFFIX
    if scale_name not in raw:
        raise CheckpointError(f"F8_E4M3 tensor {name!r} has no {scale_name!r}: jax_mxfp8 reads MXFP8 "
                              f"(one e8m0 scale per 32 values); per-tensor FP8 checkpoints are not "
                              f"supported")
    scales = raw[scale_name]
    if dtype_names[scale_name] not in SCALE_DTYPE_NAMES:
        raise CheckpointError(f"{scale_name!r} has dtype {dtype_names[scale_name]}, not an MXFP8 "
                              f"scale (expected U8 or F8_E8M0 [out, in/32]); per-tensor or "
                              f"per-channel FP8 checkpoints are not supported")
    if values.ndim != 2:
        raise CheckpointError(f"MXFP8 tensor {name!r} has shape {list(values.shape)}; only 2-D "
                              f"[out, in] weights become MxWeights (for stacked/MoE weights use "
                              f"read_safetensors() and prepare_weight() per slice)")
    n, k = values.shape
    if k % 32:
        raise CheckpointError(f"MXFP8 tensor {name!r} has in_features K={k}, not a multiple of 32")
    if scales.shape != (n, k // 32):
        raise CheckpointError(f"{scale_name!r} has shape {list(scales.shape)}; MXFP8 weight "
                              f"{name!r} [{n}, {k}] needs [{n}, {k // 32}]")
    scales = scales.view(np.uint8)
    if scales.size and int(scales.max()) == 255:
        raise CheckpointError(f"{scale_name!r} contains the e8m0 NaN byte 0xFF: the weight would "
                              f"dequantize to NaN (corrupt or non-finite source weights)")
    return scales


def load_safetensors(path: str | os.PathLike, *, backend=None) -> dict[str, Any]:
    """Loads a safetensors file or checkpoint directory.

    MXFP8 pairs (`name` F8_E4M3 [out, in] + `name_scale` U8/F8_E8M0 [out, in/32]) become
    MxWeights prepared for `backend` (default select_backend()) under `name`; other tensors
    become jax arrays (numpy arrays for 64-bit dtypes when jax_enable_x64 is off). Anything
    malformed raises CheckpointError instead of returning a wrong tensor.
    """
    raw = read_safetensors(path)
    dtype_names = {name: DTYPE_NAMES[a.dtype] for name, a in raw.items()}
    scale_names = {name + SCALE_SUFFIX for name, d in dtype_names.items() if d == "F8_E4M3"}
    out: dict[str, Any] = {}
    for name, array in raw.items():
        kind = dtype_names[name]
        if name in scale_names:
            continue
        if kind == "F8_E4M3":
            scales = _mx_pair(name, array, raw, dtype_names)
            out[name] = prepare_weight(jnp.asarray(array), jnp.asarray(scales), backend=backend)
        elif kind in ("F8_E5M2", "F8_E8M0"):
            raise CheckpointError(f"tensor {name!r} is {kind} without an F8_E4M3 partner: not an "
                                  f"MXFP8 (E4M3 + e8m0) tensor jax_mxfp8 can load")
        elif kind in SCALE_DTYPE_NAMES and name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in raw:
            partner = name[:-len(SCALE_SUFFIX)]
            raise CheckpointError(f"{name!r} looks like an MXFP8 scale but {partner!r} is "
                                  f"{dtype_names[partner]}, not F8_E4M3")
        elif jax.dtypes.canonicalize_dtype(array.dtype) == array.dtype:
            out[name] = jnp.asarray(array)
        else:
            out[name] = np.array(array)  # 64-bit without x64: keep exact on the host
    return out


# ---- writing -------------------------------------------------------------------------------------

def _flatten(tensors: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tensors.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _host_arrays(tensors: Mapping) -> dict[str, list[tuple[str, np.ndarray]]]:
    """name -> the (file name, host array) entries it writes (an MxWeight writes two)."""
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    seen: set[str] = set()
    for name, value in _flatten(tensors):
        if isinstance(value, MxWeight):
            values, scales = value.unpack()
            entries = [(name, np.asarray(values)), (name + SCALE_SUFFIX, np.asarray(scales))]
        else:
            entries = [(name, np.asarray(value))]
        for entry_name, array in entries:
            if array.dtype not in DTYPE_NAMES:
                raise CheckpointError(f"tensor {entry_name!r} has dtype {array.dtype}, which "
                                      f"safetensors cannot store")
            if entry_name in seen:
                raise CheckpointError(f"two tensors would be written as {entry_name!r} (an MxWeight "
                                      f"writes '<name>' and '<name>{SCALE_SUFFIX}')")
            seen.add(entry_name)
        groups[name] = entries
    return groups


def _write_file(path: Path, entries: list[tuple[str, np.ndarray]], metadata: Mapping[str, str]) -> None:
    # Widest dtypes first, then by name (the safetensors library's order): with the header
    # padded to 8 bytes every tensor starts aligned to its element size.
    entries = sorted(entries, key=lambda e: (-e[1].dtype.itemsize, e[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, array in entries:
        header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, array in entries:
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)  # never leave a half-written file under the final name


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], *,
                     metadata: Mapping[str, str] | None = None,
                     max_shard_bytes: int | None = None) -> list[Path]:
    """Writes tensors (name -> array or MxWeight; nested mappings are joined with '.') in the
    layout load_safetensors reads: an MxWeight `name` becomes `name` F8_E4M3 [out, in] and
    `name_scale` U8 [out, in/32].

    `path` ending in .safetensors: one file. Otherwise a directory: model.safetensors, or with
    max_shard_bytes, model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json.
    Returns the files written.
    """
    _require_little_endian()
    metadata = DEFAULT_METADATA if metadata is None else metadata
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError("metadata must map strings to strings")
    groups = _host_arrays(tensors)
    path = Path(path)
    if path.suffix == ".safetensors":
        if max_shard_bytes is not None:
            raise CheckpointError("max_shard_bytes needs a directory path, not a .safetensors file")
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(path, [e for entries in groups.values() for e in entries], metadata)
        return [path]
    path.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name in sorted(groups):  # an MxWeight's values and scales stay in one shard
        group_bytes = sum(a.nbytes for _, a in groups[name])
        if max_shard_bytes is not None and shards[-1] and size + group_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(groups[name])
        size += group_bytes
    if len(shards) == 1:
        _write_file(path / SINGLE_NAME, shards[0], metadata)
        return [path / SINGLE_NAME]
    written, weight_map = [], {}
    for i, entries in enumerate(shards, 1):
        file = path / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_file(file, entries, metadata)
        written.append(file)
        weight_map.update({name: file.name for name, _ in entries})
    total = sum(a.nbytes for entries in shards for _, a in entries)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*written, path / INDEX_NAME]
