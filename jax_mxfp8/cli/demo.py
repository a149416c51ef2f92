"""The main job: quantize a small decoder-style Flax model to MXFP8 and run jitted inference.

Builds a random Llama-style decoder (or loads one with --checkpoint DIR), converts its
nnx.Linear layers with jax_mxfp8.flax.quantize_model (an MXFP8 checkpoint is loaded as it is,
W8A8 or weight-only as its quantization config says), with q/k/v and gate/up fused into one
GEMM each, runs both models under jit and prints the backend, the logits' errors, weight
memory, and time per step. On a GPU (a fused-kernel backend) it then times what MXFP8 weights
are for: the decode step of a Llama-3-8B-shaped slice, bf16 vs MXFP8 (the tiny demo model's
own step times kernel launches, and says so).

The logits are compared with the numpy reference of models/llama_reference.py (its own
config.json parsing and the Hugging Face formulas, float32) run on the same weights: for
--checkpoint DIR the checkpoint's own tensors, MXFP8 ones dequantized; for the random model
its bf16 weights; and with the bf16 model. The check (exit 1 outside the tolerance) is the
MXFP8 model against the reference for a checkpoint, against the bf16 model for the random
model, and always the Flax model in float32 against the reference (rounding apart they agree:
a config the decoder misreads fails there).
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_mxfp8 as mx
from jax_mxfp8 import _ffi, timing
from jax_mxfp8.backends import ensure_available, get_backend_impl
from jax_mxfp8.bench import model as bench_model
from jax_mxfp8.models import llama_reference, tp_mlp


def _flax():
    """The Flax pieces of the demo (flax is an optional dependency: the `flax` extra)."""
    try:
        from flax import nnx

        from jax_mxfp8 import flax as mx_flax
        from jax_mxfp8.models import decoder
    except ModuleNotFoundError as err:
        if err.name != "flax":
            raise
        raise SystemExit("error: the demo's model is a Flax model; install flax "
                         "(pip install 'flax>=0.12.8', a dependency of jax_mxfp8) or run `python -m jax_mxfp8 demo --tp N`"
                         ) from None
    return nnx, mx_flax, decoder


def add_arguments(parser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", metavar="DIR",
                       help="load a Llama-style Hugging Face directory (config.json + safetensors, "
                            "bf16 or MXFP8) instead of building a random model")
    model.add_argument("--layers", type=int, default=4, help="decoder layers (random model)")
    model.add_argument("--hidden", type=int, default=512, help="model width, a multiple of 32")
    model.add_argument("--intermediate", type=int, default=1408, help="MLP width, a multiple of 32")
    model.add_argument("--heads", type=int, default=8, help="attention heads")
    model.add_argument("--kv-heads", type=int, default=4, help="key/value heads (grouped-query)")
    model.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    run = parser.add_argument_group("run")
    run.add_argument("--batch", type=int, default=4, help="sequences per step")
    run.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    run.add_argument("--backend", default=None, help="emulation|marlin|cutlass (default: auto)")
    run.add_argument("--w8a8", action="store_true",
                     help="quantize activations too (default: what the checkpoint's quantization "
                          "config says; else the backend's own math)")
    run.add_argument("--keep-lm-head", action="store_true",
                     help="leave lm_head in bf16 (as ModelOpt exports do)")
    run.add_argument("--repeats", type=int, default=4,
                     help="R distinct inputs unrolled in one jit for the device-time measurement")
    run.add_argument("--no-speed", dest="speed", action="store_false",
                     help="on a GPU, skip the decode benchmark of a Llama-3-8B-shaped slice")
    run.add_argument("--save", metavar="DIR", help="write the quantized model as an MXFP8 checkpoint")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-rel-error", type=float, default=0.15,
                     help="fail if the logits' relative error exceeds this")
    run.add_argument("--min-cosine", type=float, default=0.99,
                     help="fail if the logits' cosine similarity is below this")
    run.add_argument("--max-model-error", type=float, default=1e-3,
                     help="fail if the Flax model in float32 differs from the numpy reference on "
                          "the same weights by more than this relative error (rounding: ~1e-6)")
    run.add_argument("--tp", type=int, default=0, metavar="N",
                     help="run the tensor-parallel MXFP8 MLP on a mesh of N devices instead "
                          "(jax_mxfp8/models/tp_mlp.py; on CPU, N fake devices)")
    moe = parser.add_argument_group("mixture of experts")
    moe.add_argument("--moe", action="store_true",
                     help="run one random MoE layer instead (jax_mxfp8/flax/moe.py: router, top-k, "
                          "grouped GEMMs over --hidden / --intermediate), bf16 vs MXFP8")
    moe.add_argument("--experts", type=int, default=8, help="experts of the --moe layer")
    moe.add_argument("--top-k", type=int, default=2, help="experts per token of the --moe layer")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _activation_math(args, backend, impl, quant):
    """(quantize_activations, why) for the MXFP8 model: --w8a8, else the checkpoint's
    quantization config, else the backend's own math; what the backend cannot compute is
    replaced by what it can, and `why` says so."""
    if args.w8a8:
        return True, "--w8a8"
    if quant is None:
        source = "bf16 checkpoint, no quantization config: " if args.checkpoint else ""
        return impl.default_quantize_activations, f"{source}backend {backend.value}'s own math"
    want = bool(quant.quantize_activations)
    why = (f"the checkpoint's {quant.producer} quantization config: "
           f"{'weights and activations' if want else 'weight-only'}")
    if want and not impl.supports_w8a8:
        return False, f"{why}, but backend {backend.value} computes W8A16 only"
    if not want and not impl.supports_w8a16:
        return True, f"{why}, but backend {backend.value} computes W8A8 only"
    return want, why


def _build_models(args, backend, quantize_activations):
    """(bf16 model, MXFP8 model, description, n quantized layers, seconds). The bf16 model of
    an MXFP8 checkpoint holds its weights dequantized (exactly) to bf16."""
    nnx, mx_flax, decoder = _flax()
    quantize_model = mx_flax.quantize_model
    CausalLM, DecoderConfig, load_pretrained = (decoder.CausalLM, decoder.DecoderConfig,
                                                decoder.load_pretrained)

    qa = quantize_activations
    keep = (lambda path, module: path != "lm_head") if args.keep_lm_head else None
    if args.checkpoint:
        bf16, config, n_mxfp8 = load_pretrained(args.checkpoint, backend=backend,
                                                dequantize_weights=True)
        if n_mxfp8:  # already MXFP8: the bf16 model is the same weights dequantized
            start = time.perf_counter()
            model, _, _ = load_pretrained(args.checkpoint, backend=backend, quantize_activations=qa,
                                          fuse=True)
            return (bf16, model, f"MXFP8 checkpoint {args.checkpoint}", n_mxfp8,
                    time.perf_counter() - start)
        source = f"bf16 checkpoint {args.checkpoint}"
    else:
        config = DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
        bf16 = nnx.jit(lambda: CausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(args.seed)))()
        source = "random Llama-style decoder"
    start = time.perf_counter()
    model = quantize_model(nnx.clone(bf16), predicate=keep, backend=backend,
                           quantize_activations=qa, fuse=decoder.PROJECTIONS)
    return bf16, model, source, _mxfp8_linears(model), time.perf_counter() - start


def _mxfp8_layers(model) -> list:
    """The Mxfp8Linear and Mxfp8FusedLinear modules of a model (one GEMM each)."""
    nnx, mx_flax, _ = _flax()
    return [node for _, node in nnx.iter_graph(model)
            if isinstance(node, (mx_flax.Mxfp8Linear, mx_flax.nnx.Mxfp8FusedLinear))]


def _mxfp8_linears(model) -> int:
    """The MXFP8 linears of a model, each piece of a fused projection counted."""
    _, mx_flax, _ = _flax()
    return sum(len(node.names) if isinstance(node, mx_flax.nnx.Mxfp8FusedLinear) else 1
               for node in _mxfp8_layers(model))


class _Dequantized(Mapping):
    """A checkpoint's tensors as float32 numpy, MXFP8 ones dequantized exactly, one on access."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __getitem__(self, name):
        value = self.tensors[name]
        if isinstance(value, mx.MxWeight):
            return np.asarray(mx.dequantize(*value.unpack(), dtype=jnp.float32))
        return np.asarray(value)

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


