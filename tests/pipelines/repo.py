"""A throwaway git+DVC repo with this project's DAG, tiny data and tiny model settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO

BIN = Path(sys.executable).parent

TINY_MODELS: dict[str, dict[str, Any]] = {
    "density": {"epochs": 2, "batch_size": 16, "patience": 0,
                "preprocess": {"height": 48, "width": 40}},
    "tumor": {"epochs": 2, "batch_size": 16, "patience": 0,
              "preprocess": {"height": 48, "width": 40, "clahe": True}},
    "lesion": {"epochs": 2, "batch_size": 8, "patience": 0, "depth": 2, "base_filters": 4,
               "preprocess": {"height": 32, "width": 48}},
}
"""Overrides that make each model train in seconds; everything else is params.yaml's."""


def env(**extra: str) -> dict[str, str]:
    """The environment of a pipeline subprocess: the venv first, telemetry off, local MLflow."""
    out = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true"}
    out.pop("MLFLOW_TRACKING_URI", None)
    out.update(extra)
    return out


def run(args: list[str], cwd: Path, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run a command in ``cwd``; on failure with ``check`` raise with its whole output."""
    proc = subprocess.run(args, cwd=cwd, env=env(**extra_env), text=True, capture_output=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_repo(root: Path, data: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Fill ``root`` with a git+DVC repo holding the DAG, the code and a copy of ``data``.

    Args:
        root: an empty directory.
        data: a demo tree (``mammography/``, ``ultrasound/``) to copy as ``data/``.
        overrides: merged into params.yaml after the tiny defaults.
    """
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    for pkg in ("pipelines", "breastscan"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(data, root / "data")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["validate"]["min_class_count"] = 3
    params["models"] = _merge(params["models"], TINY_MODELS)
    params = _merge(params, overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/data\n/artifacts\n/mlflow.db\n/mlartifacts\n")
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "ci@example.invalid"], root)
    run(["git", "config", "user.name", "ci"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "core.analytics", "false"], root)
    run(["dvc", "add", "-q", "data"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny repo"], root)
    return root
