"""``breastscan evaluate``: a registered model scored on an external dataset and logged to MLflow.

The registry's side of an external evaluation (the scoring and the report are
:mod:`breastscan.evaluation.external`'s):

1. :func:`breastscan.registry.resolver.fetch`: ``tumor``, ``tumor@staging`` or ``tumor/3``
   to one registry version and its bundle (spec and contract), downloaded by version;
   :func:`scored_model` names that version in the report.
2. :func:`~breastscan.evaluation.external.load_external`,
   :func:`~breastscan.evaluation.external.score_external`,
   :func:`~breastscan.evaluation.external.build_report` and
   :func:`~breastscan.evaluation.external.write_report` on it.
3. :func:`log_external_run`: a new MLflow run ``external:<dataset>`` in the model's
   experiment ``breastscan-<model>``, tagged with the model version, metrics prefixed
   ``external_``.

:func:`evaluate_external` runs the three. Keras and TensorFlow are imported inside the
functions that need them.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from breastscan.data.loading import SKIP_REASONS
from breastscan.data.manifest import read_manifest
from breastscan.evaluation.external import (
    DEFAULT_OUT,
    ScoredModel,
    build_report,
    default_headline,
    load_external,
    prediction_frame,
    require_usable,
    score_external,
    write_report,
)
from breastscan.evaluation.reports import fmt_interval
from breastscan.evaluation.scoring import Evaluation
from breastscan.registry import tracking
from breastscan.registry.resolver import FetchedModel, fetch, parse_model_ref

log = logging.getLogger(__name__)

RUN_NAME_PREFIX = "external:"
METRIC_PREFIX = "external_"
TAG_MODEL = "breastscan.model"
TAG_REGISTERED_MODEL = "breastscan.registered_model"
TAG_MODEL_VERSION = "breastscan.model_version"
TAG_MODEL_STAGE = "breastscan.model_stage"
TAG_MODEL_RUN = "breastscan.model_run_id"
TAG_DATASET = "breastscan.dataset"
TAG_DATASET_PATH = "breastscan.dataset_path"
TAG_DATASET_MD5 = "breastscan.dataset_manifest_md5"
TAG_EVALUATION = "breastscan.evaluation"


# --------------------------------------------------------------------------- the version


def scored_model(fetched: FetchedModel) -> ScoredModel:
    """The report's name for a fetched version: its contract, registry name, version and stage."""
    version = fetched.resolved
    return ScoredModel(contract=fetched.contract, name=version.ref.name,
                       registered_name=version.ref.registered_name, version=version.version,
                       stage=version.ref.alias, aliases=version.aliases, run_id=version.run_id)


# --------------------------------------------------------------------------- MLflow


