"""The import graph of the two packages: `server` uses `engine`, never the reverse, and no cycles.

The graph is read from the source (every import statement, at any depth, and every
`importlib.import_module("...")` with a literal name), so a lazy import inside a
function counts as much as one at the top: a cycle through a function is still a
cycle for the reader. docs/ARCHITECTURE.md states the same rules.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "server")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "_proto" in path.parts:
                continue  # generated protobuf code
            out[_module_name(path)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` is or lies in (an `import a.b.c` of a function c)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(base[: len(base) - node.level + 1])
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] + [target]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            hit = _resolve(name, known)
            if hit and hit != mod:
                found.add(hit)
    return found


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {mod: _imports(mod, path, known) for mod, path in known.items()}


def test_engine_never_imports_server():
    bad = sorted(f"{m} -> {t}" for m, ts in import_graph().items() if m.split(".")[0] == "engine"
                 for t in ts if t.split(".")[0] == "server")
    assert not bad, "engine must not import server: " + ", ".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without edges from a module to a package that contains it: a package's
    __init__ re-exporting its modules is not a cycle with them, since importing `engine.x`
    runs `engine/__init__` first either way."""
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}


def test_no_import_cycles():
    cycles = _cycles(_without_package_inits(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_graph_sees_lazy_and_relative_imports(tmp_path):
    """The walker itself: a relative import inside a function and an importlib call both count."""
    known = {"engine.a": tmp_path / "a.py", "engine.b": tmp_path / "b.py", "server.c": tmp_path / "c.py"}
    known["engine.a"].write_text("def f():\n    from . import b\n    import importlib\n"
                                 "    importlib.import_module('server.c')\n")
    assert _imports("engine.a", known["engine.a"], known) == {"engine.b", "server.c"}
    assert _cycles({"x": {"y"}, "y": {"x"}, "z": {"x"}}) == [["x", "y"]]


@pytest.mark.parametrize("module", sorted(m for m in _modules()
                                           if m.split(".")[0] == "engine" and not m.endswith("__main__")))
def test_engine_module_imports_with_server_blocked(module):
    """Every engine module imports in a fresh interpreter in which `server` cannot be imported
    (a `__main__` module runs its command when imported, so it is left out)."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'server' or name.startswith('server.'):\n"
            "            raise ImportError('server is blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            f"import {module}\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
