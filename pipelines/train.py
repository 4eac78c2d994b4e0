"""Stage ``train@<model>``: fit one model declared under ``models:`` on its training split.

Reads ``artifacts/prepared/<dataset>/splits.csv`` (train and val rows), fits with early
stopping on the validation loss, and writes the model bundle to
``artifacts/models/<model>/`` (``model.keras``, ``preprocess.json``, ``contract.json``,
``reference.json``, ``run.json``) and the per-epoch curves to ``reports/models/<model>/history.csv``.

With ``distribution: multi_worker`` every node of the cluster runs this same command with
its own ``TF_CONFIG``; only the chief (:func:`~breastscan.training.distribute.is_chief`) writes
the bundle and the MLflow run. The other workers train in lock-step with it and save their
copy to a temporary directory they delete (every worker must take part in saving).

The MLflow run of the model starts here: params, per-epoch metrics, the GX validation
result, the split artefact, and the git commit and DVC data hash as tags. Its id goes to
``run.json``; evaluate and register add to the same run.

Run: ``python -m pipelines.train --model density``
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from breastscan.bundle import ModelBundle
from breastscan.data.loading import load_split
from breastscan.data.manifest import resolve
from breastscan.imaging.preprocessing import decode_image
from breastscan.monitoring.drift import DICOM_HEAD_BYTES, REFERENCE_LIMIT, dicom_facts, model_reference
from breastscan.registry import tracking
from breastscan.registry.runs import RUN_FILE
from breastscan.training.distribute import get_strategy, is_chief
from breastscan.training.loop import train_model, write_history
from pipelines._stage import model_dir, model_reports, parse, splits_csv, validation_report

log = logging.getLogger("pipelines.train")


def training_reference(bundle: ModelBundle, frame: pd.DataFrame, root: Path, modality: str) -> dict[str, Any]:
    """The drift reference saved with the model (``reference.json``): statistics of up to
    :data:`REFERENCE_LIMIT` training images (a seeded sample), as the service decodes them,
    and the model's outputs on them (:func:`breastscan.monitoring.drift.model_reference`)."""
    rows = frame if len(frame) <= REFERENCE_LIMIT else frame.sample(n=REFERENCE_LIMIT, random_state=0)
    grays: list[np.ndarray] = []
    headers: list[Any] = []
    for image in rows["image"]:
        path = resolve(root, str(image))
        grays.append(decode_image(path, min_side=bundle.spec.min_side, max_side=bundle.spec.max_side))
        with path.open("rb") as f:
            headers.append(dicom_facts(f.read(DICOM_HEAD_BYTES))[1])
    return model_reference(bundle, grays, modality=modality, headers=headers)


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
    if cfg.distribution == "multi_worker" and not is_chief():
        # A non-chief worker: the same steps as the chief, no MLflow run, its save discarded.
        result = train_model(cfg, train, val, modality=dataset.modality, strategy=strategy)
        with tempfile.TemporaryDirectory(prefix=f"breastscan-{cfg.name}-worker-") as scratch:
            result.bundle.save(scratch)
            log.info("%s: worker done (%d epochs); its copy of the bundle in %s is discarded, the chief "
                     "saves and logs", cfg.name, result.epochs_run, scratch)
        return 0

    project = Path.cwd()
    tags = {**tracking.run_tags(project, split=splits), "breastscan.model": cfg.name,
            "breastscan.dataset": dataset.name, "breastscan.stage": "train"}
    params = tracking.flatten_params({"model": asdict(cfg), "dataset": {
        "name": dataset.name, "path": str(dataset.path), "modality": dataset.modality},
        "prepare": asdict(args.params.prepare)})
    with tracking.start_training_run(cfg.name, project, params=params, tags=tags) as run:
        result = train_model(cfg, train, val, modality=dataset.modality, strategy=strategy,
                             callbacks=[tracking.MlflowEpochLogger()])
        reference = training_reference(result.bundle, train.frame, Path(dataset.path), dataset.modality)
        replace(result.bundle, reference=reference).save(out_dir)
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
