"""Score a model on an external dataset: the scoring and the report of ``breastscan evaluate``.

An external dataset is any directory in the manifest contract (:mod:`breastscan.data.manifest`)
that the model has never seen: a hospital's export, a public set converted with
``breastscan ingest``. It has no splits and no validation part, so nothing is learnt from
it: a classifier keeps the calibration temperature stored with the model
(:func:`breastscan.evaluation.scoring.score_bundle` with ``val=None``), a segmenter its
threshold.

The steps, each a public function:

1. :func:`load_external`: the lenient row loader
   (:func:`breastscan.data.loading.load_rows`) with the model's own spec: every row the
   model can score, and every other row counted under one reason of
   :data:`~breastscan.data.loading.SKIP_REASONS`, with example paths.
2. :func:`score_external`: the scoring core (:func:`breastscan.evaluation.scoring.score_bundle`)
   with the stored calibration and a 95 % bootstrap interval for every declared metric,
   resampling whole groups (patients).
3. :func:`build_report` and :func:`write_report`: ``<out>/<dataset>/<model>.json`` and
   ``.md`` (plus ``<model>_predictions.csv``).

Which model is scored is the caller's business: :mod:`breastscan.registry.external_runs`
resolves a registry reference to one version (:class:`ScoredModel`), runs these steps and
logs the result as an MLflow run. Keras and TensorFlow are imported inside the functions
that need them; importing this module costs nothing.
"""

from __future__ import annotations

import logging
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
from breastscan.evaluation.reports import fmt, md_escape, write_json
from breastscan.evaluation.scoring import CALIBRATION_BINS, Evaluation, Scoring, score_bundle

if TYPE_CHECKING:
    from breastscan.bundle import ModelBundle
    from breastscan.imaging.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("reports/external")
"""Default root of the reports: ``<out>/<dataset>/<model>.json``."""

MAX_EXAMPLES = 5
"""Example rows kept per skip reason."""


class NoUsableRows(ValueError):
    """No row of the dataset can be scored by the model; the message gives the reasons."""


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ScoredModel:
    """The model a report describes: its contract and the registry version it was resolved to.

    Attributes:
        contract: the model's contract (task, label, classes, modality, calibration).
        name: the model's name in params.yaml (``tumor``).
        registered_name: its registry name (``breastscan-tumor``).
        version: the registry version scored.
        stage: the stage (alias) asked for; ``None`` when pinned by version.
        aliases: every alias the version held when it was resolved.
        run_id: the MLflow run that trained it; ``None`` when not recorded.
    """

    contract: ModelContract
    name: str
    registered_name: str
    version: int
    stage: str | None
    aliases: tuple[str, ...] = ()
    run_id: str | None = None


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


def build_report(model: ScoredModel, dataset: ExternalDataset, evaluation: Evaluation, *, n_boot: int,
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
        :func:`breastscan.registry.external_runs.log_external_run`, else ``None``) and
        ``created`` (UTC ISO time).
    """
    contract = model.contract
    m = evaluation.metrics
    report: dict[str, Any] = {
        "model": model.name,
        "registered_model": model.registered_name,
        "version": model.version,
        "stage": model.stage,
        "aliases": list(model.aliases),
        "model_run_id": model.run_id,
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


def prediction_frame(dataset: ExternalDataset, evaluation: Evaluation) -> pd.DataFrame:
    """The evaluation's prediction rows, each led by its ``manifest_row`` in the dataset."""
    out = evaluation.predictions.copy()
    out.insert(0, "manifest_row", dataset.data.frame["manifest_row"].to_numpy())
    return out
