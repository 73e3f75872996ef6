"""The layers hold: which parts of the package may import what, and no import cycles.

Read from the source with `ast`, every import counted wherever it sits (at the top, inside a
function, under TYPE_CHECKING), so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

import gpuserve

PACKAGE = Path(gpuserve.__file__).parent
WEB = ("fastapi", "starlette", "uvicorn", "grpc")


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported(path: Path, name: str, known: Iterable[str] = ()) -> Iterator[str]:
    """The dotted names a module imports: `import a.b` gives a.b; `from a import b` gives a.b
    where a.b is one of the `known` modules, else a (b is a name defined in a)."""
    known = set(known)
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                anchor = here[: len(here) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield full if full in known else base


def graph() -> dict[str, set[str]]:
    """The package's own import graph: module -> the package modules it imports."""
    found = modules()
    edges: dict[str, set[str]] = {}
    for name, path in found.items():
        targets = set(imported(path, name, found)) & found.keys()
        edges[name] = targets - {name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def third_party(name: str) -> set[str]:
    """The top-level names of what a module imports from outside the package."""
    path = modules()[name]
    return {target.split(".")[0] for target in imported(path, name)} - {"gpuserve", ""}


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above is only as good as the finder: a made-up graph with one cycle.
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("from . import sibling\nfrom ..core import errors, thing\n")
    known = {"gpuserve.http.sibling", "gpuserve.core.errors"}
    names = set(imported(source, "gpuserve.http.mod", known))
    # `thing` is no module: the import is of the package that defines it.
    assert names == {"gpuserve.http.sibling", "gpuserve.core.errors", "gpuserve.core"}


@pytest.mark.parametrize(
    "name", sorted(n for n in modules() if n.startswith(("gpuserve.core", "gpuserve.protocols")))
)
def test_the_core_and_the_codecs_know_no_web_framework_and_no_grpc(name: str) -> None:
    assert third_party(name).isdisjoint(WEB), third_party(name) & set(WEB)


def test_the_batcher_imports_no_torch() -> None:
    assert "torch" not in third_party("gpuserve.core.batcher")


def test_the_cli_only_parses() -> None:
    # It hands the settings to the runtime, imported where `serve` runs, and starts nothing.
    assert third_party("gpuserve.cli").isdisjoint({*WEB, "torch"})


def test_the_supervisor_is_given_its_target() -> None:
    edges = graph()
    assert edges["gpuserve.workers"].isdisjoint({"gpuserve.cli", "gpuserve.server"})
    assert "gpuserve.cli" not in edges["gpuserve.server"]


def test_no_transport_imports_another() -> None:
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("gpuserve.grpc"):
            assert not any(t.startswith("gpuserve.http") for t in targets), (name, targets)
        if name.startswith("gpuserve.http"):
            assert not any(t.startswith("gpuserve.grpc") for t in targets), (name, targets)
