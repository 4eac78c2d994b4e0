"""Leak-free clinical-quality benchmark on real datasets: grouped, stratified k-fold CV.

A benchmark is one YAML file under ``benchmarks/`` (``busi.yaml``, ``mini_mias.yaml``). It
is a params file in the pipeline's schema (``datasets:`` and ``models:``, read by
:func:`breastscan.config.parse_params`, so the model declarations are the pipeline's) plus
a ``benchmark:`` section: where the real dataset is, how :func:`breastscan.data.adapters.ingest`
converts it, the folds, and what is scored.

For every fold the declared models are trained on the fold's training part (early stopping
and temperature scaling on its validation part) and predict its test part; a group
(a BUSI duplicate group, a mini-MIAS patient) never spans two parts. The out-of-fold
predictions of all folds are then scored twice: per fold (mean +- sd over folds) and
pooled, with a grouped 95 % bootstrap interval. Label-conflict groups (the same scan filed
under two classes) are kept out of training and reported both ways on test.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from breastscan.config import ModelConfig, Params, parse_params, segmenter_config
from breastscan.decision import fit_cutoff
from breastscan.evaluation import metrics as M
from breastscan.evaluation.reports import fmt_interval, write_json
from breastscan.evaluation.scoring import Scoring, pooled_calibration, score_bundle, score_predictions
from breastscan.provenance import git_state

log = logging.getLogger(__name__)

BENCHMARKS_DIR = Path("benchmarks")
"""The benchmark files shipped with the project (one YAML per dataset)."""
N_BOOT = 1000
"""Bootstrap resamples of the pooled confidence intervals."""


class MissingDataset(FileNotFoundError):
    """The real dataset a benchmark needs is not on this machine."""


@dataclass(frozen=True)
class BinaryView:
    """A two-class reading of a multi-class model (e.g. benign vs malignant of a 3-class one).

    Rows whose true class is ``positive`` or ``negative`` are scored with
    ``p(positive) / (p(positive) + p(negative))``, called positive at ``threshold``.

    With ``target_sensitivity``, a second operating point is scored (``*_at_target``): each
    fold's threshold is the highest one that reaches the target sensitivity on the *other*
    folds' out-of-fold scores, so the fold being scored never chooses its own threshold.
    """

    positive: str
    negative: str
    threshold: float = 0.5
    target_sensitivity: float | None = None


@dataclass(frozen=True)
class TaskSpec:
    """One model scored by a benchmark.

    Attributes:
        model: key of the model under ``models:``.
        rows: manifest column -> values kept in every part (train, val, test), e.g.
            ``{"pathology": ("benign", "malignant")}`` to segment lesion images only.
        binary: an extra two-class reading of a classifier, or ``None``.
        segmenter: a lesion-aware classifier (``roi``) reuses this earlier task's model of the
            same fold as its U-Net instead of training its own (one training less per fold);
            the two declarations must agree on the U-Net's recipe (:func:`segmenter_mismatch`).
    """

    model: str
    rows: dict[str, tuple[str, ...]] = field(default_factory=dict)
    binary: BinaryView | None = None
    segmenter: str | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark file, parsed.

    Attributes:
        name: short name (``busi``), the key in the report.
        title: one line for people.
        source: the real dataset's CSV (or folder) given to the adapter.
        ingest: :func:`~breastscan.data.adapters.ingest` arguments (``format`` and options).
        dataset: key under ``datasets:`` whose ``path`` receives the converted dataset.
        folds: number of cross-validation folds.
        seed: seed of the fold assignment.
        val_fraction: share of the whole set used for validation in each fold.
        stratify: label columns balanced across folds.
        group_column: the contract column whose rows stay together (``group``).
        conflict_labels: labels checked for conflicts within a group; empty: none checked.
        tasks: the models scored.
        params: the file's ``datasets:`` and ``models:`` in the pipeline's types.
        references: published numbers shown beside ours (free-form mappings).
    """

    name: str
    title: str
    source: Path
    ingest: dict[str, Any]
    dataset: str
    folds: int
    seed: int
    val_fraction: float
    stratify: tuple[str, ...]
    group_column: str
    conflict_labels: tuple[str, ...]
    tasks: tuple[TaskSpec, ...]
    params: Params
    references: tuple[dict[str, Any], ...] = ()

    def model(self, task: TaskSpec) -> ModelConfig:
        """The model declaration of a task."""
        return self.params.model(task.model)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise KeyError(f"--set {key}: {part!r} is not a section of the benchmark file")
        node = node[part]
    node[parts[-1]] = value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["models.busi_tumor.epochs=5", ...]`` -> ``{"models.busi_tumor.epochs": 5}`` (YAML values).

    Raises:
        ValueError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_benchmark(path: str | Path, overrides: dict[str, Any] | None = None) -> BenchmarkSpec:
    """Read a benchmark file, applying dotted-key ``overrides`` first (as ``dvc exp run -S``).

    Raises:
        ValueError / KeyError: a missing or invalid key, naming it.
    """
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    params = parse_params(raw)
    b = dict(raw.get("benchmark") or {})
    try:
        tasks = tuple(
            TaskSpec(model=str(t["model"]),
                     rows={str(k): tuple(str(v) for v in vals) for k, vals in (t.get("rows") or {}).items()},
                     binary=BinaryView(**t["binary"]) if t.get("binary") else None,
                     segmenter=str(t["segmenter"]) if t.get("segmenter") else None)
            for t in b["tasks"])
        spec = BenchmarkSpec(
            name=str(b.get("name", path.stem)), title=str(b.get("title", path.stem)),
            source=Path(b["source"]), ingest=dict(b["ingest"]), dataset=str(b["dataset"]),
            folds=int(b.get("folds", 5)), seed=int(b.get("seed", 0)),
            val_fraction=float(b.get("val_fraction", 0.15)),
            stratify=tuple(b.get("stratify", ("pathology",))),
            group_column=str(b.get("group_column", "group")),
            conflict_labels=tuple(b.get("conflict_labels", ())), tasks=tasks, params=params,
            references=tuple(b.get("references", ())))
    except KeyError as exc:
        raise ValueError(f"{path}: benchmark.{exc.args[0]} is missing") from None
    params.dataset(spec.dataset)
    if declared_device(path) not in ("cpu", "gpu"):
        raise ValueError(f"{path}: benchmark.device must be cpu or gpu, got {declared_device(path)!r}")
    for task in spec.tasks:
        cfg = spec.model(task)
        if cfg.dataset != spec.dataset:
            raise ValueError(f"{path}: model {task.model} trains on {cfg.dataset!r}, the benchmark "
                             f"converts {spec.dataset!r}")
        if task.binary and cfg.task != "classification":
            raise ValueError(f"{path}: model {task.model}: a binary view needs a classifier")
        if task.segmenter:
            _check_segmenter(path, spec, task)
    return spec


