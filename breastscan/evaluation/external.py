"""Score a registered model on an external dataset: ``breastscan evaluate``.

An external dataset is any directory in the manifest contract (:mod:`breastscan.data.manifest`)
that the model has never seen: a hospital's export, a public set converted with
``breastscan ingest``. It has no splits and no validation part, so nothing is learnt from
it: a classifier keeps the calibration temperature stored with the model
(:func:`breastscan.evaluation.scoring.evaluate_classifier` with ``val=None``), a segmenter its
threshold.

The steps, each a public function:

1. :func:`parse_model_ref` and :func:`resolve_model`: ``tumor``, ``breastscan-tumor``,
   ``tumor@staging`` (an alias; ``production`` by default) or ``tumor/3`` (a version) to
   one registry version, its run and its bundle (spec and contract).
2. :func:`load_external`: every manifest row the model can score, decoded and
   preprocessed with the bundle's own :class:`~breastscan.imaging.preprocessing.PreprocessSpec`;
   every other row is counted under one reason of :data:`SKIP_REASONS` (wrong modality,
   no label, a label outside the model's classes, a missing or undecodable image or
   mask), with example paths. Nothing is dropped silently.
3. :func:`score_external`: the project's evaluation code on those rows
   (:mod:`breastscan.evaluation.scoring`), with a 95 % bootstrap interval for every metric that
   resamples whole ``group`` s (patients).
4. :func:`build_report`, :func:`write_report` and :func:`log_external_run`:
   ``<out>/<dataset>/<model>.json`` and ``.md`` (plus ``<model>_predictions.csv``), and a
   new MLflow run ``external:<dataset>`` in the model's experiment ``breastscan-<model>``,
   tagged with the model version, metrics prefixed ``external_``.

:func:`evaluate_external` runs the four. MLflow, Keras and TensorFlow are imported inside
the functions that need them; importing this module costs nothing.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from breastscan.data.loading import SplitData
from breastscan.data.manifest import file_md5, read_manifest, resolve
from breastscan.imaging.files import read_mask
from breastscan.imaging.preprocessing import (
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    preprocess_image,
    preprocess_mask,
)
from breastscan.registry.bundle import ModelContract, read_contract

if TYPE_CHECKING:
    from breastscan.evaluation.scoring import Evaluation
    from breastscan.registry.bundle import ModelBundle

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("reports/external")
"""Default root of the reports: ``<out>/<dataset>/<model>.json``."""

DEFAULT_ALIAS = "production"
"""Stage (alias) a model reference without ``@stage`` or ``/version`` resolves to."""

REGISTERED_PREFIX = "breastscan-"
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
TAG_EVALUATION = "breastscan.evaluation.scoring"

SKIP_REASONS: dict[str, str] = {
    "wrong_modality": "modality is not the model's (or is empty)",
    "no_label": "the model's label column is empty",
    "unknown_label": "the label is not one of the model's classes",
    "no_mask": "a lesion row without a mask (segmentation)",
    "missing_image": "the image file does not exist",
    "unreadable_image": "the image does not decode (corrupt, truncated, not an image, size out of range)",
    "missing_mask": "the mask file does not exist",
    "unreadable_mask": "the mask does not decode or its size differs from the image",
}
"""Why a manifest row is not scored, in the order the checks run (one reason per row)."""

_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*?)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))?$")


class NoUsableRows(ValueError):
    """No row of the dataset can be scored by the model; the message gives the reasons."""


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelRef:
    """A model named on the command line.

    Attributes:
        name: the model's name in params.yaml (``tumor``).
        registered_name: its registry name (``breastscan-tumor``).
        version: the version asked for, or ``None``.
        alias: the stage (alias) asked for, ``None`` when a version is given.
    """

    name: str
    registered_name: str
    version: int | None
    alias: str | None

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version is not None else f"{self.name}@{self.alias}"


def parse_model_ref(text: str, default_alias: str = DEFAULT_ALIAS) -> ModelRef:
    """Parse ``NAME``, ``NAME@STAGE`` or ``NAME/VERSION`` (NAME with or without ``breastscan-``).

    Args:
        text: e.g. ``tumor``, ``breastscan-tumor``, ``tumor@staging``, ``tumor/3``.
        default_alias: the stage used when none and no version is given.

    Returns:
        The reference.

    Raises:
        ValueError: the text is not of that form (or the version is 0).
    """
    match = _REF.match(text.strip())
    if not match:
        raise ValueError(f"model reference {text!r} is not NAME, NAME@STAGE or NAME/VERSION "
                         "(e.g. tumor, tumor@staging, tumor/3)")
    name = match["name"]
    short = name[len(REGISTERED_PREFIX):] if name.startswith(REGISTERED_PREFIX) else name
    if not short:
        raise ValueError(f"model reference {text!r} has no model name")
    version = int(match["version"]) if match["version"] is not None else None
    if version is not None and version < 1:
        raise ValueError(f"model reference {text!r}: registry versions start at 1")
    alias = None if version is not None else (match["alias"] or default_alias)
    return ModelRef(name=short, registered_name=REGISTERED_PREFIX + short, version=version, alias=alias)


@dataclass
class ResolvedModel:
    """One registry version and its bundle directory.

    Attributes:
        ref: what was asked for.
        version: the registry version it resolved to.
        aliases: every alias (stage) that version holds now.
        run_id: the MLflow run that produced the version (``None`` if not recorded).
        source: the version's source URI.
        tags: the version's tags (headline, split id ...).
        bundle_dir: the downloaded bundle (``model.keras``, ``preprocess.json``,
            ``contract.json``).
        contract: the bundle's contract (read without Keras).
        spec: the bundle's preprocessing spec.
    """

    ref: ModelRef
    version: int
    aliases: list[str]
    run_id: str | None
    source: str | None
    tags: dict[str, str]
    bundle_dir: Path
    contract: ModelContract
    spec: PreprocessSpec

    def load_bundle(self) -> ModelBundle:
        """Load the Keras model with its spec and contract (imports Keras)."""
        from breastscan.registry.bundle import ModelBundle

        return ModelBundle.load(self.bundle_dir)


def _registered_names() -> list[str]:
    from mlflow import MlflowClient

    try:
        models = MlflowClient().search_registered_models(filter_string=f"name LIKE '{REGISTERED_PREFIX}%'")
    except Exception as exc:  # only used to enrich an error message
        log.debug("could not list registered models: %s", exc)
        return []
    return sorted(m.name for m in models)


def resolve_model(ref: ModelRef, dst: Path) -> ResolvedModel:
    """Find the registry version of a reference and download its bundle (no Keras import).

    Uses the MLflow registry MLflow is configured with (:func:`breastscan.registry.tracking.configure`).
    The bundle is downloaded by version number, so an alias moved meanwhile cannot mix
    two versions.

    Args:
        ref: the reference (:func:`parse_model_ref`).
        dst: directory to download into (created).

    Returns:
        The resolved version.

    Raises:
        breastscan.registry.versions.RegistryError: no such model, alias or version; the message
            lists the registered breastscan models.
    """
    from mlflow import MlflowClient

    from breastscan.registry import versions

    client = MlflowClient()
    try:
        mv = versions._get_version(client, ref.registered_name, ref.version, ref.alias or DEFAULT_ALIAS)
    except versions.RegistryError as exc:
        known = [n[len(REGISTERED_PREFIX):] for n in _registered_names()]
        raise versions.RegistryError(f"{exc}. Registered breastscan models: "
                                     f"{', '.join(known) or 'none'}") from None
    version = int(mv.version)
    try:
        holders = client.get_registered_model(ref.registered_name).aliases or {}
    except Exception as exc:  # aliases are informative only
        log.warning("could not read the aliases of %s: %s", ref.registered_name, exc)
        holders = {}
    aliases = sorted(a for a, v in holders.items() if str(v) == str(version))
    bundle_dir = versions.download_bundle(ref.registered_name, dst=Path(dst), version=version)
    log.info("%s resolved to %s v%d (aliases: %s, run %s)", ref, ref.registered_name, version,
             ", ".join(aliases) or "none", mv.run_id)
    return ResolvedModel(ref=ref, version=version, aliases=aliases, run_id=mv.run_id or None,
                         source=mv.source, tags=dict(mv.tags or {}), bundle_dir=bundle_dir,
                         contract=read_contract(bundle_dir), spec=PreprocessSpec.load(bundle_dir))


# --------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class SkippedRow:
    """A manifest row that was not scored.

    Attributes:
        row: 0-based row index in ``manifest.csv`` (the file's line is ``row + 2``).
        image: the row's ``image`` cell as written.
        detail: what was wrong, e.g. the decoder's message or the unknown label.
    """

    row: int
    image: str
    detail: str


@dataclass
class ExternalDataset:
    """The rows of an external dataset a model can score, and why the others are not scored.

    Attributes:
        root: the dataset directory.
        name: the dataset's name (reports, MLflow).
        n_rows: rows in the manifest.
        data: the scored rows: ``images`` ``(n, H, W, 1)`` float32 in [0, 1] (the model's
            spec), ``targets`` ``(n,)`` int64 class indices or ``(n, H, W, 1)`` float32
            masks in {0, 1}, ``frame`` the manifest rows used (index reset, with
            ``manifest_row``), ``groups`` the ``group`` ids (image path where empty).
        skipped: reason (a key of :data:`SKIP_REASONS`) -> the rows skipped for it.
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
        return {r: len(self.skipped[r]) for r in SKIP_REASONS if self.skipped.get(r)}

    def skip_summary(self) -> str:
        """``wrong_modality 12, missing_image 1`` (or ``none``)."""
        return ", ".join(f"{r} {n}" for r, n in self.skip_counts().items()) or "none"


def _cell(row: pd.Series, column: str) -> str | None:
    """A manifest cell as stripped text, ``None`` when the column is absent or the cell empty."""
    if column not in row.index:
        return None
    value = row[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def class_index(classes: tuple[str, ...], value: str) -> int | None:
    """Index of a label value among a model's classes (compared as text), ``None`` if absent.

    ``"2.0"`` (a density written by a float column) matches class ``"2"``, as in training
    (:func:`breastscan.data.loading.load_split`).
    """
    texts = [str(c) for c in classes]
    if value in texts:
        return texts.index(value)
    try:
        number = float(value)
    except ValueError:
        return None
    if number.is_integer() and str(int(number)) in texts:
        return texts.index(str(int(number)))
    return None


def load_external(root: str | Path, contract: ModelContract, spec: PreprocessSpec, *,
                  name: str | None = None) -> ExternalDataset:
    """Read an external dataset's manifest and preprocess every row the model can score.

    Checks run in the order of :data:`SKIP_REASONS` and the first that fails is the row's
    one reason: modality (against ``contract.modality``, case-insensitive), label
    (classification: a value of ``contract.classes``; segmentation: a mask, or pathology
    ``normal``, which gets an empty mask as in training), image file, image decoding and
    preprocessing (``spec``), mask file, mask decoding and size. Only the rows of the
    model's modality are decoded.

    Args:
        root: dataset directory holding ``manifest.csv`` (paths relative to it, or absolute).
        contract: the model's contract (task, label, classes, modality).
        spec: the model's preprocessing spec (input size, contrast steps, side limits).
        name: the dataset's name (default: the directory's name).

    Returns:
        The dataset; ``data`` may be empty (see :func:`require_usable`).

    Raises:
        FileNotFoundError: the directory has no ``manifest.csv``.
        ValueError: the manifest has no ``image`` column.
    """
    root = Path(root)
    manifest = read_manifest(root)
    if "image" not in manifest.columns:
        raise ValueError(f"{root}/manifest.csv has no 'image' column (see breastscan/data/manifest.py)")
    segmentation = contract.task == "segmentation"
    modality = contract.modality.strip().lower()
    h, w, _ = contract.input_shape
    skipped: dict[str, list[SkippedRow]] = {}
    used: list[int] = []
    images: list[np.ndarray] = []
    targets: list[Any] = []

    def skip(reason: str, i: int, image: str | None, detail: str) -> None:
        skipped.setdefault(reason, []).append(SkippedRow(row=i, image=image or "", detail=detail))

    for i, (_, row) in enumerate(manifest.iterrows()):
        image_rel = _cell(row, "image")
        row_modality = _cell(row, "modality")
        if row_modality is None or row_modality.lower() != modality:
            skip("wrong_modality", i, image_rel, f"modality={row_modality or ''!r}, model: {modality}")
            continue
        mask_rel = _cell(row, "mask")
        label_index: int | None = None
        if segmentation:
            pathology = (_cell(row, "pathology") or "").lower()
            if mask_rel is None and pathology != "normal":
                skip("no_mask", i, image_rel, f"no mask (pathology={pathology or 'unknown'})")
                continue
        else:
            value = _cell(row, contract.label)
            if value is None:
                skip("no_label", i, image_rel, f"{contract.label} is empty")
                continue
            label_index = class_index(contract.classes, value)
            if label_index is None:
                skip("unknown_label", i, image_rel, f"{contract.label}={value!r}")
                continue
        if image_rel is None or not resolve(root, image_rel).is_file():
            skip("missing_image", i, image_rel, "no such file")
            continue
        try:
            pixels = decode_image(resolve(root, image_rel), min_side=spec.min_side, max_side=spec.max_side)
            x = preprocess_image(pixels, spec)[0]
        except (ImageDecodeError, OSError, ValueError) as exc:
            skip("unreadable_image", i, image_rel, str(exc))
            continue
        if segmentation:
            mask = np.zeros((h, w, 1), np.float32)
            if mask_rel is not None:
                mask_path = resolve(root, mask_rel)
                if not mask_path.is_file():
                    skip("missing_mask", i, image_rel, f"mask {mask_rel}: no such file")
                    continue
                try:
                    raw = read_mask(mask_path)
                except (OSError, ValueError) as exc:
                    skip("unreadable_mask", i, image_rel, str(exc))
                    continue
                if raw.shape != pixels.shape:
                    skip("unreadable_mask", i, image_rel,
                         f"mask {mask_rel} is {raw.shape[1]}x{raw.shape[0]}, "
                         f"the image {pixels.shape[1]}x{pixels.shape[0]}")
                    continue
                mask = preprocess_mask(raw, spec)
            targets.append(mask)
        else:
            targets.append(label_index)
        used.append(i)
        images.append(x)

    frame = manifest.iloc[used].reset_index(drop=True).assign(manifest_row=used)
    if "group" in frame.columns:
        groups = frame["group"].fillna(frame["image"]).astype(str).to_numpy()
    else:
        groups = frame["image"].astype(str).to_numpy()
    if segmentation:
        target_array = np.stack(targets) if targets else np.zeros((0, h, w, 1), np.float32)
    else:
        target_array = np.asarray(targets, dtype=np.int64)
    data = SplitData(
        images=np.stack(images).astype(np.float32) if images else np.zeros((0, h, w, 1), np.float32),
        targets=target_array, frame=frame, groups=groups,
    )
    dataset = ExternalDataset(root=root, name=name or root.resolve().name, n_rows=len(manifest), data=data,
                              skipped=skipped, manifest_md5=file_md5(root / "manifest.csv"))
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
    what = (f"{contract.modality}, label {contract.label}, classes {', '.join(contract.classes)}"
            if contract.task == "classification" else f"{contract.modality}, lesion masks")
    if not dataset.n_rows:
        raise NoUsableRows(f"{dataset.root}/manifest.csv has no rows")
    reasons = "; ".join(
        f"{reason} {len(rows)} ({SKIP_REASONS[reason]}; e.g. {rows[0].image or '?'}: {rows[0].detail})"
        for reason, rows in ((r, dataset.skipped[r]) for r in dataset.skip_counts()))
    raise NoUsableRows(f"no row of {dataset.name} ({dataset.n_rows} rows) is usable by model "
                       f"{contract.name} ({what}): {reasons}")


# --------------------------------------------------------------------------- scoring


def default_headline(contract: ModelContract, tagged: str | None = None) -> str:
    """The metric to headline: the version's ``headline`` tag when it applies, else per task.

    Defaults: ``mean_dice`` (segmentation), ``quadratic_kappa`` (density), ``macro_auc``.
    """
    from breastscan.evaluation.scoring import CLASSIFICATION_HEADLINES, SEGMENTATION_HEADLINES

    if contract.task == "segmentation":
        return tagged if tagged in SEGMENTATION_HEADLINES else "mean_dice"
    if tagged in CLASSIFICATION_HEADLINES and not (tagged == "auc" and len(contract.classes) != 2):
        return str(tagged)
    return "quadratic_kappa" if contract.label == "density" else "macro_auc"


def score_external(bundle: ModelBundle, dataset: ExternalDataset, *, headline: str, n_boot: int = 1000,
                   seed: int = 0) -> tuple[Evaluation, dict[str, dict[str, float | None]]]:
    """Evaluate a bundle on the usable rows of an external dataset.

    Classifiers go through :func:`breastscan.evaluation.scoring.evaluate_classifier` with no
    validation split, so the temperature stored in the contract is kept (not refitted);
    segmenters through :func:`breastscan.evaluation.scoring.evaluate_segmenter` at the contract's
    threshold. Every metric then gets a 95 % percentile bootstrap interval resampling
    whole manifest groups (:func:`breastscan.evaluation.scoring.metric_intervals`).

    Args:
        bundle: the model (its contract must match the one the dataset was loaded for).
        dataset: from :func:`load_external`, with at least one usable row.
        headline: the headline metric (see :func:`default_headline`).
        n_boot: bootstrap resamples (0 = no intervals).
        seed: bootstrap seed.

    Returns:
        The :class:`~breastscan.evaluation.scoring.Evaluation` and metric name ->
        ``{"value", "ci_low", "ci_high"}``.

    Raises:
        NoUsableRows: the dataset has no usable row.
        ValueError: unknown headline for the task.
    """
    from breastscan.evaluation.scoring import evaluate_classifier, evaluate_segmenter, metric_intervals

    contract = bundle.contract
    require_usable(dataset, contract)
    if contract.task == "classification":
        evaluation = evaluate_classifier(bundle, None, dataset.data, headline=headline,
                                         quadratic_kappa=contract.label == "density", n_boot=n_boot,
                                         seed=seed)
    else:
        evaluation = evaluate_segmenter(bundle, dataset.data, headline=headline, n_boot=n_boot, seed=seed)
    intervals = metric_intervals(evaluation, dataset.data.groups, n_boot=n_boot, seed=seed)
    return evaluation, intervals


# --------------------------------------------------------------------------- report


def confusion_matrix(evaluation: Evaluation) -> list[list[int]]:
    """``(k, k)`` counts of a classifier's evaluation: rows true class, columns predicted."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    names = [str(n) for n in evaluation.class_names]
    truth = evaluation.predictions["true"].astype(str)
    matrix = sk_confusion_matrix(truth, evaluation.predictions["pred"].astype(str), labels=names)
    return [[int(v) for v in row] for row in matrix]


def build_report(model: ResolvedModel, dataset: ExternalDataset, evaluation: Evaluation,
                 intervals: dict[str, dict[str, float | None]], *, n_boot: int, seed: int) -> dict[str, Any]:
    """The JSON-able report of one external evaluation.

    Returns:
        ``model``, ``registered_model``, ``version``, ``stage`` (the alias asked for, or
        ``None`` for a version), ``aliases``, ``model_run_id``, ``task``, ``label``,
        ``modality``, ``class_names``, ``dataset`` (``name``, ``path``, ``manifest_md5``),
        ``counts`` (``rows``, ``used``, ``skipped``, ``skipped_by_reason``: reason ->
        ``count``, ``meaning``, ``examples`` of ``{"row", "image", "detail"}``),
        ``headline``, ``metrics`` (name -> ``value``, ``ci_low``, ``ci_high``), ``ci``
        (``level``, ``n_boot``, ``seed``, ``unit``, ``n_groups``), for classifiers
        ``per_class``, ``confusion_matrix`` (``labels``, ``matrix``) and ``calibration``
        (``temperature``, ``refitted`` false, ``ece``, ``ece_at_t1``, ``bins``), for
        segmenters ``segmentation`` (``threshold``, ``n_lesion_images``), ``evaluation``
        (every metric the evaluation computed), ``mlflow`` (filled by
        :func:`log_external_run`, else ``None``) and ``created`` (UTC ISO time).
    """
    from breastscan.evaluation.scoring import CALIBRATION_BINS

    contract = model.contract
    m = evaluation.metrics
    report: dict[str, Any] = {
        "model": model.ref.name,
        "registered_model": model.ref.registered_name,
        "version": model.version,
        "stage": model.ref.alias,
        "aliases": model.aliases,
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
        "metrics": intervals,
        "ci": {"level": 0.95, "method": "percentile bootstrap over manifest groups", "n_boot": n_boot,
               "seed": seed, "n_groups": int(len(np.unique(dataset.data.groups)))},
    }
    if contract.task == "classification":
        report["per_class"] = m.get("per_class", {})
        report["confusion_matrix"] = {"labels": list(evaluation.class_names), "rows": "true",
                                      "columns": "predicted", "matrix": confusion_matrix(evaluation)}
        report["calibration"] = {"temperature": m.get("temperature"), "refitted": False,
                                 "ece": m.get("ece_after"), "ece_at_t1": m.get("ece_before"),
                                 "bins": CALIBRATION_BINS}
    else:
        report["segmentation"] = {"threshold": m.get("threshold"),
                                  "n_lesion_images": m.get("n_lesion_images")}
    report["evaluation"] = m
    report["mlflow"] = None
    report["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return report


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


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
            lines.append(f"| {reason} | {info['count']} | {info['meaning']} | {_md_escape(examples)} |")
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
        interval = (f"{_fmt(v['ci_low'])} – {_fmt(v['ci_high'])}"
                    if v["ci_low"] is not None and v["ci_high"] is not None else "n/a")
        lines.append(f"| {label} | {_fmt(v['value'])} | {interval} |")
    lines.append("")
    if r["task"] == "classification":
        cal = r["calibration"]
        lines += [
            "## Calibration",
            "",
            f"Temperature {_fmt(cal['temperature'])} (stored with the model, not refitted on this data); "
            f"ECE {_fmt(cal['ece'])} ({_fmt(cal['ece_at_t1'])} at T = 1), {cal['bins']} bins.",
            "",
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
            lines.append(f"| {name} | {s['support']} | {_fmt(s['sensitivity'])} | {_fmt(s['specificity'])} "
                         f"| {_fmt(s['precision'])} | {_fmt(s['auc'])} |")
        lines.append("")
    else:
        seg = r["segmentation"]
        lines += ["## Segmentation", "",
                  f"Mask threshold {_fmt(seg['threshold'])}; {seg['n_lesion_images']} scored images "
                  "show a lesion (Dice and IoU of an empty truth and empty prediction count as 1).", ""]
    lines += ["Research and engineering use only; not for diagnosis.", ""]
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (Path,)):
        return str(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


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
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False, default=_json_default) + "\n")
    paths["markdown"].write_text(render_markdown(report))
    evaluation.predictions.to_csv(paths["predictions"], index=False, float_format="%.6g")
    return paths


def _prediction_frame(dataset: ExternalDataset, evaluation: Evaluation) -> pd.DataFrame:
    frame = dataset.data.frame
    out = evaluation.predictions.drop(columns=["image"], errors="ignore").copy()
    out.insert(0, "group", dataset.data.groups)
    out.insert(0, "image", frame["image"].astype(str).to_numpy())
    out.insert(0, "manifest_row", frame["manifest_row"].to_numpy())
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
    ``breastscan.dataset_manifest_md5``, ``breastscan.evaluation.scoring=external`` and the code
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
        resolved = resolve_model(ref, Path(tmp))
        dataset = load_external(root, resolved.contract, resolved.spec, name=dataset_name)
        require_usable(dataset, resolved.contract)
        bundle = resolved.load_bundle()
    chosen = headline or default_headline(resolved.contract, resolved.tags.get("headline"))
    evaluation, intervals = score_external(bundle, dataset, headline=chosen, n_boot=n_boot, seed=seed)
    evaluation.predictions = _prediction_frame(dataset, evaluation)
    report = build_report(resolved, dataset, evaluation, intervals, n_boot=n_boot, seed=seed)
    paths = write_report(report, evaluation, out_root)
    run_id = None
    if log_to_mlflow:
        paths = log_external_run(report, evaluation, out_root, project_root=project_root,
                                 manifest=read_manifest(root))
        run_id = report["mlflow"]["run_id"]
    head = report["metrics"].get(chosen, {})
    log.info("%s v%d on %s: %d of %d rows scored, %s = %s (95%% CI %s-%s); report %s", ref.name,
             resolved.version, dataset.name, dataset.n_used, dataset.n_rows, chosen, _fmt(head.get("value")),
             _fmt(head.get("ci_low")), _fmt(head.get("ci_high")), paths["json"])
    return ExternalResult(report=report, paths=paths, run_id=run_id)
