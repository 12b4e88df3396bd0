"""The package's shape: its modules import each other without a cycle, counting every import (inside functions
and under TYPE_CHECKING too), and library code never prints."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rnngen"


def module_name(path: Path) -> str:
    return "rnngen" if path.name == "__init__.py" else f"rnngen.{path.stem}"


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The rnngen modules ``path`` imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = "rnngen" + (f".{node.module}" if node.module else "")
            elif node.module and node.module.split(".")[0] == "rnngen":
                base = node.module
            else:
                continue
            for alias in node.names:  # `from . import console` imports a module; `from .x import y`, module x
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.glob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) - {module_name(p)} for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "rnngen.loaded" in graph["rnngen.cli"] or "rnngen.loaded" in graph["rnngen"]  # the graph is read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_library_code_never_prints() -> None:
    """Only the command line (cli*.py) and its renderer (console.py) write to the terminal."""
    for path in PACKAGE.glob("*.py"):
        if path.name.startswith("cli") or path.name in ("console.py", "__main__.py") or "render" in path.name:
            continue
        calls = [node for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
        assert not calls, f"{path.name} calls print()"


def test_the_api_functions_are_not_hidden_by_modules() -> None:
    """A submodule named like a function of rnngen's API would replace it on the package once imported."""
    import rnngen
    import rnngen.classify  # noqa: F401  (imports every module the trainers need)
    import rnngen.loaded  # noqa: F401

    assert all(callable(getattr(rnngen, name)) and not isinstance(getattr(rnngen, name), type(rnngen))
               for name in rnngen.__all__ if name != "__version__")
