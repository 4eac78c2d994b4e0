"""The whole DAG with training, in a throwaway git+DVC repo: real ``dvc repro``, real MLflow.

One repo per module (training is the expensive part): ``dvc repro`` trains, evaluates and
registers the three models with tiny settings; then the registry, promotion gates, model
loading by stage, ``dvc metrics``/``dvc plots`` and the summary table are checked against
that one repo. The lesion chain against a team's tracking server (``mlflow server`` on
PostgreSQL) is in ``test_dvc_repro.py``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.pipelines.repo import make_repo, run

pytestmark = pytest.mark.slow

MODELS = ("density", "tumor", "lesion")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_phantoms: Path) -> tuple[Path, str]:
    """A repo after ``dvc repro``, and the stdout of that run."""
    root = tmp_path_factory.mktemp("trained")
    # Low floors so that the tiny models can be promoted; one test raises them.
    low = {
        "density": {"gates": {"floors": {"quadratic_kappa": -1.0, "accuracy": 0.0}, "max_regression": 1.0}},
        "tumor": {"gates": {"floors": {"macro_auc": 0.0, "accuracy": 0.0}, "max_regression": 1.0}},
        "lesion": {"gates": {"floors": {"mean_dice": 0.0}, "max_regression": 1.0}},
    }
    make_repo(root, tiny_phantoms, {"models": low})
    proc = run(["dvc", "repro"], root)
    return root, proc.stdout


def _mlflow(root: Path) -> Iterator[object]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.MlflowClient()


@pytest.fixture()
def client(trained: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    root, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    yield _mlflow(root)
    import mlflow

    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]


def test_repro_trains_evaluates_and_registers_every_model(trained: tuple[Path, str], client) -> None:
    import mlflow

    root, stdout = trained
    for ds in ("mammography", "ultrasound"):
        assert json.loads((root / f"reports/validation/{ds}.json").read_text())["success"] is True
        splits = pd.read_csv(root / f"artifacts/prepared/{ds}/splits.csv")
        kept = splits[splits["split"] != "excluded"]
        assert set(kept["split"]) == {"train", "val", "test"}
        assert (kept.groupby("dup_group")["split"].nunique() == 1).all()
        assert json.loads((root / f"reports/prepare/{ds}.json").read_text())["n_images"] == len(splits)
    for name in MODELS:
        assert (root / f"artifacts/models/{name}/model.keras").is_file()
        run_info = json.loads((root / f"artifacts/models/{name}/run.json").read_text())
        metrics = json.loads((root / f"reports/models/{name}/metrics.json").read_text())
        assert metrics["headline_value"] is not None and metrics["n_test"] > 0
        for png in (root / f"reports/models/{name}/png").glob("*.png"):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        card = (root / f"reports/models/{name}/model_card.md").read_text()
        assert "Not for diagnosis" in card and "95% CI" in card
        # one run per model: params, per-epoch metrics, test metrics, artefacts, tags
        mlrun = client.get_run(run_info["run_id"])
        assert mlrun.data.params["model.epochs"] == "2"
        assert len(client.get_metric_history(mlrun.info.run_id, "loss")) == 2
        assert f"test_{metrics['headline']}" in mlrun.data.metrics
        assert mlrun.data.tags["breastscan.data_hash"]
        artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
        assert {"data", "training", "evaluation"} <= artifacts
        # evaluate logged the calibrated model (card inside, test metrics linked to it) ...
        logged = json.loads((root / f"reports/models/{name}/logged_model.json").read_text())
        model_id = logged["model_uri"].removeprefix("models:/")
        model = client.get_logged_model(model_id)
        assert model.source_run_id == mlrun.info.run_id == logged["run_id"]
        linked = {m.key: m.value for m in model.metrics or []}
        assert linked[f"test_{metrics['headline']}"] == pytest.approx(metrics["headline_value"])
        card_uri = f"{model.artifact_location}/artifacts/model_card.md"  # a pyfunc artifact
        signature = mlflow.models.get_model_info(logged["model_uri"]).signature
        contract = json.loads((root / f"artifacts/models/{name}/contract.json").read_text())
        k_or_mask = [len(contract["classes"])] if contract["task"] == "classification" \
            else contract["input_shape"]
        assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, *contract["input_shape"])
        assert signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, *k_or_mask)
        assert "Not for diagnosis" in mlflow.artifacts.load_text(card_uri)
        # ... and register registered that very model: the version sits at staging, with
        # its metrics and split id
        version = client.get_model_version_by_alias(f"breastscan-{name}", "staging")
        assert version.run_id == mlrun.info.run_id
        assert version.source == logged["model_uri"]
        assert version.tags["split_id"]
        assert json.loads((root / f"reports/models/{name}/registered.json").read_text())["model_uri"] \
            == logged["model_uri"]
    # the 8-category view combines the two classifiers' calibrated test predictions
    view = pd.read_csv(root / "reports/eight_category/predictions.csv")
    density = pd.read_csv(root / "reports/models/density/predictions.csv")
    tumor = pd.read_csv(root / "reports/models/tumor/predictions.csv")
    assert list(view["image"]) == list(density["image"]) == list(tumor["image"])
    p_m = tumor["prob_malignant"] / (tumor["prob_malignant"] + tumor["prob_benign"])
    np.testing.assert_allclose(view["p_malignant"], p_m, atol=1e-6)
    letters = density[["prob_A", "prob_B", "prob_C", "prob_D"]].to_numpy().argmax(axis=1)
    assert [c.split("-")[1] for c in view["category"]] == ["ABCD"[i] for i in letters]
    eight = json.loads((root / "reports/eight_category/metrics.json").read_text())
    assert eight["n_test"] == len(view) and eight["n_with_lesion"] == view["true_category"].notna().sum()
    # the summary table closes the repro output
    tail = stdout[stdout.rindex("Running stage 'summary'"):]
    for name in MODELS:
        assert name in tail
    assert "staging" in tail


def test_second_repro_does_nothing(trained: tuple[Path, str]) -> None:
    root, _ = trained
    again = run(["dvc", "repro"], root)
    assert "Running stage" not in again.stdout
    assert "up to date" in run(["dvc", "status"], root).stdout.lower()


def test_dvc_metrics_and_plots(trained: tuple[Path, str]) -> None:
    root, _ = trained
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    text = json.dumps(shown)
    for name in MODELS:
        assert f"reports/models/{name}/metrics.json" in text
    assert "quadratic_kappa" in text and "mean_dice" in text
    out = root / "plots_html"
    run(["dvc", "plots", "show", "-o", str(out)], root)
    html = (out / "index.html").read_text()
    assert "reports/models/tumor/plots/roc.csv" in html
    assert "reports/models/lesion/history.csv" in html


def test_registered_model_serves_what_the_bundle_predicts(trained: tuple[Path, str], client) -> None:
    import mlflow

    from breastscan.bundle import ModelBundle

    root, _ = trained
    bundle = ModelBundle.load(root / "artifacts/models/tumor")
    metrics = json.loads((root / "reports/models/tumor/metrics.json").read_text())
    bundle = bundle.with_temperature(metrics["temperature"])
    x = np.random.default_rng(0).random((3, *bundle.contract.input_shape), dtype=np.float32)
    served = mlflow.pyfunc.load_model("models:/breastscan-tumor@staging").predict(x)
    np.testing.assert_allclose(served, bundle.predict(x), atol=1e-5)
    assert np.allclose(served.sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_model_from_registry_reproduces_the_evaluation(trained: tuple[Path, str], client, name: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from breastscan.config import load_params
    from breastscan.data.loading import load_split
    from breastscan.evaluation.scoring import Scoring, score_bundle
    from breastscan.registry.resolver import load_bundle

    root, _ = trained
    monkeypatch.chdir(root)
    cfg = load_params(root / "params.yaml").model(name)
    dataset = load_params(root / "params.yaml").dataset(cfg.dataset)
    recorded = json.loads((root / f"reports/models/{name}/metrics.json").read_text())
    bundle = load_bundle(f"{name}@staging")  # as registered: the temperature evaluate kept
    test = load_split(root / f"artifacts/prepared/{dataset.name}/splits.csv", dataset.path, cfg, "test")
    scoring = Scoring.from_config(cfg)
    again = score_bundle(bundle, test, scoring=scoring, n_boot=0).metrics
    assert scoring.metrics
    assert {k: again[k] for k in scoring.metrics} == {k: recorded[k] for k in scoring.metrics}


def test_promotion_is_gated(trained: tuple[Path, str], client) -> None:
    import mlflow

    root, _ = trained
    cmd = ["breastscan"]  # the venv's console script (run() puts the venv first on PATH)
    ok = run([*cmd, "promote", "lesion", "--to", "production"], root)
    assert "is now at stage production" in ok.stdout
    assert client.get_model_version_by_alias("breastscan-lesion", "production").version == 1
    # classic stage URI resolves too (mirrored for older clients)
    x = np.zeros((1, 32, 48, 1), np.float32)
    assert mlflow.pyfunc.load_model("models:/breastscan-lesion/Production").predict(x).shape == (1, 32, 48, 1)

    # raise a floor beyond reach: refused, non-zero exit, the gate named with numbers
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["models"]["tumor"]["gates"]["floors"] = {"macro_auc": 0.999}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    refused = run([*cmd, "promote", "tumor", "--to", "production"], root, check=False)
    assert refused.returncode == 1
    assert "macro_auc" in refused.stderr and "floor 0.999" in refused.stderr
    assert "production" not in client.get_registered_model("breastscan-tumor").aliases

    listed = run([*cmd, "models", "--json"], root).stdout
    rows = {r["name"]: r for r in json.loads(listed)}
    assert "production" in rows["breastscan-lesion"]["aliases"]
    assert rows["breastscan-tumor"]["headline"] == "macro_auc"


def test_register_logs_the_model_again_when_the_store_lacks_it(trained: tuple[Path, str],
                                                               tmp_path: Path) -> None:
    """DVC restored evaluate's outputs, or MLFLOW_TRACKING_URI changed: register still registers."""
    import mlflow

    root = tmp_path / "copy"
    shutil.copytree(trained[0], root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    proc = run([sys.executable, "-m", "pipelines.register", "--model", "lesion"], root,
               MLFLOW_TRACKING_URI=uri)
    assert "is not in" in proc.stderr and "logging the bundle" in proc.stderr
    registered = json.loads((root / "reports/models/lesion/registered.json").read_text())
    logged = json.loads((root / "reports/models/lesion/logged_model.json").read_text())
    assert registered["model_uri"] != logged["model_uri"] and registered["version"] == 1
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("breastscan-lesion", "staging")
    assert version.source == registered["model_uri"]
    model = client.get_logged_model(registered["model_uri"].removeprefix("models:/"))
    assert mlflow.artifacts.load_text(f"{model.artifact_location}/artifacts/model_card.md") == \
        (root / "reports/models/lesion/model_card.md").read_text()
    splits = pd.read_csv(root / "artifacts/prepared/ultrasound/splits.csv")
    assert "image_md5" in splits.columns
