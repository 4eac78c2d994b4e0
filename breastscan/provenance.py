"""Provenance of a checkout: its git commit and the DVC hashes of its data and outputs.

Plain reads of ``git`` and of the ``.dvc`` / ``dvc.lock`` files, with no tracking server
involved: MLflow run tags (:func:`breastscan.registry.tracking.run_tags`) and the reports of
the benchmarks (:mod:`breastscan.evaluation.crossval`, :mod:`breastscan.evaluation.crosssite`)
record the same values. Every function answers ``None`` where the value is unknown (no git,
no checkout, no such file) rather than raising.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml


def _git(project_root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=project_root, capture_output=True, text=True,
                             timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(project_root: Path) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of a checkout: the HEAD commit and whether tracked files are
    modified; ``(None, None)`` outside a git checkout (or without git)."""
    commit = _git(Path(project_root), "rev-parse", "HEAD")
    status = _git(Path(project_root), "status", "--porcelain", "--untracked-files=no") if commit else None
    return commit, (None if status is None else bool(status))


def _yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def dvc_data_hash(project_root: Path, dvc_file: str = "data.dvc") -> str | None:
    """The md5 of the outputs recorded in a ``.dvc`` file (``<md5>.dir`` for a directory).

    Several outputs give ``path:md5`` pairs joined by commas. ``None`` when the file is
    missing or has no hash.
    """
    doc = _yaml(Path(project_root) / dvc_file)
    outs = doc.get("outs") if isinstance(doc, dict) else None
    if not isinstance(outs, list):
        return None
    hashes = [(str(o.get("path", "")), str(o["md5"])) for o in outs if isinstance(o, dict) and o.get("md5")]
    if not hashes:
        return None
    if len(hashes) == 1:
        return hashes[0][1]
    return ",".join(f"{p}:{h}" for p, h in hashes)


def dvc_lock_hash(project_root: Path, path: str | Path) -> str | None:
    """The md5 ``dvc.lock`` records for an output path (e.g. a prepared ``splits.csv``).

    Args:
        project_root: the project directory holding ``dvc.lock``.
        path: the output, relative to the project root (or absolute inside it).

    Returns:
        The md5, or ``None`` when no stage in ``dvc.lock`` outputs that path.
    """
    root = Path(project_root).resolve()
    target = Path(path)
    if target.is_absolute():
        try:
            target = target.resolve().relative_to(root)
        except ValueError:
            return None
    wanted = target.as_posix()
    doc = _yaml(root / "dvc.lock")
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, dict):
        return None
    for stage in stages.values():
        for out in (stage or {}).get("outs", []) or []:
            if isinstance(out, dict) and Path(str(out.get("path", ""))).as_posix() == wanted:
                return str(out.get("md5")) if out.get("md5") else None
    return None
