"""The import graph: no circles, and model.py stays the plain network (nothing from kernels, train or
checkpoint), checked from the source and by importing each module alone."""

import ast
import subprocess
import sys
from pathlib import Path

import lmforge

ROOT = Path(lmforge.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The lmforge modules `name` imports, at module level or inside functions (a lazy import is still an
    edge), each with the packages above it (importing a.b.c runs a/__init__ and a/b/__init__) except
    `name`'s own packages, which Python has run before `name` anyway."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            parts = t.split(".")
            found |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & known
    own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
    return found - own


def test_the_import_graph_has_no_circles():
    mods = _modules()
    graph = {n: _imports(n, p, set(mods)) for n, p in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(" -> ".join(path[path.index(m):] + [m]) if m in path else f"{n} -> {m}")
            elif m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert cycles == []


def test_model_imports_only_the_config_and_the_label_convention():
    mods = _modules()
    deps = _imports("lmforge.model", mods["lmforge.model"], set(mods))
    assert deps <= {"lmforge.config", "lmforge.data", "lmforge.data.labels"}, deps


def test_each_module_imports_alone():
    """Each module in a fresh set of lmforge modules (torch stays loaded): no module relies on another having
    been imported first; importing lmforge.model loads no kernels, training or checkpoint code."""
    code = """
import importlib, sys
names = sys.argv[1:]
for name in names:
    for m in [m for m in sys.modules if m == "lmforge" or m.startswith("lmforge.")]:
        del sys.modules[m]
    importlib.import_module(name)
    if name == "lmforge.model":
        loaded = sorted(m for m in sys.modules if m.startswith(("lmforge.kernels", "lmforge.train", "lmforge.checkpoint")))
        assert not loaded, loaded
"""
    names = [n for n in _modules() if not n.endswith("__main__")]
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
