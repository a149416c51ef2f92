"""Test-only native oracles, compiled on first use with the host C++ compiler (no CMake, no
nvcc, no GPU) and cached, so they are never part of the wheel.

load_sm100_layout(): _jax_mxfp8_sm100_layout (sm100_layout/layout_check.cc), CUTLASS's own
SM100 scale-factor layout evaluated on the host. It needs a C++17 compiler, nanobind, the
CUTLASS headers of the nvidia-cutlass wheel and the CUDA toolkit's include directories (CuTe
includes cuda_runtime_api.h and, from CUDA 13, CCCL's cuda/std). Returns (module, None), or
(None, reason) naming the missing piece.

The build goes to <tempdir>/jax_mxfp8_oracles/<key>/, the key hashing the source, the
compiler command and the Python version, so a changed source or toolchain rebuilds.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SM100_LAYOUT_SOURCE = HERE / "sm100_layout" / "layout_check.cc"
SM100_LAYOUT_MODULE = "_jax_mxfp8_sm100_layout"
COMPILE_TIMEOUT_S = 600


class Missing(Exception):
    """A piece the build needs is not there (the message names it)."""


def _cxx() -> list[str]:
    env = shlex.split(os.environ.get("CXX", ""))
    if env:
        if shutil.which(env[0]) is None:
            raise Missing(f"the host C++ compiler $CXX={env[0]}")
        return env
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return [path]
    raise Missing("a host C++ compiler (c++, g++ or clang++ on PATH, or $CXX)")


def _nanobind() -> tuple[list[Path], Path]:
    """(include dirs, nb_combined.cpp) of the installed nanobind."""
    try:
        import nanobind
    except ImportError:
        raise Missing("nanobind (pip install nanobind)") from None
    root = Path(nanobind.__file__).resolve().parent
    include = Path(nanobind.include_dir())
    combined = Path(nanobind.source_dir()) / "nb_combined.cpp"
    robin_map = root / "ext" / "robin_map" / "include"
    if not (include / "nanobind" / "nanobind.h").is_file() or not combined.is_file():
        raise Missing(f"nanobind's headers or src/nb_combined.cpp (in {root})")
    return [include, robin_map], combined


def _cutlass_include() -> Path:
    try:
        import cutlass_library
    except ImportError:
        raise Missing("the CUTLASS headers (pip install 'nvidia-cutlass>=4.2')") from None
    include = Path(cutlass_library.__file__).resolve().parent / "source" / "include"
    if not (include / "cutlass" / "cutlass.h").is_file():
        raise Missing(f"the CUTLASS headers ({include}/cutlass/cutlass.h)")
    return include


def _nvcc_include_dirs() -> list[Path]:
    """The include directories nvcc itself passes (robust to wrapper scripts on PATH)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            out = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o",
                                  os.path.join(tmp, "x.o")], capture_output=True, text=True,
                                 timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return []
    dirs = []
    for line in (out.stdout + out.stderr).splitlines():
        m = re.match(r"#\$ (?:SYSTEM_)?INCLUDES=(.*)", line)
        if m:
            tokens = shlex.split(m.group(1))
            dirs += [t[2:] if t.startswith("-I") else t for t in tokens if t != "-isystem"]
    return [Path(d) for d in dirs if d]


def _cuda_includes() -> list[Path]:
    """<cuda>/include, plus <cuda>/include/cccl where CCCL lives there (CUDA >= 13)."""
    candidates = _nvcc_include_dirs()
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for inc in candidates:
        if (inc / "cuda_runtime_api.h").is_file():
            dirs = [inc]
            if (inc / "cccl" / "cuda" / "std" / "utility").is_file():
                dirs.append(inc / "cccl")
            return dirs
    raise Missing("the CUDA toolkit's include directory (cuda_runtime_api.h; put nvcc on PATH "
                  "or set CUDA_HOME)")


def _python_flags() -> tuple[list[str], list[str], str]:
    """(compile flags, link flags, extension suffix) for this interpreter."""
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").is_file():
        raise Missing(f"the Python development headers (Python.h in {include})")
    cflags = ["-I", include]
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        cflags.append("-DNB_FREE_THREADED")
    ldflags = ["-shared"]
    if sys.platform == "darwin":
        ldflags += ["-undefined", "dynamic_lookup"]
    return cflags, ldflags, sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def _run(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    for p, log in procs:
        try:
            rc = p.wait(timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        if rc != 0:
            text = log.read_text(errors="replace")
            raise RuntimeError(f"oracle build failed ({rc}): {shlex.join(p.args)}\n{text[-4000:]}")


def _build_module(name: str, source: Path, includes: list[Path]) -> Path:
    """Compiles `source` (a nanobind module named `name`) once per key; returns the .so path."""
    cxx = _cxx()
    nb_includes, nb_combined = _nanobind()
    py_cflags, ldflags, suffix = _python_flags()
    common = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-DNDEBUG", "-DNB_COMPACT_ASSERTIONS",
              *py_cflags, *(f"-I{d}" for d in nb_includes)]
    nb_cmd = [*cxx, *common, "-O1", "-fno-strict-aliasing", "-c", str(nb_combined)]
    mod_cmd = [*cxx, *common, "-O1", *(f"-isystem{d}" for d in includes), "-c", str(source)]

    key = hashlib.sha256()
    for part in (source.read_bytes(), Path(__file__).read_bytes(), nb_combined.read_bytes(),
                 shlex.join(nb_cmd + mod_cmd).encode(), sys.version.encode()):
        key.update(part)
    out_dir = Path(tempfile.gettempdir()) / "jax_mxfp8_oracles" / key.hexdigest()[:16]
    target = out_dir / f"{name}{suffix}"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # concurrent builders do not collide
        tmp = Path(tmp)
        nb_obj, mod_obj = tmp / "nanobind.o", tmp / f"{name}.o"
        _wait([(_run(nb_cmd + ["-o", str(nb_obj)], tmp / "nanobind.log"), tmp / "nanobind.log"),
               (_run(mod_cmd + ["-o", str(mod_obj)], tmp / f"{name}.log"), tmp / f"{name}.log")])
        built = tmp / target.name
        link = [*cxx, *ldflags, str(mod_obj), str(nb_obj), "-o", str(built)]
        _wait([(_run(link, tmp / "link.log"), tmp / "link.log")])
        os.replace(built, target)  # atomic: a concurrent reader sees no half-written module
    return target


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def load_sm100_layout():
    """(module, None) with _jax_mxfp8_sm100_layout built and imported, or (None, reason)."""
    try:
        includes = [_cutlass_include(), *_cuda_includes()]
        return _import(SM100_LAYOUT_MODULE,
                       _build_module(SM100_LAYOUT_MODULE, SM100_LAYOUT_SOURCE, includes)), None
    except Missing as e:
        return None, f"{SM100_LAYOUT_MODULE} cannot be built: missing {e}"