def external_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a report, every key prefixed ``external_``.

    ``external_<metric>`` with ``_ci_low`` / ``_ci_high`` for each metric of the report,
    ``external_ece``, ``external_ece_at_t1`` and ``external_temperature`` (classifiers),
    ``external_n_rows``, ``external_n_used``, ``external_n_skipped`` and
    ``external_skipped_<reason>`` for each reason of :data:`SKIP_REASONS` (0 included);
    undefined values are left out.
    """
    flat: dict[str, Any] = {}
    for name, v in report["metrics"].items():
        flat[name] = v["value"]
        flat[f"{name}_ci_low"] = v["ci_low"]
        flat[f"{name}_ci_high"] = v["ci_high"]
    if "calibration" in report:
        cal = report["calibration"]
        flat.update(ece=cal["ece"], ece_at_t1=cal["ece_at_t1"], temperature=cal["temperature"])
        flat["per_class"] = report["per_class"]
    counts = report["counts"]
    flat.update(n_rows=counts["rows"], n_used=counts["used"], n_skipped=counts["skipped"])
    for reason in SKIP_REASONS:
        flat[f"skipped_{reason}"] = counts["skipped_by_reason"].get(reason, {}).get("count", 0)
    return {METRIC_PREFIX + k: v for k, v in tracking.numeric_items(flat).items()}


def log_external_run(report: dict[str, Any], evaluation: Evaluation, out_root: str | Path, *,
                     project_root: str | Path, manifest: pd.DataFrame | None = None) -> dict[str, Path]:
    """Log an external evaluation as a new MLflow run and (re)write the report files with its id.

    The run is ``external:<dataset>`` in the model's experiment ``breastscan-<model>``
    (created if missing, see :func:`breastscan.registry.tracking.ensure_experiment`), in the store
    MLflow is configured with. It carries tags ``breastscan.model``,
    ``breastscan.registered_model``, ``breastscan.model_version``, ``breastscan.model_stage``,
    ``breastscan.model_run_id``, ``breastscan.dataset``, ``breastscan.dataset_path``,
    ``breastscan.dataset_manifest_md5``, ``breastscan.evaluation=external`` and the code
    version; the Markdown summary as its description; a few params; the metrics of
    :func:`external_metrics`; the manifest as an MLflow dataset input (context
    ``external``); and the three report files as artifacts under ``external/<dataset>/``.

    Args:
        report: from :func:`build_report`; its ``mlflow`` entry is filled in.
        evaluation: the evaluation the report describes.
        out_root: where the report files go (see :func:`write_report`).
        project_root: the project (artifact location of a new local experiment, git commit).
        manifest: the dataset's manifest, logged as the run's dataset input.

    Returns:
        The report files written (see :func:`write_report`).
    """
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    project_root = Path(project_root)
    dataset = report["dataset"]["name"]
    experiment_id = tracking.ensure_experiment(report["model"], project_root)
    provenance = tracking.run_tags(project_root)
    provenance.pop(tracking.TAG_DATA_HASH, None)  # the project's data, not this dataset
    tags = {
        **provenance,
        TAG_MODEL: report["model"], TAG_REGISTERED_MODEL: report["registered_model"],
        TAG_MODEL_VERSION: str(report["version"]), TAG_MODEL_STAGE: report["stage"] or "",
        TAG_MODEL_RUN: report["model_run_id"] or "", TAG_DATASET: dataset,
        TAG_DATASET_PATH: report["dataset"]["path"], TAG_DATASET_MD5: report["dataset"]["manifest_md5"],
        TAG_EVALUATION: "external",
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{RUN_NAME_PREFIX}{dataset}",
                          tags=tags) as run:
        report["mlflow"] = {"tracking_uri": mlflow.get_tracking_uri(),
                            "experiment": tracking.experiment_name(report["model"]),
                            "experiment_id": experiment_id, "run_id": run.info.run_id,
                            "run_name": f"{RUN_NAME_PREFIX}{dataset}"}
        paths = write_report(report, evaluation, out_root)
        mlflow.set_tag("mlflow.note.content", paths["markdown"].read_text())
        mlflow.log_params({"model_version": report["version"], "model_stage": report["stage"] or "",
                           "dataset": dataset, "headline": report["headline"],
                           "n_boot": report["ci"]["n_boot"], "seed": report["ci"]["seed"]})
        mlflow.log_metrics(external_metrics(report))
        if manifest is not None:
            try:
                with warnings.catch_warnings():  # "source can be interpreted in multiple ways"
                    warnings.simplefilter("ignore", UserWarning)
                    source = from_pandas(manifest, source=report["dataset"]["path"], name=dataset)
                mlflow.log_input(source, context="external")
            except Exception as exc:  # the dataset record is a convenience; the tags say the same
                log.warning("could not record %s as an MLflow dataset input: %s", dataset, exc)
        for path in paths.values():
            mlflow.log_artifact(str(path), f"external/{dataset}")
    log.info("logged the evaluation on %s to MLflow run %s (experiment %s)", dataset, run.info.run_id,
             report["mlflow"]["experiment"])
    return paths


# --------------------------------------------------------------------------- all together


@dataclass
class ExternalResult:
    """What :func:`evaluate_external` did.

    Attributes:
        report: the JSON report (see :func:`build_report`).
        paths: the files written (``json``, ``markdown``, ``predictions``).
        run_id: the MLflow run, ``None`` when not logged.
    """

    report: dict[str, Any]
    paths: dict[str, Path]
    run_id: str | None


def evaluate_external(
    model: str,
    dataset_dir: str | Path,
    out_root: str | Path = DEFAULT_OUT,
    *,
    project_root: str | Path = ".",
    dataset_name: str | None = None,
    headline: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    log_to_mlflow: bool = True,
) -> ExternalResult:
    """Score a registered model on an external dataset and write and log the report.

    The contract and spec are read before Keras is loaded, so a dataset with no usable row
    fails fast. The report files are written before MLflow logging starts, so a tracking
    failure leaves them in place (without a run id) and is raised.

    Args:
        model: a model reference (see :func:`parse_model_ref`).
        dataset_dir: a directory with ``manifest.csv``.
        out_root: root of the reports (``<out_root>/<dataset>/<model>.json``).
        project_root: the project (MLflow artifact location of a new experiment, git commit).
        dataset_name: name of the dataset (default: the directory's name).
        headline: headline metric (default: :func:`default_headline` of the version's tag).
        n_boot: bootstrap resamples of the intervals.
        seed: bootstrap seed.
        log_to_mlflow: log a run ``external:<dataset>`` (see :func:`log_external_run`).

    Returns:
        The report, the files written and the MLflow run id.

    Raises:
        ValueError: a malformed model reference or an unknown headline.
        breastscan.registry.resolver.RegistryError: the model, stage or version does not exist.
        FileNotFoundError: no ``manifest.csv`` in ``dataset_dir``.
        breastscan.evaluation.external.NoUsableRows: no row can be scored (the message gives
            the reasons).
    """
    ref = parse_model_ref(model)
    root = Path(dataset_dir)
    with tempfile.TemporaryDirectory(prefix="breastscan-external-") as tmp:
        fetched = fetch(ref, Path(tmp))
        dataset = load_external(root, fetched.contract, fetched.spec, name=dataset_name)
        require_usable(dataset, fetched.contract)
        bundle = fetched.load_bundle()
    chosen = headline or default_headline(fetched.contract, fetched.resolved.tags.get("headline"))
    evaluation = score_external(bundle, dataset, headline=chosen, n_boot=n_boot, seed=seed)
    evaluation.predictions = prediction_frame(dataset, evaluation)
    report = build_report(scored_model(fetched), dataset, evaluation, n_boot=n_boot, seed=seed)
    paths = write_report(report, evaluation, out_root)
    run_id = None
    if log_to_mlflow:
        paths = log_external_run(report, evaluation, out_root, project_root=project_root,
                                 manifest=read_manifest(root))
        run_id = report["mlflow"]["run_id"]
    head = report["metrics"].get(chosen, {})
    log.info("%s v%d on %s: %d of %d rows scored, %s = %s; report %s", ref.name, fetched.resolved.version,
             dataset.name, dataset.n_used, dataset.n_rows, chosen, fmt_interval(head), paths["json"])
    return ExternalResult(report=report, paths=paths, run_id=run_id)
