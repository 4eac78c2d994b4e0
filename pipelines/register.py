"""Stage ``register@<model>``: log the calibrated model to MLflow and register it as ``staging``.

Takes the bundle of ``train@<model>`` with the temperature ``evaluate@<model>`` fitted,
writes the model card (``reports/models/<model>/model_card.md``), logs the bundle as an
MLflow model (signature, input example, preprocessing spec, class names, calibration)
with the card, creates a new version of ``breastscan-<model>`` carrying the test metrics
and the test split's id, and points the alias ``staging`` at it. Promotion to
``production`` is a separate, gated step: ``breastscan promote <model>``.

Writes ``reports/models/<model>/registered.json`` (name, version, run, model URI).

Run: ``python -m pipelines.register --model lesion``
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import mlflow

from breastscan import registry, tracking
from breastscan.bundle import ModelBundle
from breastscan.datasets import read_splits
from breastscan.modelcard import write_model_card
from breastscan.splits import split_id
from pipelines._stage import model_dir, model_reports, parse, splits_csv
from pipelines.run import model_run

log = logging.getLogger("pipelines.register")


def main(argv: list[str] | None = None) -> int:
    """Register the model named on the command line; return the process exit code."""
    args = parse(__doc__, "model", argv)
    cfg = args.params.model(args.name)
    dataset = args.params.dataset(cfg.dataset)
    reports = model_reports(cfg.name)
    metrics = json.loads((reports / "metrics.json").read_text())
    bundle = ModelBundle.load(model_dir(cfg.name))
    if cfg.task == "classification":
        bundle = bundle.with_temperature(float(metrics["temperature"]))
    test_split = split_id(splits_csv(dataset.name), "test")
    frame = read_splits(splits_csv(dataset.name))
    data = {
        "dataset": dataset.name, "path": str(dataset.path), "modality": dataset.modality,
        "split_id": test_split, "data_hash": tracking.dvc_data_hash(Path.cwd()),
        "synthetic": "phantom_id" in frame.columns,
        **json.loads((Path("reports/prepare") / f"{dataset.name}.json").read_text()),
    }
    card = write_model_card(cfg, bundle.contract, metrics, data=data, path=reports / "model_card.md")

    with model_run(cfg.name, model_dir(cfg.name), stage="register") as run, \
            tempfile.TemporaryDirectory() as tmp:
        served = bundle.save(Path(tmp) / "bundle")
        model_uri = registry.log_bundle(served, extra_artifacts={"model_card.md": card})
        mlflow.log_artifact(str(card))  # beside the run's other reports, too
        version = registry.register(cfg, model_uri, metrics=metrics, split_id=test_split,
                                    run_id=run.info.run_id)
        out = {
            "name": cfg.registered_name, "version": version, "alias": "staging",
            "run_id": run.info.run_id, "model_uri": model_uri,
            "headline": metrics["headline"], "headline_value": metrics["headline_value"],
        }
    (reports / "registered.json").write_text(json.dumps(out, indent=2) + "\n")
    log.info("registered %s version %s as staging (%s %.3f); promote with: "
             "breastscan promote %s --to production", cfg.registered_name, version,
             metrics["headline"], metrics["headline_value"], cfg.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