def _reference_inputs(args, bf16_model):
    """(config.json dict, weights by HF name, what they are) for the numpy reference: the
    checkpoint's own config.json and tensors (read here, not through the decoder's loader), or
    the random model's config and bf16 weights."""
    _, mx_flax, _ = _flax()
    if args.checkpoint:
        tensors = mx.load_safetensors(args.checkpoint, backend=mx.Backend.EMULATION)
        mxfp8 = any(isinstance(v, mx.MxWeight) for v in tensors.values())
        return (json.loads((Path(args.checkpoint) / "config.json").read_text()), _Dequantized(tensors),
                "the checkpoint's own weights" + (", MXFP8 ones dequantized" if mxfp8 else ""))
    weights = {k: np.asarray(v) for k, v in mx_flax.state_dict(bf16_model).items()}
    return bf16_model.config.to_hf(), weights, "the bf16 model's weights"


def _float32_logits(bf16_model, tokens) -> np.ndarray:
    """The Flax model's logits with its weights in float32 and full-precision float32 dots (no
    TF32 on a GPU): what the float32 numpy reference computes, up to rounding."""
    nnx, mx_flax, decoder = _flax()
    config = bf16_model.config
    model = nnx.eval_shape(lambda: decoder.CausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    model = mx_flax.load_state_dict(model, mx_flax.state_dict(bf16_model))
    with jax.default_matmul_precision("highest"):
        return np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens), np.float64)


