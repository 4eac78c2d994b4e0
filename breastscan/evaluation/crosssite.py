"""Cross-site evaluation: a model trained at one hospital, scored at another.

A cross-site benchmark file (``benchmarks/cross_site.yaml``) names two or more *sites*, each
by its own benchmark file (``busi.yaml``, ``busbra.yaml``: where the dataset is, how it is
converted, its grouping, folds and model recipes; :func:`~breastscan.evaluation.crossval.load_benchmark`
reads them), and *runs*: the sites a run trains on, the sites it scores, and whose model
recipe (``models:`` entries: a lesion U-Net and the lesion-aware tumor classifier) it trains.

Each site is split once, with its own grouping, by the site's cross-validation fold
``hold_out_fold`` (:func:`~breastscan.evaluation.crossval.make_folds`):

* a site a run only **trains** on gives all its rows: the fold's validation part stays
  validation (early stopping, temperature, the decision cutoff), the rest is training;
* a site a run only **scores** gives all its rows as test;
* a site a run trains on **and** scores keeps the fold's three parts: its test part (one
  fold, e.g. 20 %, grouped and stratified) is held out and scored.

Label-conflict groups (``conflict_labels`` of the site's file) are neither learnt nor scored.
A run writes its split tables and predictions under ``<out_dir>/<run>/`` and is resumed from
them when its rows and recipe are unchanged (:func:`train_run`).

The table (:func:`score_run`): the decision rule of the recipe's tumor model
(:mod:`breastscan.decision`) gets its cutoff on the *training* sites' validation rows for its
target sensitivity; then per scored site and per subgroup (scanner, lesion-size tertile,
and per histology the sensitivity or specificity of its class), benign-vs-malignant AUC,
sensitivity and specificity at that cutoff, lesion Dice and the two-class ECE, with 95 %
intervals that resample whole groups (patients). A metric whose subgroup has fewer than
``min_images`` images or fewer than ``min_per_class`` of a class it uses is marked too
small to read (its value is kept in the JSON, without an interval).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from breastscan.config import ModelConfig
from breastscan.data.manifest import resolve
from breastscan.evaluation import crossval
from breastscan.evaluation import metrics as M
from breastscan.evaluation.calibration import expected_calibration_error
from breastscan.evaluation.crossval import BenchmarkSpec, TaskSpec
from breastscan.evaluation.reports import fmt, fmt_interval, md_escape
from breastscan.evaluation.scoring import CALIBRATION_BINS
from breastscan.provenance import git_state

log = logging.getLogger(__name__)

KIND = "cross_site"
"""``benchmark.kind`` of a cross-site benchmark file."""
N_BOOT = 1000
"""Bootstrap resamples of every readable interval."""
ROLES = ("train", "score", "both")
"""What a run does with a site: train on all of it, score all of it, or both (held-out part)."""
TABLE_METRICS: tuple[str, ...] = ("auc", "sensitivity", "specificity", "lesion_dice", "ece")
"""Columns of the cross-site table."""
NEEDS: dict[str, tuple[int, ...]] = {"auc": (0, 1), "ece": (0, 1), "sensitivity": (1,), "specificity": (0,),
                                     "lesion_dice": ()}
"""Binary classes (0 negative, 1 positive) a metric must have ``min_per_class`` of to be read."""
SIZE_TERTILES: tuple[str, ...] = ("small", "medium", "large")


# --------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class Site:
    """One hospital's data and recipes, as its own benchmark file declares them.

    Attributes:
        name: the site's key (``busi``), the prefix of its groups.
        file: its benchmark file.
        spec: that file, parsed.
        lesion: key of its lesion U-Net under the file's ``models:``.
        tumor: key of its lesion-aware tumor classifier.
    """

    name: str
    file: Path
    spec: BenchmarkSpec
    lesion: str
    tumor: str

    def task(self, model: str) -> TaskSpec:
        """The file's task entry of ``model`` (its row filter and U-Net reuse); a model the file
        declares under ``models:`` but does not cross-validate (``tasks:``) has an empty one."""
        return next((t for t in self.spec.tasks if t.model == model), TaskSpec(model=model))


@dataclass(frozen=True)
class CrossRun:
    """One run: train on ``train``, score ``score``, with ``recipe``'s model declarations."""

    name: str
    train: tuple[str, ...]
    score: tuple[str, ...]
    recipe: str

    def role(self, site: str) -> str:
        """``train``, ``score`` or ``both`` (:data:`ROLES`)."""
        if site in self.train:
            return "both" if site in self.score else "train"
        return "score"

    @property
    def slug(self) -> str:
        """The run's folder name (``busi-to-busbra``)."""
        return self.name.replace("->", "-to-").replace("/", "-").replace(" ", "_")


