"""MXFP8 safetensors checkpoints: files assembled byte by byte from the published format, round
trips through our writer, and every kind of malformed file failing loudly."""
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp8 as mx
from jax_mxfp8.checkpoint import CheckpointError, read_safetensors

from oracles import mxfp8 as ref


def assemble(path, header: dict, data: bytes, *, header_len=None, pad=True):
    """A safetensors file built by hand: u64 LE header length, JSON header (space padded to 8
    bytes), raw little-endian tensor bytes. Independent of jax_mxfp8's writer."""
    blob = json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def entries_to_file(path, entries, metadata=None, order=None):
    """entries: [(name, dtype string, shape, raw bytes)] laid out contiguously in that order;
    the JSON lists them in `order` (default reversed) to show order does not matter."""
    header, data, offset = {}, b"", 0
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    names = order or list(reversed(header))
    header = {name: header[name] for name in names}
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    return assemble(path, header, data)


def bf16_bytes(x_f32: np.ndarray) -> bytes:
    """bf16 encoding of float32 values that bf16 represents exactly: the top 16 bits."""
    return (np.asarray(x_f32, "<f4").view("<u4") >> 16).astype("<u2").tobytes()


def random_mx_weight(rng, n, k):
    """Random e4m3 codes (no NaN codes) and scale bytes in a sane range."""
    codes = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x00
    scales = rng.integers(100, 140, size=(n, k // 32), dtype=np.uint8)
    return codes, scales


@pytest.mark.parametrize("scale_dtype", ["U8", "F8_E8M0"])
def test_hand_assembled_modelopt_file(tmp_path, scale_dtype, rng):
    n, k = 48, 96
    codes, scales = random_mx_weight(rng, n, k)
    bias = rng.integers(-64, 64, size=n).astype(np.float32) / 8  # exact in bf16
    norm = rng.standard_normal(k).astype(np.float32)
    half = rng.standard_normal(5).astype(np.float16)
    path = entries_to_file(tmp_path / "model.safetensors", [
        ("layers.0.mlp.up_proj.weight", "F8_E4M3", (n, k), codes.tobytes()),
        ("layers.0.mlp.up_proj.weight_scale", scale_dtype, (n, k // 32), scales.tobytes()),
        ("layers.0.mlp.up_proj.bias", "BF16", (n,), bf16_bytes(bias)),
        ("norm.weight", "F32", (k,), norm.astype("<f4").tobytes()),
        ("half", "F16", (5,), half.astype("<f2").tobytes()),
        ("empty", "F32", (0, 3), b""),
    ], metadata={"format": "pt"})
    tensors = mx.load_safetensors(path, backend="emulation")
    assert set(tensors) == {"layers.0.mlp.up_proj.weight", "layers.0.mlp.up_proj.bias",
                            "norm.weight", "half", "empty"}
    weight = tensors["layers.0.mlp.up_proj.weight"]
    assert isinstance(weight, mx.MxWeight) and weight.shape == (n, k)
    values, got_scales = weight.unpack()
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8), codes)
    np.testing.assert_array_equal(np.asarray(got_scales), scales)
    dense = np.asarray(mx.dequantize(values, got_scales, dtype=jnp.float32))
    np.testing.assert_array_equal(dense, ref.dequantize(codes, scales, np.float32))
    assert tensors["layers.0.mlp.up_proj.bias"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(tensors["layers.0.mlp.up_proj.bias"], np.float32), bias)
    np.testing.assert_array_equal(np.asarray(tensors["norm.weight"]), norm)
    np.testing.assert_array_equal(np.asarray(tensors["half"]), half)
    assert tensors["empty"].shape == (0, 3)


def test_header_without_padding_and_metadata(tmp_path):
    data = np.arange(6, dtype="<i4")
    path = assemble(tmp_path / "a.safetensors",
                    {"x": {"dtype": "I32", "shape": [2, 3], "data_offsets": [0, 24]}},
                    data.tobytes(), pad=False)
    out = mx.load_safetensors(path)
    np.testing.assert_array_equal(np.asarray(out["x"]), data.reshape(2, 3))


def test_reader_is_memory_mapped_and_read_only(tmp_path, rng):
    codes, scales = random_mx_weight(rng, 32, 64)
    path = entries_to_file(tmp_path / "m.safetensors", [
        ("w", "F8_E4M3", codes.shape, codes.tobytes()),
        ("w_scale", "U8", scales.shape, scales.tobytes())])
    raw = read_safetensors(path)
    assert raw["w"].dtype == jnp.float8_e4m3fn
    base = raw["w"]
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    assert not raw["w"].flags.writeable


def test_round_trip_single_file(tmp_path, rng):
    w = rng.standard_normal((64, 128)).astype(np.float32)
    weight = mx.quantize_weight(w, backend="emulation")
    tensors = {
        "a.weight": weight,
        "a.bias": jnp.asarray(rng.standard_normal(64), jnp.bfloat16),
        "nested": {"f16": jnp.asarray(rng.standard_normal((3, 4)), jnp.float16),
                   "f32": jnp.asarray(rng.standard_normal(7), jnp.float32)},
        "ids": np.arange(5, dtype=np.int32),
    }
    (file,) = mx.save_safetensors(tmp_path / "x.safetensors", tensors)
    raw = read_safetensors(file)
    assert raw["a.weight"].dtype == jnp.float8_e4m3fn and raw["a.weight_scale"].dtype == np.uint8
    assert raw["a.weight_scale"].shape == (64, 4)
    loaded = mx.load_safetensors(file, backend="emulation")
    assert set(loaded) == {"a.weight", "a.bias", "nested.f16", "nested.f32", "ids"}
    for got, want in zip(loaded["a.weight"].unpack(), weight.unpack()):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for name, want in [("a.bias", tensors["a.bias"]), ("nested.f16", tensors["nested"]["f16"]),
                       ("nested.f32", tensors["nested"]["f32"]), ("ids", tensors["ids"])]:
        assert loaded[name].dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(want))


def test_writer_output_follows_the_format(tmp_path):
    """Parse our writer's bytes by hand: padded header, aligned contiguous offsets, metadata."""
    (file,) = mx.save_safetensors(tmp_path / "y.safetensors", {
        "b": jnp.ones((3,), jnp.float32), "a": mx.quantize_weight(jnp.ones((32, 32)))})
    blob = file.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0 and blob[8:9] == b"{"
    header = json.loads(blob[8:8 + n])
    assert header.pop("__metadata__") == {"format": "pt"}
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == len(blob) - 8 - n
    for info in header.values():
        assert info["data_offsets"][0] % {"F32": 4, "F8_E4M3": 1, "U8": 1}[info["dtype"]] == 0
    assert header["a_scale"] == {"dtype": "U8", "shape": [32, 1], "data_offsets": header["a_scale"]["data_offsets"]}
    data = blob[8 + n:]
    b0, b1 = header["b"]["data_offsets"]
    assert np.frombuffer(data[b0:b1], "<f4").tolist() == [1.0, 1.0, 1.0]


def test_round_trip_sharded_directory(tmp_path, rng):
    weights = {f"layers.{i}.weight": mx.quantize_weight(rng.standard_normal((32, 64)), backend="emulation")
               for i in range(5)}
    weights["embed"] = jnp.asarray(rng.standard_normal((10, 8)), jnp.bfloat16)
    files = mx.save_safetensors(tmp_path / "ck", weights, max_shard_bytes=4096)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert len(files) > 3 and files[-1].name == "model.safetensors.index.json"
    # Values and scales of one weight live in one shard.
    for i in range(5):
        assert index["weight_map"][f"layers.{i}.weight"] == index["weight_map"][f"layers.{i}.weight_scale"]
    loaded = mx.load_safetensors(tmp_path / "ck", backend="emulation")
    assert set(loaded) == set(weights)
    for name, want in weights.items():
        if isinstance(want, mx.MxWeight):
            for got, exp in zip(loaded[name].unpack(), want.unpack()):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))
        else:
            np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(want))