def segmenter_mismatch(cfg: ModelConfig, segmenter: ModelConfig) -> list[str]:
    """The U-Net recipe fields on which a lesion-aware classifier and a segmentation model differ.

    Compared: input size, preprocessing (contrast steps, aspect), filters, depth, epochs,
    learning rate, batch size, schedule, normalisation, augmentation, seed, dropout, patience.
    Empty: the segmentation model is the U-Net the classifier would train.
    """
    own = segmenter_config(cfg)
    fields = ("base_filters", "depth", "epochs", "learning_rate", "batch_size", "schedule", "normalize",
              "augment", "seed", "dropout", "patience")
    diff = [f for f in fields if getattr(own, f) != getattr(segmenter, f)]
    own_spec, seg_spec = own.preprocess, segmenter.preprocess
    if (own_spec.height, own_spec.width) != (seg_spec.height, seg_spec.width):
        diff.append("input size")
    if replace(own_spec, height=seg_spec.height, width=seg_spec.width) != seg_spec:
        diff.append("preprocessing")
    return diff


def _check_segmenter(path: Path, spec: BenchmarkSpec, task: TaskSpec) -> None:
    names = [t.model for t in spec.tasks]
    cfg = spec.model(task)
    if cfg.roi is None:  # e.g. --set models.busi_tumor.roi=null: the whole-image classifier
        log.info("%s: %s declares no roi: it classifies the whole image and reuses no segmenter",
                 path.name, task.model)
        return
    if task.segmenter not in names[:names.index(task.model)]:
        raise ValueError(f"{path}: model {task.model} reuses {task.segmenter!r}, which must be an "
                         "earlier task")
    seg = spec.params.model(str(task.segmenter))
    diff = segmenter_mismatch(cfg, seg) if seg.task == "segmentation" else ["task"]
    if diff:
        raise ValueError(f"{path}: {task.model}.roi and {task.segmenter} differ in {', '.join(diff)}: "
                         "the reused U-Net would not be the one the pipeline trains")


