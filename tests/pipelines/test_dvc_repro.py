"""Real ``dvc repro`` of the pipeline on tiny generated data, in a throwaway git+DVC repo.

Runs the lesion chain and a ``dvc exp run -S`` experiment (a split seed, a model's epochs)
against a team's tracking server (``mlflow server`` on PostgreSQL, proxied artifacts), and
checks that a planted defect stops ``dvc repro`` at validation with a message naming it. The whole DAG,
its reproducibility and the registry are checked in ``test_train_pipeline.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.mlflow_server import mlflow_server
from tests.pipelines.repo import make_repo, run

log = logging.getLogger(__name__)

pytestmark = pytest.mark.slow

@pytest.fixture()
def repo(tmp_path: Path, tiny_phantoms: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    return make_repo(root, tiny_phantoms)


@pytest.fixture()
def team_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` with proxied artifacts on a PostgreSQL store (tests/postgres.py);
    on a SQLite store only when PostgreSQL tests are skipped on purpose (``POSTGRES=skip``)."""
    store = None
    try:
        store = request.getfixturevalue("postgres").create_database("mlflow_pipeline")
    except pytest.skip.Exception as skipped:
        log.warning("tracking server on SQLite, not PostgreSQL: %s", skipped)
    with mlflow_server(tmp_path / "server", backend_store_uri=store) as uri:
        yield uri


def test_lesion_chain_and_an_experiment_on_a_team_tracking_server(repo: Path, team_server: str) -> None:
    """``MLFLOW_TRACKING_URI`` names a server over HTTP: ``dvc repro`` of the lesion chain
    (validate, prepare, train, evaluate, register; the whole DAG is run by
    test_train_pipeline.py), then ``dvc exp run -S`` overrides, nothing stored locally."""
    uri = team_server
    run(["dvc", "repro", "register@lesion"], repo, MLFLOW_TRACKING_URI=uri)
    _registered_on_the_server(repo, uri)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    before = pd.read_csv(repo / "artifacts/prepared/ultrasound/splits.csv")["split"]
    run(["dvc", "exp", "run", "-S", "prepare.seed=7", "-S", "models.lesion.epochs=1", "register@lesion"],
        repo, MLFLOW_TRACKING_URI=uri)
    after = pd.read_csv(repo / "artifacts/prepared/ultrasound/splits.csv")["split"]
    assert (before != after).any()
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    seeds = [exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["prepare"]["seed"]
             for commit in shown for exp in (commit.get("experiments") or [])]
    assert 7 in seeds
    history = pd.read_csv(repo / "reports/models/lesion/history.csv")
    assert len(history) == 1  # the epochs override reached training
    _experiment_leaves_stages_alone(repo, uri)
    assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()


def _registered_on_the_server(repo: Path, uri: str) -> None:
    """The server has the version at @staging, logged by the run that trained it, with the Dice
    that evaluate recorded -- the mean of the per-image Dice saved with the predictions."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("breastscan-lesion", "staging")
    run_id = json.loads((repo / "artifacts/models/lesion/run.json").read_text())["run_id"]
    assert version.run_id == run_id
    reports = repo / "reports/models/lesion"
    recorded = json.loads((reports / "metrics.json").read_text())
    predictions = pd.read_csv(reports / "predictions.csv")
    assert len(predictions) == recorded["n_test"] > 0
    assert client.get_run(run_id).data.metrics["test_mean_dice"] == pytest.approx(recorded["mean_dice"])
    assert recorded["mean_dice"] == pytest.approx(predictions["dice"].mean(), abs=1e-5)
    # each per-image Dice agrees with its pixel counts: 1 when truth and prediction are both
    # empty, 0 when only one is, at most 2 min(|T|, |P|) / (|T| + |P|) otherwise
    t, p, d = predictions["true_pixels"], predictions["pred_pixels"], predictions["dice"]
    assert (predictions["lesion"] == (t > 0).astype(int)).all()
    both_empty, one_empty = (t == 0) & (p == 0), (t == 0) ^ (p == 0)
    assert (d[both_empty] == 1.0).all() and (d[one_empty] == 0.0).all()
    rest = ~both_empty
    assert (d[rest] <= 2 * np.minimum(t[rest], p[rest]) / (t[rest] + p[rest]) + 1e-6).all()
    _loads_by_alias(uri, "models:/breastscan-lesion@staging")


def _loads_by_alias(uri: str, model_uri: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
        assert model.predict(np.zeros((2, 32, 48, 1), np.float32)).shape == (2, 32, 48, 1)
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]


def _experiment_leaves_stages_alone(repo: Path, uri: str) -> None:
    """The experiment's version is tagged with it and gets no stage: @staging stays on v1."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
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
