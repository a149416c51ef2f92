"""Mixture-of-experts checkpoints: vLLM / ModelOpt fused expert tensors and Hugging Face
per-expert names, written here with the `safetensors` package, load into stacked MxWeights
bit-exactly (stacked, gate/up fused, every backend's layout) and are written back in either
layout; malformed expert sets fail with CheckpointErrors naming the problem."""
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import jax_mxfp8 as mx
from jax_mxfp8 import moe_checkpoint
from jax_mxfp8.checkpoint import CheckpointError, read_safetensors

P = "model.layers.0.mlp"
E, H, I = 4, 64, 96  # experts, hidden, intermediate (multiples of 32)


def mx_pair(rng, *shape):
    """Random e4m3 values (no NaN codes) and e8m0 scale bytes in a sane range, [..., N, K]."""
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0
    scales = rng.integers(100, 140, size=(*shape[:-1], shape[-1] // 32), dtype=np.uint8)
    return codes.view(ml_dtypes.float8_e4m3fn), scales


def scale_as(scales, scale_dtype):
    return scales if scale_dtype == "U8" else scales.view(ml_dtypes.float8_e8m0fnu)


def same_bytes(got, want) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def assert_weight(weight, values, scales, backend="emulation") -> None:
    assert isinstance(weight, mx.MxWeight) and weight.backend is mx.Backend.parse(backend)
    assert weight.num_experts == values.shape[0] and weight.shape == values.shape
    got_values, got_scales = weight.unpack()
    same_bytes(got_values, values)
    same_bytes(got_scales, scales)


def vllm_tensors(rng, scale_dtype="U8"):
    w13, w13_s = mx_pair(rng, E, 2 * I, H)
    w2, w2_s = mx_pair(rng, E, H, I)
    router = rng.standard_normal((E, H)).astype(ml_dtypes.bfloat16)
    return {f"{P}.experts.w13_weight": w13, f"{P}.experts.w13_weight_scale": scale_as(w13_s, scale_dtype),
            f"{P}.experts.w2_weight": w2, f"{P}.experts.w2_weight_scale": scale_as(w2_s, scale_dtype),
            f"{P}.gate.weight": router}


def hf_tensors(rng, scale_dtype="U8", pieces=("gate_proj", "up_proj", "down_proj"), prefix=f"{P}.experts",
               bias=False):
    """Per-expert MXFP8 tensors {name: array} and the stacked truth {piece: (values, scales)}."""
    shapes = dict(zip(pieces, [(I, H), (I, H), (H, I)]))
    tensors, stacked = {}, {}
    for piece, shape in shapes.items():
        values, scales = mx_pair(rng, E, *shape)
        stacked[piece] = (values, scales)
        for e in range(E):
            tensors[f"{prefix}.{e}.{piece}.weight"] = np.ascontiguousarray(values[e])
            tensors[f"{prefix}.{e}.{piece}.weight_scale"] = scale_as(np.ascontiguousarray(scales[e]), scale_dtype)
            if bias:
                tensors[f"{prefix}.{e}.{piece}.bias"] = rng.standard_normal(shape[0]).astype(np.float32)
    return tensors, stacked


def write(tmp_path, tensors, name="model.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


# ---- the vLLM / ModelOpt fused layout -----------------------------------------------------------

@pytest.mark.parametrize("scale_dtype", ["U8", "F8_E8M0"])
@pytest.mark.parametrize("backend", ["emulation", "marlin"])
def test_vllm_fused_layout_loads_stacked(tmp_path, rng, scale_dtype, backend):
    tensors = vllm_tensors(rng, scale_dtype)
    path = write(tmp_path, tensors)
    loaded = mx.load_safetensors(path, backend=backend)
    assert set(loaded) == {f"{P}.experts.w13_weight", f"{P}.experts.w2_weight", f"{P}.gate.weight"}
    for name in ("w13_weight", "w2_weight"):
        values = tensors[f"{P}.experts.{name}"]
        assert_weight(loaded[f"{P}.experts.{name}"], values,
                      tensors[f"{P}.experts.{name}_scale"].view(np.uint8), backend)
    same_bytes(loaded[f"{P}.gate.weight"], tensors[f"{P}.gate.weight"])
    fused = mx.load_safetensors(path, backend=backend, experts="fuse")
    assert set(fused) == {f"{P}.experts.gate_up_proj.weight", f"{P}.experts.down_proj.weight",
                          f"{P}.gate.weight"}
    assert_weight(fused[f"{P}.experts.gate_up_proj.weight"], tensors[f"{P}.experts.w13_weight"],
                  tensors[f"{P}.experts.w13_weight_scale"].view(np.uint8), backend)
    # "stack" leaves already stacked tensors under their names
    assert set(mx.load_safetensors(path, backend=backend, experts="stack")) == set(loaded)


def test_vllm_layout_written_back_byte_for_byte(tmp_path, rng):
    tensors = vllm_tensors(rng)
    fused = mx.load_safetensors(write(tmp_path, tensors), backend="marlin", experts="fuse")
    (out,) = mx.save_safetensors(tmp_path / "out.safetensors", fused, experts="vllm")
    raw = read_safetensors(out)
    assert set(raw) == set(tensors)
    for name, want in tensors.items():
        same_bytes(raw[name], want)
    # as given: the layer's own names, stacked
    (plain,) = mx.save_safetensors(tmp_path / "plain.safetensors", fused)
    assert raw_shapes(plain) == {f"{P}.experts.gate_up_proj.weight": (E, 2 * I, H),
                                 f"{P}.experts.gate_up_proj.weight_scale": (E, 2 * I, H // 32),
                                 f"{P}.experts.down_proj.weight": (E, H, I),
                                 f"{P}.experts.down_proj.weight_scale": (E, H, I // 32),
                                 f"{P}.gate.weight": (E, H)}
    again = mx.load_safetensors(plain, backend="emulation")
    assert_weight(again[f"{P}.experts.down_proj.weight"], tensors[f"{P}.experts.w2_weight"],
                  tensors[f"{P}.experts.w2_weight_scale"])


def raw_shapes(path):
    return {name: a.shape for name, a in read_safetensors(path).items()}


def test_vllm_layout_split_per_expert(tmp_path, rng):
    tensors = vllm_tensors(rng)
    loaded = mx.load_safetensors(write(tmp_path, tensors), backend="emulation")
    (out,) = mx.save_safetensors(tmp_path / "hf.safetensors", loaded, experts="per_expert")
    raw = read_safetensors(out)
    w13, w13_s = tensors[f"{P}.experts.w13_weight"], tensors[f"{P}.experts.w13_weight_scale"]
    for e in range(E):
        same_bytes(raw[f"{P}.experts.{e}.gate_proj.weight"], w13[e, :I])
        same_bytes(raw[f"{P}.experts.{e}.up_proj.weight_scale"], w13_s[e, I:])
        same_bytes(raw[f"{P}.experts.{e}.down_proj.weight"], tensors[f"{P}.experts.w2_weight"][e])
    assert len(raw) == 6 * E + 1


# ---- Hugging Face per-expert names -----------------------------------------------------------------

@pytest.mark.parametrize("scale_dtype", ["U8", "F8_E8M0"])
@pytest.mark.parametrize("backend", ["emulation", "marlin"])
def test_per_expert_names_stack_and_fuse(tmp_path, rng, scale_dtype, backend):
    tensors, truth = hf_tensors(rng, scale_dtype, bias=True)
    path = write(tmp_path, tensors)
    as_stored = mx.load_safetensors(path, backend=backend)  # default: one dense MxWeight per expert
    assert as_stored[f"{P}.experts.3.up_proj.weight"].shape == (I, H)
    stacked = mx.load_safetensors(path, backend=backend, experts="stack")
    assert set(stacked) == {f"{P}.experts.{p}.{s}" for p in truth for s in ("weight", "bias")}
    for piece, (values, scales) in truth.items():
        assert_weight(stacked[f"{P}.experts.{piece}.weight"], values, scales, backend)
        np.testing.assert_array_equal(
            np.asarray(stacked[f"{P}.experts.{piece}.bias"]),
            np.stack([tensors[f"{P}.experts.{e}.{piece}.bias"] for e in range(E)]))
    fused = mx.load_safetensors(path, backend=backend, experts="fuse")
    assert set(fused) == {f"{P}.experts.{p}.{s}" for p in ("gate_up_proj", "down_proj")
                          for s in ("weight", "bias")}
    gate, up = truth["gate_proj"], truth["up_proj"]
    assert_weight(fused[f"{P}.experts.gate_up_proj.weight"], np.concatenate([gate[0], up[0]], 1),
                  np.concatenate([gate[1], up[1]], 1), backend)
    assert fused[f"{P}.experts.gate_up_proj.bias"].shape == (E, 2 * I)
    np.testing.assert_array_equal(np.asarray(fused[f"{P}.experts.gate_up_proj.bias"])[1, I:],
                                  tensors[f"{P}.experts.1.up_proj.bias"])


def test_per_expert_round_trip_byte_for_byte(tmp_path, rng):
    tensors, _ = hf_tensors(rng, bias=True)
    fused = mx.load_safetensors(write(tmp_path, tensors), backend="marlin", experts="fuse")
    files = mx.save_safetensors(tmp_path / "out", fused, experts="per_expert", max_shard_bytes=40_000)
    assert len(files) > 2  # shards + index: the experts span several files
    raw = read_safetensors(tmp_path / "out")
    assert set(raw) == set(tensors)
    for name, want in tensors.items():
        same_bytes(raw[name], want)
    again = mx.load_safetensors(tmp_path / "out", backend="emulation", experts="fuse")
    for name, weight in fused.items():
        if isinstance(weight, mx.MxWeight):
            assert_weight(again[name], *(np.asarray(a) for a in weight.unpack()))


def test_mixtral_names_fuse_to_the_layers_names(tmp_path, rng):
    prefix = "model.layers.1.block_sparse_moe.experts"
    tensors, truth = hf_tensors(rng, pieces=("w1", "w3", "w2"), prefix=prefix)
    fused = mx.load_safetensors(write(tmp_path, tensors), backend="emulation", experts="fuse")
    assert set(fused) == {f"{prefix}.gate_up_proj.weight", f"{prefix}.down_proj.weight"}
    assert_weight(fused[f"{prefix}.down_proj.weight"], *truth["w2"])
    assert_weight(fused[f"{prefix}.gate_up_proj.weight"], np.concatenate([truth["w1"][0], truth["w3"][0]], 1),
                  np.concatenate([truth["w1"][1], truth["w3"][1]], 1))
    # the stacked Mixtral names keep their names per expert
    stacked = mx.load_safetensors(write(tmp_path, tensors, "m.safetensors"), backend="emulation", experts="stack")
    (out,) = mx.save_safetensors(tmp_path / "back.safetensors", stacked, experts="per_expert")
    assert set(read_safetensors(out)) == set(tensors)


def test_float_experts_stack_and_fuse(tmp_path, rng):
    """An unquantized (bf16) MoE checkpoint: per-expert arrays stack into [E, N, K] arrays."""
    tensors = {f"{P}.experts.{e}.{p}.weight": rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
               for e in range(E) for p, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))}
    fused = mx.load_safetensors(write(tmp_path, tensors), experts="fuse")
    gate_up = np.asarray(fused[f"{P}.experts.gate_up_proj.weight"])
    assert gate_up.shape == (E, 2 * I, H) and gate_up.dtype == ml_dtypes.bfloat16
    same_bytes(gate_up[2, :I], tensors[f"{P}.experts.2.gate_proj.weight"])
    same_bytes(gate_up[2, I:], tensors[f"{P}.experts.2.up_proj.weight"])
    (out,) = mx.save_safetensors(tmp_path / "back.safetensors", fused, experts="per_expert")
    raw = read_safetensors(out)
    assert set(raw) == set(tensors)
    for name, want in tensors.items():
        same_bytes(raw[name], want)


def test_sharded_per_expert_checkpoint(tmp_path, rng):
    """Experts spread over the shards of an index load as one stacked weight."""
    tensors, truth = hf_tensors(rng)
    directory = tmp_path / "ck"
    mx.save_safetensors(directory, mx.load_safetensors(write(tmp_path, tensors), backend="emulation"),
                        max_shard_bytes=20_000)
    assert (directory / "model.safetensors.index.json").is_file()
    stacked = mx.load_safetensors(directory, backend="emulation", experts="stack")
    for piece, pair in truth.items():
        assert_weight(stacked[f"{P}.experts.{piece}.weight"], *pair)


# ---- malformed expert sets ---------------------------------------------------------------------------

def drop(tensors, *names):
    return {k: v for k, v in tensors.items() if k not in names}


def renamed(tensors, old, new):
    return {new if k == old else k: v for k, v in tensors.items()}


def _bf16_expert(t, rng):
    t = drop(t, f"{P}.experts.2.gate_proj.weight_scale")
    t[f"{P}.experts.2.gate_proj.weight"] = rng.standard_normal((I, H)).astype(ml_dtypes.bfloat16)
    return t


def _wider_expert(t, rng):
    values, scales = mx_pair(rng, I + 32, H)
    t[f"{P}.experts.1.gate_proj.weight"], t[f"{P}.experts.1.gate_proj.weight_scale"] = values, scales
    return t


def _bias_dtypes(t, rng):
    for e in range(E):
        t[f"{P}.experts.{e}.down_proj.bias"] = np.zeros(H, np.float32 if e else ml_dtypes.bfloat16)
    return t


@pytest.mark.parametrize("mutate, experts, message", [
    (lambda t, r: drop(t, *(n for n in t if ".experts.2." in n)), "stack",
     r"expert 2 has no '(gate|up|down)_proj.weight' .*incomplete"),
    (lambda t, r: drop(t, *(n for n in t if ".experts.1." in n or ".experts.2." in n)), "fuse",
     r"experts 1, 2 have no .* while expert 3 has one"),
    (lambda t, r: drop(t, f"{P}.experts.3.down_proj.weight", f"{P}.experts.3.down_proj.weight_scale"),
     "fuse", r"expert 3 has no 'down_proj.weight'"),
    (lambda t, r: drop(t, f"{P}.experts.2.up_proj.weight_scale"), "stack",
     r"'model.layers.0.mlp.experts.2.up_proj.weight' \(expert 2 of .*\) has no .*weight_scale"),
    (_wider_expert, "stack", r"expert 1's 'gate_proj.weight' is MXFP8 \[128, 64\].* expert 0's is MXFP8 \[96, 64\]"),
    (_bf16_expert, "fuse", r"expert 2's 'gate_proj.weight' is bfloat16 \[96, 64\] but expert 0's is MXFP8"),
    (_bias_dtypes, "stack", r"expert 1's 'down_proj.bias' is float32 \[64\] but expert 0's is bfloat16"),
    (lambda t, r: {**t, f"{P}.experts.01.gate_proj.weight": t[f"{P}.experts.1.gate_proj.weight"],
                   f"{P}.experts.01.gate_proj.weight_scale": t[f"{P}.experts.1.gate_proj.weight_scale"]},
     "stack", r"expert 1 of .* is stored twice"),
    (lambda t, r: {**t, f"{P}.experts.gate_proj.weight": t[f"{P}.experts.1.gate_proj.weight"][None],
                   f"{P}.experts.gate_proj.weight_scale": t[f"{P}.experts.1.gate_proj.weight_scale"][None]},
     "stack", r"stores 'gate_proj.weight' twice"),
    (lambda t, r: {**t, **{k: v for k, v in vllm_tensors(r).items() if "w13" in k}}, "fuse",
     r"already holds: the experts are stored in two layouts"),
    (lambda t, r: drop(t, *(n for n in t if "up_proj" in n)), "fuse", r"has no up_proj \(w3\) partner"),
])
def test_malformed_expert_sets(tmp_path, rng, mutate, experts, message):
    tensors, _ = hf_tensors(rng)
    path = write(tmp_path, mutate(tensors, rng))
    with pytest.raises(CheckpointError, match=message):
        mx.load_safetensors(path, backend="emulation", experts=experts)


def test_gate_and_up_of_different_shapes_do_not_fuse(tmp_path, rng):
    tensors, _ = hf_tensors(rng)
    for e in range(E):
        tensors[f"{P}.experts.{e}.up_proj.weight"], tensors[f"{P}.experts.{e}.up_proj.weight_scale"] = \
            mx_pair(rng, I + 32, H)
    path = write(tmp_path, tensors)
    with pytest.raises(CheckpointError, match="a fused gate/up needs both the same"):
        mx.load_safetensors(path, backend="emulation", experts="fuse")
    assert mx.load_safetensors(path, backend="emulation", experts="stack")[
        f"{P}.experts.up_proj.weight"].shape == (E, I + 32, H)


def test_missing_expert_is_fine_as_stored(tmp_path, rng):
    """experts=None reads whatever experts are there, one by one."""
    tensors, _ = hf_tensors(rng)
    path = write(tmp_path, drop(tensors, *(n for n in tensors if ".experts.2." in n)))
    loaded = mx.load_safetensors(path, backend="emulation")
    assert f"{P}.experts.3.gate_proj.weight" in loaded and len(loaded) == 3 * (E - 1)


def test_writer_errors(tmp_path, rng):
    dense = mx.quantize_weight(rng.standard_normal((I, H)).astype(np.float32), backend="emulation")
    with pytest.raises(CheckpointError, match="one MXFP8 weight .* under an experts module"):
        mx.save_safetensors(tmp_path / "a.safetensors", {f"{P}.experts.gate_proj.weight": dense},
                            experts="per_expert")
    stacked = mx.quantize_weight(rng.standard_normal((2, 64, H)).astype(np.float32), backend="emulation")
    with pytest.raises(CheckpointError, match="already holds"):
        mx.save_safetensors(tmp_path / "b.safetensors",
                            {f"{P}.experts.down_proj.weight": stacked,
                             f"{P}.experts.0.down_proj.weight": dense}, experts="per_expert")
    with pytest.raises(CheckpointError, match="stacks 3 experts but"):
        mx.save_safetensors(tmp_path / "c.safetensors",
                            {f"{P}.experts.down_proj.weight": stacked,
                             f"{P}.experts.down_proj.bias": np.zeros((3, 64), np.float32)},
                            experts="vllm")
    for where, call in (("load_safetensors", lambda: mx.load_safetensors(tmp_path, experts="hf")),
                        ("save_safetensors", lambda: mx.save_safetensors(tmp_path / "d", {}, experts="stack"))):
        with pytest.raises(ValueError, match=f"{where}: experts='.*'; expected one of"):
            call()


def test_odd_fused_rows_cannot_split(tmp_path, rng):
    gate_up = np.zeros((2, 3, 32), np.float32)  # 3 rows: no gate/up halves
    with pytest.raises(CheckpointError, match="has 3 rows"):
        mx.save_safetensors(tmp_path / "a.safetensors", {f"{P}.experts.gate_up_proj.weight": gate_up},
                            experts="per_expert")


def test_names_the_module_recognises():
    assert moe_checkpoint.expert_of(f"{P}.experts.12.up_proj.weight") == (f"{P}.experts", 12)
    assert moe_checkpoint.expert_of("model.layers.0.mlp.shared_experts.up_proj.weight") is None
    assert moe_checkpoint.expert_of("experts.0.w1.weight") == ("experts", 0)
    assert moe_checkpoint.is_expert_tensor(f"{P}.experts.w13_weight")
    assert not moe_checkpoint.is_expert_tensor(f"{P}.gate.weight")
    assert not moe_checkpoint.is_expert_tensor("model.layers.0.mlp.shared_experts.up_proj.weight")


def test_prepared_per_expert_weights_stack(tmp_path, rng):
    """Per-expert weights saved in a backend's prepared layout join their stacked sets."""
    tensors, truth = hf_tensors(rng)
    per_expert = mx.load_safetensors(write(tmp_path, tensors), backend="marlin")
    mx.save_safetensors(tmp_path / "prepared", per_expert, prepared=True)
    assert any(".mx_" in name for name in read_safetensors(tmp_path / "prepared"))
    fused = mx.load_safetensors(tmp_path / "prepared", backend="marlin", experts="fuse")
    gate, up = truth["gate_proj"], truth["up_proj"]
    assert_weight(fused[f"{P}.experts.gate_up_proj.weight"], np.concatenate([gate[0], up[0]], 1),
                  np.concatenate([gate[1], up[1]], 1), "marlin")
    assert_weight(fused[f"{P}.experts.down_proj.weight"], *truth["down_proj"], "marlin")


def test_layers_of_both_layouts_in_one_checkpoint(tmp_path, rng):
    """Each experts module is converted on its own: layer 0 per expert, layer 1 fused by vLLM."""
    per_expert, truth = hf_tensors(rng)
    fused = {k.replace("layers.0", "layers.1"): v for k, v in vllm_tensors(rng).items()}
    norm = {"model.norm.weight": rng.standard_normal(H).astype(np.float32)}
    loaded = mx.load_safetensors(write(tmp_path, {**per_expert, **fused, **norm}), backend="emulation",
                                 experts="fuse")
    layer1 = "model.layers.1.mlp"
    assert set(loaded) == {f"{lp}.experts.{p}.weight" for lp in (P, layer1) for p in ("gate_up_proj", "down_proj")
                           } | {f"{layer1}.gate.weight", "model.norm.weight"}
    assert_weight(loaded[f"{P}.experts.down_proj.weight"], *truth["down_proj"])
    assert_weight(loaded[f"{layer1}.experts.gate_up_proj.weight"], fused[f"{layer1}.experts.w13_weight"],
                  fused[f"{layer1}.experts.w13_weight_scale"])
    groups = moe_checkpoint.by_experts_module(loaded)
    assert [sorted(g) for g in groups] == [
        sorted(n for n in loaded if n.startswith(f"{P}.experts.")),
        sorted(n for n in loaded if n.startswith(f"{layer1}.experts.")),
        sorted([f"{layer1}.gate.weight", "model.norm.weight"])]
