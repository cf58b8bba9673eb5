"""No module of omni2 imports itself back, directly or through others.

Read statically from the sources (ast), every import counted: the ones inside functions too,
as a deferred import still ties the two modules together (a cycle of them is how one change
breaks a module three files away, or only on the first call of one path)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """pyproject's package-dir: import name -> folder (e.g. omni2.streaming -> streaming)."""
    if tomllib is not None:
        mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    else:  # the four roots, as pyproject maps them
        mapping = {f"omni2.{name}": name for name in ("model", "streaming", "server", "clients")}
    return {name: root / folder for name, folder in mapping.items()}


def modules(roots: dict[str, Path]) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__)."""
    found = {}
    for name, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            package = parts[-1] == "__init__"
            if package:
                parts.pop()
            found[".".join([name, *parts])] = (path, package)
    return found


def import_graph(mods: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """module -> the modules of `mods` it imports (anywhere in its source)."""
    graph: dict[str, set[str]] = {}
    for name, (path, package) in mods.items():
        here = name if package else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:  # `import a.b.c` of a name inside a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
                elif target == name:
                    edges.add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or one importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm (the graph is small: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_omni2_has_no_import_cycle():
    mods = modules(package_dirs())
    assert len(mods) > 50  # the mapping was read: every package's modules are in the graph
    assert cycles(import_graph(mods)) == []


def test_a_cycle_through_a_deferred_import_is_found(tmp_path):
    """The check itself can fail: a -> b at the top, b -> c inside a function, c -> a."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n    return x\n")
    (pkg / "c.py").write_text("import demo.pkg.a\nx = 1\n")
    (pkg / "d.py").write_text("from . import a\n")  # on the path into the cycle, not in it
    graph = import_graph(modules({"demo.pkg": pkg}))
    assert graph["demo.pkg.sub.b"] == {"demo.pkg.c"}
    assert cycles(graph) == [["demo.pkg.a", "demo.pkg.c", "demo.pkg.sub.b"]]
    (pkg / "c.py").write_text("x = 1\n")
    assert cycles(import_graph(modules({"demo.pkg": pkg}))) == []