def _compare(got, want) -> tuple[float, float, float]:
    """(relative error, cosine similarity, top-1 agreement) of logits."""
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    cos = float(np.vdot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)))
    return rel, cos, float(np.mean(got.argmax(-1) == want.argmax(-1)))


def _weight_bytes(model):
    """(bytes of the MXFP8 layers' weights, what they took in bf16, whole model's param bytes)."""
    nnx, _, _ = _flax()
    mx_bytes = bf16_bytes = 0
    for node in _mxfp8_layers(model):
        weight = node.weight.get_value()
        mx_bytes += weight.nbytes
        bf16_bytes += weight.shape[0] * weight.shape[1] * 2
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return mx_bytes, bf16_bytes, total


class UnrolledForward:
    """A jitted forward over several token sets (its R = 1 output is the accuracy check) and its
    device time per step (jax_mxfp8.timing.device_time_us)."""

    def __init__(self, forward, state):
        self.forward, self.state = forward, state
        self.jitted = jax.jit(lambda state, sets: [forward(state, tokens) for tokens in sets])

    def __call__(self, token_sets):
        return self.jitted(self.state, list(token_sets))

    def time_per_step(self, token_sets, repeats: int = 5) -> float:
        sets = [(self.state, tokens) for tokens in token_sets]
        return max(timing.device_time_us(self.forward, sets, repeats), 0.0) / 1e6


