"""The package's structure, read from its source tree (not the installed copy): the import
graph of jax_mxfp8's modules has no cycles and no imports hidden in functions (except of the
modules that need the optional flax extra), and the sources, tests and docs cite no files the
repository does not have and use no words of the period the code was written in."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jax_mxfp8"

pytestmark = pytest.mark.skipif(not (PACKAGE / "__init__.py").is_file(),
                                reason=f"no jax_mxfp8 source tree at {PACKAGE} (not a checkout)")


# ---- the import graph ----------------------------------------------------------------------------

def package_modules() -> dict[str, Path]:
    """Dotted name -> source file of every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]):
    """(package modules imported at module level, those imported inside functions) by `name`.

    `from a import b` counts as an import of module a.b where that is a module, else of a; a
    name outside the package is dropped. An import of a package that contains `name` does not
    count: Python imports every enclosing package before the module itself, so that is never a
    cycle at import time."""
    is_package = path.name == "__init__.py"
    top, inside = set(), set()

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = node.module or ""
        if node.level:  # relative: from the package of `name`, up level - 1 packages
            parts = name.split(".")
            keep = len(parts) - node.level + is_package
            base = ".".join(parts[:keep] + ([base] if base else []))
        return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names]

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in targets(child):
                    while target and target not in modules:
                        target = target.rpartition(".")[0]
                    if target and target != name and not name.startswith(target + "."):
                        (inside if in_function else top).add(target)
            visit(child, nested)

    visit(ast.parse(path.read_text(), str(path)), False)
    return top, inside - top


def import_graph():
    modules = package_modules()
    top, inside = {}, {}
    for name, path in modules.items():
        top[name], inside[name] = imported_modules(name, path, modules)
    return modules, top, inside


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def strongconnect(root):
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_the_package():
    modules, top, _ = import_graph()
    assert {"jax_mxfp8", "jax_mxfp8.ops.quantize", "jax_mxfp8.backends.marlin.planner"} <= set(modules)
    assert "jax_mxfp8.ops.quantize" in top["jax_mxfp8"]
    assert "jax_mxfp8.backends.marlin.kernels" in top["jax_mxfp8.backends.marlin.planner"]


def test_no_import_cycles():
    _, top, inside = import_graph()
    both = {name: top[name] | inside[name] for name in top}
    assert cycles(both) == [], "import cycles among package modules (module- and function-level imports)"


def module_level(node):
    """The nodes of a module outside its functions (if / try / class bodies included)."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child
            yield from module_level(child)


def needs_flax(modules, top) -> set[str]:
    """Modules that import flax at module level, directly or through another package module."""
    direct = set()
    for name, path in modules.items():
        for node in module_level(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "flax" or n.startswith("flax.") for n in names):
                direct.add(name)
    needing, grew = set(direct), True
    while grew:
        grew = False
        for name, targets in top.items():
            if name not in needing and targets & needing:
                needing.add(name)
                grew = True
    return needing


def test_function_level_imports_only_of_the_flax_extra():
    """A package module imports the others at its top, so its dependencies are visible and an
    import error shows at import; only modules that need the optional flax extra may be
    imported late (by code that works without it)."""
    modules, top, inside = import_graph()
    optional = needs_flax(modules, top)
    assert {"jax_mxfp8.flax", "jax_mxfp8.models.decoder"} <= optional
    late = {name: sorted(targets - optional) for name, targets in inside.items() if targets - optional}
    assert late == {}, "function-level imports of package modules that do not need flax"


# ---- what the text cites and says -------------------------------------------------------------------

# Files and directories the text once cited (some by bare name): cited only where they exist.
CITED_PATHS = {
    "RESULTS.md": "RESULTS.md",
    "DEVELOPERS.md": "DEVELOPERS.md",
    "shared/design": "shared/design",
    "tools/gpu_build.sh": "tools/gpu_build.sh",
    "tools/marlin_dev.py": "tools/marlin_dev.py",
    "tools/tp_gpu.py": "tools/tp_gpu.py",
    "gpu_next.sh": "tools/gpu_next.sh",
    "gpu_check.sh": "tools/gpu_check.sh",
}
# Words of the period the code was written in, meaningless to a reader of the repository.
PERIOD_WORDS = [r"\bsessions?\b", r"\bissue \d+", r"\bcall \d+\b", r"\bclosing note\b"]
TEXT_ROOTS = ["jax_mxfp8", "tests", "docs", "README.md", "BUILD.md"]


def text_files():
    for entry in TEXT_ROOTS:
        path = ROOT / entry
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if "__pycache__" in file.parts or file.resolve() == Path(__file__).resolve():
                continue
            try:
                yield file, file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, FileNotFoundError):  # binary, or a missing README
                continue


def test_text_scan_reads_the_tree():
    names = {f.relative_to(ROOT).as_posix() for f, _ in text_files()}
    assert {"README.md", "docs/numerics.md", "jax_mxfp8/ops/quantize.py", "tests/conftest.py"} <= names
    assert "tests/test_package.py" not in names


# A file of the repository named by its path from the root (with an extension: the compiled
# modules and CUTLASS's tools/util/include of BUILD.md are not files of this tree).
REPO_FILE = re.compile(r"(?<![\w/.-])((?:\.ci|docs|ffi|jax_mxfp8|tests|tools)/[\w./-]*\.[A-Za-z]+)\b")


def test_cited_repository_files_exist():
    hits = []
    for file, text in text_files():
        for number, line in enumerate(text.splitlines(), 1):
            for m in REPO_FILE.finditer(line):
                if not (ROOT / m.group(1)).exists():
                    hits.append(f"{file.relative_to(ROOT)}:{number}: {m.group(1)}")
    assert hits == [], "\n".join(["cites files the repository does not have:", *hits])


def test_no_citations_of_missing_files_and_no_period_words():
    missing = {cited for cited, path in CITED_PATHS.items() if not (ROOT / path).exists()}
    patterns = [re.compile(re.escape(c)) for c in sorted(missing)] + [re.compile(w, re.IGNORECASE)
                                                                       for w in PERIOD_WORDS]
    hits = []
    for file, text in text_files():
        for number, line in enumerate(text.splitlines(), 1):
            for pattern in patterns:
                m = pattern.search(line)
                if m:
                    hits.append(f"{file.relative_to(ROOT)}:{number}: {m.group(0)!r}: {line.strip()[:120]}")
    assert hits == [], "\n".join(["cites a missing file or uses a word of the writing period:", *hits])