@dataclass(frozen=True)
class CrossSiteSpec:
    """A cross-site benchmark file, parsed.

    Attributes:
        name: key in the report (``cross_site``).
        title: one line for people.
        sites: site name -> :class:`Site`.
        runs: the runs, in order.
        hold_out_fold: the fold of each site's cross-validation that splits it.
        subgroup_columns: manifest columns scored value by value (``device``).
        class_columns: manifest columns scored value by value within a class: the
            sensitivity of a positive value, the specificity of a negative one (``histology``).
        min_images: a subgroup with fewer images is too small to read.
        min_per_class: ... or with fewer images of a class the metric uses.
        quick_images: ``--quick``: images kept per site (whole groups, stratified).
        quick_epochs: ``--quick``: at most this many epochs per training.
        decision: the decision rule of a recipe whose tumor model declares none.
        seed: bootstrap and ``--quick`` subsampling seed.
    """

    name: str
    title: str
    sites: dict[str, Site]
    runs: tuple[CrossRun, ...]
    hold_out_fold: int = 0
    subgroup_columns: tuple[str, ...] = ("device",)
    class_columns: tuple[str, ...] = ("histology",)
    min_images: int = 30
    min_per_class: int = 10
    quick_images: int = 120
    quick_epochs: int = 2
    decision: dict[str, Any] | None = None
    seed: int = 0

    def run(self, name: str) -> CrossRun:
        """The run called ``name``.

        Raises:
            ValueError: no such run (the message lists them).
        """
        for run in self.runs:
            if run.name == name:
                return run
        raise ValueError(f"{self.name} has no run {name!r}; runs: {', '.join(r.name for r in self.runs)}")


def is_cross_site(path: str | Path) -> bool:
    """Whether a benchmark file is a cross-site one (``benchmark.kind: cross_site``)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return str((raw.get("benchmark") or {}).get("kind", "")) == KIND


def _split_overrides(overrides: dict[str, Any], sites: Sequence[str],
                     ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``busi.models.busi_tumor.epochs`` goes to the site file ``busi``; other keys to this file."""
    own: dict[str, Any] = {}
    per_site: dict[str, dict[str, Any]] = {s: {} for s in sites}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head in per_site and rest:
            per_site[head][rest] = value
        else:
            own[key] = value
    return own, per_site


def load_cross_site(path: str | Path, overrides: dict[str, Any] | None = None) -> CrossSiteSpec:
    """Read a cross-site benchmark file and the site files it names (relative to its folder).

    Args:
        path: the file.
        overrides: dotted keys as ``--set`` gives them; a key starting with a site's name
            (``busi.models.busi_tumor.epochs``) overrides that site's file.

    Raises:
        ValueError: a missing or invalid key, naming it.
    """
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    b = dict(raw.get("benchmark") or {})
    site_names = [str(s) for s in (b.get("sites") or {})]
    own, per_site = _split_overrides(dict(overrides or {}), site_names)
    for key, value in own.items():
        crossval._set_dotted(raw, key, value)
    b = dict(raw.get("benchmark") or {})
    try:
        sites = {name: _site(path, name, dict(entry), per_site[name]) for name, entry in b["sites"].items()}
        runs = tuple(_run(dict(r)) for r in b["runs"])
        readable = dict(b.get("readable") or {})
        quick = dict(b.get("quick") or {})
        spec = CrossSiteSpec(
            name=str(b.get("name", path.stem)), title=str(b.get("title", path.stem)), sites=sites, runs=runs,
            hold_out_fold=int(b.get("hold_out_fold", 0)),
            subgroup_columns=tuple(map(str, b.get("subgroup_columns", ("device",)))),
            class_columns=tuple(map(str, b.get("class_columns", ("histology",)))),
            min_images=int(readable.get("min_images", 30)),
            min_per_class=int(readable.get("min_per_class", 10)),
            quick_images=int(quick.get("images_per_site", 120)),
            quick_epochs=int(quick.get("max_epochs", 2)),
            decision=dict(b["decision"]) if b.get("decision") else None, seed=int(b.get("seed", 0)))
    except KeyError as exc:
        raise ValueError(f"{path}: benchmark.{exc.args[0]} is missing") from None
    _check(path, spec)
    return spec


def _site(path: Path, name: str, entry: dict[str, Any], overrides: dict[str, Any]) -> Site:
    file = path.parent / str(entry["file"])
    spec = crossval.load_benchmark(file, overrides)
    site = Site(name=name, file=file, spec=spec, lesion=str(entry["lesion"]), tumor=str(entry["tumor"]))
    for model, task in ((site.lesion, "segmentation"), (site.tumor, "classification")):
        if model not in spec.params.models or spec.params.model(model).task not in (task, "multitask"):
            raise ValueError(f"{path}: site {name}: {model} is not a {task} (or multitask) model of "
                             f"{file.name}")
    if "multitask" in (spec.params.model(site.lesion).task, spec.params.model(site.tumor).task) \
            and site.lesion != site.tumor:
        raise ValueError(f"{path}: site {name}: a multitask model takes both roles (lesion and tumor)")
    return site


def _run(entry: dict[str, Any]) -> CrossRun:
    train = tuple(map(str, entry["train"]))
    return CrossRun(name=str(entry["name"]), train=train, score=tuple(map(str, entry["score"])),
                    recipe=str(entry.get("recipe", train[0] if len(train) == 1 else "")))


def _check(path: Path, spec: CrossSiteSpec) -> None:
    for run in spec.runs:
        unknown = sorted((set(run.train) | set(run.score) | {run.recipe}) - set(spec.sites))
        if unknown or not run.train or not run.score:
            raise ValueError(f"{path}: run {run.name}: needs train, score and (several training sites) "
                             f"recipe among the sites {sorted(spec.sites)}; unknown: {unknown}")
    for site in spec.sites.values():
        if not 0 <= spec.hold_out_fold < site.spec.folds:
            raise ValueError(f"{path}: hold_out_fold {spec.hold_out_fold}: site {site.name} has "
                             f"{site.spec.folds} folds")
    if len({r.slug for r in spec.runs}) != len(spec.runs):
        raise ValueError(f"{path}: two runs share a folder name")


