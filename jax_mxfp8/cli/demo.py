"""The main job: quantize a small decoder-style Flax model to MXFP8 and run jitted inference.

Builds a random Llama-style decoder (or loads one with --checkpoint DIR), converts its
nnx.Linear layers with jax_mxfp8.flax.quantize_model, runs both models under jit and prints
the backend, the logits' error against the bf16 model, weight memory, and time per step.
Exits 1 when the error is outside the tolerance.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_mxfp8 as mx
from jax_mxfp8 import timing
from jax_mxfp8.backends import ensure_available, get_backend_impl
from jax_mxfp8.models import tp_mlp


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
                         "(pip install 'jax_mxfp8[flax]') or run `python -m jax_mxfp8 demo --tp N`"
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
                     help="quantize activations too (default: the backend's own math)")
    run.add_argument("--keep-lm-head", action="store_true",
                     help="leave lm_head in bf16 (as ModelOpt exports do)")
    run.add_argument("--repeats", type=int, default=4,
                     help="R distinct inputs unrolled in one jit for the device-time measurement")
    run.add_argument("--save", metavar="DIR", help="write the quantized model as an MXFP8 checkpoint")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-rel-error", type=float, default=0.15,
                     help="fail if the logits' relative error exceeds this")
    run.add_argument("--min-cosine", type=float, default=0.99,
                     help="fail if the logits' cosine similarity is below this")
    run.add_argument("--tp", type=int, default=0, metavar="N",
                     help="run the tensor-parallel MXFP8 MLP on a mesh of N devices instead "
                          "(jax_mxfp8/models/tp_mlp.py; on CPU, N fake devices)")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _build_models(args, backend):
    """(bf16 reference model, MXFP8 model, description, n quantized layers, seconds)."""
    nnx, mx_flax, decoder = _flax()
    Mxfp8Linear, quantize_model = mx_flax.Mxfp8Linear, mx_flax.quantize_model
    CausalLM, DecoderConfig, load_pretrained = (decoder.CausalLM, decoder.DecoderConfig,
                                                decoder.load_pretrained)

    qa = True if args.w8a8 else None
    keep = (lambda path, module: path != "lm_head") if args.keep_lm_head else None
    if args.checkpoint:
        reference, config, n_mxfp8 = load_pretrained(args.checkpoint, backend=backend,
                                                     dequantize_weights=True)
        if n_mxfp8:  # already MXFP8: the reference is the same weights dequantized to bf16
            start = time.perf_counter()
            model, _, _ = load_pretrained(args.checkpoint, backend=backend, quantize_activations=qa)
            return (reference, model, f"MXFP8 checkpoint {args.checkpoint} (reference: its weights "
                    f"dequantized to bf16)", n_mxfp8, time.perf_counter() - start)
        source = f"bf16 checkpoint {args.checkpoint}"
    else:
        config = DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
        reference = nnx.jit(lambda: CausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(args.seed)))()
        source = "random Llama-style decoder"
    start = time.perf_counter()
    model = quantize_model(nnx.clone(reference), predicate=keep, backend=backend,
                           quantize_activations=qa)
    seconds = time.perf_counter() - start
    count = sum(isinstance(node, Mxfp8Linear) for _, node in nnx.iter_graph(model))
    return reference, model, source, count, seconds


def _weight_bytes(model):
    """(bytes of the MXFP8 layers' weights, what they took in bf16, whole model's param bytes)."""
    nnx, mx_flax, _ = _flax()
    Mxfp8Linear = mx_flax.Mxfp8Linear

    mx_bytes = bf16_bytes = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Mxfp8Linear):
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
    math = "W8A8" if (args.w8a8 or impl.default_quantize_activations) else "W8A16"
    device = jax.devices()[0]
    print(f"jax_mxfp8 {mx.__version__} | jax {jax.__version__} | device {device.platform} "
          f"({device.device_kind}) | backend {backend.value} ({math})")

    reference, model, source, n_layers, quantize_s = _build_models(args, backend)
    c = reference.config
    print(f"model: {source}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP "
          f"{c.intermediate_size}, {c.num_attention_heads} heads ({c.num_key_value_heads} kv), "
          f"vocab {c.vocab_size}; {n_layers} linear layers in MXFP8 ({quantize_s:.1f} s)")

    keys = jax.random.split(jax.random.key(args.seed + 1), max(args.repeats, 2))
    token_sets = [jax.random.randint(k, (args.batch, args.seq), 0, c.vocab_size) for k in keys]

    def unrolled(module):
        graphdef, state = nnx.split(module)
        return UnrolledForward(lambda s, t: nnx.merge(graphdef, s)(t).astype(jnp.float32), state)

    ref_forward, mx_forward = unrolled(reference), unrolled(model)
    want = np.asarray(ref_forward(token_sets[:1])[0], np.float64)
    got = np.asarray(mx_forward(token_sets[:1])[0], np.float64)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    cos = float(np.vdot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)))
    top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    print(f"input: {args.batch} x {args.seq} random tokens")
    print(f"logits vs bf16 model: cosine similarity {cos:.5f}, relative error {rel:.4f}, "
          f"top-1 agreement {100 * top1:.1f}%")

    mx_bytes, bf16_bytes, total_mx = _weight_bytes(model)
    _, _, total_bf16 = _weight_bytes(reference)
    if bf16_bytes:
        print(f"weight memory: MXFP8 layers {_mib(bf16_bytes)} in bf16 -> {_mib(mx_bytes)} "
              f"({bf16_bytes / mx_bytes:.2f}x smaller); whole model {_mib(total_bf16)} -> "
              f"{_mib(total_mx)}")

    if args.repeats >= 2:
        sets = token_sets[:args.repeats]
        ref_ms = 1e3 * ref_forward.time_per_step(sets)
        mx_ms = 1e3 * mx_forward.time_per_step(sets)
        note = " (emulation: dequantize + XLA dot, not a fused kernel)" \
            if backend is mx.Backend.EMULATION else ""
        print(f"time per step (device time of one forward over {args.batch}x{args.seq} tokens: "
              f"(t[R={len(sets)}] - t[R=1]) / {len(sets) - 1}, median of 5): bf16 {ref_ms:.2f} ms, "
              f"MXFP8 {mx_ms:.2f} ms{note}")

    if args.save:
        files = decoder.save_pretrained(model, args.save)
        print(f"saved MXFP8 checkpoint: {', '.join(str(f) for f in files)}")

    ok = rel <= args.max_rel_error and cos >= args.min_cosine
    verdict = "PASS" if ok else "FAIL"
    print(f"{verdict}: relative error {rel:.4f} (limit {args.max_rel_error}), cosine {cos:.5f} "
          f"(limit {args.min_cosine}); total {time.perf_counter() - wall:.1f} s")
    return 0 if ok else 1
