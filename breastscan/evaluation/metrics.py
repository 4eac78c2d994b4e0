"""Evaluation metrics as plain numpy / scikit-learn functions (no TensorFlow import).

Classification: :func:`classification_report` (accuracy, per-class sensitivity and
specificity, one-vs-rest AUC, confusion matrix, kappa, log loss), calibration
(:func:`expected_calibration_error`, :func:`calibration_curve_data`) and temperature
scaling (:func:`fit_temperature`, :func:`apply_temperature`). Segmentation:
:func:`dice_score`, :func:`iou_score`, :func:`segmentation_report`. Uncertainty:
:func:`bootstrap_ci`. Results are plain Python floats/lists, ready for JSON.

The Keras (in-graph) segmentation metrics live in :mod:`breastscan.models.losses`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_PROB_SUM_TOL = 1e-3


def finite_float(value: Any) -> float | None:
    """``float(value)`` when that is a finite number (numbers, numeric text such as MLflow
    tag values, 0-d arrays); ``None`` for anything else, booleans included."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# --------------------------------------------------------------------------- activations


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax.

    Args:
        logits: ``(..., k)`` real array.
        axis: the class axis.

    Returns:
        Probabilities of the same shape (float64 unless given float32), summing to 1 along
        ``axis``.
    """
    z = np.asarray(logits, dtype=np.result_type(np.asarray(logits).dtype, np.float32))
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function ``1 / (1 + exp(-x))``, elementwise, in [0, 1]."""
    from scipy.special import expit

    return expit(np.asarray(x, dtype=np.result_type(np.asarray(x).dtype, np.float32)))


# --------------------------------------------------------------------------- validation


def _check_labels_probs(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(y (n,) int, p (n, k) float64)``; a 1-D ``probs`` is P(class 1) of a binary task."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if y.ndim != 1 or p.ndim != 2 or len(y) != len(p):
        raise ValueError(f"need y_true (n,) and probs (n, k); got {y.shape} and {np.shape(probs)}")
    if len(y) == 0:
        raise ValueError("no samples")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    k = p.shape[1]
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true holds class indices outside [0, {k - 1}]")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probs must be finite probabilities in [0, 1] (did you pass logits?)")
    sums = p.sum(axis=1)
    if np.abs(sums - 1.0).max() > _PROB_SUM_TOL:
        raise ValueError("each row of probs must sum to 1 (apply softmax to logits first)")
    return y, p / sums[:, None]  # remove float32 round-off


