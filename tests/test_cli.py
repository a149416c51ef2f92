"""The command line entry points run on this machine."""
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "jax_mxfp8", *args], capture_output=True, text=True,
                          timeout=300, cwd="/")


def test_info():
    out = run("info")
    assert out.returncode == 0, out.stderr
    assert "select_backend() ->" in out.stdout and "compiled modules" in out.stdout


def test_extension_modules_built():
    import os
    from jax_mxfp8 import _ffi
    if os.environ.get("JAX_MXFP8_REQUIRE_EXTENSION") == "1":  # set by .ci/run
        assert _ffi.cpu_module() is not None, "the installed package has no compiled CPU module"
