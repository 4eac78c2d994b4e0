"""The MLflow run a model's stages share (started by train, continued by evaluate and register),
and the calibrated model evaluate logs to it."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from breastscan.bundle import ModelBundle
from breastscan.decision import DecisionRule
from breastscan.exported import ExportInfo, write_export
from breastscan.registry import tracking

log = logging.getLogger("breastscan.registry.runs")

RUN_FILE = "run.json"
LOGGED_MODEL_FILE = "logged_model.json"
"""In ``reports/models/<model>/``: the URI of the model evaluate logged, which register registers."""


@contextmanager
def model_run(model: str, bundle_dir: Path, *, stage: str) -> Iterator[mlflow.ActiveRun]:
    """Continue the run recorded in ``<bundle_dir>/run.json``, or start a new one.

    A new run is started (tagged ``breastscan.continued_from``) when the recorded run is
    not in the current tracking store: DVC restored the bundle from its cache, or
    ``MLFLOW_TRACKING_URI`` points elsewhere than at training time.
    """
    project = Path.cwd()
    tracking.configure(project)
    recorded = json.loads((bundle_dir / RUN_FILE).read_text()) if (bundle_dir / RUN_FILE).is_file() else {}
    run_id = recorded.get("run_id")
    if run_id and tracking.run_exists(run_id):
        with tracking.resume_run(run_id, stage=stage) as run:
            mlflow.set_tag(f"breastscan.{stage}", "done")
            yield run
        return
    log.warning("run %s of %s is not in %s; logging %s to a new run", run_id, model,
                mlflow.get_tracking_uri(), stage)
    tags = {**tracking.run_tags(project), "breastscan.model": model, "breastscan.continued_from": str(run_id)}
    with tracking.start_training_run(model, project, params={}, tags=tags, stage=stage) as run:
        mlflow.set_tag(f"breastscan.{stage}", "done")
        yield run


def calibrated(bundle: ModelBundle, metrics: Mapping[str, Any]) -> ModelBundle:
    """The bundle as served: a classifier with the temperature and the decision rule evaluate
    fitted (``temperature`` and, for a rule other than the arg-max, ``decision`` in ``metrics.json``);
    a multi-task model's class head likewise."""
    if bundle.contract.task not in ("classification", "multitask"):
        return bundle
    served = bundle.with_temperature(float(metrics["temperature"]))
    if metrics.get("decision") is not None:
        served = served.with_decision(DecisionRule.from_dict(metrics["decision"]))
    return served


def log_served_model(bundle: ModelBundle, metrics: Mapping[str, Any], card: Path, *,
                     graph: bytes | None = None, export: ExportInfo | None = None) -> str:
    """Log the calibrated bundle, with its model card, as an MLflow model of the active run.

    The logged model (signature, input example, preprocessing spec, class names,
    calibration; see :func:`breastscan.registry.versions.log_bundle`) also gets the test metrics
    (``test_<name>``), so MLflow shows them on the model's page. Needs TensorFlow (MLflow
    checks the input example by loading the logged model and running it).

    Args:
        bundle: the trained bundle (calibrated here from ``metrics``).
        metrics: the evaluation report.
        card: the model card.
        graph: the bundle's ONNX export (:func:`breastscan.evaluation.export.export_and_check`);
            its bundle directory carries it (``model.onnx``, ``export.json``) only when
            ``export`` says it passed its check.
        export: the export's :class:`~breastscan.exported.ExportInfo`.

    Returns:
        Its URI, ``models:/m-<id>``: what the register stage registers.
    """
    from breastscan.registry import versions

    with tempfile.TemporaryDirectory() as tmp:
        served = calibrated(bundle, metrics).save(Path(tmp) / "bundle")
        if graph is not None and export is not None and export.passed:
            write_export(served, graph, export)
        model_uri = versions.log_bundle(served, extra_artifacts={"model_card.md": card})
    mlflow.log_metrics(as_test_metrics(metrics), model_id=versions.logged_model_id(model_uri))
    return model_uri


def as_test_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics.json`` as MLflow metrics named ``test_<name>``."""
    return {f"test_{k}": v for k, v in tracking.numeric_items(dict(metrics)).items()}