# ---- malformed files --------------------------------------------------------------------------

def one_tensor(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"t": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
    (lambda p: p.write_bytes(struct.pack("<Q", 200_000_000) + b"{}"), "exceeds"),
    (lambda p: assemble(p, one_tensor(), b"\0" * 8, header_len=10_000), "runs past the end"),
    (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}" + b""), "UTF-8"),
    (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"[1, 2]  "), "start with"),
    (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"{\"a\": 1 "), "not valid JSON"),
    (lambda p: p.write_bytes(struct.pack("<Q", 24) + b'{"t": {}, "t": {}}      '), "duplicate key"),
    (lambda p: assemble(p, {"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "needs 'dtype'"),
    (lambda p: assemble(p, one_tensor(dtype="F4"), b"\0" * 8), "unknown or unsupported dtype"),
    (lambda p: assemble(p, one_tensor(dtype="Q4_K"), b"\0" * 8), "unknown or unsupported dtype"),
    (lambda p: assemble(p, one_tensor(shape=(-2,)), b"\0" * 8), "non-negative integers"),
    (lambda p: assemble(p, one_tensor(offsets=(8, 0)), b"\0" * 8), "0 <= begin <= end"),
    (lambda p: assemble(p, one_tensor(shape=(3,)), b"\0" * 8), "needs 12 bytes"),
    (lambda p: assemble(p, one_tensor(), b"\0" * 5), "out of range"),  # truncated data
    (lambda p: assemble(p, one_tensor(offsets=(1000, 1008)), b"\0" * 8), "out of range"),
    (lambda p: assemble(p, {**one_tensor(), "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                        b"\0" * 12), "overlap"),
    (lambda p: assemble(p, one_tensor(offsets=(4, 12)), b"\0" * 12), "hole"),
    (lambda p: assemble(p, one_tensor(), b"\0" * 16), "follow the last tensor"),
    (lambda p: assemble(p, {"__metadata__": {"a": 1}, **one_tensor()}, b"\0" * 8), "__metadata__"),
])
def test_malformed_files_raise(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        mx.load_safetensors(path)


def test_truncated_file_from_our_writer(tmp_path, rng):
    (file,) = mx.save_safetensors(tmp_path / "t.safetensors",
                                  {"w": mx.quantize_weight(rng.standard_normal((64, 64)))})
    blob = file.read_bytes()
    file.write_bytes(blob[:-10])
    with pytest.raises(CheckpointError, match="out of range"):
        mx.load_safetensors(file)


def mx_entries(rng, n=32, k=64, *, scale_dtype="U8", scale_shape=None, value_shape=None, scale_bytes=None):
    codes, scales = random_mx_weight(rng, n, k)
    scale_shape = scale_shape or scales.shape
    itemsize = {"U8": 1, "F8_E8M0": 1, "BF16": 2, "F32": 4}[scale_dtype]
    scale_raw = scale_bytes if scale_bytes is not None else np.resize(
        scales, int(np.prod(scale_shape)) * itemsize).tobytes()
    return [("w", "F8_E4M3", value_shape or codes.shape, codes.tobytes()),
            ("w_scale", scale_dtype, scale_shape, scale_raw)]


@pytest.mark.parametrize("make_entries, message", [  # make_entries(rng) -> the file's entries
    (lambda rng: mx_entries(rng, scale_shape=(32, 1)), r"needs \[32, 2\]"),
    (lambda rng: mx_entries(rng, scale_shape=(2, 32)), r"needs \[32, 2\]"),
    (lambda rng: mx_entries(rng, scale_dtype="BF16", scale_shape=(32, 1)), "not an MXFP8 scale"),
    (lambda rng: mx_entries(rng, scale_dtype="F32", scale_shape=(16, 1)), "not an MXFP8 scale"),
    (lambda rng: mx_entries(rng, k=48, n=32, scale_shape=(32, 1)), "not a multiple of 32"),
    (lambda rng: mx_entries(rng, value_shape=(2, 16, 64), scale_shape=(2, 16, 2)), "only 2-D"),
    (lambda rng: mx_entries(rng)[:1], "has no 'w_scale'"),
    (lambda rng: mx_entries(rng, scale_bytes=b"\x7f" * 63 + b"\xff"), "NaN byte"),
    (lambda rng: [("w", "F8_E5M2", (32, 64), b"\0" * 2048)], "not an MXFP8"),
    (lambda rng: [("w_scale", "F8_E8M0", (32, 2), b"\0" * 64)], "not an MXFP8"),
    (lambda rng: [("w", "BF16", (32, 64), b"\0" * 4096), ("w_scale", "U8", (32, 2), b"\0" * 64)],
     "not F8_E4M3"),
])
def test_bad_mxfp8_tensors_raise(tmp_path, make_entries, message, rng):
    path = entries_to_file(tmp_path / "bad.safetensors", make_entries(rng))
    with pytest.raises(CheckpointError, match=message):
        mx.load_safetensors(path, backend="emulation")


def write_index(directory, weight_map):
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_index_errors(tmp_path):
    entries_to_file(tmp_path / "s1.safetensors", [("a", "F32", (2,), b"\0" * 8)])
    entries_to_file(tmp_path / "s2.safetensors", [("b", "F32", (2,), b"\0" * 8), ("a", "F32", (1,), b"\0" * 4)])
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s3.safetensors"})
    with pytest.raises(CheckpointError, match="missing"):
        mx.load_safetensors(tmp_path)
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(CheckpointError, match="does not match"):  # s2 also holds 'a'
        mx.load_safetensors(tmp_path)
    write_index(tmp_path, {"a": "../s1.safetensors"})
    with pytest.raises(CheckpointError, match="plain file name"):
        mx.load_safetensors(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="weight_map"):
        mx.load_safetensors(tmp_path)


def test_scale_in_another_shard_pairs(tmp_path, rng):
    codes, scales = random_mx_weight(rng, 32, 64)
    entries_to_file(tmp_path / "s1.safetensors", [("w", "F8_E4M3", codes.shape, codes.tobytes())])
    entries_to_file(tmp_path / "s2.safetensors", [("w_scale", "U8", scales.shape, scales.tobytes())])
    write_index(tmp_path, {"w": "s1.safetensors", "w_scale": "s2.safetensors"})
    weight = mx.load_safetensors(tmp_path, backend="emulation")["w"]
    np.testing.assert_array_equal(np.asarray(weight.unpack()[1]), scales)


def test_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no .safetensors"):
        mx.load_safetensors(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        mx.load_safetensors(tmp_path / "missing")
    for name in ("a.safetensors", "b.safetensors"):
        entries_to_file(tmp_path / name, [("x", "F32", (1,), b"\0" * 4)])
    with pytest.raises(CheckpointError, match="expected model.safetensors"):
        mx.load_safetensors(tmp_path)


def test_writer_errors(tmp_path):
    weight = mx.quantize_weight(jnp.ones((32, 32)))
    with pytest.raises(CheckpointError, match="two tensors"):
        mx.save_safetensors(tmp_path / "a.safetensors", {"w": weight, "w_scale": np.zeros(1)})
    with pytest.raises(CheckpointError, match="cannot store"):
        mx.save_safetensors(tmp_path / "a.safetensors", {"c": np.zeros(2, np.complex64)})
    with pytest.raises(CheckpointError, match="directory"):
        mx.save_safetensors(tmp_path / "a.safetensors", {"w": weight}, max_shard_bytes=10)
    assert not (tmp_path / "a.safetensors").exists()


def test_interop_with_the_safetensors_library(tmp_path, rng):
    """Files the safetensors library writes load here; files written here pass its validation
    (its numpy reader still cannot decode F8 tensors, huggingface/safetensors#682, so it reads
    U8/F32)."""
    st_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open
    import ml_dtypes

    codes, scales = random_mx_weight(rng, 32, 64)
    st_numpy.save_file({"w": codes.view(ml_dtypes.float8_e4m3fn), "w_scale": scales,
                        "b": np.arange(3, dtype=np.float32)}, str(tmp_path / "theirs.safetensors"))
    loaded = mx.load_safetensors(tmp_path / "theirs.safetensors", backend="emulation")
    np.testing.assert_array_equal(np.asarray(loaded["w"].unpack()[0]).view(np.uint8), codes)
    np.testing.assert_array_equal(np.asarray(loaded["b"]), [0, 1, 2])

    mx.save_safetensors(tmp_path / "ours.safetensors", {"w": loaded["w"], "f": jnp.arange(4.0)})
    with safe_open(str(tmp_path / "ours.safetensors"), framework="np") as f:
        assert sorted(f.keys()) == ["f", "w", "w_scale"]
        np.testing.assert_array_equal(f.get_tensor("w_scale"), scales)
        np.testing.assert_array_equal(f.get_tensor("f"), [0, 1, 2, 3])
