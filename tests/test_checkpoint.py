"""MXFP8 safetensors checkpoints: files assembled byte by byte from the published format, round
trips through our writer, every kind of malformed file failing loudly, and the checkpoints
llm-compressor, ModelOpt, torchao and Quark write (tests/fixtures) loading bit-exactly."""
import json
import re
import shutil
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp8 as mx
from jax_mxfp8 import checkpoint as ckpt, reference as jref
from jax_mxfp8.checkpoint import CheckpointError, read_safetensors

import helpers
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
    (lambda rng: mx_entries(rng, value_shape=(2, 2, 8, 64), scale_shape=(2, 2, 8, 2)), "only 2-D"),
    (lambda rng: mx_entries(rng, value_shape=(2, 16, 64), scale_shape=(2, 16, 1)), r"needs \[2, 16, 2\]"),
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


# ---- checkpoints written by the producers' own code (tests/fixtures, tools/make_checkpoint_fixtures.py)

FIXTURES = Path(__file__).parent / "fixtures"
LINEARS = [f"model.layers.{i}.{part}" for i in range(2) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
MXFP8_FIXTURES = ["llmcompressor_mxfp8", "llmcompressor_mxfp8a16", "modelopt_mxfp8",
                  "torchao_mxfp8", "quark_mxfp8"]
# The producers' own dequantization, which ours must equal bit for bit, is in expected.npz.


def dense(weight) -> np.ndarray:
    """float32 of an MxWeight (our dequantization) or a plain array."""
    if isinstance(weight, mx.MxWeight):
        return np.asarray(mx.dequantize(*weight.unpack(), dtype=jnp.float32))
    return np.asarray(weight, np.float32)


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def load(name):
        if name not in cache:
            cache[name] = mx.load_safetensors(FIXTURES / name, backend="emulation")
        return cache[name]
    return load


@pytest.mark.parametrize("name", MXFP8_FIXTURES)
def test_producer_weights_are_bit_exact(name, loaded):
    tensors = loaded(name)
    expected = np.load(FIXTURES / name / "expected.npz")
    weights = [k for k in expected.files if k.endswith(".weight")]
    assert len(weights) == 3
    for key in weights:
        assert isinstance(tensors[key], mx.MxWeight), key
        np.testing.assert_array_equal(dense(tensors[key]), expected[key], err_msg=f"{name}: {key}")
    # Every linear is an MxWeight under its module's .weight name; nothing else is left over.
    assert sorted(k for k, v in tensors.items() if isinstance(v, mx.MxWeight)) == sorted(
        f"{m}.weight" for m in LINEARS)
    assert not [k for k in tensors if "_scale" in k or "_qdata" in k or "zero_point" in k]
    # The unquantized tensors are the base model's, exactly.
    base = loaded("bf16")
    assert set(tensors) == set(base)
    for key, value in base.items():
        if not key.endswith(tuple(f"{m}.weight" for m in LINEARS)):
            assert tensors[key].dtype == value.dtype == jnp.bfloat16, key
            np.testing.assert_array_equal(np.asarray(tensors[key]), np.asarray(value), err_msg=key)


@pytest.mark.parametrize("name", MXFP8_FIXTURES)
def test_producer_weights_are_close_to_the_base_model(name, loaded):
    """Sanity of the fixtures themselves: quantized, and quantization error of MXFP8 size."""
    tensors, base = loaded(name), loaded("bf16")
    for module in LINEARS:
        got, want = dense(tensors[f"{module}.weight"]), dense(base[f"{module}.weight"])
        assert not np.array_equal(got, want)
        assert helpers.rel_fro(got, want) < 0.05, module


def test_raw_layouts_are_what_the_producers_write():
    """What the files hold before load_safetensors converts them (documents the formats)."""
    raw = read_safetensors(FIXTURES / "torchao_mxfp8")
    up = "model.layers.0.mlp.up_proj"
    assert raw[f"{up}._weight_qdata"].dtype == jnp.float8_e4m3fn and raw[f"{up}._weight_qdata"].shape == (192, 96)
    assert raw[f"{up}._weight_scale"].dtype == jnp.float8_e8m0fnu and raw[f"{up}._weight_scale"].shape == (64, 16)
    assert raw["model.layers.0.mlp.down_proj._weight_scale"].shape == (32, 32)  # [96, 192]: K/32 = 6 -> 8
    meta = ckpt.read_safetensors_metadata(FIXTURES / "torchao_mxfp8")
    info = json.loads(meta[f"{up}.weight"])
    assert info["_type"] == "MXTensor" and info["_data"]["is_swizzled_scales"] is True
    assert info["_data"]["elem_dtype"]["_data"] == "float8_e4m3fn" and info["_data"]["block_size"] == 32
    assert f"{up}.weight" in json.loads(meta["tensor_names"])

    raw = read_safetensors(FIXTURES / "quark_mxfp8")
    assert raw[f"{up}.weight"].dtype == jnp.bfloat16 and raw[f"{up}.weight_scale"].dtype == np.float32
    assert raw[f"{up}.weight_scale"].shape == (192, 3)
    for name in ("llmcompressor_mxfp8", "llmcompressor_mxfp8a16", "modelopt_mxfp8"):
        raw = read_safetensors(FIXTURES / name)
        assert raw[f"{up}.weight"].dtype == jnp.float8_e4m3fn and raw[f"{up}.weight_scale"].dtype == np.uint8


def test_torchao_scales_unswizzle_like_the_contract(loaded):
    """The swizzled bytes torchao wrote are exactly swizzle_scales() of the scales we load,
    zero padding included, for every weight shape of the fixture (row and column padding)."""
    raw = read_safetensors(FIXTURES / "torchao_mxfp8")
    tensors = loaded("torchao_mxfp8")
    for module in LINEARS:
        _, scales = tensors[f"{module}.weight"].unpack()
        swizzled = np.asarray(raw[f"{module}._weight_scale"]).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(np.asarray(mx.swizzle_scales(scales)), swizzled, err_msg=module)
        rows, cols = scales.shape
        np.testing.assert_array_equal(
            np.asarray(jref.unswizzle_scales(jnp.asarray(swizzled), rows, cols)), np.asarray(scales))


def test_producers_agree(loaded):
    """ModelOpt and torchao use the "ceil" rule (scale 2^ceil(log2(amax / 448))): the same bytes.
    llm-compressor rounds amax to a power of two first (floor(log2(round_pow2(amax))) - 8), so
    some blocks get the next scale up, with codes 8 lower: other bytes, the same values here.
    Quark's OCP "even" rule picks a smaller scale for some blocks (saturating them): other values."""
    ao, mo, llmc, quark = (loaded(n) for n in ("torchao_mxfp8", "modelopt_mxfp8", "llmcompressor_mxfp8",
                                               "quark_mxfp8"))
    scale_steps = {"llmc": set(), "quark": set()}
    for module in LINEARS:
        key = f"{module}.weight"
        for x, y in zip(ao[key].unpack(), mo[key].unpack()):
            np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
        np.testing.assert_array_equal(dense(llmc[key]), dense(ao[key]))
        base = np.asarray(ao[key].unpack()[1]).astype(int)
        scale_steps["llmc"] |= set(np.unique(np.asarray(llmc[key].unpack()[1]).astype(int) - base).tolist())
        scale_steps["quark"] |= set(np.unique(np.asarray(quark[key].unpack()[1]).astype(int) - base).tolist())
    assert scale_steps == {"llmc": {0, 1}, "quark": {-1, 0}}


@pytest.mark.parametrize("name", ["bf16", *MXFP8_FIXTURES])
def test_logits_match_the_producer(name, loaded):
    """Our loaded weights through the independent numpy Llama give the producer's logits. The
    reference computes weight-only (W8A16): for W8A8 producers (which also quantize activations)
    the bound is the size of activation quantization, for weight-only ones bf16 rounding."""
    reference = pytest.importorskip("jax_mxfp8.models.llama_reference")
    expected = np.load(FIXTURES / name / "expected.npz")
    if "logits" not in expected.files:
        pytest.skip(f"{name}: the fixture has no producer logits (see its README.txt)")
    config = json.loads((FIXTURES / name / "config.json").read_text())
    weights = {k: dense(v) for k, v in loaded(name).items()}
    logits = reference.forward(config, weights, expected["tokens"], dtype=np.float64)
    w8a8 = name not in ("bf16", "llmcompressor_mxfp8a16")
    assert helpers.rel_fro(logits, expected["logits"]) < (0.06 if w8a8 else 0.01)
    assert np.mean(logits.argmax(-1) == expected["logits"].argmax(-1)) >= 0.9


def test_quark_needs_its_config(tmp_path):
    """Without the Quark config, bf16 weights are never re-encoded (no guessing from values)."""
    plain = mx.load_safetensors(FIXTURES / "quark_mxfp8", backend="emulation", quant_config=None)
    up = "model.layers.0.mlp.up_proj"
    assert plain[f"{up}.weight"].dtype == jnp.bfloat16 and plain[f"{up}.weight_scale"].dtype == jnp.float32
    shutil.copy(FIXTURES / "quark_mxfp8" / "model.safetensors", tmp_path / "model.safetensors")
    assert not isinstance(mx.load_safetensors(tmp_path)[f"{up}.weight"], mx.MxWeight)


def test_quark_inexact_weight_is_refused(tmp_path):
    """One element nudged off the e4m3 grid: refused, naming the tensor and the element."""
    for file in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / "quark_mxfp8" / file, tmp_path / file)
    name = "model.layers.1.mlp.down_proj.weight"
    blob = bytearray((tmp_path / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    begin = json.loads(blob[8:8 + n])[name]["data_offsets"][0]
    at = 8 + n + begin + 2 * (5 * 192 + 7)  # element [5, 7] of the [96, 192] bf16 weight
    blob[at] ^= 1  # the lowest mantissa bit: a bf16 value e4m3 x scale cannot produce
    (tmp_path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=re.escape(f"'{name}'[5, 7]")):
        mx.load_safetensors(tmp_path, backend="emulation")


# ---- torchao layout, hand-assembled -------------------------------------------------------------

def torchao_meta(elem="float8_e4m3fn", block=32, swizzled=True, kind="MXTensor", names=("qdata", "scale")):
    dt = lambda d: {"_type": "torch.dtype", "_data": d}  # noqa: E731
    return json.dumps({"_type": kind, "_data": {
        "elem_dtype": dt(elem), "block_size": block, "orig_dtype": dt("bfloat16"),
        "kernel_preference": {"_type": "KernelPreference", "_data": "AUTO"},
        "act_quant_kwargs": None, "is_swizzled_scales": swizzled}, "_tensor_data_names": list(names)})


def torchao_file(path, rng, n=200, k=160, *, swizzled=True, meta=None, scale_shape=None,
                 scale_dtype="F8_E8M0", qdata_dtype="F8_E4M3", drop=(), names=None, scale_bytes=None):
    """A torchao-flattened file of one MXTensor 'lin.weight' [n, k] and a plain 'lin.bias'
    (meta: the JSON describing 'lin.weight'; None for a valid one, False for none)."""
    codes, scales = random_mx_weight(rng, n, k)
    blob = (np.asarray(jref.swizzle_scales(jnp.asarray(scales))) if swizzled else scales)
    shape = scale_shape or ((-(-n // 128) * 32, -(-k // 128) * 16) if swizzled else scales.shape)
    nbytes = int(np.prod(shape)) * {"F8_E8M0": 1, "U8": 1, "F32": 4}[scale_dtype]
    raw_scales = scale_bytes if scale_bytes is not None else np.resize(blob, nbytes).tobytes()
    bias = np.arange(n, dtype=np.float32)
    entries = [e for e in [("lin._weight_qdata", qdata_dtype, (n, k), codes.tobytes()),
                           ("lin._weight_scale", scale_dtype, shape, raw_scales),
                           ("lin.bias", "F32", (n,), bias.tobytes())] if e[0] not in drop]
    metadata = {"lin.weight": torchao_meta(swizzled=swizzled) if meta is None else meta,
                "lin.bias": json.dumps({"_type": "Tensor"}),
                "tensor_names": json.dumps(names or ["lin.weight", "lin.bias"])}
    entries_to_file(path, entries, metadata={k: v for k, v in metadata.items() if v is not False})
    return codes, scales


@pytest.mark.parametrize("swizzled", [True, False])
@pytest.mark.parametrize("n, k", [(200, 160), (32, 32), (128, 128), (300, 416)])
def test_torchao_mxtensor(tmp_path, rng, swizzled, n, k):
    codes, scales = torchao_file(tmp_path / "m.safetensors", rng, n, k, swizzled=swizzled)
    out = mx.load_safetensors(tmp_path / "m.safetensors", backend="emulation")
    assert set(out) == {"lin.weight", "lin.bias"}
    values, got = out["lin.weight"].unpack()
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8), codes)
    np.testing.assert_array_equal(np.asarray(got), scales)


@pytest.mark.parametrize("kwargs, message", [
    (dict(meta=torchao_meta(kind="Float8Tensor")), r"Float8Tensor \(FP8"),
    (dict(meta=torchao_meta(kind="NVFP4Tensor")), "NVFP4"),
    (dict(meta=torchao_meta(elem="float4_e2m1fn_x2")), r"float4_e2m1fn_x2.*\(MXFP4\)"),
    (dict(meta=torchao_meta(elem="float8_e5m2")), "E5M2"),
    (dict(meta=torchao_meta(block=16)), "block_size 16"),
    (dict(meta=torchao_meta(names=("qdata", "scale", "zero"))), "_tensor_data_names"),
    (dict(meta="{not json"), "not valid JSON"),
    (dict(meta=False), "metadata of 'lin.weight' is missing"),
    (dict(scale_shape=(200, 5)), r"swizzled .*\[64, 32\]"),
    (dict(swizzled=False, scale_shape=(64, 32)), r"needs \[200, 5\]"),
    (dict(scale_dtype="F32", scale_shape=(16, 32)), "scale is F8_E8M0"),
    (dict(qdata_dtype="U8"), "qdata is F8_E4M3"),
    (dict(drop=("lin._weight_scale",)), "'lin._weight_scale' is not in the checkpoint"),
    (dict(scale_bytes=b"\xff" * 2048), "NaN byte"),
    (dict(names=["lin.bias"]), "no MXTensor in the metadata"),
])
def test_bad_torchao_tensors_raise(tmp_path, rng, kwargs, message):
    torchao_file(tmp_path / "m.safetensors", rng, **kwargs)
    with pytest.raises(CheckpointError, match=message):
        mx.load_safetensors(tmp_path / "m.safetensors", backend="emulation")


def test_torchao_names_without_metadata_raise(tmp_path, rng):
    codes, scales = random_mx_weight(rng, 32, 64)
    entries_to_file(tmp_path / "m.safetensors", [
        ("lin._weight_qdata", "F8_E4M3", codes.shape, codes.tobytes()),
        ("lin._weight_scale", "F8_E8M0", (32, 16), b"\x7f" * 512)], metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="looks like a torchao flattened tensor"):
        mx.load_safetensors(tmp_path / "m.safetensors", backend="emulation")


def test_torchao_sharded_directory(tmp_path, loaded):
    """The torchao fixture split over two shards, each with its own metadata (as transformers
    writes shards): same tensors."""
    raw = read_safetensors(FIXTURES / "torchao_mxfp8")
    meta = ckpt.read_safetensors_metadata(FIXTURES / "torchao_mxfp8")
    names = json.loads(meta["tensor_names"])
    halves = [names[:len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, half in enumerate(halves):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        keys = [k for k in raw if any(k == t or k.startswith(t.rpartition(".")[0] + "._" + t.rpartition(".")[2] + "_")
                                      for t in half)]
        entries = [(k, ckpt.DTYPE_NAMES[raw[k].dtype], raw[k].shape, raw[k].tobytes()) for k in keys]
        entries_to_file(tmp_path / file, entries, metadata={
            **{t: meta[t] for t in half}, "tensor_names": json.dumps(half)})
        weight_map.update({k: file for k in keys})
    write_index(tmp_path, weight_map)
    out = mx.load_safetensors(tmp_path, backend="emulation", quant_config=None)
    want = loaded("torchao_mxfp8")
    assert set(out) == set(want)
    for key in want:
        np.testing.assert_array_equal(dense(out[key]), dense(want[key]), err_msg=key)


# ---- Quark fake-quantized (QDQ) layout, hand-assembled -------------------------------------------

QUARK_CONFIG = {"quant_method": "quark", "export": {"weight_format": "fake_quantized"},
                "global_quant_config": {"weight": {"dtype": "fp8_e4m3", "qscheme": "per_group",
                                                   "group_size": 32, "scale_format": "e8m0"},
                                        "input_tensors": None, "output_tensors": None}}


def quark_dir(tmp_path, rng, n=32, k=64, *, dtype="BF16", weight=None, scales=None, extra=(),
              scale_dtype="F32", config=QUARK_CONFIG):
    codes, scale_bytes = random_mx_weight(rng, n, k)
    if weight is None:
        weight = ref.dequantize(codes, scale_bytes, np.float64)
    if scales is None:
        scales = np.exp2(scale_bytes.astype(np.float64) - 127)
    store = {"BF16": bf16_bytes, "F16": lambda a: np.asarray(a, "<f2").tobytes(),
             "F32": lambda a: np.asarray(a, "<f4").tobytes()}
    entries_to_file(tmp_path / "model.safetensors", [
        ("lin.weight", dtype, np.shape(weight), store[dtype](np.asarray(weight, np.float32))),
        ("lin.weight_scale", scale_dtype, np.shape(scales), store[scale_dtype](np.asarray(scales, np.float32))),
        *extra])
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
    return codes, scale_bytes


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_quark_qdq_reencodes_exactly(tmp_path, rng, dtype):
    codes, scales = quark_dir(tmp_path, rng, 48, 96, dtype=dtype)
    weight = mx.load_safetensors(tmp_path, backend="emulation")["lin.weight"]
    values, got = weight.unpack()
    # -0.0 and +0.0 are both e4m3 values: compare what they mean, and the non-zero codes exactly
    nonzero = (codes & 0x7F) != 0
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8)[nonzero], codes[nonzero])
    np.testing.assert_array_equal(np.asarray(got), scales)


def test_quark_qdq_edge_scales(tmp_path, rng):
    """Scale 2^-127 (e8m0 byte 0, a float32 subnormal) and 2^127 (byte 254); fp16 weights;
    an all-zero zero point is accepted and dropped."""
    codes = np.full((32, 64), 0x38, np.uint8)  # 1.0
    scale_bytes = np.zeros((32, 2), np.uint8)
    scale_bytes[:, 1] = 254
    weight = ref.dequantize(codes, scale_bytes, np.float64)  # 2^-127 and 2^127 (fp32 only)
    quark_dir(tmp_path, rng, weight=weight, dtype="F32", scales=np.exp2(scale_bytes - 127.0),
              extra=[("lin.weight_zero_point", "I32", (32, 2), b"\0" * 256)])
    out = mx.load_safetensors(tmp_path, backend="emulation")
    assert set(out) == {"lin.weight"}
    np.testing.assert_array_equal(np.asarray(out["lin.weight"].unpack()[1]), scale_bytes)
    zeros = np.zeros((32, 64))  # an all-zero block may carry scale 0.0 (byte 0)
    zeros[:, 32:] = 1.0
    quark_dir(tmp_path, rng, weight=zeros, scales=np.tile([0.0, 2.0 ** -3], (32, 1)))
    out = mx.load_safetensors(tmp_path, backend="emulation")["lin.weight"]
    np.testing.assert_array_equal(np.asarray(out.unpack()[1]), np.tile([0, 124], (32, 1)))
    np.testing.assert_array_equal(dense(out), zeros)
    small = np.full((32, 64), 2.0 ** -20)  # 3 * 2^-20 is an fp16 subnormal: 48 x scale 2^-24
    quark_dir(tmp_path, rng, weight=small * 3, dtype="F16", scales=np.full((32, 2), 2.0 ** -24))
    np.testing.assert_array_equal(dense(mx.load_safetensors(tmp_path, backend="emulation")["lin.weight"]),
                                  np.asarray(small * 3, np.float16).astype(np.float32))


@pytest.mark.parametrize("make, message", [
    (lambda t, r: quark_dir(t, r, scales=np.full((32, 2), 0.75)), r"'lin.weight_scale'\[0, 0\] = 0.75 is not a power of two"),
    (lambda t, r: quark_dir(t, r, scales=np.full((32, 2), -0.5)), "not a power of two"),
    (lambda t, r: quark_dir(t, r, scales=np.full((32, 2), np.inf)), "not a power of two"),
    (lambda t, r: quark_dir(t, r, scales=np.full((32, 2), 2.0 ** -128)), "not a power of two"),
    (lambda t, r: quark_dir(t, r, weight=np.full((32, 64), 2.0 ** -127), scales=np.zeros((32, 2)), dtype="F32"),
     r"'lin.weight'\[0, 0\] = 5.877471754111438e-39 is not an e4m3 value times its block's scale 0.0"),
    (lambda t, r: quark_dir(t, r, weight=np.full((32, 64), 0.296875), scales=np.full((32, 2), 1.0)),
     r"'lin.weight'\[0, 0\] = 0.296875 is not an e4m3 value times its block's scale 1.0"),
    (lambda t, r: quark_dir(t, r, weight=np.full((32, 64), 1024.0), scales=np.full((32, 2), 1.0)),
     r"'lin.weight'\[0, 0\]"),
    (lambda t, r: quark_dir(t, r, weight=np.full((32, 64), np.nan), scales=np.full((32, 2), 1.0)), "nan"),
    (lambda t, r: quark_dir(t, r, scales=np.ones((32, 4))), r"needs \[32, 2\]"),
    (lambda t, r: quark_dir(t, r, weight=np.ones((32, 48)), scales=np.ones((32, 1))), "not a multiple of 32"),
    (lambda t, r: quark_dir(t, r, weight=np.ones((2, 16, 64)), scales=np.ones((2, 16, 2))), "only 2-D"),
    (lambda t, r: quark_dir(t, r, scale_dtype="F16", scales=np.full((32, 2), 3.0)), "not a power of two"),
    (lambda t, r: quark_dir(t, r, extra=[("lin.weight_zero_point", "I32", (32, 2), b"\1" * 256)]), "not all zero"),
])
def test_bad_quark_tensors_raise(tmp_path, rng, make, message):
    make(tmp_path, rng)
    with pytest.raises(CheckpointError, match=message):
        mx.load_safetensors(tmp_path, backend="emulation")


def test_quark_u8_scale_next_to_float_weight_raises(tmp_path, rng):
    quark_dir(tmp_path, rng)
    entries_to_file(tmp_path / "model.safetensors", [
        ("lin.weight", "BF16", (32, 64), b"\0" * 4096), ("lin.weight_scale", "U8", (32, 2), b"\x7f" * 64)])
    with pytest.raises(CheckpointError, match="Quark fake-quantized MXFP8 weight's scale is a float"):
        mx.load_safetensors(tmp_path, backend="emulation")


def test_load_refuses_a_non_mxfp8_config(tmp_path, rng):
    quark_dir(tmp_path, rng, config={**QUARK_CONFIG, "global_quant_config": {
        "weight": {"dtype": "fp4", "qscheme": "per_group", "group_size": 32, "scale_format": "e8m0"}}})
    with pytest.raises(CheckpointError, match="MXFP4"):
        mx.load_safetensors(tmp_path, backend="emulation")
    # quant_config=None reads the tensors as they are
    assert mx.load_safetensors(tmp_path, quant_config=None)["lin.weight"].dtype == jnp.bfloat16


# ---- prepared layouts ------------------------------------------------------------------------

def test_prepared_marlin_weights_round_trip_without_repacking(tmp_path, rng, monkeypatch):
    from jax_mxfp8.backends import marlin
    w = jnp.asarray(rng.standard_normal((128, 192)), jnp.float32)
    weight = mx.quantize_weight(w, backend="marlin")  # prepared on this host (offline)
    bias = jnp.asarray(rng.standard_normal(128), jnp.float32)
    mx.save_safetensors(tmp_path, {"layer.weight": weight, "layer.bias": bias}, prepared=True)
    names = set(read_safetensors(tmp_path))
    assert {"layer.weight.mx_qweight", "layer.weight.mx_scales", "layer.weight.mx_flags"} <= names
    monkeypatch.setattr(marlin, "pack_weight", lambda *a: pytest.fail("repacked"))
    back = mx.load_safetensors(tmp_path, backend="marlin")
    assert back["layer.weight"].backend is mx.Backend.MARLIN and back["layer.weight"].meta == weight.meta
    for key in weight.arrays:
        np.testing.assert_array_equal(np.asarray(back["layer.weight"].arrays[key]),
                                      np.asarray(weight.arrays[key]))
    monkeypatch.undo()
    as_emulation = mx.load_safetensors(tmp_path, backend="emulation")["layer.weight"]
    for got, want in zip(as_emulation.unpack(), weight.unpack()):  # converted exactly
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))


def test_prepared_layout_of_another_version_is_refused(tmp_path):
    weight = mx.quantize_weight(jnp.ones((64, 64), jnp.float32), backend="marlin")
    stale = mx.MxWeight(weight.arrays, weight.shape, weight.backend, ("marlin-v1", 64, 64))
    mx.save_safetensors(tmp_path, {"w": stale}, prepared=True)
    with pytest.raises(CheckpointError, match="layout.*marlin-v1.*reads.*marlin-v2"):
        mx.load_safetensors(tmp_path, backend="marlin")
    (tmp_path / "model.safetensors").unlink()
    mx.save_safetensors(tmp_path, {"x": jnp.ones(2)}, metadata={"jax_mxfp8.prepared.w": "{not json"})
    with pytest.raises(CheckpointError, match="does not describe a prepared MXFP8 weight"):
        mx.load_safetensors(tmp_path, backend="marlin")