# --------------------------------------------------------------------------- data and folds


def prepare_dataset(spec: BenchmarkSpec) -> pd.DataFrame:
    """Convert the real dataset into the contract at ``datasets.<dataset>.path``; its manifest.

    Raises:
        MissingDataset: the source is not there (the message says what is needed).
    """
    from breastscan.data.adapters import ingest
    from breastscan.data.manifest import read_manifest

    if not spec.source.exists():
        raise MissingDataset(
            f"benchmark {spec.name} needs {spec.source} ({spec.title}); it is not on this machine. "
            f"Put the dataset there (see the README, 'Clinical quality on real data') or pass "
            f"--datasets DIR.")
    options = dict(spec.ingest)
    fmt = options.pop("format")
    out = spec.params.dataset(spec.dataset).path
    ingest(fmt, spec.source, out, **options)
    return read_manifest(out)  # as the pipeline reads it: empty cells are missing values


def make_folds(spec: BenchmarkSpec, manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The grouped, stratified folds, with a ``conflict`` column (row of a label-conflict group).

    Conflict rows stay in the fold assignment (so they can be scored on test) and are
    removed from training and validation by :func:`fold_splits`.
    """
    from breastscan.data.splits import cv_folds, label_conflicts

    cv, report = cv_folds(manifest, stratify=list(spec.stratify), n_folds=spec.folds,
                          group_column=spec.group_column, seed=spec.seed, val_fraction=spec.val_fraction,
                          exclude_label_conflicts=False, labels=list(spec.conflict_labels))
    conflicts = (label_conflicts(manifest.assign(_g=manifest[spec.group_column].fillna(manifest["image"])),
                                 "_g", list(spec.conflict_labels)) if spec.conflict_labels else {})
    groups = cv[spec.group_column].fillna(cv["image"]).astype(str)
    cv["conflict"] = groups.isin(set(conflicts)).to_numpy()
    report["conflict_groups"] = sorted(conflicts)
    report["conflict_rows"] = int(cv["conflict"].sum() // spec.folds)
    return cv, report


def fold_splits(spec: BenchmarkSpec, cv: pd.DataFrame, fold: int, task: TaskSpec) -> pd.DataFrame:
    """Fold ``fold``'s split table for one task: conflicts out of train/val, task row filter."""
    frame = cv[cv["fold"] == fold].reset_index(drop=True).copy()
    fit = frame["split"].isin(["train", "val"])
    frame.loc[fit & frame["conflict"], "split"] = "excluded"
    for column, keep in task.rows.items():
        frame.loc[~frame[column].astype(str).isin(keep), "split"] = "excluded"
    return frame


def bootstrap_groups(spec: BenchmarkSpec, frame: pd.DataFrame) -> dict[str, str]:
    """Image -> the benchmark's group (``spec.group_column``; an ungrouped image is its own).

    The unit the confidence intervals resample: the same unit the folds keep together (a
    BUSI duplicate group, a mini-MIAS patient), whatever other group-like columns the
    manifest carries (mini-MIAS has an empty ``dup_group`` column).
    """
    groups = frame[spec.group_column].where(frame[spec.group_column].notna(), frame["image"])
    return dict(zip(frame["image"].astype(str), groups.astype(str), strict=True))


# --------------------------------------------------------------------------- one fold


def epochs_capped(cfg: ModelConfig, max_epochs: int | None) -> ModelConfig:
    """``cfg`` with at most ``max_epochs`` epochs (its lesion-aware U-Net's too); ``None``: as is."""
    if max_epochs is None:
        return cfg
    cfg = replace(cfg, epochs=min(cfg.epochs, max_epochs))
    if cfg.roi is not None:
        cfg = replace(cfg, roi=replace(cfg.roi, seg_epochs=min(cfg.roi.seg_epochs, max_epochs)))
    return cfg


def run_fold(spec: BenchmarkSpec, cv: pd.DataFrame, fold: int, task: TaskSpec, out_dir: Path,
             *, max_epochs: int | None = None, trained: dict[tuple[str, int], Any] | None = None,
             ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Train one task's model on one fold and predict the fold's test part.

    Args:
        trained: ``(task, fold) -> keras model`` of the tasks run so far; this task's model
            is added, and a ``task.segmenter`` is taken from it.

    Returns:
        The test predictions (the evaluation's columns plus ``fold``, ``group``,
        ``conflict``) and a record of the fold (sizes, epochs, seconds).
    """
    import keras

    from breastscan.data.loading import load_split
    from breastscan.training.loop import train_model

    cfg = epochs_capped(spec.model(task), max_epochs)
    dataset = spec.params.dataset(spec.dataset)
    frame = fold_splits(spec, cv, fold, task)
    where = out_dir / spec.name / task.model / f"fold{fold}"
    where.mkdir(parents=True, exist_ok=True)
    frame.to_csv(where / "splits.csv", index=False)
    parts = {s: load_split(where / "splits.csv", dataset.path, cfg, s) for s in ("train", "val", "test")}
    trained = {} if trained is None else trained
    segmenter = trained.get((task.segmenter, fold)) if task.segmenter else None
    if task.segmenter and segmenter is None:
        log.warning("%s fold %d: no trained %s to reuse; training its own U-Net", task.model, fold,
                    task.segmenter)
    keras.backend.clear_session()
    result = train_model(cfg, parts["train"], parts["val"], modality=dataset.modality, segmenter=segmenter)
    trained[(task.model, fold)] = result.bundle.model
    scoring = Scoring.from_config(cfg)
    evaluation = score_bundle(result.bundle, parts["test"], val=parts["val"], scoring=scoring, n_boot=0)
    pred = evaluation.predictions.copy()
    pred["fold"] = fold
    pred["temperature"] = evaluation.temperature  # the served (calibrated) probabilities' T
    pred["group"] = pred["image"].astype(str).map(bootstrap_groups(spec, frame))
    conflict = dict(zip(frame["image"].astype(str), frame["conflict"], strict=True))
    pred["conflict"] = pred["image"].map(conflict).fillna(False).astype(bool)
    pred.to_csv(where / "predictions.csv", index=False)
    record = {"fold": fold, "n_train": len(parts["train"]), "n_val": len(parts["val"]),
              "n_test": len(parts["test"]), "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
              "train_seconds": round(result.seconds, 1), "temperature": evaluation.temperature}
    log.info("%s/%s fold %d: %s", spec.name, task.model, fold, record)
    return pred, record


# --------------------------------------------------------------------------- scoring


def _binary_frame(pred: pd.DataFrame, view: BinaryView) -> pd.DataFrame:
    keep = pred["true"].astype(str).isin([view.positive, view.negative])
    sub = pred[keep].reset_index(drop=True)
    pos, neg = sub[f"prob_{view.positive}"].to_numpy(float), sub[f"prob_{view.negative}"].to_numpy(float)
    total = np.where(pos + neg > 0, pos + neg, 1.0)
    return pd.DataFrame({"y": (sub["true"].astype(str) == view.positive).to_numpy(int),
                         "score": pos / total, "group": sub["group"].astype(str).to_numpy(),
                         "fold": sub["fold"].to_numpy()})


def threshold_for_sensitivity(scores: np.ndarray, target: float) -> float:
    """The highest threshold ``t`` with ``mean(scores >= t) >= target``
    (:func:`breastscan.decision.fit_cutoff` on positive cases only).

    Args:
        scores: ``(n,)`` scores of the positive cases, ``n >= 1``.
        target: sensitivity in ``(0, 1]``.
    """
    scores = np.asarray(scores, np.float64)
    return fit_cutoff(scores, np.ones(len(scores), bool), target)


def cross_fitted_thresholds(frame: pd.DataFrame, target: float) -> dict[int, float]:
    """Per fold, :func:`threshold_for_sensitivity` on the positives of the other folds."""
    out: dict[int, float] = {}
    for fold in sorted(frame["fold"].unique()):
        others = frame[(frame["fold"] != fold) & (frame["y"] == 1)]["score"].to_numpy()
        if len(others):
            out[int(fold)] = threshold_for_sensitivity(others, target)
    return out


BINARY_METRICS: tuple[str, ...] = ("auc", "sensitivity", "specificity", "accuracy")
"""Metrics of a two-class reading (the registry's, with class 1 the positive one)."""


def _binary_outcomes(frame: pd.DataFrame, threshold: float | np.ndarray) -> M.ClassOutcomes:
    score = frame["score"].to_numpy(np.float64)
    return M.ClassOutcomes(y=frame["y"].to_numpy(np.int64), probs=np.stack([1.0 - score, score], axis=1),
                           threshold=threshold)


def _scores(pred: pd.DataFrame, scoring: Scoring, view: BinaryView | None, thresholds: dict[int, float],
            n_boot: int, seed: int) -> dict[str, dict[str, float | None]]:
    """Every metric of one set of out-of-fold predictions (the scoring core), binary views included."""
    if not len(pred):
        return {}
    out = score_predictions(pred, scoring, n_boot=n_boot, seed=seed)
    if view is None:
        return out
    frame = _binary_frame(pred, view)
    if not len(frame):
        return out
    prefix = f"{view.positive}_vs_{view.negative}"
    groups = frame["group"].to_numpy()
    scored = M.score(_binary_outcomes(frame, view.threshold), BINARY_METRICS, groups, n_boot=n_boot,
                     seed=seed)
    out.update({f"{prefix}_{name}": s for name, s in scored.items()})
    if thresholds and frame["fold"].isin(list(thresholds)).all():
        per_row = frame["fold"].map(thresholds).to_numpy(np.float64)
        at = M.score(_binary_outcomes(frame, per_row), BINARY_METRICS[1:], groups, n_boot=n_boot, seed=seed)
        out.update({f"{prefix}_{name}_at_target": s for name, s in at.items()})
    return out


def _subset_scores(rows: pd.DataFrame, scoring: Scoring, view: BinaryView | None,
                   seed: int) -> dict[str, Any]:
    thresholds: dict[int, float] = {}
    if view is not None and view.target_sensitivity is not None and rows["fold"].nunique() > 1:
        thresholds = cross_fitted_thresholds(_binary_frame(rows, view), view.target_sensitivity)
    pooled = _scores(rows, scoring, view, thresholds, N_BOOT, seed)
    folds = [_scores(rows[rows["fold"] == fold].reset_index(drop=True), scoring, view, thresholds, 0, seed)
             for fold in sorted(rows["fold"].unique())]
    n_binary = len(_binary_frame(rows, view)) if view is not None else len(rows)
    n_lesion = int(rows["lesion"].astype(bool).sum()) if "lesion" in rows.columns else len(rows)
    metrics: dict[str, dict[str, Any]] = {}
    for name, s in pooled.items():
        per_fold = [f.get(name, {}).get("value") for f in folds]
        values = [v for v in per_fold if v is not None]
        metrics[name] = {**s, "per_fold": per_fold,
                         "mean": float(np.mean(values)) if values else None,
                         "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                         # images scored (a binary view: those of its two classes; lesion_*
                         # metrics: the images with a lesion)
                         "n": n_binary if view is not None and name.startswith(f"{view.positive}_vs_")
                         else n_lesion if name.startswith("lesion_") else len(rows)}
    out: dict[str, Any] = {"n": int(len(rows)), "metrics": metrics}
    ece = pooled_calibration(rows, scoring)
    if ece is not None:
        out["calibration"] = ece
    if thresholds:
        out["thresholds_at_target"] = {str(k): v for k, v in thresholds.items()}
    return out


def score_task(spec: BenchmarkSpec, task: TaskSpec, pred: pd.DataFrame) -> dict[str, Any]:
    """Per-fold mean +- sd and pooled values with grouped 95 % CIs, with and without conflicts.

    Every value comes from the scoring core (:func:`~breastscan.evaluation.scoring.score_predictions`
    and the metric registry) on the out-of-fold prediction rows, resampling ``group``.
    """
    scoring = Scoring.from_config(spec.model(task))
    subsets = {"all": pred}
    if pred["conflict"].any():
        subsets["without_conflicts"] = pred[~pred["conflict"]]
    return {subset: _subset_scores(rows.reset_index(drop=True), scoring, task.binary, spec.seed)
            for subset, rows in subsets.items()}


# --------------------------------------------------------------------------- whole benchmark


def run_benchmark(spec: BenchmarkSpec, out_dir: Path, *, quick: bool = False,
                  folds: Sequence[int] | None = None) -> dict[str, Any]:
    """Convert the dataset, train and score every task on every fold; the JSON-able result.

    Args:
        spec: the benchmark.
        out_dir: where each fold's ``splits.csv`` and ``predictions.csv`` go
            (``<out_dir>/<benchmark>/<model>/fold<k>/``).
        quick: fold 0 only (unless ``folds`` says otherwise), at most 3 epochs: a smoke run
            of a few minutes whose numbers mean little.
        folds: the folds to run (default: all).

    Raises:
        MissingDataset: the real dataset is not on this machine.
        ValueError: a fold number out of range.
    """
    start = time.perf_counter()
    manifest = prepare_dataset(spec)
    cv, fold_report = make_folds(spec, manifest)
    folds = list(folds) if folds else ([0] if quick else list(range(spec.folds)))
    bad = [k for k in folds if not 0 <= k < spec.folds]
    if bad:
        raise ValueError(f"benchmark {spec.name} has folds 0-{spec.folds - 1}, not {bad}")
    result: dict[str, Any] = {"title": spec.title, "source": str(spec.source), "folds": spec.folds,
                              "folds_run": folds, "seed": spec.seed, "quick": quick,
                              "conflict_groups": fold_report["conflict_groups"],
                              "conflict_rows": fold_report["conflict_rows"], "n_rows": int(len(manifest)),
                              "tasks": {}}
    trained: dict[tuple[str, int], Any] = {}
    for task in spec.tasks:
        cfg = spec.model(task)
        preds, records = [], []
        for fold in folds:
            pred, record = run_fold(spec, cv, fold, task, out_dir, max_epochs=3 if quick else None,
                                    trained=trained)
            preds.append(pred)
            records.append(record)
        pooled = pd.concat(preds, ignore_index=True)
        result["tasks"][task.model] = {
            "task": cfg.task, "label": cfg.label, "classes": list(map(str, cfg.classes)),
            "rows": {k: list(v) for k, v in task.rows.items()},
            "binary": None if task.binary is None else vars(task.binary),
            "config": _config_summary(cfg), "folds": records, "scores": score_task(spec, task, pooled)}
    result["minutes"] = round((time.perf_counter() - start) / 60, 1)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["commit"] = git_state(Path.cwd())[0]
    result["references"] = list(spec.references)
    return result


def rescore(spec: BenchmarkSpec, entry: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Score a finished run again from its saved predictions, without training.

    For a change of metric or operating point: the fold records and everything else of
    ``entry`` (the benchmark's last report entry) are kept; ``scores`` are recomputed from
    ``<out_dir>/<benchmark>/<model>/fold<k>/predictions.csv``, with each image's group
    taken again from the fold's ``splits.csv`` (:func:`bootstrap_groups`).

    Raises:
        FileNotFoundError: a fold's predictions are missing.
    """
    entry = json.loads(json.dumps(entry))
    for task in spec.tasks:
        frames = []
        for fold in entry["folds_run"]:
            path = out_dir / spec.name / task.model / f"fold{fold}" / "predictions.csv"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run the benchmark first")
            pred = pd.read_csv(path, dtype={"group": str, "image": str, "true": str})
            splits = pd.read_csv(path.with_name("splits.csv"), dtype=str, keep_default_na=False,
                                 na_values=[""])
            pred["group"] = pred["image"].map(bootstrap_groups(spec, splits))
            frames.append(pred)
        pred = pd.concat(frames, ignore_index=True)
        entry["tasks"][task.model]["scores"] = score_task(spec, task, pred)
    entry["rescored"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return entry


def _config_summary(cfg: ModelConfig) -> dict[str, Any]:
    return {"backbone": cfg.backbone, "weights": cfg.weights,
            "input": f"{cfg.preprocess.height}x{cfg.preprocess.width}", "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate, "patience": cfg.patience,
            "imbalance": cfg.imbalance, "dropout": cfg.dropout}


def read_report(path: Path) -> dict[str, Any]:
    """A report written by :func:`write_report`, or an empty one when there is none."""
    if path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("benchmarks"), dict):
            return data
    return {"benchmarks": {}}


def write_report(results: dict[str, Any], path: Path) -> Path:
    """Write the JSON report and its markdown table next to it (``.md``)."""
    write_json(results, path)
    path.with_suffix(".md").write_text(render_markdown(results))
    return path


def _fmt(m: dict[str, Any] | None) -> str:
    text = fmt_interval(m)
    if m and m.get("mean") is not None and m.get("sd") is not None:
        text += f"; folds {m['mean']:.3f} ± {m['sd']:.3f}"
    return text


def render_markdown(results: dict[str, Any]) -> str:
    """One table per benchmark: metric, pooled value (95 % CI), per-fold mean ± sd, subset
    (a cross-site benchmark: :func:`breastscan.evaluation.crosssite.markdown_lines`)."""
    from breastscan.evaluation import crosssite

    lines = ["# Clinical quality on real data (leak-free cross-validation)", ""]
    for name, bench in results.get("benchmarks", {}).items():
        if bench.get("kind") == crosssite.KIND:
            lines += crosssite.markdown_lines(name, bench)
            continue
        lines += [f"## {name}: {bench['title']}", "",
                  f"{len(bench['folds_run'])} of {bench['folds']} folds run"
                  f"{' (quick)' if bench['quick'] else ''}, "
                  f"{bench['n_rows']} images, {len(bench['conflict_groups'])} label-conflict groups "
                  f"({bench['conflict_rows']} images), {bench['minutes']} min.", "",
                  "| model | metric | subset | pooled (95 % CI); per-fold mean ± sd |", "|---|---|---|---|"]
        for model, task in bench["tasks"].items():
            for subset, scored in task["scores"].items():
                for metric, m in scored["metrics"].items():
                    n = m.get("n", scored["n"])
                    lines.append(f"| {model} | {metric} | {subset} (n={n}) | {_fmt(m)} |")
                cal = scored.get("calibration")
                if cal:
                    lines.append(f"| {model} | ECE, served (at T = 1) | {subset} (n={scored['n']}) | "
                                 f"{cal['ece']:.3f} ({cal['ece_at_t1']:.3f}) |")
        if bench.get("references"):
            lines += ["", "Published references:", ""]
            lines += [f"- {ref.get('what', '')}: {ref.get('value', '')} ({ref.get('source', '')})"
                      for ref in bench["references"]]
        lines.append("")
    return "\n".join(lines)


def benchmark_files(names: Sequence[str] = (), *, gpu: bool | None = None) -> list[Path]:
    """The shipped benchmark files, those named (``busi``, ``mini_mias``), or all that fit here.

    Args:
        names: file stems to run; empty: every file, but those declaring ``device: gpu``
            only when ``gpu`` (a full-size configuration takes hours on a CPU).
        gpu: whether a GPU is available; ``None``: ask TensorFlow (only when some file
            declares ``device: gpu``).
    """
    files = [f for f in sorted(BENCHMARKS_DIR.glob("*.yaml"))  # a pool file declares, it is no benchmark
             if "benchmark" in (yaml.safe_load(f.read_text()) or {})]
    if names:
        by_name = {f.stem: f for f in files}
        unknown = sorted(set(names) - set(by_name))
        if unknown:
            raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(by_name))}")
        return [by_name[n] for n in names]
    needs_gpu = {f for f in files if declared_device(f) == "gpu"}
    if needs_gpu and not (gpu if gpu is not None else _gpu_visible()):
        log.info("no GPU: skipping %s (name it to run it anyway)",
                 ", ".join(f.stem for f in sorted(needs_gpu)))
        files = [f for f in files if f not in needs_gpu]
    return files


def declared_device(path: Path) -> str:
    """``benchmark.device`` of a benchmark file: ``cpu`` (default) or ``gpu``."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return str((raw.get("benchmark") or {}).get("device", "cpu"))


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))
