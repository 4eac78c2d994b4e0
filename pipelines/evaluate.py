"""Stage ``evaluate@<model>``: held-out test metrics, calibration, plots.

Reads the bundle of ``train@<model>`` and the val/test rows of the split artefact. For a
classifier the calibration temperature is fitted on the validation split and every test
metric is computed on the calibrated probabilities (the ones the service returns); for
the U-Net, Dice and IoU per image. Writes ``reports/models/<model>/``: ``metrics.json``
(a DVC metrics file, with the headline metric's 95 % bootstrap CI), ``plots/*.csv``
(DVC plots: ROC, PR, confusion, calibration, Dice histogram), static PNGs under ``png/``
and ``predictions.csv``; and logs them to the model's MLflow run.

Run: ``python -m pipelines.evaluate --model tumor``
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

from breastscan import tracking
from breastscan.bundle import ModelBundle
from breastscan.datasets import load_split
from breastscan.evaluation import evaluate_classifier, evaluate_segmenter, write_evaluation
from breastscan.plots import plot_history
from pipelines._stage import model_dir, model_reports, parse, splits_csv
from pipelines.run import model_run

log = logging.getLogger("pipelines.evaluate")


def main(argv: list[str] | None = None) -> int:
    """Evaluate the model named on the command line; return the process exit code."""
    args = parse(__doc__, "model", argv)
    cfg = args.params.model(args.name)
    dataset = args.params.dataset(cfg.dataset)
    splits = splits_csv(dataset.name)
    bundle = ModelBundle.load(model_dir(cfg.name))
    test = load_split(splits, dataset.path, cfg, "test")
    reports = model_reports(cfg.name)
    if cfg.task == "classification":
        val = load_split(splits, dataset.path, cfg, "val")
        evaluation = evaluate_classifier(bundle, val, test, headline=cfg.headline,
                                         quadratic_kappa=cfg.label == "density", seed=cfg.seed)
    else:
        evaluation = evaluate_segmenter(bundle, test, headline=cfg.headline, seed=cfg.seed)
    written = write_evaluation(evaluation, reports)
    history = reports / "history.csv"
    if history.is_file():
        written["training_curves"] = plot_history(history, reports / "png" / "training_curves.png")

    m = evaluation.metrics
    log.info("%s on %d test images: %s = %s (95%% CI %s-%s)", cfg.name, m["n_test"], m["headline"],
             *(f"{v:.3f}" if isinstance(v, float) else "undefined"
               for v in (m["headline_value"], m["headline_ci_low"], m["headline_ci_high"])))
    with model_run(cfg.name, model_dir(cfg.name), stage="evaluate"):
        mlflow.log_metrics({f"test_{k}": v for k, v in tracking.numeric_items(m).items()})
        for path in written.values():
            sub = "evaluation/" + str(Path(path).parent.relative_to(reports)).strip(".")
            mlflow.log_artifact(str(path), sub.rstrip("/"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