def with_datasets(spec: CrossSiteSpec, datasets_dir: Path) -> CrossSiteSpec:
    """The same benchmark reading every site's source from ``datasets_dir/<folder>/<file>``."""
    sites = {name: replace(s, spec=replace(s.spec, source=datasets_dir / s.spec.source.parent.name
                                           / s.spec.source.name)) for name, s in spec.sites.items()}
    return replace(spec, sites=sites)


def sources(spec: CrossSiteSpec) -> list[Path]:
    """The real datasets the benchmark reads, one per site."""
    return [s.spec.source for s in spec.sites.values()]


# --------------------------------------------------------------------------- rows


def quick_subset(site: Site, manifest: pd.DataFrame, n_images: int) -> pd.DataFrame:
    """About ``n_images`` rows of a site, whole groups, stratified as the site's folds are."""
    from breastscan.data.splits import cv_folds

    if n_images >= len(manifest):
        return manifest
    n_parts = max(2, round(len(manifest) / max(n_images, 1)))
    cv, _ = cv_folds(manifest, stratify=list(site.spec.stratify), n_folds=n_parts,
                     group_column=site.spec.group_column, seed=site.spec.seed, val_fraction=0.0, labels=[])
    keep = set(cv.loc[(cv["fold"] == 0) & (cv["split"] == "test"), "image"].astype(str))
    return manifest[manifest["image"].astype(str).isin(keep)].reset_index(drop=True)


def site_rows(site: Site, manifest: pd.DataFrame, role: str, hold_out_fold: int) -> pd.DataFrame:
    """A site's rows for one run, as a split table (``split``: train / val / test / excluded).

    Columns added: ``site``; ``source_image`` (the manifest's path); ``group`` replaced by
    ``<site>:<group>`` (the site's group column; an ungrouped image is its own group);
    ``image`` and ``mask`` made absolute, so several sites' rows load from one table.

    Args:
        site: the site.
        manifest: its converted manifest (:func:`~breastscan.evaluation.crossval.prepare_dataset`).
        role: ``train`` (all rows learnt; the fold's validation part kept), ``score`` (all
            rows test) or ``both`` (the fold's train / val / test as they are).
        hold_out_fold: the fold of the site's cross-validation that splits it.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    cv, _ = crossval.make_folds(site.spec, manifest)
    frame = cv[cv["fold"] == hold_out_fold].drop(columns=["fold", "exclusion"]).reset_index(drop=True)
    if role == "train":
        frame.loc[frame["split"] == "test", "split"] = "train"
    elif role == "score":
        frame.loc[frame["split"].isin(["train", "val"]), "split"] = "test"
    frame.loc[frame["conflict"].astype(bool), "split"] = "excluded"  # neither learnt nor scored
    groups = crossval.bootstrap_groups(site.spec, frame)
    root = site.spec.params.dataset(site.spec.dataset).path
    frame["site"] = site.name
    frame["source_image"] = frame["image"].astype(str)
    frame["group"] = [f"{site.name}:{groups[str(i)]}" for i in frame["image"]]
    for column in ("image", "mask"):
        if column in frame.columns:
            frame[column] = [str(resolve(root, str(p)).resolve()) if isinstance(p, str) and p else p
                             for p in frame[column]]
    return frame


def run_rows(spec: CrossSiteSpec, run: CrossRun, manifests: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The split table of a run: :func:`site_rows` of every site it trains on or scores."""
    names = [s for s in spec.sites if s in run.train or s in run.score]
    return pd.concat([site_rows(spec.sites[s], manifests[s], run.role(s), spec.hold_out_fold) for s in names],
                     ignore_index=True)


def task_rows(spec: CrossSiteSpec, frame: pd.DataFrame, cfg: ModelConfig, role: str) -> pd.DataFrame:
    """A run's table for one model: each site's task row filter, and a classifier's classes.

    Args:
        role: ``lesion`` or ``tumor``: which of each site's tasks gives the row filter.
    """
    out = frame.copy()
    for name, site in spec.sites.items():
        task = site.task(site.lesion if role == "lesion" else site.tumor)
        for column, keep in task.rows.items():
            out.loc[(out["site"] == name) & ~out[column].astype(str).isin(keep), "split"] = "excluded"
    if cfg.has_classes:  # e.g. BUSI's normal images for a two-class model
        out.loc[~out[cfg.label].astype(str).isin([str(c) for c in cfg.classes]), "split"] = "excluded"
    return out


# --------------------------------------------------------------------------- training


def recipe(spec: CrossSiteSpec, run: CrossRun) -> tuple[ModelConfig, ModelConfig, str]:
    """``(lesion U-Net, tumor classifier, modality)`` the run trains: its recipe site's declarations."""
    site = spec.sites[run.recipe]
    return (site.spec.params.model(site.lesion), site.spec.params.model(site.tumor),
            site.spec.params.dataset(site.spec.dataset).modality)


