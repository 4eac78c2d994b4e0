"""Every project module a DVC stage runs is a dependency of that stage, so editing it reruns the stage.

For each stage of ``dvc.yaml`` (``foreach`` expanded by DVC itself) the module its ``cmd`` runs
(``python -m pipelines.X``) is read with :mod:`ast` and the project modules it imports are
followed transitively: top-level and function-level imports, ``from pkg import module``,
relative imports, the ``__init__.py`` of every package on the way (Python runs them), and
dotted string literals naming a project module (``import_module`` tables). Imports under
``if TYPE_CHECKING:`` are skipped (they never run). Nothing is hard-coded: a module moved to
another subpackage moves in the closure too, and the failure lists, per stage, the files to
add under its ``deps:``. Also checks the top-level ``metrics:``, ``plots:`` and ``artifacts:``.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

CMD_MODULE = re.compile(r"^python3?\s+-m\s+([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\s|$)")
DOTTED = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$")


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of module ``name`` under ``root`` (a package: its ``__init__.py``), or None.

    Stages run with the repo root as working directory and ``python -m`` puts it first on
    ``sys.path``, so a name resolving here is the project's; anything else is third-party.
    """
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``[a, a.b, a.b.c]``: importing a module runs every enclosing package first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` and docstrings."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = [node.test, *node.orelse]
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)):
            children.remove(body[0])
        stack.extend(children)
    return out


@cache
def direct_imports(name: str, root: Path = REPO) -> frozenset[str]:
    """Project modules (with their parent packages) that module ``name`` imports."""
    path = module_file(name, root)
    assert path is not None, name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        candidates: list[str] = []
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from pkg import x``: x is a submodule or a name defined in pkg.
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED.match(node.value):
            candidates = [node.value]  # import_module("pkg.mod") and dispatch tables
        for candidate in candidates:
            if module_file(candidate, root) is not None:
                found.update(m for m in with_parents(candidate) if module_file(m, root) is not None)
    return frozenset(found)


def closure(entry: str, root: Path = REPO) -> set[Path]:
    """Files of every project module that running ``python -m entry`` may import."""
    seen: set[str] = set()
    todo = [m for m in with_parents(entry) if module_file(m, root) is not None]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(direct_imports(name, root) - seen)
    return {module_file(name, root) for name in seen}  # type: ignore[misc]


@pytest.fixture(scope="module")
def stages() -> list[dict[str, Any]]:
    """The stages of ``dvc.yaml`` as DVC expands them: name, cmd, file deps, outs (repo-relative)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    def rel(stage: Any, def_path: str) -> str:
        return (Path(stage.wdir) / def_path).resolve().relative_to(REPO).as_posix()

    with Repo(str(REPO)) as repo:
        return [
            {"name": stage.addressing, "cmd": stage.cmd,
             "deps": [rel(stage, d.def_path) for d in stage.deps if not isinstance(d, ParamsDependency)],
             "outs": [rel(stage, o.def_path) for o in stage.outs]}
            for stage in repo.index.stages
            if Path(stage.path).resolve() == REPO / "dvc.yaml"
        ]


@pytest.fixture(scope="module")
def dvc_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))


def covered(file: str, deps: list[str]) -> bool:
    """Whether a dep is ``file`` itself or a directory holding it."""
    return any(PurePosixPath(file).is_relative_to(dep) for dep in deps)


def stage_closure(stage: dict[str, Any]) -> list[str]:
    """Repo-relative files of the project modules the stage's ``cmd`` runs and imports."""
    match = CMD_MODULE.match(stage["cmd"] or "")
    if not (match and module_file(match.group(1))):
        pytest.fail(f"{stage['name']}: cannot tell which module `{stage['cmd']}` runs "
                    "(expected `python -m <project module> ...`)", pytrace=False)
    return sorted(p.relative_to(REPO).as_posix() for p in closure(match.group(1)))


def report(title: str, per_stage: dict[str, list[str]]) -> str:
    """``title`` then, per group of stages with the same files (``foreach`` instances), the files."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, files in per_stage.items():
        groups.setdefault(tuple(files), []).append(name)
    return title + "".join(
        f"\n  {', '.join(names)}:\n" + "\n".join(f"    - {f}" for f in files)
        for files, names in groups.items())


def test_stages_depend_on_every_project_module_they_import(stages: list[dict[str, Any]]) -> None:
    assert stages, "no stage found in dvc.yaml"
    missing = {stage["name"]: gaps for stage in stages
               if (gaps := [f for f in stage_closure(stage) if not covered(f, stage["deps"])])}
    if missing:
        pytest.fail(report("stages import project modules missing from their `deps:` in dvc.yaml "
                           "(add these lines):", missing), pytrace=False)


def test_code_deps_are_modules_the_stage_imports(stages: list[dict[str, Any]]) -> None:
    # A ``.py`` dep the stage no longer imports (a module moved, an import dropped) reruns the
    # stage for nothing; a code dep that does not exist breaks ``dvc repro``. Code deps are the
    # ones inside a project package; data, report and non-Python deps are left alone.
    stale: dict[str, list[str]] = {}
    for stage in stages:
        files = stage_closure(stage)
        code = [d for d in stage["deps"] if module_file(PurePosixPath(d).parts[0]) is not None]
        if extra := [d for d in code if not (REPO / d).exists() or (d.endswith(".py") and d not in files)]:
            stale[stage["name"]] = extra
    if stale:
        pytest.fail(report("code deps in dvc.yaml that the stage does not import, or that do not "
                           "exist (remove or fix these lines):", stale), pytrace=False)


def test_closure_follows_every_kind_of_import(tmp_path: Path) -> None:
    # The import walk itself, on a made-up package, so it does not depend on today's layout.
    files = {
        "app/__init__.py": "",
        "app/main.py": """
from typing import TYPE_CHECKING
import numpy
from app import sub
from .rel import thing
import app.deep.leaf
if TYPE_CHECKING:
    from app import typing_only
def f():
    from app.lazy import g
TABLE = {"x": ("app.dynamic", "fn")}
""",
        "app/sub.py": "", "app/rel.py": "thing = 1", "app/deep/__init__.py": "", "app/deep/leaf.py": "",
        "app/typing_only.py": "", "app/lazy.py": "from . import chained\ng = 1", "app/chained.py": "",
        "app/dynamic.py": "", "app/unused.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = {p.relative_to(tmp_path).as_posix() for p in closure("app.main", tmp_path)}
    assert found == set(files) - {"app/typing_only.py", "app/unused.py"}


def test_top_level_metrics_plots_and_artifacts(
        dvc_yaml: dict[str, Any], stages: list[dict[str, Any]]) -> None:
    for section in ("metrics", "plots", "artifacts"):
        assert dvc_yaml.get(section), f"dvc.yaml has no top-level `{section}:` section"
    train_outs = {out for stage in stages if stage["name"].split("@")[0] == "train" for out in stage["outs"]}
    for name, artifact in dvc_yaml["artifacts"].items():
        assert artifact.get("type") == "model", (
            f"artifact {name}: type is {artifact.get('type')!r}, not model")
        assert artifact.get("path") in train_outs, (
            f"artifact {name}: path {artifact.get('path')!r} is not an out of a train stage "
            f"({sorted(train_outs)})")
