"""Real ``dvc repro`` of the pipeline on tiny generated data, in a throwaway git+DVC repo.

Checks ``dvc exp run -S`` overrides (a split seed, a model's epochs) and that a planted
defect stops ``dvc repro`` at validation with a message naming the defect. The whole DAG,
its reproducibility and the registry are checked in ``test_train_pipeline.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.pipelines.repo import make_repo, run

pytestmark = pytest.mark.slow

@pytest.fixture()
def repo(tmp_path: Path, tiny_phantoms: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    return make_repo(root, tiny_phantoms)


def test_exp_run_with_param_override_changes_splits(repo: Path) -> None:
    # The lesion chain only (validate, prepare, train, evaluate, register of one model):
    # the whole DAG is run by tests/pipelines/test_train_pipeline.py.
    run(["dvc", "repro", "register@lesion"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    before = pd.read_csv(repo / "artifacts/prepared/ultrasound/splits.csv")["split"]
    run(["dvc", "exp", "run", "-S", "prepare.seed=7", "-S", "models.lesion.epochs=1", "register@lesion"],
        repo)
    after = pd.read_csv(repo / "artifacts/prepared/ultrasound/splits.csv")["split"]
    assert (before != after).any()
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    seeds = [exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["prepare"]["seed"]
             for commit in shown for exp in (commit.get("experiments") or [])]
    assert 7 in seeds
    history = pd.read_csv(repo / "reports/models/lesion/history.csv")
    assert len(history) == 1  # the epochs override reached training
    _experiment_leaves_stages_alone(repo)


def _experiment_leaves_stages_alone(repo: Path) -> None:
    """The experiment's version is tagged with it and gets no stage: @staging stays on v1."""
    from mlflow import MlflowClient

    store = f"sqlite:///{repo}/mlflow.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    model = client.get_registered_model("breastscan-lesion")
    assert {alias: str(v) for alias, v in model.aliases.items()} == {"staging": "1"}
    experiment_version = client.get_model_version("breastscan-lesion", "2")
    assert experiment_version.tags.get("dvc_experiment")
    registered = json.loads((repo / "reports/models/lesion/registered.json").read_text())
    assert registered["version"] == 2 and registered["alias"] is None
    assert registered["experiment"] == experiment_version.tags["dvc_experiment"]


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
    proc = run(["dvc", "repro"], repo, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert needle in output, output[-3000:]
    report = json.loads((repo / "reports/validation/ultrasound.json").read_text())
    assert report["success"] is False
    assert not (repo / "artifacts/prepared/ultrasound/splits.csv").exists()
