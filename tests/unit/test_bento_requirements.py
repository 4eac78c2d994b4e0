"""The Bento declares every package its service imports.

A Bento's Python environment is exactly ``services/bentofile.yaml``'s ``python.packages``
and what they depend on; the development venv holds much more (MLflow, pandas, Pillow ...),
so a service that imports an undeclared package works under ``bentoml serve`` here and
fails in the container. ``tests/services/test_bento.py`` serves the built Bento from a
fresh venv made from its requirements (slow); these tests are the cheap guard:

* every first-party module the service can reach -- ``services/service.py`` and what it
  imports, at the top or inside a function, followed through ``breastscan`` -- is read
  (not run), and each third-party module it imports must come from a distribution in the
  closure of the declared packages (their ``Requires-Dist``, extras and markers applied);
* the declared pins are the versions installed here (the tested ones);
* a subprocess imports what a worker imports (the service module and the modules its
  worker, ``breastscan.serving.runtime.Worker``, imports when it is built and started) and
  checks that the read modules cover it.

Imports made by third-party packages are theirs to declare (most of what they import here
beyond their requirements is optional: keras -> pandas / matplotlib, httpx -> brotli ...).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
BENTOFILE = REPO / "services" / "bentofile.yaml"
FIRST_PARTY = ("breastscan", "services")
ENTRY = "services.service"

NOT_SERVED: dict[tuple[str, str], str] = {
    ("breastscan.serving.store", "import_model"):
        "registry -> BentoML store import: run by `breastscan build` / `import-models` in the "
        "project's venv (MLflow), never by the service",
    **{("breastscan.serving.follow", method): "following the registry stage: off in a Bento (a Bento serves "
       "the versions it was built with; runtime.service_config turns it off), on only under `make serve` in "
       "the project's venv (MLflow)" for method in ("connect", "holders", "load", "record")},
}
"""Functions of served modules that the service never calls: their imports are not followed."""


# --------------------------------------------------------------------------- declared packages


def declared() -> list[Requirement]:
    """The bentofile's ``python.packages``."""
    info = yaml.safe_load(BENTOFILE.read_text())
    return [Requirement(p) for p in info["python"]["packages"]]


@cache
def declared_closure() -> dict[str, str]:
    """``{distribution: the declared package that brings it}`` over the installed metadata."""
    found: dict[str, str] = {}
    todo = [(req, canonicalize_name(req.name)) for req in declared()]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, root = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in done:
            continue
        done.add(key)
        found.setdefault(name, root)
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue  # test_declared_pins_are_the_installed_versions names it
        environments = [{"extra": e} for e in sorted(req.extras)] or [{"extra": ""}]
        for line in requires:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate(env) for env in environments):
                todo.append((dep, root))
    return found


@cache
def distributions_of(top: str) -> set[str]:
    """The installed distributions providing top-level module ``top``."""
    return {canonicalize_name(d) for d in md.packages_distributions().get(top, [])}


# --------------------------------------------------------------------------- what the service imports


