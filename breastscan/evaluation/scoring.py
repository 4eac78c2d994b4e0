"""Held-out evaluation of a trained bundle: metrics with a bootstrap CI, calibration, plot data.

Everything is measured on the **test** split; the only thing learnt from data here, the
calibration temperature of a classifier, is fitted on the **validation** split
(:func:`breastscan.evaluation.metrics.fit_temperature`), and the test metrics are computed on the
calibrated probabilities: the ones the service returns.

An :class:`Evaluation` holds a JSON-able ``metrics`` dict (a ``dvc metrics`` file, and
the input of the promotion gates), plot data as lists of row dicts (``dvc plots`` CSV
files) and one prediction row per test image; :func:`write_evaluation` writes them, with
static PNGs (:mod:`breastscan.evaluation.plots`).

The headline metric (``cfg.headline``) carries a 95 % percentile bootstrap interval that
resamples whole ``dup_group`` groups (:func:`breastscan.evaluation.metrics.bootstrap_ci`), so
images of one patient, or near-duplicates of one scan, are never counted as independent.

Nothing here imports TensorFlow: the bundle runs the model.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastscan.data.loading import SplitData
from breastscan.evaluation import metrics as M
from breastscan.labels import BIRADS_DENSITY
from breastscan.registry.bundle import ModelBundle

log = logging.getLogger(__name__)

BATCH = 64
"""Images per model call when computing logits."""

CALIBRATION_BINS = 15
"""Equal-width confidence bins of the ECE and the reliability diagram."""

DICE_HIST_BINS = 20

CLASSIFICATION_HEADLINES: tuple[str, ...] = (
    "accuracy", "balanced_accuracy", "macro_auc", "quadratic_kappa", "log_loss", "auc",
)
"""Headline metrics :func:`evaluate_classifier` can bootstrap (``auc``: binary models only)."""

SEGMENTATION_HEADLINES: tuple[str, ...] = ("mean_dice", "mean_iou", "lesion_mean_dice", "lesion_mean_iou")
"""Headline metrics :func:`evaluate_segmenter` can bootstrap."""

PLOT_COLUMNS: dict[str, tuple[str, ...]] = {
    "roc": ("class", "fpr", "tpr"),
    "pr": ("class", "recall", "precision"),
    "confusion": ("actual", "predicted"),
    "calibration": ("stage", "bin", "bin_lower", "bin_upper", "confidence", "accuracy", "count"),
    "dice": ("image", "dice", "iou", "lesion"),
    "dice_hist": ("bin_lower", "bin_upper", "count"),
}
"""Columns of each plot CSV (written even when a plot has no rows)."""


@dataclass
class Evaluation:
    """The result of evaluating one model on its test split.

    Attributes:
        task: ``classification`` or ``segmentation``.
        metrics: JSON-able metrics (see :func:`evaluate_classifier` /
            :func:`evaluate_segmenter`); ``None`` where a metric is undefined.
        plots: plot name (``roc``, ``pr``, ``confusion``, ``calibration``, ``dice``,
            ``dice_hist``) -> row dicts with the columns of :data:`PLOT_COLUMNS`.
        predictions: one row per test image.
        class_names: the model's class names in index order.
        temperature: the calibration temperature of a classifier (fitted on validation, or
            the bundle's stored one when there is no validation split), else ``None``.
    """

    task: str
    metrics: dict[str, Any]
    plots: dict[str, list[dict[str, Any]]]
    predictions: pd.DataFrame
    class_names: tuple[str, ...] = ()
    temperature: float | None = None


# --------------------------------------------------------------------------- shared


def batched_logits(bundle: ModelBundle, images: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
    """Raw model outputs of many images, ``batch_size`` at a time.

    Args:
        bundle: the model.
        images: ``(n, H, W, 1)`` float32 in [0, 1] at the model's input size.
        batch_size: images per model call.

    Returns:
        ``(n, k)`` logits or ``(n, H, W, 1)`` mask logits, float32.
    """
    images = np.asarray(images, np.float32)
    if len(images) == 0:
        return bundle.logits(images)
    parts = [bundle.logits(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate(parts, axis=0)


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN / inf to ``None``."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def _headline_ci(
    name: str,
    fn: Callable[[np.ndarray], float],
    n: int,
    groups: np.ndarray,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Headline value on all samples and its grouped 95 % bootstrap interval."""
    try:
        value: float | None = float(fn(np.arange(n)))
    except ValueError:
        value = None
    if value is not None and not math.isfinite(value):
        value = None
    low = high = None
    if value is not None and n_boot > 0:
        try:
            low, high = M.bootstrap_ci(fn, n, n_boot=n_boot, seed=seed, groups=np.asarray(groups))
        except ValueError as exc:
            log.warning("no bootstrap interval for %s: %s", name, exc)
    return {"headline": name, "headline_value": value, "headline_ci_low": low, "headline_ci_high": high}


# --------------------------------------------------------------------------- classification


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney rank sum (ties averaged, as scikit-learn); NaN if undefined."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _classification_metric(name: str, y: np.ndarray, probs: np.ndarray) -> Callable[[np.ndarray], float]:
    """``metric(idx)`` of one headline name on a resample ``idx`` (ValueError when undefined)."""
    k = probs.shape[1]
    pred = probs.argmax(axis=1)

    def accuracy(idx: np.ndarray) -> float:
        return float(np.mean(pred[idx] == y[idx]))

    def balanced_accuracy(idx: np.ndarray) -> float:
        yi, pi = y[idx], pred[idx]
        return float(np.mean([np.mean(pi[yi == c] == c) for c in np.unique(yi)]))

    def macro_auc(idx: np.ndarray) -> float:
        yi, p = y[idx], probs[idx]
        aucs = [_auc(yi == c, p[:, c]) for c in range(k)]
        defined = [a for a in aucs if math.isfinite(a)]
        if not defined:
            raise ValueError("AUC undefined: one class only")
        return float(np.mean(defined))

    def auc(idx: np.ndarray) -> float:
        if k != 2:
            raise ValueError("'auc' is the binary AUC; use macro_auc for more than two classes")
        return _auc(y[idx] == 1, probs[idx, 1])

    squared_distance = (np.arange(k)[:, None] - np.arange(k)[None, :]).astype(float) ** 2

    def quadratic_kappa(idx: np.ndarray) -> float:
        # sklearn's cohen_kappa_score(weights="quadratic") in closed form: the bootstrap
        # calls this a thousand times, where sklearn's argument checks alone cost 6 s.
        observed = np.bincount(y[idx] * k + pred[idx], minlength=k * k).reshape(k, k).astype(float)
        expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / max(observed.sum(), 1.0)
        disagreement = float((squared_distance * expected).sum())
        if disagreement == 0.0:
            return float("nan")
        return 1.0 - float((squared_distance * observed).sum()) / disagreement

    def log_loss(idx: np.ndarray) -> float:
        p = np.clip(probs[idx, y[idx]], 1e-15, 1.0)
        return float(-np.mean(np.log(p)))

    table = {f.__name__: f for f in (accuracy, balanced_accuracy, macro_auc, auc, quadratic_kappa, log_loss)}
    if name not in table:
        raise ValueError(f"unknown classification headline {name!r}; "
                         f"choose one of {CLASSIFICATION_HEADLINES}")
    return table[name]


def _curves(y: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> tuple[list[dict], list[dict]]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    roc: list[dict[str, Any]] = []
    pr: list[dict[str, Any]] = []
    for c, name in enumerate(names):
        positive = (y == c).astype(int)
        if not 0 < positive.sum() < len(y):
            log.info("no ROC/PR curve for class %s: the test split does not hold both outcomes", name)
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        roc += [{"class": name, "fpr": float(a), "tpr": float(b)} for a, b in zip(fpr, tpr, strict=True)]
        precision, recall, _ = precision_recall_curve(positive, probs[:, c])
        pr += [{"class": name, "recall": float(r), "precision": float(p)}
               for r, p in zip(recall, precision, strict=True)]
    return roc, pr


def _calibration_rows(probs: np.ndarray, y: np.ndarray, stage: str) -> list[dict[str, Any]]:
    data = M.calibration_curve_data(probs, y, n_bins=CALIBRATION_BINS)
    return [
        {"stage": stage, "bin": i, "bin_lower": data["bin_lower"][i], "bin_upper": data["bin_upper"][i],
         "confidence": data["confidence"][i], "accuracy": data["accuracy"][i], "count": data["count"][i]}
        for i in range(data["n_bins"]) if data["count"][i] > 0
    ]


def evaluate_classifier(
    bundle: ModelBundle,
    val: SplitData | None,
    test: SplitData,
    *,
    headline: str,
    quadratic_kappa: bool,
    n_boot: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Calibrate a classifier on validation and evaluate it on test.

    The temperature ``T`` minimises the validation NLL of ``softmax(logits / T)``; every
    test metric uses the calibrated probabilities (``bundle.with_temperature(T)``), and the
    ECE is reported before (``T = 1``) and after scaling.

    Args:
        bundle: the trained classifier (its own temperature is ignored: refitted here,
            unless ``val`` is ``None``).
        val: validation split (temperature fit); ``None`` keeps the temperature stored in
            the bundle's contract (external data, which has no validation split), and
            ``n_val`` is then 0.
        test: test split (every metric).
        headline: the metric with a bootstrap CI, one of :data:`CLASSIFICATION_HEADLINES`.
        quadratic_kappa: also report quadratic-weighted kappa (ordinal labels, e.g. density).
        n_boot: bootstrap resamples of the headline CI (0 = no CI).
        seed: bootstrap seed.

    Returns:
        An :class:`Evaluation` whose ``metrics`` hold ``accuracy``, ``balanced_accuracy``,
        ``macro_auc``, ``quadratic_kappa`` (when asked), ``auc`` (binary models),
        ``log_loss``, ``ece_before``, ``ece_after``, ``temperature``, ``headline``,
        ``headline_value``, ``headline_ci_low``, ``headline_ci_high``, ``per_class``
        (name -> ``support``, ``sensitivity``, ``specificity``, ``precision``, ``auc``),
        ``n_test`` and ``n_val``; plots ``roc``, ``pr``, ``confusion`` and ``calibration``;
        predictions with ``image``, ``true``, ``pred`` and ``prob_<class>`` columns.

    Raises:
        ValueError: the bundle is not a classifier, the test split is empty, or the headline
            is unknown (checked before any model call).
    """
    contract = bundle.contract
    if contract.task != "classification":
        raise ValueError(f"model {contract.name} is a {contract.task} model, not a classifier")
    if headline not in CLASSIFICATION_HEADLINES:
        raise ValueError(f"unknown classification headline {headline!r}; "
                         f"choose one of {CLASSIFICATION_HEADLINES}")
    if len(test) == 0:
        raise ValueError(f"model {contract.name}: empty test split")
    names = tuple(contract.class_names)
    y = np.asarray(test.targets).astype(np.int64)

    if val is None:
        temperature = float(contract.temperature)
        log.info("model %s: no validation split, keeping the stored temperature %.3f", contract.name,
                 temperature)
    elif len(val):
        temperature = M.fit_temperature(batched_logits(bundle, val.images), np.asarray(val.targets))
    else:
        log.warning("model %s: empty validation split, temperature left at 1.0", contract.name)
        temperature = 1.0
    logits = batched_logits(bundle, test.images)
    before = bundle.with_temperature(1.0).probabilities(logits).astype(np.float64)
    probs = bundle.with_temperature(temperature).probabilities(logits).astype(np.float64)
    probs /= probs.sum(axis=1, keepdims=True)
    before /= before.sum(axis=1, keepdims=True)

    report = M.classification_report(y, probs, names, quadratic_kappa=quadratic_kappa)
    ece_before = M.expected_calibration_error(before, y, n_bins=CALIBRATION_BINS)
    ece_after = M.expected_calibration_error(probs, y, n_bins=CALIBRATION_BINS)
    head = _headline_ci(headline, _classification_metric(headline, y, probs), len(y), test.groups,
                        n_boot, seed)

    metrics: dict[str, Any] = {
        "accuracy": report["accuracy"],
        "balanced_accuracy": report["balanced_accuracy"],
        "macro_auc": report["macro_auc"],
    }
    if quadratic_kappa:
        metrics["quadratic_kappa"] = report["quadratic_kappa"]
    if "auc" in report:
        metrics["auc"] = report["auc"]
    metrics.update({
        "log_loss": report["log_loss"],
        "ece_before": ece_before,
        "ece_after": ece_after,
        "temperature": float(temperature),
        **head,
        "per_class": {
            name: {key: stats[key] for key in ("support", "sensitivity", "specificity", "precision", "auc")}
            for name, stats in report["per_class"].items()
        },
        "n_test": int(len(y)),
        "n_val": int(len(val)) if val is not None else 0,
    })

    pred = probs.argmax(axis=1)
    roc, pr = _curves(y, probs, names)
    plots: dict[str, list[dict[str, Any]]] = {
        "roc": roc,
        "pr": pr,
        "confusion": [{"actual": names[t], "predicted": names[p]} for t, p in zip(y, pred, strict=True)],
        "calibration": _calibration_rows(before, y, "before") + _calibration_rows(probs, y, "after"),
    }
    images = test.frame["image"].astype(str).tolist() if "image" in test.frame.columns else [""] * len(y)
    predictions = pd.DataFrame({
        "image": images,
        "true": [names[t] for t in y],
        "pred": [names[p] for p in pred],
        **{f"prob_{name}": probs[:, c] for c, name in enumerate(names)},
    })
    log.info("%s: T = %.3f, ECE %.3f -> %.3f, %s = %s on %d test images", contract.name, temperature,
             ece_before, ece_after, headline, head["headline_value"], len(y))
    return Evaluation(task="classification", metrics=_clean(metrics), plots=plots, predictions=predictions,
                      class_names=names, temperature=float(temperature))


# --------------------------------------------------------------------------- segmentation


def _segmentation_metric(
    name: str, dice: np.ndarray, iou: np.ndarray, lesion: np.ndarray
) -> Callable[[np.ndarray], float]:
    """``metric(idx)`` of one segmentation headline on a resample ``idx`` (ValueError when undefined)."""
    if name not in SEGMENTATION_HEADLINES:
        raise ValueError(f"unknown segmentation headline {name!r}; choose one of {SEGMENTATION_HEADLINES}")
    values = dice if name.endswith("dice") else iou

    def scores(idx: np.ndarray) -> float:
        if name.startswith("lesion_"):
            idx = idx[lesion[idx]]
            if len(idx) == 0:
                raise ValueError("no lesion image in the resample")
        return float(np.mean(values[idx]))

    return scores


def evaluate_segmenter(
    bundle: ModelBundle,
    test: SplitData,
    *,
    headline: str = "mean_dice",
    n_boot: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Per-image Dice and IoU of a segmenter on test, at the contract's threshold.

    Args:
        bundle: the trained segmenter (mask logits out).
        test: test split with ``(n, H, W, 1)`` masks in {0, 1}.
        headline: one of :data:`SEGMENTATION_HEADLINES`.
        n_boot: bootstrap resamples of the headline CI (0 = no CI).
        seed: bootstrap seed.

    Returns:
        An :class:`Evaluation` whose ``metrics`` hold ``mean_dice``, ``mean_iou``,
        ``lesion_mean_dice`` / ``lesion_mean_iou`` (images with a lesion only; ``None`` if
        none), ``n_lesion_images``, ``threshold``, the headline with its CI and ``n_test``;
        plots ``dice`` (per image) and ``dice_hist``; predictions per image.

    Raises:
        ValueError: not a segmenter, empty test split, or unknown headline.
    """
    contract = bundle.contract
    if contract.task != "segmentation":
        raise ValueError(f"model {contract.name} is a {contract.task} model, not a segmenter")
    if headline not in SEGMENTATION_HEADLINES:
        raise ValueError(f"unknown segmentation headline {headline!r}; "
                         f"choose one of {SEGMENTATION_HEADLINES}")
    if len(test) == 0:
        raise ValueError(f"model {contract.name}: empty test split")
    threshold = float(contract.threshold)
    probs = bundle.probabilities(batched_logits(bundle, test.images))
    truth = np.asarray(test.targets)
    report = M.segmentation_report(truth, probs, threshold=threshold)
    dice = np.asarray(report["dice_per_image"])
    iou = np.asarray(report["iou_per_image"])
    n = len(dice)
    lesion = truth.reshape(n, -1).max(axis=1) > 0.5

    head = _headline_ci(headline, _segmentation_metric(headline, dice, iou, lesion), n, test.groups,
                        n_boot, seed)
    metrics = {
        "mean_dice": report["mean_dice"],
        "mean_iou": report["mean_iou"],
        "lesion_mean_dice": report["lesion_mean_dice"],
        "lesion_mean_iou": report["lesion_mean_iou"],
        "n_lesion_images": report["n_lesion_images"],
        "threshold": threshold,
        **head,
        "n_test": n,
    }
    images = test.frame["image"].astype(str).tolist() if "image" in test.frame.columns else [""] * n
    counts, edges = np.histogram(dice, bins=DICE_HIST_BINS, range=(0.0, 1.0))
    plots: dict[str, list[dict[str, Any]]] = {
        "dice": [{"image": im, "dice": float(d), "iou": float(v), "lesion": int(le)}
                 for im, d, v, le in zip(images, dice, iou, lesion, strict=True)],
        "dice_hist": [
            {"bin_lower": float(edges[i]), "bin_upper": float(edges[i + 1]), "count": int(counts[i])}
            for i in range(len(counts))
        ],
    }
    pred_pixels = (np.asarray(probs).reshape(n, -1) >= threshold).sum(axis=1)
    predictions = pd.DataFrame({
        "image": images, "lesion": lesion.astype(int), "dice": dice, "iou": iou,
        "true_pixels": (truth.reshape(n, -1) > 0.5).sum(axis=1), "pred_pixels": pred_pixels,
    })
    log.info("%s: mean Dice %.3f, mean IoU %.3f on %d test images (%d with a lesion)", contract.name,
             report["mean_dice"], report["mean_iou"], n, report["n_lesion_images"])
    return Evaluation(task="segmentation", metrics=_clean(metrics), plots=plots, predictions=predictions,
                      class_names=tuple(contract.class_names))


# --------------------------------------------------------------------------- intervals


def metric_intervals(
    evaluation: Evaluation,
    groups: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float | None]]:
    """Every bootstrappable metric of an evaluation with its grouped 95 % bootstrap interval.

    Recomputed from ``evaluation.predictions`` with the same metric functions and the same
    resampling as the headline of :func:`evaluate_classifier` / :func:`evaluate_segmenter`,
    so for the headline metric the interval equals ``headline_ci_low``/``headline_ci_high``
    (same ``groups``, ``n_boot`` and ``seed``).

    Args:
        evaluation: the result of :func:`evaluate_classifier` or :func:`evaluate_segmenter`.
        groups: ``(n,)`` group ids of the evaluated images (patients; whole groups are
            resampled), in the order of ``evaluation.predictions``.
        n_boot: bootstrap resamples (0 = values only, no intervals).
        seed: bootstrap seed.

    Returns:
        Metric name -> ``{"value", "ci_low", "ci_high"}`` (``None`` where undefined):
        classifiers ``accuracy``, ``balanced_accuracy``, ``macro_auc``, ``log_loss``, plus
        ``quadratic_kappa`` when the evaluation reports it and ``auc`` for two classes;
        segmenters every name of :data:`SEGMENTATION_HEADLINES`.

    Raises:
        ValueError: ``groups`` does not have one entry per prediction.
    """
    pred = evaluation.predictions
    n = len(pred)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {g.shape}")
    fns: dict[str, Callable[[np.ndarray], float]] = {}
    if evaluation.task == "classification":
        names = list(evaluation.class_names)
        index = {name: i for i, name in enumerate(names)}
        y = np.asarray([index[str(t)] for t in pred["true"]], dtype=np.int64)
        probs = pred[[f"prob_{name}" for name in names]].to_numpy(np.float64)
        wanted = ["accuracy", "balanced_accuracy", "macro_auc", "log_loss"]
        if "quadratic_kappa" in evaluation.metrics:
            wanted.append("quadratic_kappa")
        if len(names) == 2:
            wanted.append("auc")
        fns = {name: _classification_metric(name, y, probs) for name in wanted}
    else:
        dice = pred["dice"].to_numpy(np.float64)
        iou = pred["iou"].to_numpy(np.float64)
        lesion = pred["lesion"].to_numpy().astype(bool)
        fns = {name: _segmentation_metric(name, dice, iou, lesion) for name in SEGMENTATION_HEADLINES}
    out: dict[str, dict[str, float | None]] = {}
    for name, fn in fns.items():
        head = _headline_ci(name, fn, n, g, n_boot, seed)
        out[name] = {"value": head["headline_value"], "ci_low": head["headline_ci_low"],
                     "ci_high": head["headline_ci_high"]}
    return out


# --------------------------------------------------------------------------- combined view


def eight_category(
    density_probs: np.ndarray,
    tumor_probs: np.ndarray,
    tumor_class_names: Sequence[str],
    *,
    density_names: Sequence[str] = BIRADS_DENSITY,
) -> list[dict[str, Any]]:
    """Combine the density and tumor models into the 8-category view of the older tool.

    The older tool reported one of eight categories, ``<benign|malignant>-<A..D>``:
    pathology crossed with BI-RADS density. Here:

    * the density letter is the arg-max of the density model;
    * the pathology is the more likely of benign and malignant: the tumor model's
      probabilities of those two are renormalised, ``P(m | lesion) = p_m / (p_b + p_m)``
      (0.5 each if both are 0), and ``malignant`` wins ties (the cautious reading). A
      ``normal`` class, if the tumor model has one, does not take part: it is reported
      separately as ``p_normal``, and ``finding`` is the tumor model's own arg-max over
      all its classes (so it may say ``normal`` while the category still names the more
      likely lesion type);
    * the joint probability of category ``(t, d)`` is ``P(density = d) * P(t | lesion)``,
      treating the two models' outputs as independent; the eight values sum to 1 and
      ``category`` is their arg-max.

    Args:
        density_probs: ``(n, 4)`` density probabilities (rows sum to 1), columns in
            ``density_names`` order.
        tumor_probs: ``(n, k)`` tumor probabilities (rows sum to 1).
        tumor_class_names: ``k`` names; must include ``benign`` and ``malignant``.
        density_names: density letters of the columns (BI-RADS ``A``-``D``).

    Returns:
        One dict per image: ``category`` (e.g. ``"malignant-C"``), ``density`` (letter),
        ``pathology`` (``benign`` / ``malignant``), ``finding`` (arg-max tumor class),
        ``p_malignant`` (renormalised), ``p_normal`` (``None`` without a normal class),
        ``confidence`` (joint probability of ``category``) and ``probabilities`` (all
        eight categories -> joint probability).

    Raises:
        ValueError: shapes disagree, a row is not a probability vector, or ``benign`` /
            ``malignant`` is not a tumor class.
    """
    d = np.asarray(density_probs, np.float64)
    t = np.asarray(tumor_probs, np.float64)
    letters = [str(x) for x in density_names]
    names = [str(x).lower() for x in tumor_class_names]
    if d.ndim != 2 or d.shape[1] != len(letters):
        raise ValueError(f"density_probs must be (n, {len(letters)}), got {d.shape}")
    if t.ndim != 2 or t.shape[1] != len(names) or len(t) != len(d):
        raise ValueError(f"tumor_probs must be ({len(d)}, {len(names)}), got {t.shape}")
    for label, p in (("density_probs", d), ("tumor_probs", t)):
        if len(p) and (not np.isfinite(p).all() or p.min() < 0 or np.abs(p.sum(axis=1) - 1).max() > 1e-3):
            raise ValueError(f"{label} rows must be probabilities summing to 1")
    if "benign" not in names or "malignant" not in names:
        raise ValueError(f"tumor classes {list(tumor_class_names)} need 'benign' and 'malignant'")
    ib, im = names.index("benign"), names.index("malignant")
    i_normal = names.index("normal") if "normal" in names else None

    out: list[dict[str, Any]] = []
    for dp, tp in zip(d, t, strict=True):
        lesion = tp[ib] + tp[im]
        p_m = float(tp[im] / lesion) if lesion > 0 else 0.5
        pathology = "malignant" if p_m >= 0.5 else "benign"
        letter = letters[int(np.argmax(dp))]
        joint = {f"{kind}-{lt}": float(dp[j] * (p_m if kind == "malignant" else 1.0 - p_m))
                 for kind in ("benign", "malignant") for j, lt in enumerate(letters)}
        category = f"{pathology}-{letter}"
        out.append({
            "category": category,
            "density": letter,
            "pathology": pathology,
            "finding": str(tumor_class_names[int(np.argmax(tp))]),
            "p_malignant": p_m,
            "p_normal": float(tp[i_normal]) if i_normal is not None else None,
            "confidence": joint[category],
            "probabilities": joint,
        })
    return out


# --------------------------------------------------------------------------- output


def write_evaluation(evaluation: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    """Write an evaluation: ``metrics.json``, ``plots/*.csv``, ``predictions.csv``, ``png/*.png``.

    Plot CSVs (for ``dvc plots``): ``roc.csv`` (class, fpr, tpr), ``pr.csv`` (class, recall,
    precision), ``confusion.csv`` (actual, predicted: one row per test image),
    ``calibration.csv`` (stage before/after, bin, confidence, accuracy ...) for a
    classifier; ``dice.csv`` (per image) and ``dice_hist.csv`` for a segmenter. PNGs:
    ``roc.png``, ``pr.png``, ``confusion.png``, ``calibration.png`` or ``dice_hist.png``.

    Args:
        evaluation: the result of :func:`evaluate_classifier` / :func:`evaluate_segmenter`.
        out_dir: the model's report directory (created).

    Returns:
        Name (``metrics``, ``predictions``, ``<plot>_csv``, ``<plot>_png``) -> path written.
    """
    from breastscan.evaluation import plots

    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(_clean(evaluation.metrics), indent=2, allow_nan=False) + "\n")
    written["metrics"] = metrics_path
    predictions_path = out / "predictions.csv"
    evaluation.predictions.to_csv(predictions_path, index=False, float_format="%.6g")
    written["predictions"] = predictions_path

    for name, rows in evaluation.plots.items():
        columns = list(PLOT_COLUMNS.get(name, rows[0].keys() if rows else ()))
        path = out / "plots" / f"{name}.csv"
        pd.DataFrame(rows, columns=columns).to_csv(path, index=False, float_format="%.6g")
        written[f"{name}_csv"] = path

    png = out / "png"
    p = evaluation.plots
    if evaluation.task == "classification":
        aucs = {n: s.get("auc") for n, s in evaluation.metrics.get("per_class", {}).items()}
        written["roc_png"] = plots.plot_roc(p.get("roc", []), png / "roc.png", aucs=aucs)
        written["pr_png"] = plots.plot_pr(p.get("pr", []), png / "pr.png")
        written["confusion_png"] = plots.plot_confusion(p.get("confusion", []), evaluation.class_names,
                                                        png / "confusion.png")
        written["calibration_png"] = plots.plot_calibration(p.get("calibration", []), png / "calibration.png")
    else:
        written["dice_hist_png"] = plots.plot_dice_hist([r["dice"] for r in p.get("dice", [])],
                                                        png / "dice_hist.png", bins=DICE_HIST_BINS)
    log.info("wrote evaluation of %d test images to %s", evaluation.metrics.get("n_test", 0), out)
    return written
