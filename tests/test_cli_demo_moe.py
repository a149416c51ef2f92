"""`python -m jax_mxfp8 demo --moe` (jax_mxfp8/cli/demo.py's moe_main): one random MoE layer,
bf16 vs MXFP8, its report, its tolerance check and its errors. The layer itself:
test_moe_layer.py."""
import argparse
import contextlib
import io
import re

import pytest

pytest.importorskip("flax.nnx")

from jax_mxfp8.cli import demo  # noqa: E402

SMALL = ["--moe", "--hidden", "128", "--intermediate", "256", "--experts", "8", "--top-k", "2",
         "--batch", "2", "--seq", "8", "--repeats", "2"]


def run_demo(*argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = demo.main(parser.parse_args(list(argv)))
    return code, out.getvalue()


def reported(text: str, line_start: str, what: str = "relative error") -> float:
    line = next(line for line in text.splitlines() if line.startswith(line_start))
    return float(re.search(rf"{what} ([-+.0-9e]+)", line).group(1))


def test_demo_moe_runs_and_reports():
    code, text = run_demo(*SMALL, "--backend", "emulation")
    assert code == 0, text
    for expected in ("backend emulation (W8A16)", "8 experts, top-2", "fused gate/up [8, 512, 128]",
                     "32 rows (tokens x top-2)", "weight memory: experts", "time per layer call",
                     "bf16 (jax.lax.ragged_dot)", "MXFP8 (ragged_linear)", "PASS"):
        assert expected in text, text
    # EMULATION is the bf16 layer on the exactly dequantized weights; MXFP8 rounding vs bf16
    assert reported(text, "output vs bf16 layer on the dequantized weights") < 1e-2, text
    assert reported(text, "bf16 layer vs einsum over every expert") < 1e-2, text
    assert 1e-3 < reported(text, "output vs bf16 layer:") < 0.15, text
    assert "logits vs" not in text  # the decoder demo did not run


def test_demo_moe_fails_outside_tolerance():
    code, text = run_demo(*SMALL, "--repeats", "0", "--max-rel-error", "1e-6")
    assert code == 1 and "FAIL" in text and "time per layer call" not in text


@pytest.mark.parametrize("extra, message", [
    (["--w8a8"], "W8A16"),
    (["--top-k", "9"], "1 <= --top-k 9 <= --experts 8"),
    (["--hidden", "100"], "multiples of 32"),
    (["--backend", "cutlass"], "cannot run here|no grouped GEMM"),
])
def test_demo_moe_errors(extra, message):
    code, text = run_demo(*SMALL, *extra)
    assert code == 2 and re.search(message, text), text
