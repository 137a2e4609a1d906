"""The shape of src/phantomdeq, read from the source (no import): no module imports another
one that (directly or through others) imports it back, and no module imports a private
(underscore) name from another phantomdeq module -- such a name is made public in its owner,
or the code moves. Every import counts, also inside functions and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (path, is_package)}`` of every module under src/phantomdeq."""
    found = {}
    for path in sorted((SRC / "phantomdeq").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def _imports(name: str, path: Path, is_package: bool, modules: dict) -> list[tuple[str, str, int]]:
    """``(imported module, imported name or "", line)`` for every phantomdeq import in one
    module; ``from M import x`` where ``M.x`` is a module counts as an import of ``M.x``."""
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in modules:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append(
                    (sub, "", node.lineno) if sub in modules else (target, alias.name, node.lineno)
                )
    return out


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {}
    private = []
    for name, (path, is_package) in modules.items():
        edges[name] = set()
        for target, imported, line in _imports(name, path, is_package, modules):
            if target != name:
                edges[name].add(target)
            if imported.startswith("_") and not imported.startswith("__"):
                rel = path.relative_to(SRC)
                private.append(f"{rel}:{line} imports {imported} from {target}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_the_package():
    edges, _ = _graph()
    assert "phantomdeq.deq" in edges and "phantomdeq.solvers.base" in edges
    assert "phantomdeq.solvers.tracker" in edges["phantomdeq.solvers.base"]


def test_no_import_cycle_between_modules():
    cycles = _cycles(_graph()[0])
    assert not cycles, f"modules that import each other (directly or in a ring): {cycles}"


def test_no_private_name_is_imported_from_another_module():
    private = _graph()[1]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_the_checks_catch_what_they_forbid():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
