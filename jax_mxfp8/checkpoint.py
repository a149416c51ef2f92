"""MXFP8 safetensors checkpoints: a validating, memory-mapped reader and a writer.

Layouts load_safetensors turns into MxWeights (each under its module's `<module>.weight` name):

- NVIDIA ModelOpt "MXFP8", compressed-tensors "mxfp8-quantized" (llm-compressor) and this
  library's writer: `<name>` F8_E4M3 [out, in] + `<name>_scale` U8 (or F8_E8M0) [out, in/32]
  biased e8m0 exponents.
- torchao MXTensor (MXDynamicActivationMXWeightConfig, transformers save_pretrained):
  `<module>._weight_qdata` F8_E4M3 [out, in] + `<module>._weight_scale` F8_E8M0 in the 128x4
  swizzled layout, [ceil(out/128)*32, ceil(in/128)*16] (the bytes of docs/numerics.md's F8_128x4
  layout; or [out, in/32] when is_swizzled_scales is false), described by the JSON the safetensors
  metadata holds under `<module>.weight` (`_type` MXTensor, elem_dtype, block_size, ...).
- AMD Quark fake-quantized (QDQ) export, only when the directory's quantization config says
  Quark MXFP8: `<name>` BF16/F16/F32 [out, in] holding e4m3 value x scale exactly, + `<name>_scale`
  F32 [out, in/32] powers of two. Re-encoded exactly to e4m3 codes + e8m0 bytes; a tensor that is
  not exactly representable is refused, naming the first element that is not.
- Stacked experts (vLLM / ModelOpt `experts.w13_weight` [E, 2I, H], this library's writer): the
  first layout with a leading expert axis, values [E, out, in] + scales [E, out, in/32]: one
  stacked MxWeight. Per-expert names (`experts.{e}.gate_proj.weight`, any layout above) are
  stacked with load_safetensors(experts="stack" / "fuse") (jax_mxfp8/moe_checkpoint.py).

Every other tensor is an ordinary array.

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
import re
import struct
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_mxfp8 import moe_checkpoint
from jax_mxfp8._errors import CheckpointError
from jax_mxfp8.quant_config import read_quant_config
from jax_mxfp8.backends import Backend, get_backend_impl, registered_backends, select_backend
from jax_mxfp8.weight import MxWeight, decode_meta, encode_meta, prepare_weight

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale"
# save_safetensors(prepared=True): a weight's prepared arrays are `<name>.mx_<array>`, described
# by the metadata entry PREPARED_KEY + name (backend, shape, layout meta, array names).
PREPARED_KEY = "jax_mxfp8.prepared."
PREPARED_INFIX = ".mx_"
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
QDQ_DTYPE_NAMES = ("BF16", "F16", "F32")  # Quark fake-quantized weights and their scales
TORCHAO_NAMES_KEY = "tensor_names"  # torchao's metadata: the state-dict names it flattened
TORCHAO_ELEMENTS = {"float8_e4m3fn": "MXFP8", "float8_e5m2": "MXFP8 with E5M2 values",
                    "float4_e2m1fn_x2": "MXFP4", "fp6_e2m3": "MXFP6 (e2m3)", "fp6_e3m2": "MXFP6 (e3m2)"}
TORCHAO_SCHEMES = {"Float8Tensor": "FP8 (per-tensor / per-row / block scales)",
                   "NVFP4Tensor": "NVFP4", "Int4Tensor": "INT4", "Int8Tensor": "INT8",
                   "Int4TilePackedTo4dTensor": "INT4", "IntxUnpackedToInt8Tensor": "INTx",
                   "Int4PlainInt32Tensor": "INT4"}


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


def _merge_metadata(merged: dict[str, str], metadata: Mapping[str, str], file: Path) -> None:
    """Shards' metadata together: torchao writes its per-tensor entries and a "tensor_names"
    list into each shard (the lists are joined); for any other key the first shard's value is
    kept (a producer may write per-shard values that nothing here reads)."""
    for key, value in metadata.items():
        if key == TORCHAO_NAMES_KEY:
            try:
                names = json.loads(value)
                previous = json.loads(merged.get(key, "[]"))
            except ValueError as err:
                raise CheckpointError(f"{file}: metadata {key!r} is not valid JSON ({err})") from None
            if not isinstance(names, list) or not isinstance(previous, list):
                raise CheckpointError(f"{file}: metadata {key!r} must be a JSON list of names")
            merged[key] = json.dumps(previous + [n for n in names if n not in previous])
        else:
            merged.setdefault(key, value)


def _read_all(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    _require_little_endian()
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, str] = {}
    for file, expected in _files_of(path):
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in the index but missing")
        found, file_metadata = _read_file(file)
        if expected is not None and set(found) != expected:
            missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
            raise CheckpointError(f"{file} does not match {INDEX_NAME}: missing {missing[:5]}, not "
                                  f"listed {extra[:5]}")
        duplicates = sorted(set(found) & set(tensors))
        if duplicates:
            raise CheckpointError(f"{file}: tensors {duplicates[:5]} also appear in another shard")
        tensors.update(found)
        _merge_metadata(metadata, file_metadata, file)
    return tensors, metadata


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, or of a directory (with model.safetensors.index.json,
    or a single model.safetensors), as read-only numpy views of a memory map, under the names
    the file uses (no layout conversion). F8 tensors come as ml_dtypes arrays. Raises
    CheckpointError for anything malformed."""
    return _read_all(Path(path))[0]


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` string map of a safetensors file or checkpoint directory (shards'
    maps merged)."""
    return _read_all(Path(path))[1]


def _mx_pair(name: str, values: np.ndarray, raw: Mapping[str, np.ndarray], dtype_names) -> np.ndarray:
    """Validates an MXFP8 (values, scales) pair and returns the scales as uint8."""
    scale_name = name + SCALE_SUFFIX
    if scale_name not in raw:
        expert = moe_checkpoint.expert_of(name)
        if expert is not None:
            raise CheckpointError(
                f"F8_E4M3 tensor {name!r} (expert {expert[1]} of {expert[0]!r}) has no "
                f"{scale_name!r}: every expert's MXFP8 weight needs its e8m0 scale tensor; the "
                f"checkpoint is incomplete (re-export it, or check every shard of the index is there)")
        raise CheckpointError(f"F8_E4M3 tensor {name!r} has no {scale_name!r}: jax_mxfp8 reads MXFP8 "
                              f"(one e8m0 scale per 32 values); per-tensor FP8 checkpoints are not "
                              f"supported")
    scales = raw[scale_name]
    if dtype_names[scale_name] not in SCALE_DTYPE_NAMES:
        raise CheckpointError(f"{scale_name!r} has dtype {dtype_names[scale_name]}, not an MXFP8 "
                              f"scale (expected U8 or F8_E8M0 [out, in/32]); per-tensor or "
                              f"per-channel FP8 checkpoints are not supported")
    if values.ndim not in (2, 3):
        raise CheckpointError(f"MXFP8 tensor {name!r} has shape {list(values.shape)}; only 2-D "
                              f"[out, in] weights and 3-D [experts, out, in] stacked experts "
                              f"become MxWeights (read others with read_safetensors())")
    *lead, n, k = values.shape
    if k % 32:
        raise CheckpointError(f"MXFP8 tensor {name!r} has in_features K={k}, not a multiple of 32")
    if values.ndim == 3 and lead[0] == 0:
        raise CheckpointError(f"MXFP8 tensor {name!r} has shape {list(values.shape)}: no experts")
    if scales.shape != (*lead, n, k // 32):
        raise CheckpointError(f"{scale_name!r} has shape {list(scales.shape)}; MXFP8 weight "
                              f"{name!r} {list(values.shape)} needs {[*lead, n, k // 32]}")
    scales = scales.view(np.uint8)
    _check_scale_bytes(scale_name, scales)
    return scales


def _check_scale_bytes(scale_name: str, scales: np.ndarray) -> None:
    if scales.size and int(scales.max()) == 255:
        raise CheckpointError(f"{scale_name!r} contains the e8m0 NaN byte 0xFF: the weight would "
                              f"dequantize to NaN (corrupt or non-finite source weights)")


# ---- torchao: <module>._<param>_qdata + <module>._<param>_scale, described by metadata JSON -------

def _torchao_parts(tensor_name: str) -> tuple[str, str]:
    """'model.layers.0.mlp.up_proj.weight' -> the names flatten_tensor_state_dict gives its data."""
    module, _, param = tensor_name.rpartition(".")
    prefix = f"{module}._{param}_" if module else f"_{param}_"
    return prefix + "qdata", prefix + "scale"


def _unswizzle(flat: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """F8_128x4 bytes (docs/numerics.md; torchao's to_blocked) -> row-major [rows, cols]."""
    mp, kbp = -(-rows // 128) * 128, -(-cols // 4) * 4
    tiles = flat.reshape(mp // 128, kbp // 4, 32, 4, 4)  # row tile, col tile, r % 32, r // 32, c % 4
    return tiles.transpose(0, 3, 2, 1, 4).reshape(mp, kbp)[:rows, :cols]


def _torchao_metadata(tensor_name: str, metadata: Mapping[str, str]) -> dict:
    where = f"torchao metadata of {tensor_name!r}"
    if tensor_name not in metadata:
        raise CheckpointError(f"{where} is missing: the safetensors metadata has no {tensor_name!r} "
                              f"entry describing its flattened tensors")
    try:
        info = json.loads(metadata[tensor_name])
    except ValueError as err:
        raise CheckpointError(f"{where} is not valid JSON ({err})") from None
    if not isinstance(info, dict) or not isinstance(info.get("_type"), str):
        raise CheckpointError(f"{where} must be a JSON object with a '_type'")
    return info


def _torchao_mx(tensor_name: str, info: dict, raw: Mapping[str, np.ndarray],
                dtype_names: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validates one torchao MXTensor and returns (values [N, K] e4m3, scales [N, K/32] uint8,
    the flattened names it consumed)."""
    kind, data = info["_type"], info.get("_data")
    where = f"torchao tensor {tensor_name!r}"
    if kind != "MXTensor":
        scheme = TORCHAO_SCHEMES.get(kind, "not MXFP8")
        raise CheckpointError(f"{where} is a torchao {kind} ({scheme}); jax_mxfp8 reads MXFP8 "
                              f"(MXTensor with float8_e4m3fn elements, block 32) only")
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: metadata '_data' must be an object")
    elem = data.get("elem_dtype")
    elem = elem.get("_data") if isinstance(elem, dict) else elem
    if elem != "float8_e4m3fn":
        raise CheckpointError(f"{where}: MXTensor elem_dtype {elem!r} "
                              f"({TORCHAO_ELEMENTS.get(elem, 'unknown')}) is not MXFP8 E4M3")
    if data.get("block_size") != 32:
        raise CheckpointError(f"{where}: MXTensor block_size {data.get('block_size')!r}; MXFP8 "
                              f"has one scale per 32 values")
    swizzled = data.get("is_swizzled_scales", False)
    if not isinstance(swizzled, bool):
        raise CheckpointError(f"{where}: is_swizzled_scales {swizzled!r} is not a boolean")
    names = info.get("_tensor_data_names")
    if names is not None and sorted(names) != ["qdata", "scale"]:
        raise CheckpointError(f"{where}: _tensor_data_names {names!r}; an MXTensor has "
                              f"['qdata', 'scale']")
    qdata_name, scale_name = _torchao_parts(tensor_name)
    for part in (qdata_name, scale_name):
        if part not in raw:
            raise CheckpointError(f"{where}: the metadata describes an MXTensor but {part!r} is "
                                  f"not in the checkpoint")
    values, scales = raw[qdata_name], raw[scale_name]
    if dtype_names[qdata_name] != "F8_E4M3":
        raise CheckpointError(f"{qdata_name!r} has dtype {dtype_names[qdata_name]}; an MXFP8 "
                              f"MXTensor's qdata is F8_E4M3")
    if dtype_names[scale_name] not in SCALE_DTYPE_NAMES:
        raise CheckpointError(f"{scale_name!r} has dtype {dtype_names[scale_name]}; an MXTensor's "
                              f"scale is F8_E8M0")
    if values.ndim != 2:
        raise CheckpointError(f"{where} has shape {list(values.shape)}; only 2-D [out, in] weights "
                              f"become MxWeights")
    n, k = values.shape
    if k % 32:
        raise CheckpointError(f"{where} has in_features K={k}, not a multiple of 32")
    if swizzled:
        want = (-(-n // 128) * 32, -(-k // 128) * 16)  # torchao's swizzled scale dims
        if scales.shape != want:
            raise CheckpointError(f"{scale_name!r} has shape {list(scales.shape)}; the swizzled "
                                  f"(128x4 tile) scales of a [{n}, {k}] MXTensor are {list(want)}")
        scales = _unswizzle(scales.view(np.uint8).reshape(-1), n, k // 32)
    elif scales.shape != (n, k // 32):
        raise CheckpointError(f"{scale_name!r} has shape {list(scales.shape)}; MXTensor {where} "
                              f"[{n}, {k}] needs [{n}, {k // 32}]")
    scales = np.ascontiguousarray(scales.view(np.uint8))
    _check_scale_bytes(scale_name, scales)
    return values, scales, [qdata_name, scale_name]


def _torchao_weights(raw, dtype_names, metadata) -> tuple[dict[str, tuple], set[str]]:
    """{tensor name: (values, scales)} of every torchao-flattened tensor, and the names used."""
    flattened = sorted(n for n in raw if re.search(r"(^|\.)_[^.]+_(qdata|scale)$", n))
    if TORCHAO_NAMES_KEY not in metadata:
        if flattened:
            raise CheckpointError(f"{flattened[0]!r} looks like a torchao flattened tensor, but the "
                                  f"safetensors metadata has no {TORCHAO_NAMES_KEY!r} / per-tensor "
                                  f"description (torchao writes both); cannot tell its layout")
        return {}, set()
    try:
        tensor_names = json.loads(metadata[TORCHAO_NAMES_KEY])
    except ValueError as err:
        raise CheckpointError(f"metadata {TORCHAO_NAMES_KEY!r} is not valid JSON ({err})") from None
    if not isinstance(tensor_names, list) or not all(isinstance(n, str) for n in tensor_names):
        raise CheckpointError(f"metadata {TORCHAO_NAMES_KEY!r} must be a JSON list of names")
    out: dict[str, tuple] = {}
    used: set[str] = set()
    for tensor_name in tensor_names:
        if tensor_name in raw and tensor_name not in metadata:
            continue  # a plain tensor torchao did not describe
        info = _torchao_metadata(tensor_name, metadata)
        if info["_type"] in ("Tensor", "torch.Tensor"):
            continue
        if not any(p in raw for p in _torchao_parts(tensor_name)) and tensor_name not in raw:
            continue  # in a shard this index does not include (a partial directory)
        values, scales, names = _torchao_mx(tensor_name, info, raw, dtype_names)
        out[tensor_name] = (values, scales)
        used.update(names)
    leftover = [n for n in flattened if n not in used]
    if leftover:
        raise CheckpointError(f"{leftover[0]!r} looks like a torchao flattened tensor, but no "
                              f"MXTensor in the metadata's {TORCHAO_NAMES_KEY!r} accounts for it")
    return out, used


# ---- Quark fake-quantized (QDQ): float weight = e4m3 value x power-of-two scale --------------------

QDQ_CHUNK = 1 << 22  # elements re-encoded at a time (float64 temporaries stay small)


def _scale_bytes_from_powers_of_two(scale_name: str, scales: np.ndarray):
    """float powers of two 2^(e-127), e in [0, 254] -> the e8m0 bytes e, and where the scale is
    +0.0 (allowed for an all-zero block only; byte 0); anything else refused."""
    bits = np.ascontiguousarray(scales.astype(np.float32)).view(np.uint32)
    exponent, mantissa = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    normal = (bits >> 31 == 0) & (exponent >= 1) & (exponent <= 254) & (mantissa == 0)
    smallest = bits == 0x00400000  # 2^-127: e8m0 byte 0, a float32 subnormal
    zero = bits == 0
    ok = normal | smallest | zero
    if not ok.all():
        index = tuple(int(i) for i in np.argwhere(~ok)[0])
        raise CheckpointError(f"{scale_name!r}{list(index)} = {float(scales[index])!r} is not a power of "
                              f"two in [2^-127, 2^127]: not an MXFP8 (e8m0) scale")
    return np.where(normal, exponent, 0).astype(np.uint8), zero


def _requantize_qdq(name: str, weight: np.ndarray, scales: np.ndarray, scale_name: str):
    """A fake-quantized weight and its power-of-two block scales -> (e4m3 values, e8m0 bytes),
    exactly: every element divided by its block's scale must be an e4m3 value."""
    if weight.ndim != 2:
        raise CheckpointError(f"MXFP8 (Quark fake-quantized) tensor {name!r} has shape "
                              f"{list(weight.shape)}; only 2-D [out, in] weights become MxWeights")
    n, k = weight.shape
    if k % 32:
        raise CheckpointError(f"MXFP8 (Quark fake-quantized) tensor {name!r} has in_features K={k}, "
                              f"not a multiple of 32")
    if scales.shape != (n, k // 32):
        raise CheckpointError(f"{scale_name!r} has shape {list(scales.shape)}; MXFP8 weight {name!r} "
                              f"[{n}, {k}] needs [{n}, {k // 32}]")
    scale_bytes, zero_scale = _scale_bytes_from_powers_of_two(scale_name, scales)
    codes = np.empty((n, k), ml_dtypes.float8_e4m3fn)
    rows = max(1, QDQ_CHUNK // max(k, 1))
    for r0 in range(0, n, rows):
        w = weight[r0:r0 + rows].astype(np.float64)  # exact for bf16 / fp16 / fp32
        blocks = w.reshape(w.shape[0], k // 32, 32)
        e = scale_bytes[r0:r0 + rows].astype(np.int64) - 127
        q = blocks * np.exp2(-e)[..., None]  # exact: a power of two, in float64's range
        c = q.astype(ml_dtypes.float8_e4m3fn)
        ok = (c.astype(np.float64) == q) & (np.abs(q) <= 448.0)
        ok &= ~zero_scale[r0:r0 + rows, :, None] | (blocks == 0)  # scale 0: the block must be 0
        if not ok.all():
            r, b, i = (int(j) for j in np.argwhere(~ok)[0])
            col = b * 32 + i
            raise CheckpointError(
                f"{name!r}[{r0 + r}, {col}] = {float(w[r, col])!r} is not an e4m3 value times its "
                f"block's scale {float(scales[r0 + r, b])!r} (it is {float(q[r, b, i])!r} times "
                f"2^{int(e[r, b])}): not an exactly representable MXFP8 fake-quantized weight")
        codes[r0:r0 + rows] = c.reshape(w.shape)
    return codes, scale_bytes


def _quark_weights(raw, dtype_names) -> tuple[dict[str, tuple], set[str]]:
    out: dict[str, tuple] = {}
    used: set[str] = set()
    for scale_name in sorted(raw):
        if not scale_name.endswith(SCALE_SUFFIX):
            continue
        name = scale_name[:-len(SCALE_SUFFIX)]
        if name not in raw or dtype_names[name] not in QDQ_DTYPE_NAMES:
            continue
        if dtype_names[scale_name] not in QDQ_DTYPE_NAMES:
            raise CheckpointError(f"{scale_name!r} has dtype {dtype_names[scale_name]}; a Quark "
                                  f"fake-quantized MXFP8 weight's scale is a float power of two "
                                  f"(F32) [out, in/32]")
        codes, scales = _requantize_qdq(name, raw[name], raw[scale_name], scale_name)
        out[name] = (codes, scales)
        used.update((name, scale_name))
        zero_point = name + "_zero_point"
        if zero_point in raw:
            if np.any(np.asarray(raw[zero_point]) != 0):
                raise CheckpointError(f"{zero_point!r} is not all zero: MXFP8 is symmetric")
            used.add(zero_point)
    return out, used


def _resolve_quant_config(path: Path, quant_config):
    if not isinstance(quant_config, str):
        return quant_config
    if quant_config != "auto":
        raise ValueError(f"quant_config must be a QuantConfig, None or 'auto'; got {quant_config!r}")
    directory = path if path.is_dir() else path.parent
    return read_quant_config(directory)


def load_safetensors(path: str | os.PathLike, *, backend=None, quant_config="auto",
                     experts=None) -> dict[str, Any]:
    """Loads a safetensors file or checkpoint directory.

    MXFP8 weights in any of the layouts of the module docstring (ModelOpt / compressed-tensors
    pairs, torchao MXTensors with swizzled scales, Quark fake-quantized weights) become
    MxWeights prepared for `backend` (default select_backend()) under `<module>.weight`; a 3-D
    pair [E, N, K] + [E, N, K/32] (stacked experts, e.g. vLLM's `experts.w13_weight`) becomes one
    stacked MxWeight. Other tensors become jax arrays (numpy arrays for 64-bit dtypes when
    jax_enable_x64 is off). Anything malformed raises CheckpointError instead of returning a
    wrong tensor.

    quant_config: "auto" reads the directory's quantization config (jax_mxfp8.quant_config;
    for a file path, the file's directory), which raises CheckpointError for a scheme that is
    not MXFP8; or pass a QuantConfig, or None for none. Float weights are re-encoded as
    Quark fake-quantized MXFP8 only when it is a Quark config (the values are never guessed at).

    experts (mixture-of-experts tensors, jax_mxfp8.moe_checkpoint, docs/moe.md): None keeps the
    names as stored; "stack" stacks per-expert tensors `<p>.experts.{e}.<rest>` (every producer's
    layout) into `<p>.experts.<rest>` [E, ...] (MXFP8 weights: one stacked MxWeight); "fuse"
    stacks too and gives the MoE layer's names: `<p>.experts.gate_up_proj.weight` [E, 2I, H]
    (gate_proj / w1 rows, then up_proj / w3; vLLM's w13_weight) and `<p>.experts.down_proj.weight`
    [E, H, I] (w2). An incomplete or inconsistent expert set is a CheckpointError.
    """
    moe_checkpoint.check_layout(experts, moe_checkpoint.LOAD_LAYOUTS, "load_safetensors")
    path = Path(path)
    quant_config = _resolve_quant_config(path, quant_config)
    raw, metadata = _read_all(path)
    dtype_names = {name: DTYPE_NAMES[a.dtype] for name, a in raw.items()}
    prepared, used = _prepared_weights(raw, metadata, backend)
    converted, torchao_used = _torchao_weights(raw, dtype_names, metadata)
    used |= torchao_used
    if quant_config is not None and quant_config.producer == "quark":
        quark, quark_used = _quark_weights(raw, dtype_names)
        converted.update(quark)
        used |= quark_used
    scale_names = {name + SCALE_SUFFIX for name, d in dtype_names.items()
                   if d == "F8_E4M3" and name not in used}
    # Checkpoint-layout tensors (Mx pairs of e4m3 values + scale bytes, numpy arrays) first, so
    # that expert sets are stacked before anything is prepared.
    tensors: dict[str, Any] = {name: moe_checkpoint.Mx(*pair) for name, pair in converted.items()}
    if experts is not None:  # prepared expert weights join their sets (unpacked exactly)
        for name in [n for n in prepared if moe_checkpoint.is_expert_tensor(n)]:
            tensors[name] = moe_checkpoint.Mx(*(np.asarray(a) for a in prepared.pop(name).unpack()))
    for name, array in raw.items():
        kind = dtype_names[name]
        if name in scale_names or name in used:
            continue
        if name in tensors or name in prepared:
            raise CheckpointError(f"tensor {name!r} is stored both plainly and as a converted "
                                  f"MXFP8 weight")
        if kind == "F8_E4M3":
            tensors[name] = moe_checkpoint.Mx(array, _mx_pair(name, array, raw, dtype_names))
        elif kind in ("F8_E5M2", "F8_E8M0"):
            raise CheckpointError(f"tensor {name!r} is {kind} without an F8_E4M3 partner: not an "
                                  f"MXFP8 (E4M3 + e8m0) tensor jax_mxfp8 can load")
        elif kind in SCALE_DTYPE_NAMES and name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in raw:
            partner = name[:-len(SCALE_SUFFIX)]
            raise CheckpointError(f"{name!r} looks like an MXFP8 scale but {partner!r} is "
                                  f"{dtype_names[partner]}, not F8_E4M3")
        else:
            tensors[name] = array
    out: dict[str, Any] = dict(prepared)
    for group in [tensors] if experts is None else moe_checkpoint.by_experts_module(tensors):
        for name, value in moe_checkpoint.load_layout(group, experts).items():
            if name in out:
                raise CheckpointError(f"tensor {name!r} is stored both in a prepared layout and in "
                                      f"the checkpoint layout; keep one")
            out[name] = _to_jax(value, backend)
    return out


def _to_jax(value, backend):
    """A checkpoint-layout tensor as load_safetensors returns it: an Mx pair prepared for
    `backend`, an array as a jax array (64-bit ones numpy when jax_enable_x64 is off)."""
    if isinstance(value, moe_checkpoint.Mx):
        return prepare_weight(jnp.asarray(value.values), jnp.asarray(value.scales), backend=backend)
    if jax.dtypes.canonicalize_dtype(value.dtype) == value.dtype:
        return jnp.asarray(value)
    return np.array(value)  # keep exact on the host


# ---- prepared layouts (save_safetensors(prepared=True)) ------------------------------------------

def _prepared_weights(raw, metadata, backend) -> tuple[dict[str, MxWeight], set[str]]:
    """MxWeights stored in a backend's prepared layout. Used as stored (no repacking) when they
    are for the backend asked for (default: select_backend()), else converted exactly; a layout
    this version does not know is an error."""
    out, used = {}, set()
    for key, value in metadata.items():
        if not key.startswith(PREPARED_KEY):
            continue
        name = key[len(PREPARED_KEY):]
        try:
            info = json.loads(value)
            stored = Backend.parse(info["backend"])
            shape = tuple(int(d) for d in info["shape"])
            meta = decode_meta(info["meta"])
            names = list(info["arrays"])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"metadata {key!r} does not describe a prepared MXFP8 weight "
                                  f"({err})") from None
        if stored not in registered_backends():
            raise CheckpointError(f"{name!r} is stored for backend {stored.value}, which this build "
                                  f"lacks; re-save it from the checkpoint layout")
        layout_of = get_backend_impl(stored).shard_meta  # the layout meta of a given shape
        want = None if layout_of is None else layout_of(None, shape)
        if meta != want:
            raise CheckpointError(
                f"{name!r} is stored in the {stored.value} layout {meta!r}, but this version of "
                f"jax_mxfp8 reads {want!r}; load the weight from the checkpoint layout (values + "
                f"scales) or re-save it with this version")
        arrays = {}
        for array in names:
            tensor = f"{name}{PREPARED_INFIX}{array}"
            if tensor not in raw:
                raise CheckpointError(f"{name!r}: the prepared array {tensor!r} is missing")
            arrays[array] = jnp.asarray(raw[tensor])
            used.add(tensor)
        weight = MxWeight(arrays, shape, stored, meta)
        target = select_backend() if backend is None else Backend.parse(backend)
        out[name] = weight if target is stored else weight.to_backend(target)
    return out, used


# ---- writing -------------------------------------------------------------------------------------

def _flatten(tensors: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tensors.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _host_arrays(tensors: Mapping, prepared: bool = False,
                 described: dict | None = None) -> dict[str, list[tuple[str, np.ndarray]]]:
    """name -> the (file name, host array) entries it writes (an MxWeight writes two, or with
    prepared=True its prepared arrays, described in `described`)."""
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    seen: set[str] = set()
    for name, value in _flatten(tensors):
        if isinstance(value, MxWeight) and prepared and value.backend is not Backend.EMULATION:
            entries = [(f"{name}{PREPARED_INFIX}{key}", np.asarray(a))
                       for key, a in sorted(value.arrays.items())]
            described[PREPARED_KEY + name] = json.dumps(
                {"backend": value.backend.value, "shape": list(value.shape),
                 "meta": encode_meta(value.meta), "arrays": sorted(value.arrays)})
        elif isinstance(value, (MxWeight, moe_checkpoint.Mx)):
            values, scales = value.unpack() if isinstance(value, MxWeight) else value
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


def _expert_layout(tensors: Mapping, experts) -> Mapping:
    """save_safetensors' experts= layout: the experts' tensors (MxWeights as Mx pairs, exact)
    renamed / split by jax_mxfp8.moe_checkpoint; everything else as given."""
    moe_checkpoint.check_layout(experts, moe_checkpoint.SAVE_LAYOUTS, "save_safetensors")
    if experts is None:
        return tensors
    flat = dict(_flatten(tensors))
    for name, value in flat.items():
        if moe_checkpoint.is_expert_tensor(name):
            flat[name] = (moe_checkpoint.Mx(*(np.asarray(a) for a in value.unpack()))
                          if isinstance(value, MxWeight) else np.asarray(value))
    return moe_checkpoint.save_layout(flat, experts)


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], *,
                     metadata: Mapping[str, str] | None = None,
                     max_shard_bytes: int | None = None, prepared: bool = False,
                     experts=None) -> list[Path]:
    """Writes tensors (name -> array or MxWeight; nested mappings are joined with '.') in the
    layout load_safetensors reads: an MxWeight `name` becomes `name` F8_E4M3 [out, in] and
    `name_scale` U8 [out, in/32] (the layout every producer reads).

    prepared=True keeps each non-EMULATION MxWeight in its backend's prepared layout instead
    (`name.mx_<array>`, with the backend, shape and layout version in the metadata), so that
    load_safetensors on that backend uses it without repacking; jax_mxfp8 alone reads it.

    A stacked MxWeight [E, N, K] is written as `name` [E, N, K] + `name_scale` [E, N, K/32].
    experts (mixture-of-experts tensors under `<p>.experts.`, in the checkpoint layout; see
    jax_mxfp8.moe_checkpoint): None writes them as given; "per_expert" writes Hugging Face names,
    `<p>.experts.{e}.<rest>` per expert, a fused `gate_up_proj` split into `gate_proj` and
    `up_proj`; "vllm" writes vLLM's `<p>.experts.w13_weight` [E, 2I, H] (gate_up_proj, or gate_proj
    and up_proj concatenated) and `<p>.experts.w2_weight` [E, H, I] (down_proj).

    `path` ending in .safetensors: one file. Otherwise a directory: model.safetensors, or with
    max_shard_bytes, model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json.
    Returns the files written.
    """
    _require_little_endian()
    metadata = dict(DEFAULT_METADATA if metadata is None else metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError("metadata must map strings to strings")
    groups = _host_arrays(_expert_layout(tensors, experts), prepared, metadata)
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
