"""The library's layers: no two top-level parts of ``breastscan`` import each other.

A *part* is a subpackage (``breastscan/data/``) or a top-level module
(``breastscan/config.py``). Part A depends on part B when any module of A imports any module
of B, at module level or inside a function (a deferred import still runs); imports under
``if TYPE_CHECKING:`` never run and are left out. The graph of these dependencies must have
no cycle, of two parts or of more: then each part can be read, tested and changed standing
only on the parts below it. The order the code follows, bottom to top:

    labels, decision, jsonable, logs, processes, provenance, imaging/
    -> config -> data -> models/ -> bundle -> training/ -> evaluation/ -> registry/
    -> monitoring/, serving/ -> cli

A failure lists every group of parts that import one another, with the ``file:line`` of each
import between them, so the import to move stands in the message.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

Graph = dict[tuple[str, str], list[str]]
"""``(importing part, imported part)`` -> the ``file:line`` of each import behind the edge."""


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` but the bodies of ``if TYPE_CHECKING:`` (their ``else`` is kept)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def imported_names(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """Dotted names an import statement may load (``from p import x``: ``p`` and ``p.x``).

    Args:
        node: an ``import`` or ``from ... import`` statement.
        package: the package the importing module is in (resolves relative imports).
    """
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]


def part_graph(root: Path) -> Graph:
    """The import graph between the top-level parts of the package at ``root``.

    Args:
        root: a package directory (``<repo>/breastscan``); its name is the package's name.

    Returns:
        An edge per pair of distinct parts with at least one runtime import between them.
    """
    top = root.name
    parts = {p.stem if p.suffix == ".py" else p.name for p in root.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    graph: Graph = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        package = module if relative.name == "__init__" else module.rpartition(".")[0]
        source = module.split(".")[1] if "." in module else None
        where = path.relative_to(root.parent).as_posix()
        if source is None:  # the package's own __init__.py belongs to no part
            continue
        for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            targets = {name.split(".")[1] for name in imported_names(node, package)
                       if name.startswith(f"{top}.")}
            for target in sorted(targets & parts - {source}):
                graph.setdefault((source, target), []).append(f"{where}:{node.lineno}")
    return {edge: sorted(places, key=_file_then_line) for edge, places in graph.items()}


def _file_then_line(place: str) -> tuple[str, int]:
    path, _, line = place.rpartition(":")
    return path, int(line)


def reachable(graph: Graph, start: str) -> set[str]:
    """Parts ``start`` depends on, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        for source, target in graph:
            if source == node and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def cycles(graph: Graph) -> list[list[str]]:
    """The groups of parts that depend on one another (strongly connected, two parts or more), sorted."""
    reach = {part: reachable(graph, part) for edge in graph for part in edge}
    groups = {frozenset({p} | {q for q in reach[p] if p in reach[q]}) for p in reach if p in reach[p]}
    return sorted(sorted(group) for group in groups)


def describe(graph: Graph, groups: list[list[str]]) -> str:
    """Each group of :func:`cycles`, with every import between its parts as ``file:line``."""
    lines = []
    for group in groups:
        lines.append(f"parts that import one another: {', '.join(group)}")
        for (source, target), places in sorted(graph.items()):
            if source in group and target in group:
                lines.append(f"  {source} -> {target}: {', '.join(places)}")
    return "\n".join(lines)


def test_no_two_parts_of_breastscan_import_each_other() -> None:
    graph = part_graph(REPO / "breastscan")
    assert ("config", "labels") in graph, "the import walk found none of the library's known imports"
    found = cycles(graph)
    if found:
        pytest.fail("the layers of breastscan form cycles (move the imports below, or what they "
                    "import, to a lower part):\n" + describe(graph, found), pytrace=False)


def test_the_walk_finds_deferred_and_long_cycles_but_not_type_checking_imports(tmp_path: Path) -> None:
    # The check itself, on a made-up package, so that it does not depend on today's layout.
    files = {
        "__init__.py": "",
        "base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import top\n",
        "low/__init__.py": "",
        "low/a.py": "import os\n\ndef f():\n    from pkg.mid import b\n",  # deferred: low -> mid
        "mid/__init__.py": "from . import b\n",
        "mid/b.py": "from pkg import top\nfrom pkg.base import x\n",       # mid -> top, mid -> base
        "top.py": "import pkg.low.a\n",                                      # top -> low: closes the cycle
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    graph = part_graph(tmp_path / "pkg")
    assert graph == {("low", "mid"): ["pkg/low/a.py:4"], ("mid", "top"): ["pkg/mid/b.py:1"],
                     ("mid", "base"): ["pkg/mid/b.py:2"], ("top", "low"): ["pkg/top.py:1"]}
    assert cycles(graph) == [["low", "mid", "top"]]  # base -> top is TYPE_CHECKING only
    assert describe(graph, cycles(graph)).splitlines() == [
        "parts that import one another: low, mid, top",
        "  low -> mid: pkg/low/a.py:4",
        "  mid -> top: pkg/mid/b.py:1",
        "  top -> low: pkg/top.py:1",
    ]
    (tmp_path / "pkg" / "top.py").write_text("import pkg.base\n")
    assert cycles(part_graph(tmp_path / "pkg")) == []