def _none_if_nan(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# --------------------------------------------------------------------------- classification


def classification_report(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    quadratic_kappa: bool = False,
) -> dict[str, Any]:
    """Summarise a classifier's predictions.

    The predicted class is ``argmax(probs)``. One-vs-rest ROC AUC of class ``c`` uses
    ``probs[:, c]``; it is ``None`` when ``y_true`` lacks class ``c`` (or holds only ``c``),
    and the macro AUC averages the defined ones.

    Args:
        y_true: ``(n,)`` int class indices in ``[0, k)``.
        probs: ``(n, k)`` probabilities, rows summing to 1.
        class_names: ``k`` names, in index order (from :mod:`breastscan.labels`).
        quadratic_kappa: also report quadratic-weighted Cohen's kappa (ordinal labels such
            as breast density).

    Returns:
        A JSON-able dict: ``n``, ``class_names``, ``accuracy``, ``balanced_accuracy`` (mean
        recall over the classes present in ``y_true``), ``per_class`` (name ->
        ``support``, ``sensitivity``, ``specificity``, ``precision``, ``auc``; undefined values
        are ``None``), ``macro_auc``, ``confusion_matrix`` (list of lists, rows = true, columns
        = predicted), ``log_loss``, and ``quadratic_kappa`` when asked, ``auc`` (of class
        index 1, the positive class) when ``k == 2``.

    Raises:
        ValueError: shapes disagree, labels are out of range, or probs are not probabilities.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        cohen_kappa_score,
        confusion_matrix,
        log_loss,
        roc_auc_score,
    )

    y, p = _check_labels_probs(y_true, probs)
    k = p.shape[1]
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} probability columns")
    labels = list(range(k))
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=labels)
    n = int(len(y))

    per_class: dict[str, dict[str, Any]] = {}
    aucs: list[float] = []
    for c, name in enumerate(names):
        tp = int(cm[c, c])
        fn = int(cm[c, :].sum() - tp)
        fp = int(cm[:, c].sum() - tp)
        tn = n - tp - fn - fp
        positives = (y == c)
        auc = None
        if 0 < positives.sum() < n:
            auc = float(roc_auc_score(positives.astype(int), p[:, c]))
            aucs.append(auc)
        per_class[name] = {
            "support": tp + fn,
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "auc": auc,
        }

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" etc.
        report: dict[str, Any] = {
            "n": n,
            "class_names": names,
            "accuracy": float(accuracy_score(y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "per_class": per_class,
            "macro_auc": float(np.mean(aucs)) if aucs else None,
            "confusion_matrix": cm.astype(int).tolist(),
            "log_loss": float(log_loss(y, p, labels=labels)),
        }
        if quadratic_kappa:
            kappa = cohen_kappa_score(y, pred, weights="quadratic", labels=labels)
            report["quadratic_kappa"] = _none_if_nan(float(kappa))
    if k == 2:
        report["auc"] = per_class[names[1]]["auc"]
    return report


# --------------------------------------------------------------------------- calibration


def _top_label_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _check_labels_probs(y_true, probs)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # Bins are (lower, upper]; a confidence of exactly 0 goes to the first bin.
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return count, conf_sum, acc_sum


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width confidence bins.

    ``ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|`` where the confidence is
    the largest probability and accuracy whether the arg-max is the true class.

    Args:
        probs: ``(n, k)`` probabilities (or ``(n,)`` P(class 1) of a binary task).
        y_true: ``(n,)`` int class indices.
        n_bins: number of bins over [0, 1].

    Returns:
        ECE in [0, 1].
    """
    count, conf_sum, acc_sum = _top_label_bins(probs, y_true, n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / count.sum())


def calibration_curve_data(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Per-bin data of a top-label reliability diagram.

    Args:
        probs: ``(n, k)`` probabilities (or ``(n,)`` P(class 1) of a binary task).
        y_true: ``(n,)`` int class indices.
        n_bins: number of equal-width bins over [0, 1].

    Returns:
        A JSON-able dict of lists, one entry per bin: ``bin_lower``, ``bin_upper``,
        ``confidence`` (mean top probability), ``accuracy`` (fraction correct) — both
        ``None`` for an empty bin — and ``count``; plus ``ece`` and ``n_bins``.
    """
    count, conf_sum, acc_sum = _top_label_bins(probs, y_true, n_bins)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    return {
        "n_bins": int(n_bins),
        "bin_lower": edges[:-1].tolist(),
        "bin_upper": edges[1:].tolist(),
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count, strict=True)],
        "accuracy": [float(s / c) if c else None for s, c in zip(acc_sum, count, strict=True)],
        "count": count.astype(int).tolist(),
        "ece": float(np.abs(acc_sum - conf_sum).sum() / count.sum()),
    }


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    from scipy.special import log_softmax

    logp = log_softmax(logits / temperature, axis=1)
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(
    logits: np.ndarray,
    y_true: np.ndarray,
    *,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """Fit the temperature ``T`` of temperature scaling by minimising the mean NLL.

    ``softmax(logits / T)`` with ``T > 1`` softens over-confident predictions; the search
    is a bounded scalar minimisation over ``log T``.

    Args:
        logits: ``(n, k)`` validation logits (the model's output, before softmax).
        y_true: ``(n,)`` int class indices.
        bounds: search interval for ``T``.

    Returns:
        The fitted temperature (> 0).
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64)
    if z.ndim != 2 or y.shape != (len(z),) or len(z) == 0:
        raise ValueError(f"need logits (n, k) and y_true (n,); got {z.shape} and {y.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"y_true holds class indices outside [0, {z.shape[1] - 1}]")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    result = minimize_scalar(
        lambda log_t: _nll(z, y, math.exp(log_t)),
        bounds=(math.log(lo), math.log(hi)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    temperature = float(math.exp(result.x))
    logger.debug("temperature %.4f: NLL %.4f -> %.4f", temperature, _nll(z, y, 1.0), result.fun)
    return temperature


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / T)``.

    Args:
        logits: ``(n, k)`` logits.
        temperature: ``T > 0`` from :func:`fit_temperature`.

    Returns:
        ``(n, k)`` probabilities in [0, 1], rows summing to 1.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=-1)


# --------------------------------------------------------------------------- segmentation


def _binary_pair(true: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(true).astype(bool)
    p = np.asarray(pred).astype(bool)
    if t.shape != p.shape:
        raise ValueError(f"mask shapes differ: {t.shape} vs {p.shape}")
    return t, p


def dice_score(true: np.ndarray, pred: np.ndarray) -> float:
    """Dice ``2|T∩P| / (|T| + |P|)`` of two binary masks; 1.0 when both are empty.

    Args:
        true: ``(H, W)`` bool (or {0, 1}) ground truth.
        pred: ``(H, W)`` bool (or {0, 1}) prediction.

    Returns:
        Dice in [0, 1].
    """
    t, p = _binary_pair(true, pred)
    denom = int(t.sum()) + int(p.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(t, p).sum()) / denom


def iou_score(true: np.ndarray, pred: np.ndarray) -> float:
    """Intersection over union ``|T∩P| / |T∪P|`` of two binary masks; 1.0 when both are empty.

    Args:
        true: ``(H, W)`` bool (or {0, 1}) ground truth.
        pred: ``(H, W)`` bool (or {0, 1}) prediction.

    Returns:
        IoU in [0, 1].
    """
    t, p = _binary_pair(true, pred)
    union = int(np.logical_or(t, p).sum())
    return 1.0 if union == 0 else int(np.logical_and(t, p).sum()) / union


def segmentation_report(
    true_masks: np.ndarray,
    pred_probs: np.ndarray,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Per-image Dice and IoU of thresholded predictions, and their means.

    Args:
        true_masks: ``(n, H, W)`` (or ``(n, H, W, 1)``) ground truth, bool or {0, 1}
            (values > 0.5 are foreground).
        pred_probs: same shape, predicted probabilities in [0, 1] (apply
            :func:`sigmoid` to U-Net logits first).
        threshold: a pixel is foreground when its probability is ``>= threshold``.

    Returns:
        A JSON-able dict: ``n_images``, ``threshold``, ``mean_dice``, ``mean_iou``,
        ``dice_per_image``, ``iou_per_image``, ``n_lesion_images`` (non-empty truth) and
        ``lesion_mean_dice`` / ``lesion_mean_iou`` over those images (``None`` if none).
    """
    t = np.asarray(true_masks)
    p = np.asarray(pred_probs, dtype=np.float64)
    if t.ndim == 4 and t.shape[-1] == 1:
        t = t[..., 0]
    if p.ndim == 4 and p.shape[-1] == 1:
        p = p[..., 0]
    if t.ndim != 3 or t.shape != p.shape:
        raise ValueError(f"need true_masks and pred_probs of shape (n, H, W); got {t.shape}, {p.shape}")
    if len(t) == 0:
        raise ValueError("no images")
    truth = t > 0.5 if t.dtype != bool else t
    pred = p >= threshold
    dice = [dice_score(a, b) for a, b in zip(truth, pred, strict=True)]
    iou = [iou_score(a, b) for a, b in zip(truth, pred, strict=True)]
    lesion = truth.reshape(len(truth), -1).any(axis=1)
    n_lesion = int(lesion.sum())
    return {
        "n_images": int(len(t)),
        "threshold": float(threshold),
        "mean_dice": float(np.mean(dice)),
        "mean_iou": float(np.mean(iou)),
        "dice_per_image": [float(d) for d in dice],
        "iou_per_image": [float(v) for v in iou],
        "n_lesion_images": n_lesion,
        "lesion_mean_dice": float(np.mean(np.asarray(dice)[lesion])) if n_lesion else None,
        "lesion_mean_iou": float(np.mean(np.asarray(iou)[lesion])) if n_lesion else None,
    }


# --------------------------------------------------------------------------- uncertainty


def bootstrap_ci(
    metric: Callable[[np.ndarray], float],
    n: int,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a metric.

    ``metric`` receives an index array (a resample of ``range(n)``, with repeats) and
    returns the metric on those samples, e.g.
    ``lambda idx: roc_auc_score(y[idx], p[idx])``. Resamples where the metric is undefined
    (it raises ``ValueError`` or returns NaN, e.g. one class only) are skipped.

    Args:
        metric: function of an ``(m,)`` int index array returning a float.
        n: number of samples.
        n_boot: number of bootstrap resamples.
        alpha: 1 - confidence level (0.05 gives a 95 % interval).
        seed: seed of the resampling (same seed, same interval).
        groups: ``(n,)`` group ids (e.g. patient ids); whole groups are resampled so that
            correlated samples stay together.

    Returns:
        ``(low, high)``: the ``alpha/2`` and ``1 - alpha/2`` percentiles.

    Raises:
        ValueError: bad arguments, or the metric is undefined on every resample.
    """
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    members: list[np.ndarray] | None = None
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise ValueError(f"groups must have shape ({n},), got {g.shape}")
        _, inverse = np.unique(g, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse)
        members = np.split(order, np.cumsum(counts)[:-1])

    stats: list[float] = []
    skipped = 0
    for _ in range(int(n_boot)):
        if members is None:
            idx = rng.integers(0, n, size=n)
        else:
            chosen = rng.integers(0, len(members), size=len(members))
            idx = np.concatenate([members[i] for i in chosen])
        try:
            value = float(metric(idx))
        except ValueError:
            skipped += 1
            continue
        if math.isnan(value):
            skipped += 1
            continue
        stats.append(value)
    if not stats:
        raise ValueError("the metric is undefined on every bootstrap resample")
    if skipped:
        logger.info("bootstrap: skipped %d of %d resamples where the metric is undefined", skipped, n_boot)
    low, high = np.quantile(np.asarray(stats), [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)
