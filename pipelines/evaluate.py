"""Stage ``evaluate@<model>``: held-out test metrics, calibration, plots, model card, logged model.

Reads the bundle of ``train@<model>`` and the val/test rows of the split artefact. For a
classifier the calibration temperature is fitted on the validation split and every test
metric is computed on the calibrated probabilities (the ones the service returns); for
the U-Net, Dice and IoU per image. Writes ``reports/models/<model>/``: ``metrics.json``
(a DVC metrics file, with the headline metric's 95 % bootstrap CI), ``plots/*.csv``
(DVC plots: ROC, PR, confusion, calibration, Dice histogram), static PNGs under ``png/``,
``predictions.csv`` and ``model_card.md`` (data, intended use, metrics with CIs,
calibration, known limitations), and logs them to the model's MLflow run. A model trained
on a pool of sites is scored on each site's test rows apart as well as pooled (``sites``
in ``metrics.json``, a ``site`` column in ``predictions.csv``).

The calibrated bundle's forward pass is exported to ONNX and checked against the Keras model
on the test images (:mod:`breastscan.evaluation.export`); the check goes to
``reports/models/<model>/export.json`` (a DVC metrics file) and the model card.

The calibrated bundle is logged to that run as an MLflow model (signature, input example,
preprocessing spec, class names, calibration, the model card, and the ONNX export when it
passed its check) carrying the test metrics; its URI goes to
``reports/models/<model>/logged_model.json`` for ``register@<model>``, which then needs no
TensorFlow.

Run: ``python -m pipelines.evaluate --model tumor``
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow

from breastscan.bundle import ModelBundle
from breastscan.config import DatasetConfig
from breastscan.data.loading import load_split, read_splits
from breastscan.data.pools import SITE_COLUMN
from breastscan.data.splits import split_id
from breastscan.evaluation.export import export_and_check
from breastscan.evaluation.plots import plot_history
from breastscan.evaluation.reports import write_evaluation
from breastscan.evaluation.scoring import Scoring, per_site, score_bundle
from breastscan.exported import EXPORT_FILE
from breastscan.provenance import dvc_data_hash
from breastscan.registry.modelcard import write_model_card
from breastscan.registry.runs import LOGGED_MODEL_FILE, calibrated, log_served_model, model_run
from pipelines._stage import REPORTS, model_dir, model_reports, parse, splits_csv

log = logging.getLogger("pipelines.evaluate")


def card_data(dataset: DatasetConfig, splits: Path) -> dict[str, Any]:
    """What the model card says about the data: dataset, test split id, DVC hash, split counts."""
    frame = read_splits(splits)
    return {
        "dataset": dataset.name, "path": str(dataset.path), "modality": dataset.modality,
        "split_id": split_id(splits, "test"), "data_hash": dvc_data_hash(Path.cwd()),
        "synthetic": "phantom_id" in frame.columns,
        **json.loads((REPORTS / "prepare" / f"{dataset.name}.json").read_text()),
    }


def main(argv: list[str] | None = None) -> int:
    """Evaluate the model named on the command line; return the process exit code."""
    args = parse(__doc__, "model", argv)
    cfg = args.params.model(args.name)
    dataset = args.params.dataset(cfg.dataset)
    splits = splits_csv(dataset.name)
    bundle = ModelBundle.load(model_dir(cfg.name))
    test = load_split(splits, dataset.path, cfg, "test")
    reports = model_reports(cfg.name)
    val = load_split(splits, dataset.path, cfg, "val") if cfg.has_classes else None
    scoring = Scoring.from_config(cfg)
    evaluation = score_bundle(bundle, test, val=val, scoring=scoring, seed=cfg.seed)
    if dataset.is_pool:  # every site scored apart as well as pooled
        evaluation.metrics["sites"] = per_site(evaluation, test, scoring, column=SITE_COLUMN, seed=cfg.seed)
        evaluation.predictions.insert(0, SITE_COLUMN, test.frame[SITE_COLUMN].astype(str).to_numpy())
        for site, sm in evaluation.metrics["sites"].items():
            value = sm["headline_value"]
            log.info("%s at site %s (%d test images): %s = %s", cfg.name, site, sm["n_test"], sm["headline"],
                     f"{value:.3f}" if isinstance(value, float) else "undefined")
    written = write_evaluation(evaluation, reports)
    history = reports / "history.csv"
    if history.is_file():
        written["training_curves"] = plot_history(history, reports / "png" / "training_curves.png")

    m = evaluation.metrics
    log.info("%s on %d test images: %s = %s (95%% CI %s-%s)", cfg.name, m["n_test"], m["headline"],
             *(f"{v:.3f}" if isinstance(v, float) else "undefined"
               for v in (m["headline_value"], m["headline_ci_low"], m["headline_ci_high"])))
    served = calibrated(bundle, m)
    graph, export = export_and_check(served, test.images)  # TensorFlow serves it unless export.passed
    written["export"] = reports / EXPORT_FILE
    written["export"].write_text(json.dumps(export.to_dict(), indent=2) + "\n")
    card = write_model_card(cfg, served.contract, m, data=card_data(dataset, splits),
                            path=reports / "model_card.md", export=export.to_dict())
    with model_run(cfg.name, model_dir(cfg.name), stage="evaluate") as run:
        for path in written.values():
            sub = "evaluation/" + str(Path(path).parent.relative_to(reports)).strip(".")
            mlflow.log_artifact(str(path), sub.rstrip("/"))
        mlflow.log_artifact(str(card))
        # logs the test metrics, linked to the model; the export travels with it when it passed
        model_uri = log_served_model(bundle, m, card, graph=graph, export=export)
        logged = {"model_uri": model_uri, "run_id": run.info.run_id}
    (reports / LOGGED_MODEL_FILE).write_text(json.dumps(logged, indent=2) + "\n")
    log.info("%s: calibrated model logged as %s (register@%s registers it)", cfg.name, model_uri, cfg.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
