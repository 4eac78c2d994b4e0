"""One scoring core: the evaluate stage, ``breastscan evaluate``, the CV benchmark (and its
re-score from saved predictions) and the promotion re-score give identical metric values
on the same predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.config import ModelConfig, parse_params
from breastscan.data.loading import load_split
from breastscan.data.manifest import CONTRACT_COLUMNS, write_manifest
from breastscan.evaluation import crossval
from breastscan.evaluation.external import load_external, score_external
from breastscan.evaluation.reports import write_evaluation
from breastscan.evaluation.scoring import Scoring, score_bundle, score_predictions
from breastscan.registry.promotion import rescore_on_split
from tests.conftest import tiny_model

MODELS: dict[str, dict[str, Any]] = {
    "density": dict(task="classification", dataset="mg", label="density", classes=[1, 2, 3, 4],
                    headline="quadratic_kappa", gates={"floors": {"accuracy": 0.1}}),
    "tumor": dict(task="classification", dataset="mg", label="pathology",
                  classes=["benign", "malignant", "normal"], headline="macro_auc"),
    "lesion": dict(task="segmentation", dataset="mg", label="mask", headline="mean_dice"),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Mammography phantoms and a split table: 14 validation rows, the rest test."""
    from breastscan.data.phantoms import generate_dataset

    root = tmp_path_factory.mktemp("core") / "mg"
    frame = generate_dataset(root, "mammography", n_images=48, seed=11, height=72, width=56,
                             duplicate_rate=0.0, label_conflicts=0)
    frame = frame[list(CONTRACT_COLUMNS)]
    write_manifest(frame, root)
    splits = frame.assign(split=["val"] * 14 + ["test"] * (len(frame) - 14))
    splits_csv = root.parent / "splits.csv"
    splits.to_csv(splits_csv, index=False)
    return root, splits_csv


def _config(name: str, root: Path) -> ModelConfig:
    raw = {"datasets": {"mg": {"path": str(root), "modality": "mammography", "labels": ["density"]}},
           "models": {name: {**MODELS[name], "preprocess": {"height": 32, "width": 32}, "depth": 2,
                             "base_filters": 4}}}
    return parse_params(raw).model(name)


def _bundle(cfg: ModelConfig) -> ModelBundle:
    model = tiny_model(cfg.task, len(cfg.classes), seed=3)
    contract = ModelContract.from_config(cfg, "mammography")
    return ModelBundle(model=model, spec=cfg.preprocess, contract=contract)


def _values(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {name: s["value"] for name, s in scores.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_caller_scores_alike(name: str, dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, splits_csv = dataset
    cfg = _config(name, root)
    scoring = Scoring.from_config(cfg)
    bundle = _bundle(cfg)
    test = load_split(splits_csv, root, cfg, "test")
    val = load_split(splits_csv, root, cfg, "val") if cfg.task == "classification" else None

    # 1. the evaluate stage: temperature fitted on validation, files written
    stage = score_bundle(bundle, test, val=val, scoring=scoring, seed=cfg.seed)
    write_evaluation(stage, tmp_path / "reports")
    stage_values = {m: stage.metrics[m] for m in scoring.metrics}
    assert set(stage_values) == set(scoring.metrics)
    assert any(v is not None for v in stage_values.values())
    served = bundle.with_temperature(stage.temperature) if stage.temperature is not None else bundle

    # 2. re-scored from the saved predictions (what bench-quality --rescore does)
    saved = pd.read_csv(tmp_path / "reports" / "predictions.csv",
                        dtype={"image": str, "group": str, "true": str})
    rescored = score_predictions(saved, scoring, seed=cfg.seed)
    assert _values(rescored) == stage_values
    assert rescored[cfg.headline]["ci_low"] == stage.metrics["headline_ci_low"]

    # 3. the promotion re-score of the calibrated bundle on the same split
    promoted = rescore_on_split(cfg, splits_csv, root, None)(served)
    assert {m: promoted[m] for m in scoring.metrics} == stage_values

    # 4. the CV benchmark's pooled scores of the same predictions as one fold
    spec = crossval.BenchmarkSpec(
        name="core", title="core", source=root, ingest={}, dataset="mg", folds=1, seed=cfg.seed,
        val_fraction=0.2, stratify=(), group_column="group", conflict_labels=(),
        tasks=(crossval.TaskSpec(model=name),),
        params=parse_params({"datasets": {"mg": {"path": str(root), "modality": "mammography"}},
                             "models": {name: {**MODELS[name], "preprocess": {"height": 32, "width": 32},
                                               "depth": 2, "base_filters": 4}}}))
    pooled = crossval.score_task(spec, spec.tasks[0], saved.assign(fold=0, conflict=False))
    assert {m: pooled["all"]["metrics"][m]["value"] for m in scoring.metrics} == stage_values

    # 5. breastscan evaluate on the test rows as an external dataset (stored calibration)
    external_root = tmp_path / "external"
    rows = pd.read_csv(splits_csv, dtype=str, keep_default_na=False)
    rows = rows[rows["split"] == "test"].drop(columns="split")
    rows["image"] = [str(root / p) for p in rows["image"]]
    rows["mask"] = [str(root / p) if p else "" for p in rows["mask"]]
    external_root.mkdir()
    rows.to_csv(external_root / "manifest.csv", index=False)
    external = load_external(external_root, served.contract, served.spec)
    assert external.n_used == len(test)
    evaluation = score_external(served, external, headline=cfg.headline, n_boot=0)
    assert _values(evaluation.scores or {}) == stage_values


def test_declaration_decides_the_metrics(dataset: tuple[Path, Path]) -> None:
    """Kappa is reported because density headlines it, never because of the model's name."""
    root, _ = dataset
    density = Scoring.from_config(_config("density", root))
    tumor = Scoring.from_config(_config("tumor", root))
    assert "quadratic_kappa" in density.metrics and "quadratic_kappa" not in tumor.metrics
    renamed = Scoring.declare("classification", ["1", "2", "3", "4"], "macro_auc")
    assert "quadratic_kappa" not in renamed.metrics
    gated = Scoring.declare("classification", ["a", "b", "c"], "macro_auc", ["quadratic_kappa"])
    assert "quadratic_kappa" in gated.metrics
    with pytest.raises(ValueError, match="auc"):
        Scoring.declare("classification", ["a", "b", "c"], "auc")
    assert np.isin(["auc"], Scoring.declare("classification", ["b", "m"], "auc").metrics).all()