def main(args) -> int:
    if getattr(args, "tp", 0):  # tensor parallel: the MLP example of models/tp_mlp.py
        return tp_mlp.main(args)
    if getattr(args, "moe", False):  # one mixture-of-experts layer
        return moe_main(args)
    wall = time.perf_counter()
    nnx, _, decoder = _flax()

    try:
        backend = ensure_available(mx.Backend.parse(args.backend)) if args.backend else mx.select_backend()
    except ValueError as err:
        print(f"error: {err}")
        return 2
    impl = get_backend_impl(backend)
    if args.w8a8 and not impl.supports_w8a8:
        print(f"error: backend {backend.value} computes W8A16 only; drop --w8a8 or use --backend emulation")
        return 2
    quant = None
    if args.checkpoint:
        decoder.read_config(args.checkpoint)  # FileNotFoundError naming config.json
        quant = decoder.read_quant_config(args.checkpoint)
    qa, why = _activation_math(args, backend, impl, quant)
    math = "W8A8" if qa else "W8A16"
    device = jax.devices()[0]
    print(f"jax_mxfp8 {mx.__version__} | jax {jax.__version__} | device {device.platform} "
          f"({device.device_kind}) | backend {backend.value} ({math})")
    print(f"math: {math} ({'activations quantized too' if qa else 'bf16 activations'}): {why}")
    if _ffi.cpu_module() is None and device.platform == "gpu":  # no kernels: say why, once
        print(f"note: no jax_mxfp8 kernels here: {_ffi.cuda_module_problem()}")

    bf16, model, source, n_layers, quantize_s = _build_models(args, backend, qa)
    c = bf16.config
    print(f"model: {source}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP "
          f"{c.intermediate_size}, {c.num_attention_heads} heads ({c.num_key_value_heads} kv, "
          f"head_dim {c.head_dim}), vocab {c.vocab_size}, rope_theta {c.rope_theta:g}"
          f"{' (llama3 scaling)' if c.rope_scaling else ''}"
          f"{', tied embeddings' if c.tie_word_embeddings else ''}; {n_layers} linear layers in "
          f"MXFP8 ({quantize_s:.1f} s), {len(_mxfp8_layers(model))} GEMMs with q/k/v and gate/up "
          f"fused")
    if quant is not None:
        print(f"quantization config: {quant.producer}, group size {quant.group_size}, ignore "
              f"{list(quant.ignore) or 'nothing'}")

    keys = jax.random.split(jax.random.key(args.seed + 1), max(args.repeats, 2))
    token_sets = [jax.random.randint(k, (args.batch, args.seq), 0, c.vocab_size) for k in keys]

    def unrolled(module):
        graphdef, state = nnx.split(module)
        return UnrolledForward(lambda s, t: nnx.merge(graphdef, s)(t).astype(jnp.float32), state)

    bf16_forward, mx_forward = unrolled(bf16), unrolled(model)
    from_bf16 = np.asarray(bf16_forward(token_sets[:1])[0], np.float64)
    got = np.asarray(mx_forward(token_sets[:1])[0], np.float64)
    # The independent numpy reference (models/llama_reference.py: its own config.json parsing
    # and the Hugging Face formulas, float32) on the same weights; and the Flax model in float32
    # on them, whose only difference from the reference is then rounding (~1e-6): a wrong
    # rope_theta, eps or head layout in the decoder shows up there, quantization cannot hide it.
    start = time.perf_counter()
    ref_config, ref_weights, ref_what = _reference_inputs(args, bf16)
    tokens = token_sets[0]
    reference = np.asarray(llama_reference.forward(ref_config, ref_weights, np.asarray(tokens),
                                                   dtype=np.float32), np.float64)
    ref_s = time.perf_counter() - start
    model_vs_ref = _compare(_float32_logits(bf16, tokens), reference)
    print(f"input: {args.batch} x {args.seq} random tokens")
    vs_ref, vs_bf16 = _compare(got, reference), _compare(got, from_bf16)
    print(f"logits vs numpy reference ({ref_what}; {ref_s:.1f} s): cosine similarity "
          f"{vs_ref[1]:.5f}, relative error {vs_ref[0]:.4f}, top-1 agreement {100 * vs_ref[2]:.1f}%")
    print(f"logits vs bf16 model: cosine similarity {vs_bf16[1]:.5f}, relative error "
          f"{vs_bf16[0]:.4f}, top-1 agreement {100 * vs_bf16[2]:.1f}%")
    print(f"float32 Flax model vs numpy reference (same weights: checks the decoder's config "
          f"parsing and math): relative error {model_vs_ref[0]:.2e}")

    mx_bytes, bf16_bytes, total_mx = _weight_bytes(model)
    _, _, total_bf16 = _weight_bytes(bf16)
    if bf16_bytes:
        print(f"weight memory: MXFP8 layers {_mib(bf16_bytes)} in bf16 -> {_mib(mx_bytes)} "
              f"({bf16_bytes / mx_bytes:.2f}x smaller); whole model {_mib(total_bf16)} -> "
              f"{_mib(total_mx)}")

    if args.repeats >= 2:
        sets = token_sets[:args.repeats]
        ref_ms = 1e3 * bf16_forward.time_per_step(sets)
        mx_ms = 1e3 * mx_forward.time_per_step(sets)
        note = " (emulation: dequantize + XLA dot, not a fused kernel)" \
            if backend is mx.Backend.EMULATION else ""
        if device.platform == "gpu":
            note += (f" -- a {c.hidden_size}-wide model's GEMMs are small, mostly launch "
                     f"time: the decode benchmark below is the comparison that means something")
        print(f"time per step (device time of one forward over {args.batch}x{args.seq} tokens: "
              f"(t[R={len(sets)}] - t[R=1]) / {len(sets) - 1}, median of 5): bf16 {ref_ms:.2f} ms, "
              f"MXFP8 {mx_ms:.2f} ms{note}")

    if device.platform == "gpu" and backend is not mx.Backend.EMULATION and args.speed:
        # Where MXFP8 weights pay: decode, whose time is reading the weights. A slice of a real
        # model's shapes (Llama-3-8B, 4 of 32 layers, fused projections) says what a serving
        # loop gains; the tiny demo model above cannot.
        print("decode speed: a Llama-3-8B-shaped slice (4 layers, fused q/k/v and gate/up, "
              "context 1024), the jitted decode step in a loop, bf16 vs MXFP8 "
              "(python -m jax_mxfp8 bench --model llama3-8b for the whole model; --no-speed "
              "skips this):", flush=True)
        bench_model.main(["--model", "llama3-8b", "--layers", "4", "--batch", "1,16",
                          "--ctx", "1024", "--prefill", "0", "--fused", "--backend", backend.value,
                          "--lm-head", "none", "--steps", "16", "--rounds", "3", "--no-busy",
                          "--copy-mib", "256"])

    if args.save:
        files = decoder.save_pretrained(model, args.save)
        print(f"saved MXFP8 checkpoint: {', '.join(str(f) for f in files)}")

    # The check: a checkpoint against the reference on its own weights; the random model against
    # the bf16 model it was quantized from; either way the float32 Flax model against the reference.
    rel, cos, _ = vs_ref if args.checkpoint else vs_bf16
    against = "numpy reference" if args.checkpoint else "bf16 model"
    model_ok = model_vs_ref[0] <= args.max_model_error  # NaN fails too
    ok = rel <= args.max_rel_error and cos >= args.min_cosine and model_ok
    verdict = "PASS" if ok else "FAIL"
    print(f"{verdict}: vs {against}: relative error {rel:.4f} (limit {args.max_rel_error}), cosine "
          f"{cos:.5f} (limit {args.min_cosine}); float32 model vs reference {model_vs_ref[0]:.2e} "
          f"(limit {args.max_model_error}); total {time.perf_counter() - wall:.1f} s")
    if not model_ok:
        print("the Flax model disagrees with the numpy reference on the same weights: the "
              "decoder's config parsing or its math is wrong for this model")
    return 0 if ok else 1


