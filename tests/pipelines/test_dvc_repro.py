"""Real ``dvc repro`` of the pipeline on tiny generated data, in a throwaway git+DVC repo.

Checks the DAG runs end to end, writes its declared outputs, is reproducible (a second
``dvc repro`` does nothing), answers ``dvc metrics show`` / ``dvc exp run -S``, and that a
planted defect stops it at validation with a message naming the defect.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, text=True, capture_output=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _make_repo(root: Path, data: Path) -> Path:
    """A git+DVC repo holding this project's DAG and a copy of the tiny phantom data."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    for pkg in ("pipelines", "breastscan"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(data, root / "data")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["validate"]["min_class_count"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["git", "config", "user.email", "ci@example.invalid"], root)
    _run(["git", "config", "user.name", "ci"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "core.analytics", "false"], root)
    _run(["dvc", "add", "-q", "data"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "tiny repo"], root)
    return root


@pytest.fixture()
def repo(tmp_path: Path, tiny_phantoms: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    return _make_repo(root, tiny_phantoms)


def test_repro_runs_whole_dag_and_is_reproducible(repo: Path) -> None:
    _run(["dvc", "repro"], repo)
    for ds in ("mammography", "ultrasound"):
        report = json.loads((repo / f"reports/validation/{ds}.json").read_text())
        assert report["success"] is True
        splits = pd.read_csv(repo / f"artifacts/prepared/{ds}/splits.csv")
        kept = splits[splits["split"] != "excluded"]
        assert set(kept["split"]) == {"train", "val", "test"}
        assert (kept.groupby("dup_group")["split"].nunique() == 1).all()
        metrics = json.loads((repo / f"reports/prepare/{ds}.json").read_text())
        assert metrics["n_images"] == len(splits)
    # nothing changed: a second repro runs no stage
    again = _run(["dvc", "repro"], repo)
    assert "Running stage" not in again.stdout
    shown = _run(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "near_duplicate_pairs" in shown
    status = _run(["dvc", "status"], repo).stdout
    assert "up to date" in status.lower()


def test_exp_run_with_param_override_changes_splits(repo: Path) -> None:
    _run(["dvc", "repro"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "baseline"], repo)
    before = pd.read_csv(repo / "artifacts/prepared/ultrasound/splits.csv")["split"]
    _run(["dvc", "exp", "run", "-S", "prepare.seed=7"], repo)
    after = pd.read_csv(repo / "artifacts/prepared/ultrasound/splits.csv")["split"]
    assert (before != after).any()
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo).stdout)
    seeds = [exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["prepare"]["seed"]
             for commit in shown for exp in (commit.get("experiments") or [])]
    assert 7 in seeds


@pytest.mark.parametrize(
    ("defect", "needle"),
    [("missing_file", "missing_on_purpose.png"), ("unknown_label", "Cancer"), ("corrupt_png", "truncated")],
)
def test_planted_defect_stops_at_validation(repo: Path, defect: str, needle: str) -> None:
    root = repo / "data" / "ultrasound"
    df = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    if defect == "missing_file":
        df.loc[1, "image"] = "images/missing_on_purpose.png"
    elif defect == "unknown_label":
        df.loc[1, "pathology"] = "Cancer"
    else:
        target = root / df.loc[1, "image"]
        target.write_bytes(target.read_bytes()[:300])
    df.to_csv(root / "manifest.csv", index=False)
    proc = _run(["dvc", "repro"], repo, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert needle in output, output[-3000:]
    report = json.loads((repo / "reports/validation/ultrasound.json").read_text())
    assert report["success"] is False
    assert not (repo / "artifacts/prepared/ultrasound/splits.csv").exists()
