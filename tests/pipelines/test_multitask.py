"""A multi-task model through the real ``dvc repro`` and MLflow: trained, scored on both
outputs, calibrated, carded, registered and promoted through its gates as one model."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.pipelines.repo import make_repo, run

pytestmark = pytest.mark.slow

MODEL = {
    "task": "multitask", "dataset": "ultrasound", "label": "pathology",
    "classes": ["benign", "malignant", "normal"], "base_filters": 4, "depth": 2, "epochs": 2,
    "batch_size": 16,
    "patience": 0, "preprocess": {"height": 32, "width": 32}, "headline": "macro_auc", "tta": "flip",
    "decision": {"rule": "positive_ratio", "positive": "malignant", "versus": "benign",
                 "target_sensitivity": 0.9},
    "gates": {"floors": {"lesion_mean_dice": 0.0, "macro_auc": 0.0}, "max_regression": 1.0},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_phantoms: Path) -> tuple[Path, str]:
    """A repo after ``dvc repro register@us_mt`` and ``breastscan promote us_mt``, and their output."""
    root = make_repo(tmp_path_factory.mktemp("multitask"), tiny_phantoms, {"models": {"us_mt": MODEL}})
    proc = run(["dvc", "repro", "register@us_mt"], root)
    promoted = run(["breastscan", "promote", "us_mt", "--to", "production"], root)
    return root, proc.stdout + proc.stderr + promoted.stdout + promoted.stderr


def test_both_outputs_are_scored_in_one_report(trained: tuple[Path, str]) -> None:
    root, _ = trained
    reports = root / "reports/models/us_mt"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["headline"] == "macro_auc" and metrics["headline_value"] is not None
    for key in ("accuracy", "macro_auc", "per_class", "temperature", "decision", "mean_dice",
                "lesion_mean_dice", "n_lesion_images", "threshold"):
        assert key in metrics, key
    assert metrics["decision"]["cutoff"] is not None  # fitted on the validation split
    pred = pd.read_csv(reports / "predictions.csv")
    assert {"prob_benign", "prob_malignant", "prob_normal", "pred", "dice", "lesion"} <= set(pred.columns)
    assert len(pred) == metrics["n_test"]
    for plot in ("roc", "calibration", "dice", "dice_hist"):
        assert (reports / "plots" / f"{plot}.csv").is_file(), plot
    card = (reports / "model_card.md").read_text()
    assert "one forward pass" in card and "## Calibration" in card and "## Decision rule" in card
    assert "Lesion probability per pixel" in card and "Test-time flips" in card


def test_the_drift_reference_holds_both_kinds_of_record(trained: tuple[Path, str]) -> None:
    root, _ = trained
    reference = json.loads((root / "artifacts/models/us_mt/reference.json").read_text())
    assert reference["task"] == "multitask"
    assert all("logits" in r and "lesion_fraction" in r for r in reference["records"])


def test_it_is_registered_promoted_and_answers_both_in_one_call(trained: tuple[Path, str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root, out = trained
    assert "breastscan-us_mt v1 is now at stage production" in out, out
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.chdir(root)  # the store's artifact paths are the project's
    version = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        "breastscan-us_mt", "production")
    assert version.tags["task"] == "multitask"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/breastscan-us_mt@production")
        answer = model.predict(np.zeros((2, 32, 32, 1), np.float32))
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
    assert answer["probabilities"].shape == (2, 3) and answer["mask"].shape == (2, 32, 32, 1)
    np.testing.assert_allclose(answer["probabilities"].sum(axis=1), 1.0, atol=1e-5)