def _source(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """``(absolute module name, line)`` of every import, skipping ``TYPE_CHECKING`` blocks
    and the :data:`NOT_SERVED` functions; ``from a import b`` gives ``a`` and ``a.b``."""
    package = module if is_package else module.rpartition(".")[0]
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (module, node.name) in NOT_SERVED:
            continue
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base, node.lineno
            yield from ((f"{base}.{alias.name}", node.lineno) for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


@cache
def scan() -> tuple[frozenset[str], dict[str, tuple[str, ...]]]:
    """First-party modules reachable from the service, and the third-party top-level
    modules they import with where (``module:line``)."""
    seen: set[str] = set()
    third: dict[str, set[str]] = {}
    todo = [ENTRY]
    while todo:
        module = todo.pop()
        path = None if module in seen else _source(module)
        if path is None:  # done already, or a name imported from a module (a class ...)
            continue
        seen.add(module)
        parents = module.split(".")
        todo.extend(".".join(parents[:i]) for i in range(1, len(parents)))  # packages' __init__
        tree = ast.parse(path.read_text(), str(path))
        for name, line in _imports(tree, module, path.name == "__init__.py"):
            top = name.split(".")[0]
            if top in FIRST_PARTY:
                todo.append(name)
            elif top and top != "__future__" and top not in sys.stdlib_module_names:
                third.setdefault(top, set()).add(f"{module}:{line}")
    return frozenset(seen), {top: tuple(sorted(where)) for top, where in third.items()}


# --------------------------------------------------------------------------- tests


def test_declared_pins_are_the_installed_versions() -> None:
    wrong = []
    for req in declared():
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            wrong.append(f"{req} is not installed in this venv")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{req}: this venv has {version}")
    assert not wrong, f"{BENTOFILE.name}: " + "; ".join(wrong)


def test_the_scan_reaches_the_service_code() -> None:
    modules, third = scan()
    # What the worker imports at start and while serving, through the service's own imports.
    assert {"services.service", "breastscan.evaluation.combined", "breastscan.bundle",
            "breastscan.models.gradcam", "breastscan.serving.grpc_server", "breastscan.serving.ui",
            "breastscan.imaging.dicom"} <= modules
    assert "breastscan.registry.resolver" not in modules  # NOT_SERVED: MLflow is not in the Bento
    assert {"bentoml", "numpy", "keras", "tensorflow", "grpc", "cv2", "pydicom", "PIL"} <= set(third)


def test_every_package_the_service_imports_is_declared() -> None:
    closure = declared_closure()
    _, third = scan()
    missing = []
    for top, where in sorted(third.items()):
        dists = distributions_of(top)
        if not dists & closure.keys():
            provider = ", ".join(sorted(dists)) or "no installed distribution"
            missing.append(f"{top} ({provider}; imported at {', '.join(where[:3])})")
    assert not missing, (f"imported by the service but not in {BENTOFILE.relative_to(REPO)}'s "
                         "python.packages nor their dependencies: " + "; ".join(missing))


# Runs in a subprocess: imports what a worker imports, and reports the first-party modules
# loaded and the third-party top-level modules first-party code asked the import system for.
WORKER_IMPORTS = r"""
import importlib, json, os, sys

repo, modules = sys.argv[1], sys.argv[2:]
first_party = tuple(os.path.join(repo, d) + os.sep for d in ("breastscan", "services"))
asked = set()


class Watch:
    def find_spec(self, name, path=None, target=None):
        frame = sys._getframe(1)
        while frame is not None and ("importlib" in frame.f_code.co_filename
                                     or frame.f_code.co_filename.startswith("<frozen")):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(first_party):
            asked.add(name.split(".")[0])
        return None


sys.meta_path.insert(0, Watch())
for name in modules:
    importlib.import_module(name)
loaded = sorted(n for n, m in sys.modules.items()
                if (getattr(m, "__file__", None) or "").startswith(first_party))
print("REPORT " + json.dumps({"loaded": loaded, "asked": sorted(asked)}))
"""


def test_a_worker_imports_only_what_the_scan_read(tmp_path: Path) -> None:
    modules, _ = scan()
    # The service module, then what its worker imports when it is built and started (the
    # scan found them in services/service.py and breastscan/serving/runtime.py, whose Worker
    # the service builds); a serving config naming the models: no store needed.
    service_imports = [name for path, module in ((REPO / "services" / "service.py", ENTRY),
                                                 (REPO / "breastscan" / "serving" / "runtime.py",
                                                  "breastscan.serving.runtime"))
                       for name, _ in _imports(ast.parse(path.read_text()), module, False) if name in modules]
    config = tmp_path / "serving.yaml"
    config.write_text("models: [density, tumor, lesion]\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(BENTOML_HOME=str(tmp_path / "bentoml"), BREASTSCAN_SERVING_CONFIG=str(config),
               BENTOML_DO_NOT_TRACK="true", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", WORKER_IMPORTS, str(REPO), ENTRY, *service_imports],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert "services.service" in report["loaded"] and "breastscan.serving.grpc_server" in report["loaded"]
    unread = sorted(set(report["loaded"]) - modules)
    assert not unread, f"the worker loads first-party modules the scan did not read: {unread}"
    closure = declared_closure()
    asked = {top for top in report["asked"]
             if top not in FIRST_PARTY and top not in sys.stdlib_module_names}
    undeclared = sorted(top for top in asked if not distributions_of(top) & closure.keys())
    assert not undeclared, f"first-party code imported undeclared packages at run time: {undeclared}"