MOE_MAX_KERNEL_ERROR = 1e-2  # ragged_linear's bound against float64 (docs/moe.md)


def _moe_backend(args):
    """(backend, note): --backend, else the default device's choice, or, where that has no
    grouped GEMM (CUTLASS), MARLIN where it runs, else EMULATION."""
    if args.backend:
        return ensure_available(mx.Backend.parse(args.backend)), ""
    backend = mx.select_backend()
    if get_backend_impl(backend).ragged_linear is not None:
        return backend, ""
    for fallback in (mx.Backend.MARLIN, mx.Backend.EMULATION):
        try:
            return ensure_available(fallback), f" ({backend.value} has no grouped GEMM)"
        except ValueError:
            continue
    raise ValueError("no backend with a grouped GEMM runs here")


def moe_main(args) -> int:
    """`demo --moe`: a random MoE layer (--experts, --top-k, --hidden, --intermediate) in bf16
    and its experts in MXFP8, on --batch x --seq random tokens; prints the errors (against the
    bf16 layer, and against the bf16 layer on the dequantized weights: the grouped GEMM's own),
    the experts' weight memory and the time per layer call; exit 1 outside the tolerances."""
    wall = time.perf_counter()
    nnx, mx_flax, _ = _flax()
    moe = mx_flax.moe
    if args.checkpoint or args.w8a8 or args.save:
        print("error: --moe runs a random layer, W8A16 (ragged_linear); drop --checkpoint, --w8a8 "
              "and --save")
        return 2
    try:
        backend, why = _moe_backend(args)
    except ValueError as err:
        print(f"error: {err}")
        return 2
    if get_backend_impl(backend).ragged_linear is None:
        print(f"error: backend {backend.value} has no grouped GEMM; use --backend marlin or emulation")
        return 2
    hidden, inter, experts, top_k = args.hidden, args.intermediate, args.experts, args.top_k
    if hidden % 32 or inter % 32 or not 1 <= top_k <= experts:
        print(f"error: --hidden {hidden} and --intermediate {inter} must be multiples of 32 and "
              f"1 <= --top-k {top_k} <= --experts {experts}")
        return 2
    device = jax.devices()[0]
    print(f"jax_mxfp8 {mx.__version__} | jax {jax.__version__} | device {device.platform} "
          f"({device.device_kind}) | backend {backend.value}{why} (W8A16)")
    bf16 = moe.MoE.create(hidden, inter, experts, top_k, rngs=nnx.Rngs(args.seed))
    start = time.perf_counter()
    mxfp8 = moe.quantize_moe(nnx.clone(bf16), backend=backend)
    quantize_s = time.perf_counter() - start
    print(f"model: random MoE layer: {experts} experts, top-{top_k} (softmax over the experts, "
          f"renormalized over the {top_k} chosen: Mixtral / Qwen3-MoE), hidden {hidden}, expert "
          f"MLP {inter} (SiLU(gate) * up); experts in MXFP8 ({quantize_s:.1f} s): fused gate/up "
          f"[{experts}, {2 * inter}, {hidden}] and down [{experts}, {hidden}, {inter}], one grouped "
          f"GEMM each (ragged_linear); router bf16")

    keys = jax.random.split(jax.random.key(args.seed + 1), max(args.repeats, 2))
    xs = [jax.random.normal(k, (args.batch, args.seq, hidden), jnp.bfloat16) for k in keys]
    tokens = args.batch * args.seq
    _, ids = moe.route(bf16.gate(xs[0].reshape(-1, hidden)), top_k)
    rows = np.bincount(np.asarray(ids).ravel(), minlength=experts)
    print(f"input: {args.batch} x {args.seq} random tokens: {tokens * top_k} rows (tokens x top-{top_k}), "
          f"per expert min {rows.min()} / max {rows.max()}, {int((rows == 0).sum())} experts without any")

    def unrolled(module):
        graphdef, state = nnx.split(module)
        return UnrolledForward(lambda s, x: nnx.merge(graphdef, s)(x).astype(jnp.float32), state)

    bf16_forward, mx_forward = unrolled(bf16), unrolled(mxfp8)
    twin_forward = unrolled(moe.dequantized(mxfp8))
    from_bf16 = np.asarray(bf16_forward(xs[:1])[0], np.float64)
    got = np.asarray(mx_forward(xs[:1])[0], np.float64)
    on_dequantized = np.asarray(twin_forward(xs[:1])[0], np.float64)
    weights = [w.get_value() for w in (bf16.gate.weight, bf16.experts.gate_up_proj.weight,
                                       bf16.experts.down_proj.weight)]
    reference = np.asarray(moe.moe_reference(xs[0], *weights, top_k=top_k), np.float64)
    vs_bf16 = _compare(got, from_bf16)
    kernel = _compare(got, on_dequantized)[0]
    sorting = _compare(from_bf16, reference)[0]
    print(f"output vs bf16 layer: cosine similarity {vs_bf16[1]:.5f}, relative error {vs_bf16[0]:.4f}")
    print(f"output vs bf16 layer on the dequantized weights (the grouped GEMM's own error): "
          f"relative error {kernel:.2e}")
    print(f"bf16 layer vs einsum over every expert (checks routing, sorting and unsorting): "
          f"relative error {sorting:.2e}")
    mx_bytes = sum(l.weight.get_value().nbytes for l in (mxfp8.experts.gate_up_proj, mxfp8.experts.down_proj))
    bf16_bytes = sum(l.weight.get_value().nbytes for l in (bf16.experts.gate_up_proj, bf16.experts.down_proj))
    print(f"weight memory: experts {_mib(bf16_bytes)} in bf16 -> {_mib(mx_bytes)} "
          f"({bf16_bytes / mx_bytes:.2f}x smaller)")

    if args.repeats >= 2:
        sets = xs[:args.repeats]
        ref_ms = 1e3 * bf16_forward.time_per_step(sets)
        mx_ms = 1e3 * mx_forward.time_per_step(sets)
        note = " (emulation: dequantize + XLA grouped dot, not a fused kernel)" \
            if backend is mx.Backend.EMULATION else ""
        print(f"time per layer call (device time over {args.batch}x{args.seq} tokens: "
              f"(t[R={len(sets)}] - t[R=1]) / {len(sets) - 1}, median of 5): bf16 "
              f"(jax.lax.ragged_dot) {ref_ms:.3f} ms, MXFP8 (ragged_linear) {mx_ms:.3f} ms{note}")

    ok = (vs_bf16[0] <= args.max_rel_error and vs_bf16[1] >= args.min_cosine
          and kernel <= MOE_MAX_KERNEL_ERROR and sorting <= MOE_MAX_KERNEL_ERROR)  # NaN fails too
    print(f"{'PASS' if ok else 'FAIL'}: vs bf16 layer: relative error {vs_bf16[0]:.4f} (limit "
          f"{args.max_rel_error}), cosine {vs_bf16[1]:.5f} (limit {args.min_cosine}); vs the "
          f"dequantized weights {kernel:.2e}, bf16 layer vs einsum {sorting:.2e} (limits "
          f"{MOE_MAX_KERNEL_ERROR}); total {time.perf_counter() - wall:.1f} s")
    return 0 if ok else 1
