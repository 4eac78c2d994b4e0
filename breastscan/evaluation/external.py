"""Score a registered model on an external dataset: ``breastscan evaluate``.

An external dataset is any directory in the manifest contract (:mod:`breastscan.data.manifest`)
that the model has never seen: a hospital's export, a public set converted with
``breastscan ingest``. It has no splits and no validation part, so nothing is learnt from
it: a classifier keeps the calibration temperature stored with the model
(:func:`breastscan.evaluation.scoring.score_bundle` with ``val=None``), a segmenter its
threshold.

The steps, each a public function:

1. :func:`breastscan.registry.resolver.fetch`: ``tumor``, ``tumor@staging`` or ``tumor/3``
   to one registry version and its bundle (spec and contract), downloaded by version.
2. :func:`load_external`: the lenient row loader
   (:func:`breastscan.data.loading.load_rows`) with the bundle's own spec: every row the
   model can score, and every other row counted under one reason of
   :data:`~breastscan.data.loading.SKIP_REASONS`, with example paths.
3. :func:`score_external`: the scoring core (:func:`breastscan.evaluation.scoring.score_bundle`)
   with the stored calibration and a 95 % bootstrap interval for every declared metric,
   resampling whole groups (patients).
4. :func:`build_report`, :func:`write_report` and :func:`log_external_run`:
   ``<out>/<dataset>/<model>.json`` and ``.md`` (plus ``<model>_predictions.csv``), and a
   new MLflow run ``external:<dataset>`` in the model's experiment ``breastscan-<model>``,
   tagged with the model version, metrics prefixed ``external_``.

:func:`evaluate_external` runs the four. MLflow, Keras and TensorFlow are imported inside
the functions that need them; importing this module costs nothing.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from breastscan.bundle import ModelContract
from breastscan.data.loading import SKIP_REASONS, LoadedRows, RowSpec, SkippedRow, SplitData, load_rows
from breastscan.data.manifest import file_md5, read_manifest
from breastscan.evaluation import metrics as M
from breastscan.evaluation.reports import fmt, fmt_interval, md_escape, write_json
from breastscan.evaluation.scoring import CALIBRATION_BINS, Evaluation, Scoring, score_bundle
from breastscan.registry.resolver import FetchedModel, fetch, parse_model_ref

if TYPE_CHECKING:
    from breastscan.bundle import ModelBundle
    from breastscan.imaging.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("reports/external")
"""Default root of the reports: ``<out>/<dataset>/<model>.json``."""

RUN_NAME_PREFIX = "external:"
METRIC_PREFIX = "external_"
MAX_EXAMPLES = 5
"""Example rows kept per skip reason."""

TAG_MODEL = "breastscan.model"
TAG_REGISTERED_MODEL = "breastscan.registered_model"
TAG_MODEL_VERSION = "breastscan.model_version"
TAG_MODEL_STAGE = "breastscan.model_stage"
TAG_MODEL_RUN = "breastscan.model_run_id"
TAG_DATASET = "breastscan.dataset"
TAG_DATASET_PATH = "breastscan.dataset_path"
TAG_DATASET_MD5 = "breastscan.dataset_manifest_md5"
TAG_EVALUATION = "breastscan.evaluation"


class NoUsableRows(ValueError):
    """No row of the dataset can be scored by the model; the message gives the reasons."""


# --------------------------------------------------------------------------- the data


@dataclass
class ExternalDataset:
    """The rows of an external dataset a model can score, and why the others are not scored.

    Attributes:
        root: the dataset directory.
        name: the dataset's name (reports, MLflow).
        n_rows: rows in the manifest.
        data: the scored rows (``frame`` with ``manifest_row``; ``groups`` per row).
        skipped: reason (a key of :data:`~breastscan.data.loading.SKIP_REASONS`) -> rows.
        manifest_md5: MD5 of ``manifest.csv``.
    """

    root: Path
    name: str
    n_rows: int
    data: SplitData
    skipped: dict[str, list[SkippedRow]] = field(default_factory=dict)
    manifest_md5: str = ""

    @property
    def n_used(self) -> int:
        """Rows scored."""
        return len(self.data)

    @property
    def n_skipped(self) -> int:
        """Rows not scored."""
        return sum(len(rows) for rows in self.skipped.values())

    def skip_counts(self) -> dict[str, int]:
        """Reason -> rows skipped for it (reasons with at least one row, in check order)."""
        return LoadedRows(self.data, self.n_rows, self.skipped).skip_counts()

    def skip_summary(self) -> str:
        """``wrong_modality 12, missing_image 1`` (or ``none``)."""
        return LoadedRows(self.data, self.n_rows, self.skipped).skip_summary()


def load_external(root: str | Path, contract: ModelContract, spec: PreprocessSpec, *,
                  name: str | None = None) -> ExternalDataset:
    """Read an external dataset's manifest and load every row the model can score (leniently).

    Args:
        root: dataset directory holding ``manifest.csv`` (paths relative to it, or absolute).
        contract: the model's contract (task, label, classes, modality).
        spec: the model's preprocessing spec.
        name: the dataset's name (default: the directory's name).

    Raises:
        FileNotFoundError: the directory has no ``manifest.csv``.
        ValueError: the manifest has no ``image`` column.
    """
    root = Path(root)
    manifest = read_manifest(root)
    if "image" not in manifest.columns:
        raise ValueError(f"{root}/manifest.csv has no 'image' column (see breastscan/data/manifest.py)")
    loaded = load_rows(manifest, root, RowSpec.from_contract(contract, spec), strict=False)
    dataset = ExternalDataset(root=root, name=name or root.resolve().name, n_rows=loaded.n_rows,
                              data=loaded.data, skipped=loaded.skipped,
                              manifest_md5=file_md5(root / "manifest.csv"))
    log.info("%s: %d of %d rows usable by %s (%s, %s); skipped: %s", dataset.name, dataset.n_used,
             dataset.n_rows, contract.name, contract.modality, contract.label, dataset.skip_summary())
    return dataset


def require_usable(dataset: ExternalDataset, contract: ModelContract) -> None:
    """Raise :class:`NoUsableRows` when no row can be scored, naming every reason.

    Raises:
        NoUsableRows: e.g. ``no row of ext (40 rows) is usable by model tumor (mammography,
            label pathology): wrong_modality 38 (modality is not the model's ...), ...``.
    """
    if dataset.n_used:
        return
    classes = f"{contract.modality}, label {contract.label}, classes {', '.join(contract.classes)}"
    what = {"classification": classes, "segmentation": f"{contract.modality}, lesion masks",
            "multitask": f"{classes}, lesion masks"}[contract.task]
    if not dataset.n_rows:
        raise NoUsableRows(f"{dataset.root}/manifest.csv has no rows")
    reasons = "; ".join(
        f"{reason} {len(rows)} ({SKIP_REASONS[reason]}; e.g. {rows[0].image or '?'}: {rows[0].detail})"
        for reason, rows in ((r, dataset.skipped[r]) for r in dataset.skip_counts()))
    raise NoUsableRows(f"no row of {dataset.name} ({dataset.n_rows} rows) is usable by model "
                       f"{contract.name} ({what}): {reasons}")


# --------------------------------------------------------------------------- scoring


def default_headline(contract: ModelContract, tagged: str | None = None) -> str:
    """The metric to headline: the model's declared one, else the version's ``headline`` tag
    when it applies, else ``mean_dice`` (segmenters) or ``macro_auc``."""
    if contract.headline:
        return contract.headline
    allowed = M.headlines(contract.task, len(contract.classes))
    if tagged in allowed:
        return str(tagged)
    return "mean_dice" if contract.task == M.SEGMENTATION else "macro_auc"


def score_external(bundle: ModelBundle, dataset: ExternalDataset, *, headline: str, n_boot: int = 1000,
                   seed: int = 0) -> Evaluation:
    """Score a bundle on the usable rows of an external dataset (the scoring core, stored calibration).

    Every declared metric gets a 95 % bootstrap interval resampling whole groups
    (``evaluation.scores``); nothing is refitted on the external data.

    Raises:
        NoUsableRows: the dataset has no usable row.
        ValueError: the headline does not apply to the model.
    """
    contract = bundle.contract
    require_usable(dataset, contract)
    scoring = Scoring.from_contract(contract, headline)
    return score_bundle(bundle, dataset.data, val=None, scoring=scoring, n_boot=n_boot, seed=seed,
                        all_intervals=True)


# --------------------------------------------------------------------------- report


def confusion_matrix(evaluation: Evaluation) -> list[list[int]]:
    """``(k, k)`` counts of a classifier's evaluation: rows true class, columns predicted."""
    from breastscan.evaluation.scoring import outcomes_of

    scoring = Scoring(task=M.CLASSIFICATION, class_names=evaluation.class_names, headline="accuracy",
                      metrics=("accuracy",))
    outcomes = outcomes_of(evaluation.predictions, scoring)
    assert isinstance(outcomes, M.ClassOutcomes)
    return M.confusion(outcomes)


def build_report(model: FetchedModel, dataset: ExternalDataset, evaluation: Evaluation, *, n_boot: int,
                 seed: int) -> dict[str, Any]:
    """The JSON-able report of one external evaluation.

    Returns:
        ``model``, ``registered_model``, ``version``, ``stage`` (the alias asked for, or
        ``None`` for a version), ``aliases``, ``model_run_id``, ``task``, ``label``,
        ``modality``, ``class_names``, ``dataset`` (``name``, ``path``, ``manifest_md5``),
        ``counts`` (``rows``, ``used``, ``skipped``, ``skipped_by_reason``: reason ->
        ``count``, ``meaning``, ``examples`` of ``{"row", "image", "detail"}``),
        ``headline``, ``metrics`` (name -> ``value``, ``ci_low``, ``ci_high``), ``ci``
        (``level``, ``n_boot``, ``seed``, ``unit``, ``n_groups``), for classifiers
        ``per_class``, ``confusion_matrix`` (``labels``, ``matrix``), ``calibration``
        (``temperature``, ``refitted`` false, ``ece``, ``ece_at_t1``, ``bins``) and
        ``decision`` (the stored rule the predicted classes follow, not refitted:
        :meth:`~breastscan.decision.DecisionRule.to_dict` plus ``description``), for
        segmenters ``segmentation`` (``threshold``, ``n_lesion_images``), ``evaluation``
        (every metric the evaluation computed), ``mlflow`` (filled by
        :func:`log_external_run`, else ``None``) and ``created`` (UTC ISO time).
    """
    contract, version = model.contract, model.resolved
    m = evaluation.metrics
    report: dict[str, Any] = {
        "model": version.ref.name,
        "registered_model": version.ref.registered_name,
        "version": version.version,
        "stage": version.ref.alias,
        "aliases": list(version.aliases),
        "model_run_id": version.run_id,
        "task": contract.task,
        "label": contract.label,
        "modality": contract.modality,
        "class_names": list(contract.class_names),
        "dataset": {"name": dataset.name, "path": str(dataset.root.resolve()),
                    "manifest_md5": dataset.manifest_md5},
        "counts": {
            "rows": dataset.n_rows, "used": dataset.n_used, "skipped": dataset.n_skipped,
            "skipped_by_reason": {
                reason: {"count": len(dataset.skipped[reason]), "meaning": SKIP_REASONS[reason],
                         "examples": [{"row": s.row, "image": s.image, "detail": s.detail}
                                      for s in dataset.skipped[reason][:MAX_EXAMPLES]]}
                for reason in dataset.skip_counts()
            },
        },
        "headline": m.get("headline"),
        "metrics": evaluation.scores,
        "ci": {"level": 0.95, "method": "percentile bootstrap over manifest groups", "n_boot": n_boot,
               "seed": seed, "n_groups": int(len(np.unique(dataset.data.groups)))},
    }
    if contract.task in (M.CLASSIFICATION, M.MULTITASK):
        report["per_class"] = m.get("per_class", {})
        report["confusion_matrix"] = {"labels": list(evaluation.class_names), "rows": "true",
                                      "columns": "predicted", "matrix": confusion_matrix(evaluation)}
        report["calibration"] = {"temperature": m.get("temperature"), "refitted": False,
                                 "ece": m.get("ece_after"), "ece_at_t1": m.get("ece_before"),
                                 "bins": CALIBRATION_BINS}
        rule = evaluation.decision or contract.rule
        report["decision"] = {**rule.to_dict(), "refitted": False, "description": rule.describe()}
    if contract.task in (M.SEGMENTATION, M.MULTITASK):
        report["segmentation"] = {"threshold": m.get("threshold"),
                                  "n_lesion_images": m.get("n_lesion_images")}
    report["evaluation"] = m
    report["mlflow"] = None
    report["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return report


def render_markdown(report: dict[str, Any]) -> str:
    """A human summary of a report (:func:`build_report`) in Markdown.

    Numbers are printed with three decimals, as ``_fmt`` does; ``n/a`` where undefined.
    """
    r = report
    counts = r["counts"]
    stage = f"stage `{r['stage']}`" if r["stage"] else "pinned by version"
    lines = [
        f"# External evaluation: {r['model']} v{r['version']} on `{r['dataset']['name']}`",
        "",
        f"- Model: `{r['registered_model']}` version {r['version']} ({stage}; aliases: "
        f"{', '.join(r['aliases']) or 'none'}), trained in run `{r['model_run_id'] or 'unknown'}`",
        f"- Task: {r['task']} of `{r['label']}`"
        + (f" ({', '.join(r['class_names'])})" if r["task"] == "classification" else "")
        + f", modality {r['modality']}",
        f"- Dataset: `{r['dataset']['path']}` (manifest md5 `{r['dataset']['manifest_md5']}`)",
        f"- Created: {r['created']}" + (f"; MLflow run `{r['mlflow']['run_id']}` in experiment "
                                         f"`{r['mlflow']['experiment']}`" if r.get("mlflow") else ""),
        "",
        "## Rows",
        "",
        "| rows | count |",
        "|---|---:|",
        f"| in the manifest | {counts['rows']} |",
        f"| scored | {counts['used']} |",
        f"| skipped | {counts['skipped']} |",
        "",
    ]
    if counts["skipped_by_reason"]:
        lines += ["### Skipped rows", "", "| reason | rows | meaning | examples |", "|---|---:|---|---|"]
        for reason, info in counts["skipped_by_reason"].items():
            examples = "; ".join(f"`{e['image']}` ({e['detail']})" for e in info["examples"][:3])
            lines.append(f"| {reason} | {info['count']} | {info['meaning']} | {md_escape(examples)} |")
        lines.append("")
    ci = r["ci"]
    lines += [
        f"## Metrics ({int(ci['level'] * 100)} % CI: percentile bootstrap, {ci['n_boot']} resamples "
        f"of {ci['n_groups']} groups)",
        "",
        "| metric | value | 95 % CI |",
        "|---|---:|---|",
    ]
    for name, v in r["metrics"].items():
        label = f"**{name}** (headline)" if name == r["headline"] else name
        interval = (f"{fmt(v['ci_low'])} – {fmt(v['ci_high'])}"
                    if v["ci_low"] is not None and v["ci_high"] is not None else "n/a")
        lines.append(f"| {label} | {fmt(v['value'])} | {interval} |")
    lines.append("")
    if r["task"] in ("classification", "multitask"):
        cal = r["calibration"]
        lines += [
            "## Calibration",
            "",
            f"Temperature {fmt(cal['temperature'])} (stored with the model, not refitted on this data); "
            f"ECE {fmt(cal['ece'])} ({fmt(cal['ece_at_t1'])} at T = 1), {cal['bins']} bins.",
            "",
        ]
        if r.get("decision"):
            lines += ["## Decision rule", "",
                      f"{r['decision']['description']} Stored with the model, not refitted on this data: "
                      "the predicted classes, sensitivities and specificities below are at this rule.", ""]
        lines += [
            "## Confusion matrix (rows: true, columns: predicted)",
            "",
        ]
        labels = r["confusion_matrix"]["labels"]
        lines += ["| true \\ predicted | " + " | ".join(labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        for name, row in zip(labels, r["confusion_matrix"]["matrix"], strict=True):
            lines.append(f"| {name} | " + " | ".join(str(c) for c in row) + " |")
        lines += ["", "## Per class", "", "| class | support | sensitivity | specificity | precision | AUC |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, s in r["per_class"].items():
            lines.append(f"| {name} | {s['support']} | {fmt(s['sensitivity'])} | {fmt(s['specificity'])} "
                         f"| {fmt(s['precision'])} | {fmt(s['auc'])} |")
        lines.append("")
    if r["task"] in ("segmentation", "multitask"):
        seg = r["segmentation"]
        lines += ["## Segmentation", "",
                  f"Mask threshold {fmt(seg['threshold'])}; {seg['n_lesion_images']} scored images "
                  "show a lesion (Dice and IoU of an empty truth and empty prediction count as 1).", ""]
    lines += ["Research and engineering use only; not for diagnosis.", ""]
    return "\n".join(lines)


def report_paths(out_root: str | Path, dataset_name: str, model: str) -> dict[str, Path]:
    """``json``, ``markdown`` and ``predictions`` paths under ``<out_root>/<dataset_name>/``."""
    base = Path(out_root) / dataset_name
    return {"json": base / f"{model}.json", "markdown": base / f"{model}.md",
            "predictions": base / f"{model}_predictions.csv"}


def write_report(report: dict[str, Any], evaluation: Evaluation, out_root: str | Path) -> dict[str, Path]:
    """Write ``<out_root>/<dataset>/<model>.json``, ``<model>.md`` and ``<model>_predictions.csv``.

    The predictions file has one row per scored image: its ``manifest_row``, ``image``,
    ``group`` and the evaluation's prediction columns (``true``, ``pred``, ``prob_<class>``
    or ``dice``, ``iou`` ...).

    Returns:
        ``{"json": path, "markdown": path, "predictions": path}``.
    """
    paths = report_paths(out_root, report["dataset"]["name"], report["model"])
    write_json(report, paths["json"])
    paths["markdown"].write_text(render_markdown(report))
    evaluation.predictions.to_csv(paths["predictions"], index=False, float_format="%.6g")
    return paths


def _prediction_frame(dataset: ExternalDataset, evaluation: Evaluation) -> pd.DataFrame:
    out = evaluation.predictions.copy()
    out.insert(0, "manifest_row", dataset.data.frame["manifest_row"].to_numpy())
    return out


# --------------------------------------------------------------------------- MLflow


def external_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a report, every key prefixed ``external_``.

    ``external_<metric>`` with ``_ci_low`` / ``_ci_high`` for each metric of the report,
    ``external_ece``, ``external_ece_at_t1`` and ``external_temperature`` (classifiers),
    ``external_n_rows``, ``external_n_used``, ``external_n_skipped`` and
    ``external_skipped_<reason>`` for each reason of :data:`SKIP_REASONS` (0 included);
    undefined values are left out.
    """
    from breastscan.registry.tracking import numeric_items

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
    return {METRIC_PREFIX + k: v for k, v in numeric_items(flat).items()}


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

    from breastscan.registry import tracking

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
        breastscan.registry.versions.RegistryError: the model, stage or version does not exist.
        FileNotFoundError: no ``manifest.csv`` in ``dataset_dir``.
        NoUsableRows: no row can be scored (the message gives the reasons).
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
    evaluation.predictions = _prediction_frame(dataset, evaluation)
    report = build_report(fetched, dataset, evaluation, n_boot=n_boot, seed=seed)
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
