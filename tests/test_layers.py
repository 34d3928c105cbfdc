"""The layering rule of docs/architecture.md, checked on every module of the package.

A module may import from its own layer or a lower one, never from a higher one; imports inside
functions count (a lazy import that dodges the rule is still a circle at run time). The package's
``__init__`` (the public façade every layer may ``import dcanets`` for its side effect of loading
the plugins) and ``__main__`` modules are left out. No module may be longer than 600 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dcanets"
MAX_LINES = 600

# (prefix, layer): the first matching prefix decides; higher numbers sit higher
LAYERS: List[Tuple[str, int]] = [
    ("dcanets.cli", 6),
    ("dcanets.tune", 5),
    ("dcanets.analysis", 4),
    ("dcanets.papers", 4),
    ("dcanets.engine", 3),
    ("dcanets.optim", 2),
    ("dcanets.hessian", 1),
    ("dcanets.layers", 1),
    ("dcanets.dca", 1),
    ("dcanets", 0),  # hookspecs, plugins, _compat, validation, names, builder
]
EXEMPT = {"dcanets", "dcanets.__main__", "dcanets.cli.__main__"}


def layer(module: str) -> int:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py")


def modules() -> Dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: Set[str]) -> Iterator[Tuple[str, int]]:
    """(imported dcanets module, line) for every import statement of ``path``, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(kept + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                yield target, node.lineno


def test_no_module_imports_a_higher_layer() -> None:
    known = modules()
    upward = [f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)}) at line {line}"
              for name, path in sorted(known.items()) if name not in EXEMPT
              for target, line in imports(name, path, set(known))
              if target not in EXEMPT and layer(target) > layer(name)]
    assert upward == []


def test_no_import_circle() -> None:
    known = modules()
    graph = {name: {t for t, _ in imports(name, path, set(known)) if t not in EXEMPT}
             for name, path in known.items() if name not in EXEMPT}
    # a module importing its own package's __init__ is not a circle of two modules
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    circles = [scc for scc in strongly_connected(graph) if len(scc) > 1]
    assert circles == []


def test_no_module_over_600_lines() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's algorithm, iterative (the package's import graph is small, but recursion limits differ)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(sorted(component))
    return out


@pytest.mark.parametrize("module, expected", [("dcanets.cli.tune", 6), ("dcanets.optim.protocol", 2),
                                              ("dcanets.hessian", 1), ("dcanets.names", 0)])
def test_layer_table(module: str, expected: int) -> None:
    assert layer(module) == expected


def test_the_checks_see_an_upward_import(tmp_path: Path) -> None:
    """The import scan finds a lazy import inside a function (the kind that dodged the rule before)."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from dcanets.analysis import fidelity\n    return fidelity\n")
    found = list(imports("dcanets.optim.probe", source, {"dcanets.analysis", "dcanets.analysis.fidelity"}))
    assert found == [("dcanets.analysis.fidelity", 2)]
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"], ["c"]]