def fingerprint(cfgs: Sequence[ModelConfig], frames: Sequence[pd.DataFrame], max_epochs: int | None) -> str:
    """What makes a run's predictions: the recipes, each model's rows and parts, the epoch cap."""
    rows = [f[["site", "source_image", "split"]].astype(str).values.tolist() for f in frames]
    blob = json.dumps({"models": [asdict(c) for c in cfgs], "rows": rows, "max_epochs": max_epochs},
                      default=str, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _fit(cfg: ModelConfig, frame: pd.DataFrame, where: Path, modality: str, segmenter: Any) -> Any:
    """Train one model on a run's table (``splits_<model>.csv`` written beside the predictions)."""
    import keras

    from breastscan.training.loop import train_model

    parts = _parts(cfg, frame, where, ("train", "val"))
    keras.backend.clear_session()
    return train_model(cfg, parts["train"], parts["val"], modality=modality, segmenter=segmenter)


def _parts(cfg: ModelConfig, frame: pd.DataFrame, where: Path, names: Sequence[str]) -> dict[str, Any]:
    from breastscan.data.loading import load_split

    splits = where / f"splits_{cfg.name}.csv"
    frame.to_csv(splits, index=False)
    return {s: load_split(splits, where, cfg, s) for s in names}


def _predict(cfg: ModelConfig, bundle: Any, frame: pd.DataFrame, where: Path, columns: Sequence[str],
             ) -> tuple[pd.DataFrame, float | None]:
    """A trained model's predictions of the val (classifier) and test rows, and its temperature.

    The prediction rows carry ``part`` (``val`` / ``test``), the calibration ``temperature``
    (classifier) and the table's ``columns`` of each image (``site``, ``group``, subgroups).
    """
    from breastscan.evaluation.scoring import Scoring, score_bundle

    parts = _parts(cfg, frame, where, ("val", "test"))
    scoring = Scoring.from_config(cfg)
    preds, temperature = [], None
    # a classifier's temperature (and its own decision cutoff) are fitted on the validation
    # rows, the same for both calls; its calibrated validation rows fit the table's cutoff
    val = parts["val"] if cfg.task == "classification" else None
    for part in ("val", "test") if val is not None else ("test",):
        scored = score_bundle(bundle, parts[part], val=val, scoring=scoring, n_boot=0)
        temperature = scored.temperature
        preds.append(scored.predictions.assign(part=part))
    pred = pd.concat(preds, ignore_index=True)
    if temperature is not None:
        pred["temperature"] = temperature
    meta = frame.drop_duplicates("image").set_index("image")
    for column in columns:
        if column in meta.columns:
            pred[column] = pred["image"].map(meta[column])
    return pred, temperature


def _fit_and_predict(cfg: ModelConfig, frame: pd.DataFrame, where: Path, modality: str, segmenter: Any,
                     columns: Sequence[str]) -> tuple[pd.DataFrame, dict[str, Any], Any]:
    """Train one model on a run's table and predict its val (classifier) and test rows."""
    result = _fit(cfg, frame, where, modality, segmenter)
    pred, temperature = _predict(cfg, result.bundle, frame, where, columns)
    record = _fit_record(cfg, frame, result, temperature)
    log.info("%s: %s", cfg.name, record)
    return pred, record, result.bundle.model


def _fit_multitask(cfg: ModelConfig, frames: dict[str, pd.DataFrame], where: Path, modality: str,
                   columns: Sequence[str]) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Train a multi-task model once; its class head scores the tumor rows, its mask the lesion rows."""
    from breastscan.config import task_view

    result = _fit(cfg, frames["tumor"], where, modality, None)
    tumor, temperature = _predict(task_view(cfg, "classification"), result.bundle.view("classification"),
                                  frames["tumor"], where, columns)
    lesion, _ = _predict(task_view(cfg, "segmentation"), result.bundle.view("segmentation"),
                         frames["lesion"], where, columns)
    record = _fit_record(cfg, frames["tumor"], result, temperature)
    log.info("%s: %s", cfg.name, record)
    return {"lesion": lesion, "tumor": tumor}, record


def _fit_record(cfg: ModelConfig, frame: pd.DataFrame, result: Any,
                temperature: float | None) -> dict[str, Any]:
    """Rows per site and part, epochs, seconds, temperature; a classifier's partial labels."""
    from breastscan.data.pools import site_classes

    used = frame[frame["split"] != "excluded"]
    counts = {str(site): {str(part): int(n) for part, n in rows["split"].value_counts().items()}
              for site, rows in used.groupby("site")}
    record = {"rows": counts, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
              "train_seconds": round(result.seconds, 1), "temperature": temperature}
    if cfg.has_classes:  # a site lacking a class: training leaves it out of its rows' loss
        sets = site_classes(used[used["split"] == "train"], cfg.label, cfg.classes)
        if sets:
            record["partial_labels"] = {site: [str(c) for c, ok in zip(cfg.class_names, flags, strict=True)
                                               if ok] for site, flags in sets.items()}
    return record


def train_run(spec: CrossSiteSpec, run: CrossRun, frame: pd.DataFrame, where: Path, *,
              max_epochs: int | None = None, train: bool = True,
              ) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Train a run's U-Net and tumor classifier and predict, or read a finished run back.

    Args:
        frame: the run's split table (:func:`run_rows`).
        where: the run's folder (``splits_<model>.csv``, ``predictions_<model>.csv``, ``run.json``).
        max_epochs: cap of every training's epochs (``--quick``).
        train: ``False``: only read a finished run (``--rescore``).

    Returns:
        ``{"lesion": predictions, "tumor": predictions}`` (rows of ``part`` ``test``; the
        classifier's also ``val``) and the run record (fit records, ``fingerprint``, ``resumed``).

    Raises:
        FileNotFoundError: ``train=False`` and no finished run with these rows and recipes.
    """
    lesion_cfg, tumor_cfg, modality = recipe(spec, run)
    lesion_cfg, tumor_cfg = (crossval.epochs_capped(c, max_epochs) for c in (lesion_cfg, tumor_cfg))
    frames = {"lesion": task_rows(spec, frame, lesion_cfg, "lesion"),
              "tumor": task_rows(spec, frame, tumor_cfg, "tumor")}
    key = fingerprint([lesion_cfg, tumor_cfg], list(frames.values()), max_epochs)
    paths = {role: where / f"predictions_{role}.csv" for role in frames}
    done = where / "run.json"
    if done.is_file() and all(p.is_file() for p in paths.values()):
        record = json.loads(done.read_text())
        if record.get("fingerprint") == key:
            log.info("%s: finished run found in %s, not trained again", run.name, where)
            return {r: _read_predictions(p) for r, p in paths.items()}, {**record, "resumed": True}
    if not train:
        raise FileNotFoundError(f"{where} holds no finished run {run.name} with these rows and recipes: run "
                                "the benchmark first")
    where.mkdir(parents=True, exist_ok=True)
    columns = ("site", "group", "source_image", *spec.subgroup_columns, *spec.class_columns)
    if tumor_cfg.task == "multitask":  # one model in both roles
        preds, fits = _fit_multitask(tumor_cfg, frames, where, modality, columns)
        fits = {tumor_cfg.name: fits}
    else:
        lesion, lesion_record, unet = _fit_and_predict(lesion_cfg, frames["lesion"], where, modality, None,
                                                       columns)
        reuse = spec.sites[run.recipe].task(tumor_cfg.name).segmenter == lesion_cfg.name
        tumor, tumor_record, _ = _fit_and_predict(tumor_cfg, frames["tumor"], where, modality,
                                                  unet if reuse else None, columns)
        preds = {"lesion": lesion, "tumor": tumor}
        fits = {lesion_cfg.name: lesion_record, tumor_cfg.name: tumor_record}
    for role, pred in preds.items():
        pred.to_csv(paths[role], index=False)
    record = {"fingerprint": key, "models": {"lesion": lesion_cfg.name, "tumor": tumor_cfg.name},
              "fit": fits, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    done.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return {r: _read_predictions(p) for r, p in paths.items()}, {**record, "resumed": False}


def _read_predictions(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"image": str, "group": str, "true": str, "pred": str, "site": str,
                                    "source_image": str, "part": str})


# --------------------------------------------------------------------------- the table


def decision_rule(spec: CrossSiteSpec, run: CrossRun) -> Any:
    """The run's decision rule, cutoff not yet fitted: its recipe tumor model's declared
    ``positive_ratio`` rule, else the file's ``decision:``.

    Raises:
        ValueError: neither is a ``positive_ratio`` rule (the table needs a positive class).
    """
    from breastscan.decision import DecisionRule

    declared = recipe(spec, run)[1].decision
    rule = declared if not declared.is_argmax else DecisionRule.from_dict(spec.decision)
    if rule.is_argmax:
        raise ValueError(f"{spec.name} run {run.name}: {recipe(spec, run)[1].name} declares no "
                         "positive_ratio decision rule and the benchmark file no `decision:`")
    return rule


def fit_rule(rule: Any, tumor: pd.DataFrame, class_names: Sequence[str], fitted_on: str) -> Any:
    """The rule with its cutoff fitted on the ``val`` prediction rows of its two classes.

    Args:
        rule: a ``positive_ratio`` :class:`~breastscan.decision.DecisionRule`.
        tumor: the classifier's prediction rows (``part``, ``true``, ``prob_<class>``).
        class_names: the classifier's classes, in ``prob_`` column order.
        fitted_on: what the rows are, for people.
    """
    val = tumor[(tumor["part"] == "val") & tumor["true"].isin([rule.positive, rule.versus])]
    names = [str(c) for c in class_names]
    probs = val[[f"prob_{c}" for c in names]].to_numpy(np.float64)
    return rule.fit(probs, val["true"].map(names.index).to_numpy(np.int64), names, fitted_on=fitted_on)


def binary_rows(tumor: pd.DataFrame, rule: Any, class_names: Sequence[str]) -> pd.DataFrame:
    """The classifier's rows of the rule's two classes, with ``y`` (1: positive) and ``ratio``."""
    rows = tumor[tumor["true"].isin([rule.positive, rule.versus])].reset_index(drop=True)
    probs = rows[[f"prob_{c}" for c in class_names]].to_numpy(np.float64)
    return rows.assign(y=(rows["true"] == rule.positive).to_numpy(np.int64),
                       ratio=rule.ratio(probs, [str(c) for c in class_names]))


def size_edges(fraction: np.ndarray) -> tuple[float, float]:
    """The lesion-size tertile edges: the 1/3 and 2/3 quantiles of ``(n,)`` mask fractions in [0, 1]."""
    low, high = np.quantile(np.asarray(fraction, np.float64), [1 / 3, 2 / 3])
    return float(low), float(high)


def size_class(fraction: np.ndarray, edges: tuple[float, float]) -> np.ndarray:
    """``(n,)`` ``small`` (<= first edge), ``medium`` or ``large`` (> second edge)."""
    index = np.digitize(np.asarray(fraction, np.float64), edges, right=True)
    return np.asarray(SIZE_TERTILES, dtype=object)[index]


def readable(metric: str, n: int, counts: dict[int, int], n_lesion: int, spec: CrossSiteSpec) -> bool:
    """Whether a subgroup is large enough for ``metric``: ``min_images`` images (lesion images
    for Dice) and ``min_per_class`` of every class the metric uses (:data:`NEEDS`)."""
    if metric == "lesion_dice":
        return n_lesion >= spec.min_images
    return n >= spec.min_images and all(counts.get(c, 0) >= spec.min_per_class for c in NEEDS[metric])


def _metric(metric: str, rows: pd.DataFrame, lesion: pd.DataFrame, cutoff: float, n_boot: int,
            seed: int) -> dict[str, float | None]:
    """One metric of a subgroup: ``value`` and its grouped interval (``ci_low``, ``ci_high``)."""
    if metric == "lesion_dice":
        masks = M.MaskOutcomes(dice=lesion["dice"].to_numpy(np.float64),
                               iou=lesion["iou"].to_numpy(np.float64),
                               lesion=lesion["lesion"].to_numpy().astype(bool))
        return M.score(masks, ["lesion_mean_dice"], lesion["group"].astype(str).to_numpy(), n_boot=n_boot,
                       seed=seed)["lesion_mean_dice"]
    ratio = rows["ratio"].to_numpy(np.float64)
    probs = np.stack([1.0 - ratio, ratio], axis=1)
    y = rows["y"].to_numpy(np.int64)
    if metric == "ece":  # the two-class reading's top-label ECE, a point value
        return {"value": expected_calibration_error(probs, y, n_bins=CALIBRATION_BINS), "ci_low": None,
                "ci_high": None}
    outcomes = M.ClassOutcomes(y=y, probs=probs, threshold=cutoff)
    return M.score(outcomes, [metric], rows["group"].astype(str).to_numpy(), n_boot=n_boot, seed=seed)[metric]


def subgroup_scores(rows: pd.DataFrame, lesion: pd.DataFrame, cutoff: float, metrics: Sequence[str],
                    spec: CrossSiteSpec, n_boot: int) -> dict[str, Any]:
    """The table's metrics of one subgroup.

    Args:
        rows: its classifier rows (:func:`binary_rows`: ``y``, ``ratio``, ``group``).
        lesion: its lesion images' U-Net rows (``dice``, ``iou``, ``lesion``, ``group``).
        cutoff: the rule's cutoff (fitted on the training sites).
        metrics: names of :data:`TABLE_METRICS` to score.
        n_boot: resamples of a readable metric's interval.

    Returns:
        ``n`` (images of the two classes), ``n_positive``, ``n_negative``, ``n_lesion`` and
        ``metrics``: name -> ``value``, ``ci_low``, ``ci_high``, ``readable``.
    """
    counts = {1: int(rows["y"].sum()), 0: int(len(rows) - rows["y"].sum())}
    out: dict[str, Any] = {"n": int(len(rows)), "n_positive": counts[1], "n_negative": counts[0],
                           "n_lesion": int(len(lesion)), "metrics": {}}
    for metric in metrics:
        if not (len(lesion) if metric == "lesion_dice" else len(rows)):
            continue
        ok = readable(metric, len(rows), counts, len(lesion), spec)
        scored = _metric(metric, rows, lesion, cutoff, n_boot if ok else 0, spec.seed)
        out["metrics"][metric] = {**scored, "readable": ok}
    return out


def _subgroups(spec: CrossSiteSpec, rows: pd.DataFrame) -> list[tuple[str, str, str | None, Any, int | None]]:
    """``(kind, name, column, value, class)`` of each subgroup of a scored site's rows."""
    out: list[tuple[str, str, str | None, Any, int | None]] = [("all", "all", None, None, None)]
    for column in spec.subgroup_columns:
        values = rows[column].dropna().astype(str) if column in rows.columns else pd.Series(dtype=str)
        if values.nunique() > 1:
            out += [(column, v, column, v, None) for v in values.value_counts().index]
    out += [("lesion size", name, "size", name, None) for name in SIZE_TERTILES]
    for column in spec.class_columns:
        if column in rows.columns:
            sizes = rows.dropna(subset=[column]).astype({column: str}).groupby([column, "y"]).size()
            for key in sizes.sort_values(ascending=False).index:
                value, y = str(key[0]), int(key[1])
                out.append((column, value, column, value, y))
    return out


def site_table(spec: CrossSiteSpec, rows: pd.DataFrame, lesion: pd.DataFrame, cutoff: float,
               rule: Any, n_boot: int) -> dict[str, Any]:
    """One scored site's table: every subgroup (:func:`_subgroups`) with :func:`subgroup_scores`.

    Args:
        rows: the site's scored classifier rows (:func:`binary_rows`) with ``fraction``.
        lesion: the site's scored U-Net rows with ``fraction`` (normal images included).
        cutoff: the rule's fitted cutoff.
        rule: the rule (its ``positive`` and ``versus`` name the classes).
    """
    lesion = lesion[lesion["lesion"].astype(bool)]
    edges = size_edges(lesion["fraction"].to_numpy()) if len(lesion) else (0.0, 0.0)
    rows = rows.assign(size=size_class(rows["fraction"].to_numpy(), edges))
    lesion = lesion.assign(size=size_class(lesion["fraction"].to_numpy(), edges))
    table = []
    for kind, name, column, value, y in _subgroups(spec, rows):
        in_rows = rows if column is None else rows[rows[column].astype(str) == value]
        if column is None:
            in_lesion = lesion
        elif column in lesion.columns:  # the U-Net's rows carry the same columns (train_run)
            in_lesion = lesion[lesion[column].astype(str) == value]
        else:
            in_lesion = lesion[:0]
        metrics: Sequence[str] = TABLE_METRICS
        if y is not None:  # a class column: one class, its own rate
            in_rows = in_rows[in_rows["y"] == y]
            metrics = ("sensitivity",) if y == 1 else ("specificity",)
        entry = subgroup_scores(in_rows, in_lesion, cutoff, metrics, spec, n_boot)
        table.append({"kind": kind, "name": name,
                      "class": None if y is None else (rule.positive if y == 1 else rule.versus), **entry})
    return {"n": int(len(rows)), "n_positive": int(rows["y"].sum()), "size_tertiles": list(edges),
            "subgroups": table}


def score_run(spec: CrossSiteSpec, run: CrossRun, preds: dict[str, pd.DataFrame], record: dict[str, Any], *,
              n_boot: int = N_BOOT) -> dict[str, Any]:
    """A run's entry in the report: what it trained, its fitted rule and a table per scored site.

    Args:
        preds: :func:`train_run`'s predictions (``lesion``, ``tumor``).
        record: :func:`train_run`'s record.
        n_boot: bootstrap resamples of the readable intervals.
    """
    lesion_cfg, tumor_cfg, _ = recipe(spec, run)
    names = [str(c) for c in tumor_cfg.class_names]
    rule = fit_rule(decision_rule(spec, run), preds["tumor"], names,
                    fitted_on=f"validation rows of {' + '.join(run.train)}")
    pixels = lesion_cfg.preprocess.height * lesion_cfg.preprocess.width
    lesion = preds["lesion"][preds["lesion"]["part"] == "test"]
    fraction = dict(zip(lesion["image"], lesion["true_pixels"].to_numpy(np.float64) / pixels, strict=True))
    lesion = lesion.assign(fraction=lesion["image"].map(fraction))
    rows = binary_rows(preds["tumor"][preds["tumor"]["part"] == "test"], rule, names)
    rows = rows.assign(fraction=rows["image"].map(fraction))
    scored = {site: site_table(spec, rows[rows["site"] == site], lesion[lesion["site"] == site],
                               float(rule.cutoff), rule, n_boot) for site in run.score}
    return {"train": list(run.train), "score": list(run.score), "recipe": run.recipe,
            "models": record["models"], "classes": names, "fit": record["fit"], "resumed": record["resumed"],
            "decision": rule.to_dict(), "scored": scored}


# --------------------------------------------------------------------------- the benchmark


def run_cross_site(spec: CrossSiteSpec, out_dir: Path, *, quick: bool = False, runs: Sequence[str] = (),
                   train: bool = True, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert the sites' datasets, train (or resume) and score the runs; the JSON-able entry.

    Args:
        out_dir: runs go to ``<out_dir>/<name>[_quick]/<run>/``.
        quick: ``quick_images`` images a site, at most ``quick_epochs`` epochs, 200 resamples:
            a smoke run of a few minutes whose numbers mean little.
        runs: the runs to make (default: all); ``previous``'s other runs are kept.
        train: ``False``: score finished runs again without training (``--rescore``).
        previous: the benchmark's last report entry.

    Raises:
        MissingDataset: a site's dataset is not on this machine.
        FileNotFoundError: ``train=False`` and a run has not finished.
    """
    start = time.perf_counter()
    selected = [spec.run(name) for name in runs] if runs else list(spec.runs)
    used = [s for s in spec.sites if any(s in r.train or s in r.score for r in selected)]
    manifests = {s: crossval.prepare_dataset(spec.sites[s].spec) for s in used}
    if quick:
        manifests = {s: quick_subset(spec.sites[s], m, spec.quick_images) for s, m in manifests.items()}
    kept = dict((previous or {}).get("runs", {})) if previous and previous.get("quick") == quick else {}
    result: dict[str, Any] = {
        "kind": KIND, "title": spec.title, "quick": quick, "hold_out_fold": spec.hold_out_fold,
        "sites": {s: {"title": spec.sites[s].spec.title, "file": spec.sites[s].file.name,
                      "source": str(spec.sites[s].spec.source), "n_rows": int(len(manifests[s]))}
                  for s in used},
        "readable": {"min_images": spec.min_images, "min_per_class": spec.min_per_class},
        "n_boot": 200 if quick else N_BOOT, "runs": kept}
    where = out_dir / f"{spec.name}{'_quick' if quick else ''}"
    for run in selected:
        log.info("%s: run %s", spec.name, run.name)
        frame = run_rows(spec, run, manifests)
        preds, record = train_run(spec, run, frame, where / run.slug,
                                  max_epochs=spec.quick_epochs if quick else None, train=train)
        result["runs"][run.name] = score_run(spec, run, preds, record, n_boot=result["n_boot"])
    result["runs"] = {r.name: result["runs"][r.name] for r in spec.runs if r.name in result["runs"]}
    result.update(minutes=round((time.perf_counter() - start) / 60, 1),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), commit=git_state(Path.cwd())[0])
    return result


# --------------------------------------------------------------------------- markdown


def _cell(entry: dict[str, Any], metric: str) -> str:
    m = entry["metrics"].get(metric)
    if m is None:
        return ""
    if not m["readable"]:
        return "too small"
    return fmt_interval(m)


def _subgroup_label(entry: dict[str, Any], edges: Sequence[float]) -> str:
    name = md_escape(entry["name"])
    if entry["kind"] == "lesion size":
        low, high = (f"{100 * e:.1f} %" for e in edges)
        span = {"small": f"≤ {low}", "medium": f"{low}–{high}", "large": f"> {high}"}[entry["name"]]
        return f"lesion size: {name} ({span} of the image)"
    if entry.get("class"):
        return f"{md_escape(entry['kind'])}: {name} ({entry['class']})"
    return name if entry["kind"] == "all" else f"{md_escape(entry['kind'])}: {name}"


HEADER = ["| subgroup | images (malignant / benign) | AUC | sensitivity | specificity | lesion Dice | ECE |",
          "|---|---|---|---|---|---|---|"]


def _row(label: str, entry: dict[str, Any]) -> str:
    cells = " | ".join(_cell(entry, m) for m in TABLE_METRICS)
    return f"| {label} | {entry['n']} ({entry['n_positive']} / {entry['n_negative']}) | {cells} |"


def _intro(bench: dict[str, Any]) -> list[str]:
    sites = ", ".join(f"{s} ({v['n_rows']} images)" for s, v in bench["sites"].items())
    r = bench["readable"]
    quick = "; a quick run: its numbers mean little" if bench["quick"] else ""
    return [f"Sites {sites}{quick}; {bench['minutes']} min. Sensitivity and specificity at the "
            "decision rule whose cutoff was fitted on the training sites' validation rows; 95 % "
            f"intervals resample whole patients ({bench['n_boot']} resamples); ECE of the "
            "benign-vs-malignant reading (a point value). \"too small\": fewer than "
            f"{r['min_images']} images (lesion images for Dice) or fewer than {r['min_per_class']} "
            "of a class the metric uses.", "",
            "| run | scored site | images (malignant / benign) | AUC | sensitivity | specificity "
            "| lesion Dice | ECE |", "|---|---|---|---|---|---|---|---|"]


def _run_section(run_name: str, run: dict[str, Any]) -> list[str]:
    d = run["decision"]
    score = f"p({d['positive']}) / (p({d['positive']}) + p({d['versus']}))"
    lines = ["", f"### {md_escape(run_name)}: trained on {' + '.join(run['train'])} "
                 f"({run['models']['lesion']}, {run['models']['tumor']})", "",
             f"{d['positive']} when {score} ≥ {d['cutoff']:.3f}, fitted on the {d.get('fitted_on', '')} "
             f"for sensitivity {d.get('target_sensitivity')}: there sensitivity "
             f"{fmt(d.get('val_sensitivity'))}, specificity {fmt(d.get('val_specificity'))} "
             f"({d.get('val_positives')} {d['positive']}, {d.get('val_negatives')} {d['versus']} images)."]
    for site, table in run["scored"].items():
        held = " (its held-out part)" if site in run["train"] else ""
        lines += ["", f"Scored on {site}{held}:", "", *HEADER]
        # a class column's subgroups too small to read go on one line below the table
        small = [e for e in table["subgroups"]
                 if e["class"] and not any(m["readable"] for m in e["metrics"].values())]
        lines += [_row(_subgroup_label(e, table["size_tertiles"]), e) for e in table["subgroups"]
                  if e not in small]
        if small:
            named = (f"{md_escape(e['kind'])} {md_escape(e['name'])} ({e['class']}, {e['n']})" for e in small)
            lines += ["", "Too small to read: " + ", ".join(named) + "."]
    return lines


def markdown_lines(name: str, bench: dict[str, Any]) -> list[str]:
    """The cross-site section of ``reports/quality_benchmark.md``: an overview (every run on
    every scored site), then per run and scored site a table of its subgroups."""
    lines = [f"## {name}: {bench['title']}", "", *_intro(bench)]
    for run_name, run in bench["runs"].items():
        for site, table in run["scored"].items():
            held = " (held-out part)" if site in run["train"] else ""
            lines.append(f"| {md_escape(run_name)} | {site}{held} " + _row("", table["subgroups"][0])[3:])
    for run_name, run in bench["runs"].items():
        lines += _run_section(run_name, run)
    lines.append("")
    return lines
