"""Stage ``train@<model>``: fit one model declared under ``models:`` on its training split.

Reads ``artifacts/prepared/<dataset>/splits.csv`` (train and val rows), fits with early
stopping on the validation loss, and writes the model bundle to
``artifacts/models/<model>/`` (``model.keras``, ``preprocess.json``, ``contract.json``,
``run.json``) and the per-epoch curves to ``reports/models/<model>/history.csv``.

The MLflow run of the model starts here: params, per-epoch metrics, the GX validation
result, the split artefact, and the git commit and DVC data hash as tags. Its id goes to
``run.json``; evaluate and register add to the same run.

Run: ``python -m pipelines.train --model density``
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import mlflow

from breastscan.data.loading import load_split
from breastscan.models.training import get_strategy, train_model, write_history
from breastscan.registry import tracking
from breastscan.registry.runs import RUN_FILE
from pipelines._stage import model_dir, model_reports, parse, splits_csv, validation_report

log = logging.getLogger("pipelines.train")


def main(argv: list[str] | None = None) -> int:
    """Train the model named on the command line; return the process exit code."""
    args = parse(__doc__, "model", argv)
    cfg = args.params.model(args.name)
    dataset = args.params.dataset(cfg.dataset)
    splits = splits_csv(dataset.name)
    out_dir, reports = model_dir(cfg.name), model_reports(cfg.name)
    reports.mkdir(parents=True, exist_ok=True)

    strategy = get_strategy(cfg.distribution)
    train = load_split(splits, dataset.path, cfg, "train")
    val = load_split(splits, dataset.path, cfg, "val")
    log.info("%s: %d training and %d validation images from %s", cfg.name, len(train.frame),
             len(val.frame), splits)

    project = Path.cwd()
    tags = {**tracking.run_tags(project, split=splits), "breastscan.model": cfg.name,
            "breastscan.dataset": dataset.name, "breastscan.stage": "train"}
    params = tracking.flatten_params({"model": asdict(cfg), "dataset": {
        "name": dataset.name, "path": str(dataset.path), "modality": dataset.modality},
        "prepare": asdict(args.params.prepare)})
    with tracking.start_training_run(cfg.name, project, params=params, tags=tags) as run:
        result = train_model(cfg, train, val, modality=dataset.modality, strategy=strategy,
                             callbacks=[tracking.MlflowEpochLogger()])
        result.bundle.save(out_dir)
        history_csv = write_history(result.history, reports / "history.csv")
        mlflow.log_artifact(str(history_csv), "training")
        mlflow.log_artifact(str(splits), "data")
        mlflow.log_artifact(str(validation_report(dataset.name)), "data/validation")
        mlflow.log_metrics({"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                            "train_seconds": result.seconds})
        (out_dir / RUN_FILE).write_text(json.dumps({
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": mlflow.get_tracking_uri(),
        }, indent=2) + "\n")
    log.info("%s: trained %d epochs (best %d) in %.0f s -> %s", cfg.name, result.epochs_run,
             result.best_epoch, result.seconds, out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
